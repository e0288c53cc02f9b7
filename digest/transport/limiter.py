"""The send-time rate limiter's interface, with no limit: a ground module.

The batch sender takes one, the runtime picks one and ``digest.transport.ratelimit`` implements it on
Redis; keeping the interface below all three means neither the runtime nor the Redis limiter
has to import the sender to name it.
"""

from __future__ import annotations


class RateLimiter:
    """No limit; the Redis-backed limiter in ``digest.transport.ratelimit`` shares one across workers."""

    async def acquire(self, domain: str) -> None:
        return None
