"""What an operator asks during or after a run: counts, rate, the oldest open delivery, failures."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.delivery import counts_by_status, failure_reasons
from digest.models import Delivery, DeliveryStatus, Digest
from digest.reputation import PauseRules


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
        counts=counts_by_status(session, digest.id),
        rate_per_second=rate,
        oldest_open=oldest,
        failures=failure_reasons(session, digest.id, limit=20),
    )


def reputation_lines(session: Session, now: dt.datetime, rules: PauseRules) -> list[str]:
    from digest.reputation import active_pause, complaints_in, counted_complaints, sent_in

    complaints, sent = complaints_in(session, now, rules.window), sent_in(session, now, rules.window)
    counted, domains = counted_complaints(session, now, rules)
    rate = complaints / sent if sent else 0.0
    pause = active_pause(session)
    lines = [
        f"complaint rate (last {rules.window.days} days): {rate:.2%} ({complaints} of {sent} sent;"
        f" {counted} count toward a pause, from {domains} domains); "
        + ("SENDING PAUSED" if pause else "sending on")
        + f", pause threshold {rules.threshold:.2%} and at least {rules.min_complaints} complaints"
        f" from {rules.min_domains} domains"
    ]
    if pause is not None:
        lines.append(
            f"SENDING PAUSED since {pause.paused_at:%Y-%m-%d %H:%M} UTC: {pause.reason}"
            " (resume with `digest sending resume`)"
        )
    return lines


def status_for(session: Session, day: dt.date | None) -> list[EditionStatus]:
    """The editions of ``day`` (default: the newest day that has one)."""
    if day is None:
        day = session.scalar(select(func.max(Digest.date)))
        if day is None:
            return []
    digests = session.scalars(select(Digest).where(Digest.date == day).order_by(Digest.kind))
    return [edition_status(session, d) for d in digests]
