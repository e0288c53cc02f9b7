"""The retry and bounce policy: what a failed attempt leads to, and when it is tried again.

The mailer says what happened (``digest.transport.mailer.SendError``): ``permanent`` for an SMTP 5xx,
temporary for a 4xx or a connection problem, and at which stage, so that only a refusal at
``RCPT`` is about the recipient. This module decides what follows from that: a temporary
failure is retried after an exponential backoff with jitter until ``max_attempts``; a permanent
one, or the last attempt, fails the delivery. A failure about the recipient is a bounce (hard
when permanent); what a bounce does to the subscriber is decided in ``digest.subscribers.subscriptions``.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named: importing the mailer (aiosmtplib) would slow `digest status`
    from digest.transport.mailer import SendError


@dataclass(frozen=True)
class DeliveryPolicy:
    """Picks per digest and their weighing, leases, retries, and the soft-bounce rule that
    ``digest.subscribers.subscriptions.record_bounce`` applies (its ``BounceRules``)."""

    digest_size: int = 10
    max_attempts: int = 6
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    lease_seconds: int = 120
    stale_after: dt.timedelta = dt.timedelta(hours=20)
    relevance_weight: float = 0.7
    soft_bounce_threshold: int = 3
    soft_bounce_window: dt.timedelta = dt.timedelta(days=7)
    # Rows claimed at a time within a batch: a whole page of the default DIGEST_BATCH_SIZE.
    # Chunks of 100 cost 0.23-0.34 commits per message against 0.18-0.19 (bench/README.md,
    # issue 22); an unsubscribe while the rows wait is still caught by the batch's recheck, and
    # a dead worker's rows come back when their lease runs out, as before.
    claim_chunk: int = 500

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped."""
        ceiling = min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    def retry_at(self, error: SendError, attempts: int, now: dt.datetime) -> dt.datetime | None:
        """When a delivery that failed its ``attempts``-th attempt is tried again; None: never."""
        if error.permanent or attempts >= self.max_attempts:
            return None
        return now + dt.timedelta(seconds=self.backoff(attempts))


def is_bounce(error: SendError) -> bool:
    """Whether a failure counts against the recipient (hard when ``error.permanent``).

    Only a refusal of the recipient is about them; a refused sender, rejected content or an
    unreachable relay must not bounce anyone.
    """
    return error.about_recipient
