"""When each subscriber's digest goes out: at their hour, in their time zone, daily or weekly.

Beat calls ``dispatch_due`` once an hour. It works out which (time zone, hour) pairs reach their
local hour in the UTC hour that just started, picks the edition each of them is due, and hands
the matching subscribers to ``digest.pipeline.dispatch`` (keyset pages, a commit per page, then
``enqueue``). Nothing here loads subscribers: the due set is an SQL filter.

Rules:

* A subscriber's hour is due at the first instant their local clock shows it: when a DST change
  skips the hour (02:00 on a spring-forward night) it is due at the moment of the change, and an
  hour that happens twice (autumn) is due only the first time. So DST neither skips nor doubles
  a day; the unique (subscriber, edition) ledger row guards against doubles as well.
* Daily subscribers get the edition of the day before their local date: by their morning that
  day is over. Days without papers have no edition, so weekends and quiet days send nothing
  (no empty emails).
* Weekly subscribers get, on their weekday (Monday = 0), the weekly edition of the seven days
  up to the day before their local date, built here when first needed.
* Paused, pending and unsubscribed subscribers get nothing (``due_subscriber_page``).
* An unknown time-zone name is treated as UTC (the documented default).
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session

from digest.db import transaction
from digest.delivery.composer import DigestComposer, build_digest
from digest.models import Delivery, Digest, DigestItem, DigestKind, Frequency, Subscriber, SubscriberStatus
from digest.pipeline import composer_of, dispatch
from digest.ranking import TrendingWeights
from digest.runtime import Runtime

HOUR = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Slot:
    """Subscribers in ``timezone`` whose ``hour`` is due now, on their local ``date``."""

    timezone: str
    hour: int
    date: dt.date


def _zone(name: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def due_slots(timezones: Iterable[str], now: dt.datetime, hours: int = 1) -> list[Slot]:
    """The local hours that start in the UTC hour ``now`` falls in (or in the ``hours`` UTC hours
    up to it), per time zone.

    A local hour H on date D starts at ``datetime(D, H, tzinfo=zone)`` with ``fold=0``: for an
    hour that does not exist (spring forward) that is the instant of the change, for one that
    happens twice its first occurrence. Due: that instant lies in (hour start - 1 h, hour start].
    """
    end = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    start = end - hours * HOUR
    slots = []
    for name in sorted(set(timezones)):
        zone = _zone(name)
        first = (start + dt.timedelta(microseconds=1)).astimezone(zone).date()
        last = end.astimezone(zone).date()
        for day in (first + dt.timedelta(days=n) for n in range((last - first).days + 1)):
            for hour in range(24):
                instant = dt.datetime.combine(day, dt.time(hour), tzinfo=zone).astimezone(dt.UTC)
                if start < instant <= end:
                    slots.append(Slot(name, hour, day))
    return slots


def _slot_filter(slots: Iterable[Slot], weekly: bool) -> ColumnElement[bool]:
    """SQL for "a subscriber of one of these slots"; weekly ones must be on their weekday."""
    hours: dict[tuple[str, int | None], set[int]] = defaultdict(set)
    for slot in slots:
        hours[(slot.timezone, slot.date.weekday() if weekly else None)].add(slot.hour)
    clauses = []
    for (zone, weekday), wanted in sorted(hours.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        clause = and_(Subscriber.timezone == zone, Subscriber.send_hour.in_(sorted(wanted)))
        if weekday is not None:
            clause = and_(clause, Subscriber.weekday == weekday)
        clauses.append(clause)
    return or_(*clauses)


def due_editions(
    session: Session, slots: list[Slot], weights: TrendingWeights, *, refresh_weekly: bool = True
) -> list[tuple[int, ColumnElement[bool]]]:
    """(edition id, subscriber filter) for every edition due in these slots, daily then weekly.

    A weekly edition is (re)built here when someone is due for it; with ``refresh_weekly``
    False an existing one is used as it is (catching up must not reorder an edition that
    others already received)."""
    if not slots:
        return []
    dates = {s.date for s in slots}
    has_items = exists().where(DigestItem.digest_id == Digest.id)
    dailies = {
        d.date: d.id
        for d in session.scalars(
            select(Digest).where(
                Digest.kind == DigestKind.DAILY,
                Digest.date.between(min(dates) - dt.timedelta(days=1), max(dates)),
                has_items,
            )
        )
    }
    daily_slots: dict[int, list[Slot]] = defaultdict(list)
    weekly_slots: dict[int, list[Slot]] = defaultdict(list)
    for slot in slots:
        # Yesterday's edition in the subscriber's own calendar: by their morning that day is
        # over (in UTC too, for every zone up to UTC+8), so nobody gets a half-collected day.
        edition = dailies.get(slot.date - dt.timedelta(days=1))
        if edition is not None:
            daily_slots[edition].append(slot)
    for week_end in sorted({s.date - dt.timedelta(days=1) for s in slots}):
        due = [s for s in slots if s.date - dt.timedelta(days=1) == week_end]
        # Build a weekly edition only when someone is due for it: most hours nobody is.
        wanted = session.scalar(
            select(Subscriber.id)
            .where(
                Subscriber.status == SubscriberStatus.ACTIVE,
                Subscriber.frequency == Frequency.WEEKLY,
                _slot_filter(due, weekly=True),
            )
            .limit(1)
        )
        weekly = None
        if wanted and not refresh_weekly:
            weekly = session.scalar(select(Digest).where(Digest.kind == DigestKind.WEEKLY, Digest.date == week_end))
        if wanted and weekly is None:
            weekly = build_digest(session, week_end, weights, DigestKind.WEEKLY)
        if weekly is not None and weekly.items:
            weekly_slots[weekly.id] = due
    return [(i, _slot_filter(s, weekly=False)) for i, s in sorted(daily_slots.items())] + [
        (i, _slot_filter(s, weekly=True)) for i, s in sorted(weekly_slots.items())
    ]


def dispatch_due(
    runtime: Runtime,
    now: dt.datetime,
    enqueue: Callable[[int, list[int]], None],
    composers: dict[int, DigestComposer] | None = None,
) -> int:
    """Plan and hand out every digest due in the UTC hour of ``now``, and those of the
    ``DIGEST_CATCH_UP_HOURS`` before it that were never planned; returns the number of pages.

    ``enqueue(digest_id, subscriber_ids)`` is called after each page's commit. Running it twice
    in the same hour plans nothing new (the ledger has one row per subscriber and edition).
    """
    factory = runtime.session_factory
    hour_start = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    stale_after = runtime.policy.stale_after
    # Never further back than a digest may still go out (DIGEST_STALE_AFTER_HOURS).
    catch_up = min(runtime.settings.catch_up_hours, math.ceil(stale_after / HOUR) - 2)
    missed_since = hour_start - (catch_up + 1) * HOUR
    with transaction(factory) as session:
        zones = session.scalars(
            select(Subscriber.timezone).where(Subscriber.status == SubscriberStatus.ACTIVE).distinct()
        ).all()
        # (edition, subscriber filter, stale limit) to plan.
        plans = [(d, c, now + stale_after) for d, c in due_editions(session, due_slots(zones, now), runtime.weights)]
        if catch_up > 0:
            # Hours that passed without their digests being planned (beat or the workers were
            # down): the ledger says who is still missing one. Not for anyone whose row changed
            # since (joined, resumed, switched to daily, moved their hour): their next digest
            # comes at their next hour. The stale limit counts from the earliest missed hour.
            earlier = due_slots(zones, hour_start - HOUR, hours=catch_up)
            for digest_id, condition in due_editions(session, earlier, runtime.weights, refresh_weekly=False):
                planned = exists().where(Delivery.subscriber_id == Subscriber.id, Delivery.digest_id == digest_id)
                missed = and_(condition, Subscriber.updated_at <= missed_since, ~planned)
                plans.append((digest_id, missed, missed_since + stale_after))
    pages = 0
    for digest_id, condition, not_after in plans:
        pages += dispatch(
            factory,
            digest_id,
            now=now,
            page_size=runtime.settings.batch_size,
            stale_after=stale_after,
            message_domain=runtime.message_domain,
            composer=composer_of(runtime, digest_id, composers),
            enqueue=lambda ids, d=digest_id: enqueue(d, ids),  # type: ignore[misc]
            extra_filter=condition,
            not_after=not_after,
        )
    return pages
