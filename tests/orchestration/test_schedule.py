"""Each subscriber's digest at their local hour: time zones, DST, daily, weekly, paused, no repeats."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict

import pytest
from sqlalchemy import select

from digest.core.db import transaction
from digest.core.models import Delivery, Digest, DigestKind, Frequency, Subscriber
from digest.orchestration import schedule
from digest.orchestration.pipeline import InProcess
from digest.orchestration.runtime import Runtime
from tests.support.factories import THURSDAY, add_papers, add_subscriber, collect, utc
from tests.support.inbox import papers_in_text
from tests.support.runs import deliver_due
from tests.support.servers import SMTPSink
from tests.support.settings import runtime_with

HOUR = dt.timedelta(hours=1)


# Offsets from UTC written down by hand (not from zoneinfo) for the 2026 changes.
def offset_hours(zone: str, day: dt.date) -> int:
    if zone == "America/Los_Angeles":
        return -8 if day < dt.date(2026, 3, 8) else -7
    if zone == "Europe/Berlin":
        return 1 if day < dt.date(2026, 3, 29) else 2
    if zone == "Asia/Tokyo":
        return 9
    if zone == "Australia/Sydney":
        return 11 if day < dt.date(2026, 4, 5) else 10
    return 0


ZONES = ("America/Los_Angeles", "Europe/Berlin", "Asia/Tokyo", "Australia/Sydney", "UTC")
DST_DAYS = (dt.date(2026, 3, 8), dt.date(2026, 3, 29), dt.date(2026, 4, 5))


def test_each_zone_is_dispatched_in_its_hour_across_dst_changes(runtime: Runtime) -> None:
    for change in DST_DAYS:
        for offset in range(-3, 3):
            add_papers(runtime, change + dt.timedelta(days=offset), count=1)
    with transaction(runtime.session_factory) as session:
        ids = {
            zone: add_subscriber(session, f"{zone.replace('/', '.')}@example.org", timezone=zone).id for zone in ZONES
        }
    dispatched: dict[int, list[dt.datetime]] = defaultdict(list)
    for change in DST_DAYS:
        start = utc(change.year, change.month, change.day) - dt.timedelta(days=1)
        hours = [start + i * HOUR for i in range(72)]
        for now in hours:
            # Hourly and a few minutes late: each run stands for its five-minute tick, so whole-hour
            # zones are found by the run after their H:00 (quarter-hour zones need every tick).
            def record(_digest: int, page: list[int], hour: dt.datetime = now) -> None:
                for sid in page:
                    dispatched[sid].append(hour)

            schedule.dispatch_due(runtime, now + dt.timedelta(minutes=4), InProcess(runtime, record))
        for zone, sid in ids.items():
            expected = set()
            for day in (change + dt.timedelta(days=d) for d in range(-1, 3)):
                instant = dt.datetime.combine(day, dt.time(8), dt.UTC) - offset_hours(zone, day) * HOUR
                if hours[0] <= instant <= hours[-1]:
                    expected.add(instant)
            got = [t for t in dispatched[sid] if hours[0] <= t <= hours[-1]]
            assert sorted(got) == sorted(expected), (zone, change)  # each local day once, at 08:00
    with runtime.session_factory() as session:
        # One ledger row per subscriber and day: 3 days around each of 3 changes.
        for sid in ids.values():
            count = len(session.scalars(select(Delivery.id).where(Delivery.subscriber_id == sid)).all())
            assert count == 9


def due_at(zones: list[str], now: dt.datetime) -> set[tuple[int, dt.date]]:
    """(hour, local date) that a beat run at ``now`` finds due since the previous tick."""
    tick = schedule.tick_of(now)
    return {(s.hour, s.date) for s in schedule.due_slots(zones, tick - schedule.TICK, tick)}


def test_hours_that_dst_skips_or_repeats_are_due_exactly_once() -> None:
    zones = ["America/Los_Angeles"]
    march_8, november_1 = dt.date(2026, 3, 8), dt.date(2026, 11, 1)
    # 2026-03-08: 02:00 PST does not exist; clocks jump from 01:59 to 03:00 PDT (10:00 UTC),
    # so 02:00 is due with 03:00, at the change, and at no other tick.
    assert due_at(zones, utc(2026, 3, 8, 9)) == {(1, march_8)}
    assert due_at(zones, utc(2026, 3, 8, 10)) == {(2, march_8), (3, march_8)}
    assert due_at(zones, utc(2026, 3, 8, 10, 5)) == set()
    # 2026-11-01: 01:00-01:59 happens twice (08:00 and 09:00 UTC); due only the first time.
    assert due_at(zones, utc(2026, 11, 1, 8)) == {(1, november_1)}
    assert due_at(zones, utc(2026, 11, 1, 9)) == set()
    assert due_at(zones, utc(2026, 11, 1, 10)) == {(2, november_1)}
    # Chatham (+12:45/+13:45): on 2026-09-27 02:45 jumps to 03:45 (14:00 UTC); 03:00 never
    # shows and is due at the change, not at 04:00 (14:15 UTC) when the old offset reads it.
    assert due_at(["Pacific/Chatham"], utc(2026, 9, 26, 14)) == {(3, dt.date(2026, 9, 27))}
    assert due_at(["Pacific/Chatham"], utc(2026, 9, 26, 14, 15)) == {(4, dt.date(2026, 9, 27))}
    # On 2026-04-05 03:45 goes back to 02:45 (14:00 UTC): 03:00 is due at 13:15 UTC, not again.
    assert due_at(["Pacific/Chatham"], utc(2026, 4, 4, 13, 15)) == {(3, dt.date(2026, 4, 5))}
    assert due_at(["Pacific/Chatham"], utc(2026, 4, 4, 14, 15)) == set()
    assert due_at(["Pacific/Chatham"], utc(2026, 4, 4, 15, 15)) == {(4, dt.date(2026, 4, 5))}
    # Half- and quarter-hour zones are due at their own H:00 (a run a little late stands for
    # its tick), never before it.
    april_16 = dt.date(2026, 4, 16)
    assert due_at(["Asia/Kolkata"], utc(2026, 4, 16, 2, 25)) == set()
    assert due_at(["Asia/Kolkata"], utc(2026, 4, 16, 2, 30, 40)) == {(8, april_16)}
    assert due_at(["Asia/Kolkata"], utc(2026, 4, 16, 3)) == set()
    assert due_at(["Asia/Kathmandu"], utc(2026, 4, 16, 2, 15)) == {(8, april_16)}
    # An unknown zone is treated as UTC.
    assert schedule.due_slots(["Mars/Olympus_Mons"], utc(2026, 4, 16, 7, 55), utc(2026, 4, 16, 8)) == [
        schedule.Slot("Mars/Olympus_Mons", 8, april_16)
    ]


def test_daily_subscribers_get_days_with_papers_only_and_paused_get_nothing(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    with transaction(runtime.session_factory) as session:
        add_subscriber(session, "daily@example.org")
        add_subscriber(session, "tokyo@example.org", timezone="Asia/Tokyo")
        add_subscriber(session, "paused@example.org", frequency=Frequency.PAUSED)
    # Thursday to Sunday, every hour: Friday, Saturday and Sunday have no papers.
    start = utc(2026, 4, 16)  # Thursday's papers arrive during Thursday (UTC)
    for i in range(4 * 24):
        deliver_due(runtime, start + i * HOUR + dt.timedelta(minutes=1))
    assert len(smtp.to("daily@example.org")) == 1
    assert len(smtp.to("tokyo@example.org")) == 1  # at 08:00 on Friday in Tokyo, Thursday's papers
    assert smtp.to("paused@example.org") == []
    assert len(smtp.messages) == 2
    with runtime.session_factory() as session:
        sent_at = {r: s for r, s in session.execute(select(Delivery.recipient, Delivery.sent_at))}
    # Each gets Thursday's papers on their own Friday morning, when Thursday is over.
    assert sent_at["daily@example.org"] == utc(2026, 4, 17, 8, 1)
    assert sent_at["tokyo@example.org"] == utc(2026, 4, 16, 23, 1)


def test_a_day_without_papers_sends_nothing(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    with transaction(runtime.session_factory) as session:
        add_subscriber(session, "daily@example.org")
    # Saturday: yesterday (Friday) has no edition; Thursday's went out on Friday.
    assert deliver_due(runtime, utc(2026, 4, 18, 8)) == 0
    assert smtp.messages == []


def test_weekly_subscribers_get_one_digest_a_week_with_that_weeks_top_papers(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    add_papers(runtime, dt.date(2026, 4, 21))  # a Tuesday of the following week
    with transaction(runtime.session_factory) as session:
        add_subscriber(session, "weekly@example.org", timezone="Europe/Berlin", frequency=Frequency.WEEKLY, weekday=4)
    start = utc(2026, 4, 16)
    for i in range(10 * 24):  # Thursday 16 to Saturday 25 April, every hour
        deliver_due(runtime, start + i * HOUR)

    first, second = smtp.to("weekly@example.org")
    with runtime.session_factory() as session:
        weekly_editions = select(Digest).where(Digest.kind == DigestKind.WEEKLY).order_by(Digest.date)
        weeklies = session.scalars(weekly_editions).all()
        assert [w.date for w in weeklies] == [dt.date(2026, 4, 16), dt.date(2026, 4, 23)]
        top = [item.paper_id for item in weeklies[0].items][: runtime.settings.digest_size]
        deliveries = session.execute(select(Delivery.digest_id, Delivery.sent_at).order_by(Delivery.id)).all()
    assert "Week to" in str(first["Subject"])
    assert [pid for pid, _ in papers_in_text(first)] == top
    assert [pid for pid, _ in papers_in_text(second)] == ["260421.00000", "260421.00001", "260421.00002"]
    # Friday 08:00 in Berlin (CEST) is 06:00 UTC.
    assert [sent for _, sent in deliveries] == [utc(2026, 4, 17, 6), utc(2026, 4, 24, 6)]


def test_two_digests_in_a_row_never_repeat_a_paper(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)  # 22 papers
    with transaction(runtime.session_factory) as session:
        sid = add_subscriber(session, "switcher@example.org", topics="agents").id
    deliver_due(runtime, utc(2026, 4, 17, 8))  # Friday morning: Thursday's papers
    # The subscriber switches to weekly on Saturdays: the week's edition holds Thursday's papers again.
    with transaction(runtime.session_factory) as session:
        subscriber = session.get(Subscriber, sid)
        assert subscriber is not None
        subscriber.frequency, subscriber.weekday = Frequency.WEEKLY, 5
    deliver_due(runtime, utc(2026, 4, 18, 8))
    deliver_due(runtime, utc(2026, 4, 18, 8, 30))  # beat running twice in the hour changes nothing

    daily, weekly = smtp.to("switcher@example.org")
    first = [pid for pid, _ in papers_in_text(daily)]
    again = [pid for pid, _ in papers_in_text(weekly)]
    assert len(first) == len(again) == runtime.settings.digest_size
    assert set(first).isdisjoint(again)
    assert "Week to" in str(weekly["Subject"])


def test_hours_missed_while_beat_was_down_are_caught_up_once(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    long_ago = utc(2026, 4, 1)
    with transaction(runtime.session_factory) as session:
        for email, hour, changed in (
            ("eight@example.org", 8, long_ago),
            ("two@example.org", 2, long_ago),
            # Joined, or resumed from a pause, after the missed hour: their first digest waits
            # for their next 08:00.
            ("joined@example.org", 8, utc(2026, 4, 17, 9, 30)),
        ):
            subscriber = add_subscriber(session, email, hour=hour)
            subscriber.confirmed_at = subscriber.updated_at = changed
    # Beat was down on Friday from 01:00 to 10:59 UTC and comes back at 11:04.
    with runtime_with(runtime.settings, catch_up_hours=0) as not_catching_up:
        deliver_due(not_catching_up, utc(2026, 4, 17, 11, 4))
    assert smtp.messages == []  # without catching up, Friday's 08:00 digest is lost
    assert runtime.settings.catch_up_hours == 6  # the default
    deliver_due(runtime, utc(2026, 4, 17, 11, 20))
    [caught_up] = smtp.to("eight@example.org")
    assert [pid for pid, _ in papers_in_text(caught_up)]  # Thursday's papers, as at 08:00
    assert smtp.to("two@example.org") == []  # 02:00 is further back than 6 hours
    assert smtp.to("joined@example.org") == []
    with runtime.session_factory() as session:
        (not_after,) = session.scalars(select(Delivery.not_after)).all()
    # Stale 20 hours after the start of catching up's reach, not after planning: 11:20 less
    # the hour a run looks back over anyway and the 6 hours caught up.
    assert not_after == utc(2026, 4, 17, 4, 20) + dt.timedelta(hours=20)
    for hour in range(12, 24):  # the rest of the day: nobody gets a second one
        deliver_due(runtime, utc(2026, 4, 17, hour, 4))
    assert [m.rcpt_tos for m in smtp.messages] == [["eight@example.org"]]


@pytest.mark.settings(catch_up_hours=12)
def test_catching_up_reaches_no_further_back_than_the_stale_limit(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    with transaction(runtime.session_factory) as session:
        subscriber = add_subscriber(session, "eight@example.org", hour=8)
        subscriber.confirmed_at = subscriber.updated_at = utc(2026, 4, 1)
    runtime.policy = dataclasses.replace(runtime.policy, stale_after=dt.timedelta(hours=4))
    # With a 4-hour stale limit catching up reaches 4 - 2 = 2 hours back: at 11:04 the 08:00
    # digest is out of reach, at 10:04 it is not.
    deliver_due(runtime, utc(2026, 4, 17, 11, 4))
    assert smtp.messages == []
    deliver_due(runtime, utc(2026, 4, 17, 10, 4))
    assert len(smtp.to("eight@example.org")) == 1
