"""What an operator asks during or after a run: counts, rate, the oldest open delivery, failures."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.delivery import counts_by_status, failure_reasons
from digest.models import Delivery, DeliveryStatus, Digest


@dataclass
class EditionStatus:
    kind: str
    day: dt.date
    counts: dict[str, int]
    rate_per_second: float | None
    oldest_open: dt.datetime | None
    failures: list[str] = field(default_factory=list)

    def lines(self, now: dt.datetime) -> list[str]:
        c = self.counts
        out = [
            f"{self.kind} digest {self.day}: "
            + ", ".join(f"{name} {c.get(name, 0)}" for name in ("sent", "sending", "pending", "failed", "skipped"))
        ]
        if self.rate_per_second is not None:
            out.append(f"  send rate: {self.rate_per_second:.1f} messages/s")
        if self.oldest_open is not None:
            age = now - self.oldest_open
            out.append(
                f"  oldest open delivery: planned {self.oldest_open:%Y-%m-%d %H:%M} UTC"
                f" ({age.total_seconds() / 60:.0f} min ago)"
            )
        out.extend(f"  failed: {reason}" for reason in self.failures)
        return out


def edition_status(session: Session, digest: Digest) -> EditionStatus:
    first, last, sent = session.execute(
        select(func.min(Delivery.sent_at), func.max(Delivery.sent_at), func.count(Delivery.sent_at)).where(
            Delivery.digest_id == digest.id, Delivery.status == DeliveryStatus.SENT
        )
    ).one()
    rate = None
    if first is not None and last is not None and sent > 1 and last > first:
        rate = (sent - 1) / (last - first).total_seconds()
    oldest = session.scalar(
        select(func.min(Delivery.created_at)).where(
            Delivery.digest_id == digest.id,
            Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
        )
    )
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return EditionStatus(
        kind=digest.kind.value,
        day=digest.date,
        counts=with_compacted(session, digest.id, counts_by_status(session, digest.id)),
        rate_per_second=rate,
        oldest_open=oldest,
        failures=failure_reasons(session, digest.id, limit=20),
    )


def with_compacted(session: Session, digest_id: int, counts: dict[str, int]) -> dict[str, int]:
    """Live ledger counts plus those of rows compaction removed (``digest.compaction``)."""
    from digest.compaction import compacted_counts

    for status, n in compacted_counts(session, digest_id).items():
        counts[status] = counts.get(status, 0) + n
    return counts


def reputation_lines(
    session: Session, now: dt.datetime, window_days: int, threshold: float, min_sent: int
) -> list[str]:
    from digest.reputation import complaints_in, sending_paused, sent_in

    window = dt.timedelta(days=window_days)
    complaints, sent = complaints_in(session, now, window), sent_in(session, now, window)
    rate = complaints / sent if sent else 0.0
    paused = sending_paused(session, now, threshold, window=window, min_sent=min_sent)
    return [
        f"complaint rate (last {window_days} days): {rate:.2%} ({complaints} of {sent} sent); "
        + ("SENDING PAUSED" if paused else "sending on")
        + f", pause threshold {threshold:.2%}"
    ]


def status_for(session: Session, day: dt.date | None) -> list[EditionStatus]:
    """The editions of ``day`` (default: the newest day that has one)."""
    if day is None:
        day = session.scalar(select(func.max(Digest.date)))
        if day is None:
            return []
    digests = session.scalars(select(Digest).where(Digest.date == day).order_by(Digest.kind))
    return [edition_status(session, d) for d in digests]
