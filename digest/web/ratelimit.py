"""Request rate limits shared by every web process (Redis via ``limits``; memory without Redis)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from digest.core.errors import RateLimited

__all__ = ["RateLimited", "Rule", "WebLimits"]


@dataclass(frozen=True)
class Rule:
    name: str  # namespace in the store, e.g. "subscribe-ip"
    limit: RateLimitItem


# Every state-changing endpoint a link token opens, limited twice (issue 18: any self-made
# subscription gives a token, and each preferences save costs ~90 ms of CPU and a row or two):
# - per token ("subscriber"): keyed on the subscriber the signed token names, not the token's
#   text, so the fresh links a confirmed reader can keep asking for share one budget;
# - per client ("ip", ``client_ip``: an IPv4 address or an IPv6 /64), higher, because a
#   household or an office behind one address holds several subscriptions.
# A reader clicking through a whole digest (up to 30 papers, both links) stays well inside
# "feedback"; someone reworking their preferences by trial and error inside the others.
TOKEN_LIMITS: dict[str, tuple[str, str]] = {
    # action: (per token, per client)
    "preferences": ("30/hour", "120/hour"),  # POST /preferences/{token}
    "teach": ("30/hour", "120/hour"),  # POST /preferences/{token}/teach/{save,undo,reset}
    "data-link": ("5/hour", "20/hour"),  # POST /preferences/{token}/data-link (mail is capped too)
    "feedback": ("120/hour", "300/hour"),  # POST /feedback/{token}/{more,less}
    "delete": ("10/hour", "30/hour"),  # POST /my-data/{token}/delete
}


class WebLimits:
    """Named limits; ``hit`` raises ``RateLimited`` (with seconds to wait) when one is used up.

    ``per_ip`` (``DIGEST_RATE_LIMIT_SUBSCRIBE_PER_IP``) is the per-client limit of the forms a
    stranger fills in (sign-up, resend, console sign-in); ``TOKEN_LIMITS`` those of the links.
    """

    def __init__(self, redis_url: str | None, *, per_ip: str):
        self.storage = storage_from_string(redis_url or "memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.per_ip = parse(per_ip)
        self.per_token = {action: (parse(token), parse(client)) for action, (token, client) in TOKEN_LIMITS.items()}

    def hit(self, action: str, kind: str, key: str) -> None:
        """Requests per client; what a request may make us mail is ``digest.subscribers.confirmation_limits``."""
        limit = self.per_ip
        if action in self.per_token:
            token_limit, client_limit = self.per_token[action]
            limit = token_limit if kind == "subscriber" else client_limit
        identity = hashlib.sha256(key.encode()).hexdigest()[:32]
        if not self.limiter.hit(limit, "digest-web", action, kind, identity):
            stats = self.limiter.get_window_stats(limit, "digest-web", action, kind, identity)
            raise RateLimited(max(1, math.ceil(stats.reset_time - time.time())))

    def hit_link(self, action: str, client: str, subscriber_of: Callable[[], int | None]) -> None:
        """One request to a token's state-changing endpoint: counted per client first (so
        forged tokens count too), then per subscriber the token names (``subscriber_of``
        verifies it; None for a forged or expired token, which the handler then refuses)."""
        self.hit(action, "ip", client)
        subscriber_id = subscriber_of()
        if subscriber_id is not None:
            self.hit(action, "subscriber", str(subscriber_id))
