"""What an operator asks during or after a run: counts, rate, the oldest open delivery, failures."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.core.models import Digest
from digest.delivery.reputation import PauseRules


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
    # Imported here: the ledger module brings the whole delivery code (composer, rendering),
    # which `digest status` with no edition yet, and `status --check`, never need.
    from digest.delivery.ledger import counts_by_status, failure_reasons, oldest_open, send_span

    first, last, sent = send_span(session, digest.id)
    rate = None
    if first is not None and last is not None and sent > 1 and last > first:
        rate = (sent - 1) / (last - first).total_seconds()
    oldest = oldest_open(session, digest.id)
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
    """Live ledger counts plus those of rows compaction removed (``digest.delivery.compaction``)."""
    from digest.delivery.ledger import compacted_counts

    for status, n in compacted_counts(session, digest_id).items():
        counts[status] = counts.get(status, 0) + n
    return counts


def sending_paused_now(session: Session, now: dt.datetime, rules: PauseRules) -> bool:
    """Whether sending is paused (a latched pause): the one place `digest status`, its --check
    and /metrics ask. Workers latch a pause when complaints trip ``rules`` before a batch."""
    from digest.delivery.reputation import active_pause

    return active_pause(session) is not None


def reputation_lines(session: Session, now: dt.datetime, rules: PauseRules) -> list[str]:
    from digest.delivery.reputation import active_pause, complaints_in, counted_complaints, sent_in

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


# How far back open deliveries are looked for; the sweep reaches as far.
OPEN_HORIZON = dt.timedelta(days=7)


def oldest_due(session: Session, now: dt.datetime) -> dt.datetime | None:
    """Since when the longest-waiting sendable delivery has been due (None: nothing is waiting).

    Due: pending since it was planned or since its retry time, or ``sending`` whose worker's
    lease ran out. A retry waiting for its backoff is not due yet. Only recent editions are
    read, through the (edition, status) index.
    """
    from digest.delivery.ledger import oldest_due as due_since

    recent = list(session.scalars(select(Digest.id).where(Digest.date >= (now - OPEN_HORIZON).date())))
    if not recent:
        return None
    found = due_since(session, recent, now)
    return min((t if t.tzinfo else t.replace(tzinfo=dt.UTC) for t in found), default=None)


@dataclass(frozen=True)
class Probe:
    """What `digest status --check` found in Redis and among the workers (only with Redis)."""

    redis_configured: bool = False
    redis_error: str | None = None
    beat_age_seconds: float | None = None  # None: beat never wrote a heartbeat
    beat_stale_after_seconds: float = 300.0
    workers_answering: bool = False


def check_problems(
    session: Session, now: dt.datetime, rules: PauseRules, late_after: dt.timedelta, probe: Probe
) -> list[str]:
    """Every reason an operator should be woken, each one line; empty means all is well."""
    problems: list[str] = []
    if probe.redis_configured:
        if probe.redis_error is not None:
            problems.append(f"Redis is not reachable: {probe.redis_error}")
        else:
            if probe.beat_age_seconds is None:
                problems.append("beat has never written a heartbeat (is `celery -A workers beat` running?)")
            elif probe.beat_age_seconds > probe.beat_stale_after_seconds:
                problems.append(f"beat heartbeat is stale: last written {probe.beat_age_seconds:.0f} s ago")
            if not probe.workers_answering:
                problems.append("no Celery worker answered a ping")
    if sending_paused_now(session, now, rules):
        problems.append("sending is paused (see `digest status`; lift it with `digest sending resume`)")
    due = oldest_due(session, now)
    if due is not None and now - due > late_after:
        minutes = (now - due).total_seconds() / 60
        problems.append(f"a delivery is late: due {minutes:.0f} min ago ({due:%Y-%m-%d %H:%M} UTC) and not sent")
    return problems


def status_for(session: Session, day: dt.date | None) -> list[EditionStatus]:
    """The editions of ``day`` (default: the newest day that has one)."""
    if day is None:
        day = session.scalar(select(func.max(Digest.date)))
        if day is None:
            return []
    digests = session.scalars(select(Digest).where(Digest.date == day).order_by(Digest.kind))
    return [edition_status(session, d) for d in digests]
