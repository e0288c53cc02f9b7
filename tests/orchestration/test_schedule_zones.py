"""Every zone's hour: beat's five-minute ticks bring each subscriber's digest within 10 minutes
after H:00 on their own clock, in :30 and :45 zones too, across DST changes, late and missed
ticks included."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from zoneinfo import ZoneInfo

import time_machine
from sqlalchemy import select

from digest.core.db import transaction
from digest.core.models import Digest, DigestKind, Frequency
from digest.orchestration import schedule
from digest.orchestration.pipeline import InProcess
from digest.orchestration.runtime import Runtime
from tests.support.factories import add_papers, add_subscriber, utc

MINUTE = dt.timedelta(minutes=1)
PROMISE = 10 * MINUTE  # design.md, "Schedule": within 10 minutes after H:00 local

# (zone, hour): a whole-hour zone each side of UTC, +5:30, +5:45 and Chatham (+12:45/+13:45),
# with hours that DST skips (New York 02:00 on 2026-03-08) and repeats (Chatham 03:00 on
# 2026-04-05), and hours whose local day is not the UTC day.
SUBSCRIBERS = (
    ("Asia/Kolkata", 8),
    ("Asia/Kolkata", 0),
    ("Asia/Kathmandu", 7),
    ("Pacific/Chatham", 3),
    ("Pacific/Chatham", 9),
    ("America/New_York", 2),
    ("America/New_York", 8),
    ("Europe/London", 8),
    ("Europe/London", 22),
    ("UTC", 8),
)


def offset(zone: str, wall: dt.datetime) -> dt.timedelta:
    """The UTC offset at local wall time ``wall``, written down by hand for the 2026 changes
    (not from zoneinfo). A skipped wall time takes the offset from before the change (02:00
    in New York is then 07:00 UTC, the change); a repeated one its first occurrence."""
    hours = dt.timedelta(hours=1)
    if zone == "Asia/Kolkata":
        return 5.5 * hours
    if zone == "Asia/Kathmandu":
        return 5.75 * hours
    if zone == "Pacific/Chatham":  # 03:45 +13:45 goes back to 02:45 +12:45 on 2026-04-05
        return 13.75 * hours if wall < dt.datetime(2026, 4, 5, 3, 45) else 12.75 * hours
    if zone == "America/New_York":  # 02:00 -5 jumps to 03:00 -4 on 2026-03-08
        return -5 * hours if wall < dt.datetime(2026, 3, 8, 3) else -4 * hours
    if zone == "Europe/London":  # 01:00 +0 jumps to 02:00 +1 on 2026-03-29
        return 0 * hours if wall < dt.datetime(2026, 3, 29, 2) else hours
    return 0 * hours


def hour_starts(zone: str, hour: int, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The instants (UTC) in [start, end] at which ``zone`` shows ``hour``:00, one per local day."""
    instants = []
    for day in (start.date() + dt.timedelta(days=n) for n in range(-1, (end - start).days + 2)):
        wall = dt.datetime.combine(day, dt.time(hour))
        instant = (wall - offset(zone, wall)).replace(tzinfo=dt.UTC)
        if start <= instant <= end:
            instants.append(instant)
    return instants


def beat_ticks(start: dt.datetime, end: dt.datetime) -> tuple[list[dt.datetime], set[dt.datetime]]:
    """When beat runs ``dispatch-due`` every five minutes from ``start`` to ``end``: each run up
    to two minutes late, and now and then one that never runs (never two in a row)."""
    runs, missed = [], set()
    for n in range(int((end - start) / schedule.TICK) + 1):
        tick = start + n * schedule.TICK
        if n % 7 == 3:
            missed.add(tick)
        else:
            runs.append(tick + dt.timedelta(seconds=(n * 37) % 120))
    return runs, missed


def test_every_zone_gets_its_digest_within_ten_minutes_of_its_own_hour(runtime: Runtime) -> None:
    # A normal day and a DST change elsewhere each: the US change on 2026-03-08 (07:00 UTC),
    # and the Chatham/New Zealand one on 2026-04-05 (14:00 UTC on the 4th).
    spans = [(utc(2026, 3, 7), utc(2026, 3, 9)), (utc(2026, 4, 4), utc(2026, 4, 6))]
    for first, _ in spans:
        for day in range(-2, 3):
            add_papers(runtime, first.date() + dt.timedelta(days=day), count=1)
    with transaction(runtime.session_factory) as session:
        ids = {}
        for zone, hour in SUBSCRIBERS:
            subscriber = add_subscriber(
                session, f"{zone.replace('/', '.')}.{hour}@example.org", timezone=zone, hour=hour
            )
            # Subscribed long before: a tick that a missed one leaves to catch up must find them.
            subscriber.confirmed_at = subscriber.updated_at = utc(2026, 1, 1)
            ids[(zone, hour)] = subscriber.id

    planned: dict[int, list[dt.datetime]] = defaultdict(list)
    missed_an_hour = False
    for start, end in spans:
        # Beat was running before: nothing that the span's first ticks catch up (from further
        # back than the span) is counted.
        runs, missed = beat_ticks(start - 8 * schedule.HOUR, end)
        for now in runs:

            def record(_digest: int, page: list[int], now: dt.datetime = now) -> None:
                for sid in page:
                    planned[sid].append(now)

            with time_machine.travel(now, tick=False):
                schedule.dispatch_due(runtime, now, InProcess(runtime, record))
        for (zone, hour), sid in ids.items():
            got = sorted(t for t in planned[sid] if start <= t <= end)
            # Hours that start in the last minutes of the span may go out after it.
            expected = hour_starts(zone, hour, start, end - PROMISE)
            assert len(got) == len(expected) == 2, (zone, hour, start, got)
            for due, sent in zip(expected, got, strict=True):
                assert due <= sent < due + PROMISE, (zone, hour, due, sent)
            missed_an_hour |= bool(missed.intersection(expected))
    assert missed_an_hour  # some hour's own tick never ran, and the next one still found it


def test_monthly_readers_get_the_best_of_the_month_once_on_the_first_at_their_hour(runtime: Runtime) -> None:
    # Papers of March's last day, of April and of May's first day: only April's are April's best.
    for day in (dt.date(2026, 3, 31), dt.date(2026, 4, 3), dt.date(2026, 4, 20), dt.date(2026, 4, 30)):
        add_papers(runtime, day, count=2)
    add_papers(runtime, dt.date(2026, 5, 1), count=1)
    readers = (("Asia/Kolkata", 8), ("UTC", 9), ("America/New_York", 7))
    with transaction(runtime.session_factory) as session:
        ids = {}
        for zone, hour in readers:
            subscriber = add_subscriber(
                session,
                f"monthly.{zone.replace('/', '.')}@example.org",
                timezone=zone,
                hour=hour,
                frequency=Frequency.MONTHLY,
            )
            subscriber.confirmed_at = subscriber.updated_at = utc(2026, 1, 1)
            ids[subscriber.id] = (zone, hour)
        daily = add_subscriber(session, "daily@example.org", hour=9)
        daily.confirmed_at = daily.updated_at = utc(2026, 1, 1)
        daily_id = daily.id

    planned: dict[int, list[tuple[dt.datetime, int]]] = defaultdict(list)
    start, end = utc(2026, 4, 29, 20), utc(2026, 5, 1, 14)
    for n in range(int((end - start) / schedule.TICK) + 1):
        now = start + n * schedule.TICK

        def record(digest_id: int, page: list[int], now: dt.datetime = now) -> None:
            for sid in page:
                planned[sid].append((now, digest_id))

        with time_machine.travel(now, tick=False):
            schedule.dispatch_due(runtime, now, InProcess(runtime, record))

    editions = {digest_id for got in planned.values() for _, digest_id in got}
    with transaction(runtime.session_factory) as session:
        kinds = {d.id: d for d in session.scalars(select(Digest).where(Digest.id.in_(editions)))}
        monthly = [d for d in kinds.values() if d.kind is DigestKind.MONTHLY]
        assert len(monthly) == 1 and monthly[0].date == dt.date(2026, 4, 30)
        months = {item.paper.daily_date.month for item in monthly[0].items}
        assert months == {4} and len(monthly[0].items) == 6, "the best of April, and only April"
        monthly_id = monthly[0].id
    for sid, (zone, hour) in ids.items():
        got = planned[sid]
        assert len(got) == 1, (zone, got)  # once, on the 1st, not on the 30th
        when, digest_id = got[0]
        due = hour_starts(zone, hour, utc(2026, 5, 1) - 14 * schedule.HOUR, end)
        due = [d for d in due if d.astimezone(ZoneInfo(zone)).day == 1]
        assert digest_id == monthly_id and due[0] <= when < due[0] + PROMISE, (zone, when)
    assert all(kinds[d].kind is DigestKind.DAILY for _, d in planned[daily_id])  # daily readers get dailies
