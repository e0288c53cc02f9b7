"""When each subscriber's digest goes out: at their hour, in their time zone, daily, weekly or monthly.

Beat calls ``dispatch_due`` every five minutes (``TICK``): local hours start on the quarter hour
somewhere (+5:30 in India, +5:45 in Nepal, +12:45 on the Chatham Islands), so an hourly run on
UTC hours would send those subscribers' digests 30 or 45 minutes late. A run works out which
(time zone, hour) pairs reached their local hour since the previous tick, picks the edition each
of them is due, and hands the matching subscribers to ``digest.orchestration.pipeline.dispatch_edition``
(keyset pages, each planned and sent as the given ``Handout`` does it). Nothing here loads
subscribers: the due set is an SQL filter.

A run also looks back over the hour before it, for subscribers still without their row in the
ledger (and unchanged since their hour began): a tick that came late or never ran (beat
restarting) then costs minutes, not a day, and the windows may overlap because the unique
(subscriber, edition) row makes planning twice a no-op. Further back, ``DIGEST_CATCH_UP_HOURS``
covers beat or the workers being down for longer.

Rules:

* A subscriber's hour H is due at the first tick at or after the instant their local clock shows
  H:00 (within ``TICK``; one late or missed tick makes it two), never before it. Every current
  UTC offset is a whole quarter hour, so with ticks on multiples of five minutes it is H:00.
* That instant is the first one their local clock shows the hour: when a DST change
  skips the hour (02:00 on a spring-forward night) it is due at the moment of the change, and an
  hour that happens twice (autumn) is due only the first time. So DST neither skips nor doubles
  a day; the unique (subscriber, edition) ledger row guards against doubles as well.
* Daily subscribers get the edition of the day before their local date: by their morning that
  day is over. Days without papers have no edition, so weekends and quiet days send nothing
  (no empty emails).
* Weekly subscribers get, on their weekday (Monday = 0), the weekly edition of the seven days
  up to the day before their local date, built here when first needed.
* Monthly subscribers get, on the 1st of their month, the monthly edition of the previous
  calendar month ("the best of"), built the same way.
* Paused, pending and unsubscribed subscribers get nothing (``due_subscriber_page``).
* An unknown time-zone name is treated as UTC (the documented default).
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import Digest, DigestItem, DigestKind, Frequency, Subscriber, SubscriberStatus
from digest.delivery.composer import build_digest
from digest.delivery.ledger import not_planned_for
from digest.orchestration.pipeline import Handout, dispatch_edition
from digest.orchestration.runtime import Runtime
from digest.ranking.trending import TrendingWeights

HOUR = dt.timedelta(hours=1)
# Beat's cadence for ``digest.dispatch_due`` (workers/celery_app.py): the contract is a digest
# within 10 minutes after H:00 local, which one late or missed tick must not break.
TICK = dt.timedelta(minutes=5)
# How far back a run looks for due subscribers still without a ledger row, besides catching up.
LOOK_BACK = HOUR


@dataclass(frozen=True)
class Slot:
    """Subscribers in ``timezone`` whose ``hour`` is due now, on their local ``date``."""

    timezone: str
    hour: int
    date: dt.date

    @property
    def starts_at(self) -> dt.datetime:
        """The instant (UTC) the local clock first shows the hour (``fold=0``: the first of an
        hour that DST repeats) or, for an hour that DST skips, the instant of the change."""
        zone = _zone(self.timezone)
        wall = dt.datetime.combine(self.date, dt.time(self.hour))
        instant = wall.replace(tzinfo=zone).astimezone(dt.UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == wall:
            return instant
        # Skipped. ``fold=0`` reads H:00 with the offset from before the change, which is the
        # change itself only when the gap starts at H:00 (US 02:00); on the Chatham Islands the
        # gap is 02:45-03:45, and 03:00 read that way is 04:00 on the new clock. The change lies
        # between the two readings: find the first second whose local time is past H:00.
        before, after = wall.replace(tzinfo=zone, fold=1).astimezone(dt.UTC), instant
        while after - before > dt.timedelta(seconds=1):
            middle = before + (after - before) / 2
            if middle.astimezone(zone).replace(tzinfo=None) >= wall:
                after = middle
            else:
                before = middle
        return after.replace(microsecond=0)


def _zone(name: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def tick_of(now: dt.datetime) -> dt.datetime:
    """The scheduled tick a run at ``now`` stands for: ``now`` in UTC, down to a multiple of
    ``TICK`` (beat fires a little after its time, and a slot's instant is exact)."""
    now = now.astimezone(dt.UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + ((now - midnight) // TICK) * TICK


def due_slots(timezones: Iterable[str], start: dt.datetime, end: dt.datetime) -> list[Slot]:
    """The local hours, per time zone, that start in (``start``, ``end``].

    Each slot counts at ``Slot.starts_at``, one instant, so windows that follow each other see
    every slot exactly once, DST changes included."""
    start, end = start.astimezone(dt.UTC), end.astimezone(dt.UTC)
    slots: list[Slot] = []
    for name in sorted(set(timezones)):
        zone = _zone(name)
        first = (start + dt.timedelta(microseconds=1)).astimezone(zone).date()
        last = end.astimezone(zone).date()
        for day in (first + dt.timedelta(days=n) for n in range((last - first).days + 1)):
            slots.extend(s for s in (Slot(name, h, day) for h in range(24)) if start < s.starts_at <= end)
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
    """(edition id, subscriber filter) for every edition due in these slots: daily, weekly, monthly.

    A weekly or monthly edition is (re)built here when someone is due for it; with ``refresh_weekly``
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
    for slot in slots:
        # Yesterday's edition in the subscriber's own calendar: by their morning that day is
        # over (in UTC too, for every zone up to UTC+8), so nobody gets a half-collected day.
        edition = dailies.get(slot.date - dt.timedelta(days=1))
        if edition is not None:
            daily_slots[edition].append(slot)
    periodic: list[tuple[int, ColumnElement[bool]]] = []
    for kind, frequency, on_weekday in (
        (DigestKind.WEEKLY, Frequency.WEEKLY, True),
        (DigestKind.MONTHLY, Frequency.MONTHLY, False),
    ):
        # Weekly subscribers are due on their weekday, monthly ones on the 1st of the month;
        # both get the edition of the period that ended the day before.
        eligible = slots if kind is DigestKind.WEEKLY else [s for s in slots if s.date.day == 1]
        for period_end in sorted({s.date - dt.timedelta(days=1) for s in eligible}):
            due = [s for s in eligible if s.date - dt.timedelta(days=1) == period_end]
            edition = _periodic_edition(session, due, period_end, kind, frequency, on_weekday, weights, refresh_weekly)
            if edition is not None:
                periodic.append((edition, _slot_filter(due, weekly=on_weekday)))
    return [(i, _slot_filter(s, weekly=False)) for i, s in sorted(daily_slots.items())] + periodic


def _periodic_edition(
    session: Session,
    due: list[Slot],
    period_end: dt.date,
    kind: DigestKind,
    frequency: Frequency,
    on_weekday: bool,
    weights: TrendingWeights,
    refresh: bool,
) -> int | None:
    """The id of the weekly or monthly edition ending ``period_end`` if anyone in ``due`` wants it."""
    # Build the edition only when someone is due for it: most ticks nobody is.
    wanted = session.scalar(
        select(Subscriber.id)
        .where(
            Subscriber.status == SubscriberStatus.ACTIVE,
            Subscriber.frequency == frequency,
            _slot_filter(due, weekly=on_weekday),
        )
        .limit(1)
    )
    if not wanted:
        return None
    edition = None
    if not refresh:
        edition = session.scalar(select(Digest).where(Digest.kind == kind, Digest.date == period_end))
    if edition is None:
        edition = build_digest(session, period_end, weights, kind)
    return edition.id if edition is not None and edition.items else None


def dispatch_due(runtime: Runtime, now: dt.datetime, handout: Handout) -> int:
    """Plan and hand out every digest due since the previous tick, those of the hour before it
    that are still unplanned (a late or missed tick), and those of the ``DIGEST_CATCH_UP_HOURS``
    before that which were never planned; returns the number of pages.

    Each edition goes to ``dispatch_edition`` with ``handout`` (beat: the workers' queues).
    Running it twice in the same tick plans nothing new (the ledger has one row per subscriber
    and edition).
    """
    factory = runtime.session_factory
    tick = tick_of(now)
    since = tick - LOOK_BACK
    stale_after = runtime.policy.stale_after
    # Never further back than a digest may still go out (DIGEST_STALE_AFTER_HOURS).
    catch_up = min(runtime.settings.catch_up_hours, math.ceil(stale_after / HOUR) - 2)
    missed_since = since - catch_up * HOUR

    def unplanned(digest_id: int) -> ColumnElement[bool]:
        return not_planned_for(digest_id, Subscriber.id)

    with transaction(factory) as session:
        zones = session.scalars(
            select(Subscriber.timezone).where(Subscriber.status == SubscriberStatus.ACTIVE).distinct()
        ).all()
        # (edition, subscriber filter, stale limit) to plan.
        fresh = due_slots(zones, tick - TICK, tick)
        plans = [(d, c, now + stale_after) for d, c in due_editions(session, fresh, runtime.weights)]
        # Slots of the last hour a tick already saw, unless it came late or not at all: only
        # subscribers still without a row, so an on-time beat re-plans and re-enqueues nobody,
        # and, as when catching up, only those whose row is unchanged since their hour began
        # (someone who joined at 08:20 gets their first 08:00 digest tomorrow, not now). A
        # weekly edition is not rebuilt for them (others may have received it already).
        by_instant: dict[dt.datetime, list[Slot]] = defaultdict(list)
        for slot in due_slots(zones, since, tick - TICK):
            by_instant[slot.starts_at].append(slot)
        for instant, slots in sorted(by_instant.items()):
            for digest_id, condition in due_editions(session, slots, runtime.weights, refresh_weekly=False):
                late = and_(condition, Subscriber.updated_at <= instant, unplanned(digest_id))
                plans.append((digest_id, late, now + stale_after))
        if catch_up > 0:
            # Hours that passed without their digests being planned (beat or the workers were
            # down): the ledger says who is still missing one. Not for anyone whose row changed
            # since (joined, resumed, switched to daily, moved their hour): their next digest
            # comes at their next hour. The stale limit counts from the earliest missed hour.
            earlier = due_slots(zones, missed_since, since)
            for digest_id, condition in due_editions(session, earlier, runtime.weights, refresh_weekly=False):
                missed = and_(condition, Subscriber.updated_at <= missed_since, unplanned(digest_id))
                plans.append((digest_id, missed, missed_since + stale_after))
    return sum(
        dispatch_edition(runtime, digest_id, handout, now=now, extra_filter=condition, not_after=not_after)
        for digest_id, condition, not_after in plans
    )
