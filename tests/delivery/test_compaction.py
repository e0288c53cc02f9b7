"""Ledger compaction over 40 simulated days with a retention of 20.

Each day gets its own papers, a daily and a weekly edition (the weekly one spans 7 days, so
consecutive weekly digests share candidates; and a paper featured again 12 days later tops the
day: only the ledger's rows of the last 15 days keep either from repeating), planned and sent
through the real batch path to a real SMTP sink, then compacted as beat would. Afterwards:
`digest status` still reports an old day's true counts, nobody got a paper twice within the
no-repeats reach, and people who left stayed gone. (With a retention of 8 days the no-repeats
check fails: the re-featured paper arrives twice.)
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict

import pytest
from sqlalchemy import func, select

from digest.core.db import transaction
from digest.core.models import (
    Delivery,
    DeliveryCount,
    Digest,
    DigestKind,
    Frequency,
    Paper,
    Subscriber,
    SubscriberStatus,
)
from digest.core.retention import NO_REPEAT_LOOKBACK
from digest.core.settings import Settings
from digest.delivery.batch import run_batch
from digest.delivery.compaction import compact
from digest.delivery.composer import build_digest
from digest.delivery.ledger import counts_by_status
from digest.operations.status import status_for
from digest.orchestration import pipeline
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed, unsubscribe
from tests.support.servers import SMTPSink
from tests.support.settings import make_settings

FIRST_DAY = dt.date(2026, 3, 2)
DAYS = 40
RETENTION = 20
PAPER_LINK = re.compile(r"huggingface\.co/papers/([0-9.]+)")
MESSAGE_DATE = re.compile(r"<(\d{4}-\d\d-\d\d)\.(daily|weekly)\.")


REFEATURED_AFTER = 12  # days: inside the no-repeats reach, outside a weekly edition's span


def add_papers(runtime: Runtime, day: dt.date, index: int) -> None:
    """Eight new papers a day; and, as Daily Papers does, an older paper featured again, on top."""
    with transaction(runtime.session_factory) as session:
        if index >= REFEATURED_AFTER:
            again = session.get(Paper, f"2603.{index - REFEATURED_AFTER:02d}000")
            assert again is not None
            again.daily_date, again.upvotes = day, 1000
            again.submitted_at = dt.datetime.combine(day, dt.time(8), dt.UTC)
        for k in range(8):
            session.add(
                Paper(
                    id=f"2603.{index:02d}{k:03d}",
                    title=f"Paper {k} of day {index}",
                    abstract="A study of diffusion models and agents.",
                    upvotes=100 - 10 * k,
                    daily_date=day,
                    submitted_at=dt.datetime.combine(day, dt.time(8), dt.UTC),
                )
            )


def send_edition(runtime: Runtime, day: dt.date, kind: DigestKind, now: dt.datetime) -> None:
    with transaction(runtime.session_factory) as session:
        digest = build_digest(session, day, runtime.weights, kind)
        assert digest is not None
        digest_id = digest.id
    with transaction(runtime.session_factory) as session:
        composer = pipeline.composer_for(runtime, session, digest_id)

    def send(digest_id: int, ids: list[int]) -> None:
        run_batch(
            runtime.session_factory,
            composer,
            ids,
            mailer_factory=runtime.mailer_factory(),
            policy=runtime.policy,
            bounce_sender=runtime.bounce_sender(),
            clock=lambda: now,
        )

    pipeline.dispatch_edition(runtime, digest_id, pipeline.InProcess(runtime, send), now=now, page_size=50)


def test_forty_days_with_retention_twenty(runtime: Runtime, smtp: SMTPSink) -> None:
    start = dt.datetime.combine(FIRST_DAY, dt.time(7), dt.UTC)
    with transaction(runtime.session_factory) as session:
        people = [add_confirmed(session, runtime.tokens, f"reader{n}@example.org", now=start) for n in range(12)]
        for n, person in enumerate(people):
            person.digest_size = 3
            person.frequency = Frequency.WEEKLY if n % 2 else Frequency.DAILY
    emails = [p.email for p in people]
    leaver, bouncer = emails[2], emails[3]
    smtp.behaviour.refuse[bouncer] = "550 5.1.1 <bouncer>: Recipient address rejected"
    counts_on: dict[dt.date, dict[str, dict[str, int]]] = {}
    for index in range(DAYS):
        day = FIRST_DAY + dt.timedelta(days=index)
        now = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(8), dt.UTC)
        if index == 5:
            with transaction(runtime.session_factory) as session:
                subscriber = session.scalar(select(Subscriber).where(Subscriber.email == leaver))
                assert subscriber is not None
                unsubscribe(session, subscriber, now=now)
        add_papers(runtime, day, index)
        for kind in (DigestKind.DAILY, DigestKind.WEEKLY):
            send_edition(runtime, day, kind, now)
        with runtime.session_factory() as session:
            counts_on[day] = {
                d.kind.value: counts_by_status(session, d.id)
                for d in session.scalars(select(Digest).where(Digest.date == day))
            }
        result = compact(runtime.session_factory, today=now.date(), retention_days=RETENTION, pause=0)
        # Each day's run compacts exactly the editions that just passed the retention.
        due = counts_on.get(day - dt.timedelta(days=RETENTION), {})
        assert result.rows == sum(sum(c.values()) for c in due.values())

    last = FIRST_DAY + dt.timedelta(days=DAYS - 1)
    cutoff = last + dt.timedelta(days=1) - dt.timedelta(days=RETENTION)
    with runtime.session_factory() as session:
        oldest_live = session.scalar(select(func.min(Digest.date)).join(Delivery, Delivery.digest_id == Digest.id))
        assert oldest_live == cutoff, "rows older than the retention are gone, newer ones stay"
        assert (session.scalar(select(func.count()).select_from(DeliveryCount)) or 0) > 0
        # Counts: `digest status --date D` for a compacted day says what it said on the day.
        old_day = FIRST_DAY + dt.timedelta(days=3)
        reported = {e.kind: e.counts for e in status_for(session, old_day)}
        assert reported == counts_on[old_day]
        assert reported["daily"]["sent"] > 0 and reported["weekly"]["sent"] > 0
        # Trust: whoever left or bounced is still not sendable, and their history is on record.
        statuses = dict(session.execute(select(Subscriber.email, Subscriber.status)).all())
        assert statuses[leaver] is SubscriberStatus.UNSUBSCRIBED
        assert statuses[bouncer] is SubscriberStatus.BOUNCED
        assert sum(1 for s in statuses.values() if s is SubscriberStatus.ACTIVE) == len(emails) - 2

    # No repeats: what each reader actually received, read from the messages themselves.
    received: dict[str, list[tuple[dt.date, set[str]]]] = defaultdict(list)
    for message in smtp.messages:
        parsed = message.message
        when = MESSAGE_DATE.match(str(parsed["Message-ID"]))
        assert when is not None
        body = parsed.get_body(preferencelist=("plain",))
        assert body is not None
        papers = set(PAPER_LINK.findall(body.get_content()))
        received[message.rcpt_tos[0]].append((dt.date.fromisoformat(when[1]), papers))
    assert set(received) == set(emails) - {bouncer}
    for email, digests in received.items():
        digests.sort(key=lambda item: item[0])
        for n, (day, papers) in enumerate(digests):
            assert len(papers) == 3
            for later, later_papers in digests[n + 1 :]:
                if later - day < NO_REPEAT_LOOKBACK:
                    assert not papers & later_papers, f"{email} got {papers & later_papers} on {day} and {later}"
    weekly = [e for n, e in enumerate(emails) if n % 2 and e not in (leaver, bouncer)]
    assert all(len(received[e]) == DAYS for e in weekly), "a weekly digest every simulated day"
    assert max(d for d, _ in received[leaver]) < FIRST_DAY + dt.timedelta(days=5), "nothing after leaving"


def test_retention_must_outlast_the_rules_it_serves(runtime: Runtime, smtp: SMTPSink) -> None:
    url = runtime.settings.database_url
    with pytest.raises(ValueError, match="must exceed the no-repeats reach"):
        make_settings(url, smtp, ledger_retention_days=15)
    with pytest.raises(ValueError, match="DIGEST_COMPLAINT_WINDOW_DAYS"):
        make_settings(url, smtp, ledger_retention_days=20, complaint_window_days=25)
    assert isinstance(make_settings(url, smtp, ledger_retention_days=16), Settings)


def test_compaction_on_sqlite_counts_open_rows_as_skipped(sqlite_url: str) -> None:
    from digest.core.db import make_engine, make_session_factory
    from digest.operations.status import with_compacted

    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    now = dt.datetime(2026, 5, 1, 8, tzinfo=dt.UTC)
    with transaction(factory) as session:
        old = Digest(kind=DigestKind.DAILY, date=dt.date(2026, 3, 2), created_at=now)
        session.add(old)
        session.flush()
        for n, status in enumerate(["sent", "sent", "failed", "pending", "skipped"]):
            session.add(
                Delivery(digest_id=old.id, status=status, message_id=f"<m{n}@x>", created_at=now, updated_at=now)
            )
    result = compact(factory, today=dt.date(2026, 5, 1), retention_days=30, batch_size=2, pause=0, vacuum=True)
    assert (result.rows, result.batches) == (5, 3)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        counts = with_compacted(session, old.id, counts_by_status(session, old.id))
    assert counts == {"sent": 2, "failed": 1, "skipped": 2, "pending": 0, "sending": 0}
    engine.dispose()


def test_digest_compact_then_status_reports_the_old_day(runtime: Runtime) -> None:
    from tests.support.processes import run_cli, settings_env

    now = dt.datetime.now(dt.UTC)
    old_day = now.date() - dt.timedelta(days=45)
    with transaction(runtime.session_factory) as session:
        old = Digest(kind=DigestKind.DAILY, date=old_day, created_at=now)
        recent = Digest(kind=DigestKind.DAILY, date=now.date() - dt.timedelta(days=2), created_at=now)
        session.add_all([old, recent])
        session.flush()
        for n in range(7):
            for digest in (old, recent):
                status = "failed" if n == 0 else "sent"
                session.add(
                    Delivery(
                        digest_id=digest.id,
                        status=status,
                        message_id=f"<{digest.id}.{n}@x>",
                        created_at=now,
                        updated_at=now,
                    )
                )
    env = settings_env(runtime.settings)
    result = run_cli(["compact"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("compacted 7 delivery rows of 1 editions"), result.stdout
    report = run_cli(["status", "--date", old_day.isoformat()], env, timeout=60)
    assert report.returncode == 0, report.stderr
    assert f"daily digest {old_day}: sent 6, sending 0, pending 0, failed 1, skipped 0" in report.stdout
    with runtime.session_factory() as session:
        left = session.scalars(select(Delivery.digest_id).distinct()).all()
    assert left == [recent.id], "the recent edition keeps its rows"


def test_digest_compact_dry_run_reports_and_writes_nothing(runtime: Runtime) -> None:
    from tests.support.processes import run_cli, settings_env
    from tests.support.rows import snapshot

    now = dt.datetime.now(dt.UTC)
    with transaction(runtime.session_factory) as session:
        old = Digest(kind=DigestKind.DAILY, date=now.date() - dt.timedelta(days=45), created_at=now)
        session.add(old)
        session.flush()
        for n, status in enumerate(["sent", "sent", "failed", "pending"]):
            session.add(
                Delivery(digest_id=old.id, status=status, message_id=f"<dry{n}@x>", created_at=now, updated_at=now)
            )

    def ledger() -> tuple[object, ...]:
        with runtime.session_factory() as session:
            deliveries = session.execute(select(Delivery.id, Delivery.status).order_by(Delivery.id)).all()
            counts = session.execute(select(DeliveryCount.digest_id, DeliveryCount.status, DeliveryCount.count)).all()
        return tuple(deliveries), tuple(counts), tuple(snapshot(runtime))

    before = ledger()
    result = run_cli(["compact", "--dry-run"], settings_env(runtime.settings), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: would compact 4 delivery rows of 1 editions"), result.stdout
    assert "(failed 1, sent 2, skipped 1); nothing was written" in result.stdout
    assert ledger() == before


def test_a_compacted_edition_is_closed_run_sends_nothing_and_status_keeps_its_counts(
    runtime: Runtime, smtp: SMTPSink
) -> None:
    """After compaction the ledger still knows who had edition D: `digest run --date D` sends
    nothing again (it used to send everyone a second copy) and `digest status` keeps its counts."""
    from tests.support.processes import run_cli, settings_env

    now = dt.datetime.now(dt.UTC)
    old_day = now.date() - dt.timedelta(days=45)
    with transaction(runtime.session_factory) as session:
        for n in range(3):
            add_confirmed(session, runtime.tokens, f"closed{n}@example.org", now=now - dt.timedelta(days=60))
        for k in range(4):
            session.add(
                Paper(
                    id=f"2601.{k:05d}",
                    title=f"Old paper {k}",
                    abstract="A study of diffusion models and agents.",
                    upvotes=50 - k,
                    daily_date=old_day,
                    submitted_at=dt.datetime.combine(old_day, dt.time(8), dt.UTC),
                )
            )
    env = settings_env(runtime.settings)
    first = run_cli(["run", "--date", old_day.isoformat()], env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert len(smtp.wait_for(3)) == 3, "the day's digest went out once"
    assert run_cli(["compact"], env, timeout=60).returncode == 0
    smtp.clear()

    again = run_cli(["run", "--date", old_day.isoformat()], env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"Digest {old_day} is closed: its deliveries were compacted; nothing sent."
    assert smtp.messages == [], "nobody gets the closed edition a second time"
    with runtime.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0, "nothing planned again"
    report = run_cli(["status", "--date", old_day.isoformat()], env, timeout=60)
    assert report.returncode == 0, report.stderr
    assert f"daily digest {old_day}: sent 3, sending 0, pending 0, failed 0, skipped 0" in report.stdout
