"""Send-time rate limits shared by every worker through Redis (the ``limits`` library).

Applied when a message is about to go out, not when tasks are queued: queued work can pile up
freely, but the mail servers downstream see at most the configured rate overall and per
recipient domain, however many workers run.
"""

from __future__ import annotations

import asyncio
import time

from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from digest.transport.limiter import RateLimiter


class RedisSendLimiter(RateLimiter):
    def __init__(self, redis_url: str, per_second: float, per_domain_per_second: float):
        self._limiter = MovingWindowRateLimiter(storage_from_string(redis_url))
        # Whole-second windows with the rate as the count: 0.5/s becomes 1 per 2 seconds.
        self._overall = _item(per_second)
        self._per_domain = _item(per_domain_per_second)

    async def acquire(self, domain: str) -> None:
        for item, key in ((self._overall, "all"), (self._per_domain, f"domain:{domain.lower()}")):
            if item is None:
                continue
            while not self._limiter.hit(item, "digest-send", key):
                reset_at = self._limiter.get_window_stats(item, "digest-send", key).reset_time
                await asyncio.sleep(min(1.0, max(0.001, reset_at - time.time())))


def _item(rate: float) -> RateLimitItemPerSecond | None:
    if rate <= 0:
        return None
    if rate >= 1:
        return RateLimitItemPerSecond(round(rate), 1)
    return RateLimitItemPerSecond(1, max(1, round(1 / rate)))
