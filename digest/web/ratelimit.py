"""Request rate limits shared by every web process (Redis via ``limits``; memory without Redis)."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from digest.errors import DigestError


class RateLimited(DigestError):
    def __init__(self, retry_after: int):
        super().__init__("Too many requests. Please try again later.")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rule:
    name: str  # namespace in the store, e.g. "subscribe-ip"
    limit: RateLimitItem


class WebLimits:
    """Named limits; ``hit`` raises ``RateLimited`` (with seconds to wait) when one is used up."""

    def __init__(self, redis_url: str | None, *, per_ip: str):
        self.storage = storage_from_string(redis_url or "memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.per_ip = parse(per_ip)

    def hit(self, action: str, kind: str, key: str) -> None:
        """Requests per client; what a request may make us mail is ``digest.confirmation_limits``."""
        limit = self.per_ip
        identity = hashlib.sha256(key.encode()).hexdigest()[:32]
        if not self.limiter.hit(limit, "digest-web", action, kind, identity):
            stats = self.limiter.get_window_stats(limit, "digest-web", action, kind, identity)
            raise RateLimited(max(1, math.ceil(stats.reset_time - time.time())))
