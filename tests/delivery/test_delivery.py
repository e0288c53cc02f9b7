"""The delivery ledger against a real SMTP server that refuses, defers and drops connections."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import delete, null, select, update
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import Delivery, DeliveryStatus, Subscriber, SubscriberStatus, utcnow
from digest.delivery.ledger import claim
from digest.orchestration.pipeline import (
    SWEEP_REACH,
    InProcess,
    collect_day,
    composer_of,
    dispatch_edition,
    run_inprocess,
    send_batch,
    sweep,
    sweep_open,
)
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed, unsubscribe
from tests.support.servers import SMTPSink
from tests.support.settings import runtime_with

DAY = dt.date(2024, 10, 25)


def people(runtime: Runtime, count: int) -> list[str]:
    emails = [f"reader{n:03d}@example.com" for n in range(count)]
    with transaction(runtime.session_factory) as session:
        for email in emails:
            add_confirmed(session, runtime.tokens, email, now=utcnow())
    return emails


def deliveries(session: Session) -> dict[str, Delivery]:
    session.expire_all()
    rows = session.execute(select(Subscriber.email, Delivery).join(Delivery, Delivery.subscriber_id == Subscriber.id))
    return {email: delivery for email, delivery in rows}


def received_counts(smtp: SMTPSink) -> Counter[str]:
    return Counter(r for m in smtp.messages for r in m.rcpt_tos)


def test_a_recipient_refused_with_550_fails_alone_with_the_reason(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 5)
    smtp.behaviour.refuse[emails[2]] = "550 5.1.1 No such user here"
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["sent"] == 4 and summary.counts["failed"] == 1
    assert set(received_counts(smtp)) == set(emails) - {emails[2]}
    rows = deliveries(session)
    assert rows[emails[2]].status is DeliveryStatus.FAILED
    assert rows[emails[2]].last_error == "550 5.1.1 No such user here"
    assert rows[emails[2]].attempts == 1, "a 5xx is not retried"
    assert f"{emails[2]}: 550 5.1.1 No such user here" in summary.lines()[-1]
    bounced = session.scalar(select(Subscriber).where(Subscriber.email == emails[2]))
    assert bounced is not None and bounced.status is SubscriberStatus.BOUNCED


def test_the_server_closing_the_connection_mid_batch_costs_no_message(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 12)
    smtp.behaviour.drop_after = 2  # hang up after every second message on a connection
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["sent"] == 12
    assert received_counts(smtp) == Counter(emails), "each exactly once"
    assert len(smtp.accepted_on_connection) >= 6, "the server really hung up and we reconnected"
    assert all(d.status is DeliveryStatus.SENT for d in deliveries(session).values())


def test_temporary_failures_are_retried_with_backoff_then_delivered(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 3)
    smtp.behaviour.temp_fail_data = 4
    smtp.behaviour.data_reply = "451 4.7.1 Greylisted, try again"
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["sent"] == 3
    assert received_counts(smtp) == Counter(emails)
    rows = deliveries(session)
    assert sum(d.attempts for d in rows.values()) == 3 + 4
    assert all("queued as test" in (d.smtp_reply or "") for d in rows.values())


def test_temporary_failures_past_the_limit_fail_with_the_reason(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    (email,) = people(runtime, 1)
    smtp.behaviour.temp_fail_data = 100
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["failed"] == 1
    delivery = deliveries(session)[email]
    assert delivery.attempts == runtime.settings.send_max_attempts
    assert delivery.last_error == "451 4.3.0 Try again later"
    assert smtp.messages == []


def prepare(runtime: Runtime, emails: list[str]) -> int:
    with runtime.papers_client() as client, transaction(runtime.session_factory) as session:
        digest_id = collect_day(session, client, DAY, runtime).digest_id
    assert digest_id is not None
    dispatch_edition(runtime, digest_id, InProcess(runtime, lambda digest_id, ids: None), now=utcnow())
    return digest_id


def test_a_dead_workers_lease_expires_and_the_same_message_is_sent(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    (email,) = people(runtime, 1)
    digest_id = prepare(runtime, [email])
    with transaction(runtime.session_factory) as s:
        (subscriber_id,) = s.scalars(select(Subscriber.id))
        claimed = claim(s, digest_id, [subscriber_id], now=utcnow(), lease_seconds=60)
    assert len(claimed) == 1
    # The worker "dies" here: the row stays `sending` and nobody else may take it...
    assert send_batch(runtime, digest_id, [subscriber_id]).sent == 0
    # ...until its lease runs out.
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(lease_until=utcnow() - dt.timedelta(seconds=1)))
    assert send_batch(runtime, digest_id, [subscriber_id]).sent == 1
    delivery = deliveries(session)[email]
    assert delivery.status is DeliveryStatus.SENT and delivery.attempts == 2
    assert smtp.messages[0].message["Message-ID"] == delivery.message_id


def test_two_workers_claiming_the_same_page_send_once(runtime: Runtime, smtp: SMTPSink) -> None:
    emails = people(runtime, 4)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        ids = list(s.scalars(select(Subscriber.id)))
    first = send_batch(runtime, digest_id, ids)
    second = send_batch(runtime, digest_id, ids)
    assert (first.sent, second.sent) == (4, 0)
    assert received_counts(smtp) == Counter(emails)


def test_stale_deliveries_are_skipped_not_dropped(runtime: Runtime, smtp: SMTPSink, session: Session) -> None:
    (email,) = people(runtime, 1)
    digest_id = prepare(runtime, [email])
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(not_after=utcnow() - dt.timedelta(minutes=1)))
        ids = list(s.scalars(select(Subscriber.id)))
    result = send_batch(runtime, digest_id, ids)
    assert result.skipped == 1 and smtp.messages == []
    delivery = deliveries(session)[email]
    assert delivery.status is DeliveryStatus.SKIPPED
    assert delivery.last_error is not None and delivery.last_error.startswith("stale: not sent before")


def test_unsubscribing_after_planning_stops_the_queued_digest(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 2)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        subscriber = s.scalar(select(Subscriber).where(Subscriber.email == emails[0]))
        assert subscriber is not None
        unsubscribe(s, subscriber, now=utcnow())
        ids = list(s.scalars(select(Subscriber.id)))
    send_batch(runtime, digest_id, ids)
    assert set(received_counts(smtp)) == {emails[1]}
    assert deliveries(session)[emails[0]].status is DeliveryStatus.SKIPPED


def test_a_latched_pause_stops_the_run_until_an_operator_resumes_it(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    import pytest

    from digest.core.errors import SendingPaused
    from digest.delivery import reputation

    emails = people(runtime, 3)
    with transaction(runtime.session_factory) as s:
        reputation.pause(s, utcnow(), "complaint rate 0.41% is above 0.30%")
    with pytest.raises(SendingPaused, match=r"sending paused since .*: complaint rate 0.41% .*digest sending resume"):
        run_inprocess(runtime, DAY)
    assert smtp.messages == []
    assert {d.status for d in deliveries(session).values()} == {DeliveryStatus.PENDING}
    with transaction(runtime.session_factory) as s:
        reputation.resume(s, utcnow(), "test")
    run_inprocess(runtime, DAY)
    assert sorted(received_counts(smtp)) == emails


def statuses(session: Session) -> set[SubscriberStatus]:
    session.expire_all()
    return set(session.scalars(select(Subscriber.status)))


def test_a_refused_sender_fails_the_run_but_bounces_nobody(runtime: Runtime, smtp: SMTPSink, session: Session) -> None:
    people(runtime, 3)
    smtp.behaviour.mail_reply = "530 5.7.0 Authentication required"
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["failed"] == 3
    assert statuses(session) == {SubscriberStatus.ACTIVE}, "the relay's problem is not the readers'"
    assert {d.last_error for d in deliveries(session).values()} == {"530 5.7.0 Authentication required"}


def test_rejected_content_fails_the_run_but_bounces_nobody(runtime: Runtime, smtp: SMTPSink, session: Session) -> None:
    people(runtime, 3)
    smtp.behaviour.temp_fail_data = 3
    smtp.behaviour.data_reply = "554 5.7.1 Message content rejected"
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["failed"] == 3
    assert statuses(session) == {SubscriberStatus.ACTIVE}


@pytest.mark.settings(lease_seconds=1, smtp_pool_size=1)
def test_a_slow_batch_keeps_its_leases_so_no_one_else_sends_it(runtime: Runtime, smtp: SMTPSink) -> None:
    """A batch slower than its lease (rate limits, a slow relay) must not be swept to a second worker."""
    emails = people(runtime, 6)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        ids = list(s.scalars(select(Subscriber.id)))
    smtp.behaviour.delay = 0.5  # 6 messages over one connection: ~3 s, the lease is 1 s
    swept: list[int] = []

    def sweeper() -> None:
        for _ in range(5):
            time.sleep(0.6)
            sweep(runtime, digest_id, InProcess(runtime, lambda _, ids: swept.extend(ids)), now=utcnow())

    thread = threading.Thread(target=sweeper)
    thread.start()
    result = send_batch(runtime, digest_id, ids)
    thread.join()
    assert result.sent == 6
    assert swept == [], "rows still waiting in the batch were handed out again"
    assert received_counts(smtp) == Counter(emails)


def test_erasing_someone_with_a_queued_digest_lets_the_run_finish(runtime: Runtime, smtp: SMTPSink) -> None:
    from digest.subscribers.subscriptions import erase, get_by_email

    emails = people(runtime, 2)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        erase(s, runtime.tokens, get_by_email(s, emails[0]), now=utcnow())
    summary = run_inprocess(runtime, DAY, sleep=lambda _: (_ for _ in ()).throw(AssertionError("waiting forever")))
    assert summary.digest_id == digest_id
    assert summary.counts["sent"] == 1 and summary.counts["skipped"] == 1
    assert set(received_counts(smtp)) == {emails[1]}


def test_two_dispatchers_planning_the_same_page_both_succeed_once(runtime: Runtime, smtp: SMTPSink) -> None:
    from digest.core.models import Digest
    from digest.delivery.planning import plan_deliveries

    emails = people(runtime, 3)
    digest_id = prepare(runtime, emails)  # plans everyone once
    with transaction(runtime.session_factory) as s:
        digest = s.get(Digest, digest_id)
        assert digest is not None
        ids = list(s.scalars(select(Subscriber.id)))
        composer = composer_of(runtime, digest_id)
        plan_deliveries(s, digest, ids, composer=composer, now=utcnow(), not_after=utcnow(), message_domain="x.org")
    with runtime.session_factory() as s:
        assert len(list(s.scalars(select(Delivery.id)))) == 3


def test_the_sweep_closes_stale_rows_even_while_sending_is_paused(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 2)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(not_after=utcnow() - dt.timedelta(minutes=1)))
    enqueued: list[int] = []
    sweep(runtime, digest_id, InProcess(runtime, lambda _, ids: enqueued.extend(ids)), now=utcnow())
    assert enqueued == [] and smtp.messages == []
    rows = deliveries(session)
    assert {d.status for d in rows.values()} == {DeliveryStatus.SKIPPED}
    assert {d.last_error for d in rows.values()} == {"stale: not sent in time"}


def test_beats_sweep_hands_out_every_open_edition_within_its_reach(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 3)
    digest_id = prepare(runtime, emails)  # planned, never sent (no worker took the batches)
    with transaction(runtime.session_factory) as s:
        stale = s.scalar(select(Subscriber.id).where(Subscriber.email == emails[0]))
        others = sorted(s.scalars(select(Subscriber.id).where(Subscriber.email.in_(emails[1:]))))
        s.execute(update(Delivery).where(Delivery.subscriber_id == stale).values(not_after=utcnow()))
    handed: list[tuple[int, list[int]]] = []
    handout = InProcess(runtime, lambda digest_id, ids: handed.append((digest_id, ids)))
    assert sweep_open(runtime, handout, now=utcnow()) == 2
    assert [(d, sorted(ids)) for d, ids in handed] == [(digest_id, others)]
    assert deliveries(session)[emails[0]].status is DeliveryStatus.SKIPPED and smtp.messages == []
    # An edition whose rows were all planned longer ago than the sweep reaches is left alone.
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(created_at=utcnow() - SWEEP_REACH - dt.timedelta(hours=1)))
    assert sweep_open(runtime, handout, now=utcnow()) == 0 and len(handed) == 1


def test_papers_are_chosen_at_planning_and_survive_a_rebuilt_edition(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    from digest.core.models import DigestItem, Paper

    (email,) = people(runtime, 1)
    digest_id = prepare(runtime, [email])
    planned = deliveries(session)[email]
    assert planned.status is DeliveryStatus.PENDING and planned.recipient == email
    assert planned.paper_ids and len(planned.paper_ids) == runtime.settings.digest_size
    dropped = planned.paper_ids[0]
    with transaction(runtime.session_factory) as s:
        title = s.get(Paper, dropped).title  # type: ignore[union-attr]
        # A later collection rebuilt the edition and the paper fell out of it.
        s.execute(delete(DigestItem).where(DigestItem.paper_id == dropped))
        ids = list(s.scalars(select(Subscriber.id)))
    assert send_batch(runtime, digest_id, ids).sent == 1
    [message] = smtp.to(email)
    text = message.get_body(preferencelist=("plain",))
    assert text is not None and " ".join(title.split()) in " ".join(text.get_content().split())
    assert deliveries(session)[email].paper_ids == planned.paper_ids


def test_someone_with_nothing_new_gets_a_skipped_row_and_no_mail(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    from digest.core.models import Digest, DigestItem, DigestKind

    emails = people(runtime, 2)
    with runtime.papers_client() as client, transaction(runtime.session_factory) as s:
        digest_id = collect_day(s, client, DAY, runtime).digest_id
        every_paper = list(s.scalars(select(DigestItem.paper_id).where(DigestItem.digest_id == digest_id)))
        # Yesterday's digest (an edition of its own) already brought the first reader all of them.
        earlier = Digest(kind=DigestKind.DAILY, date=DAY - dt.timedelta(days=1), created_at=utcnow())
        s.add(earlier)
        s.flush()
        first = s.scalar(select(Subscriber.id).where(Subscriber.email == emails[0]))
        s.add(
            Delivery(
                digest_id=earlier.id,
                subscriber_id=first,
                status=DeliveryStatus.SENT,
                message_id="<earlier@x>",
                paper_ids=every_paper,
                created_at=utcnow() - dt.timedelta(days=1),
            )
        )
    summary = run_inprocess(runtime, DAY)
    assert summary.counts["skipped"] == 1 and summary.counts["sent"] == 1
    assert set(received_counts(smtp)) == {emails[1]}
    skipped = session.scalar(select(Delivery).where(Delivery.digest_id == digest_id, Delivery.subscriber_id == first))
    assert skipped is not None and skipped.status is DeliveryStatus.SKIPPED
    assert skipped.last_error == "no new papers for this subscriber"


@pytest.mark.parametrize("no_papers", [None, null()], ids=["json-null", "sql-null"])
def test_a_row_planned_without_papers_waits_for_planning_and_is_then_sent_once(
    runtime: Runtime, smtp: SMTPSink, session: Session, no_papers: object
) -> None:
    """Rows an older release planned without papers (it chose them at send time): a sender
    chooses nothing (it builds no ranker), so the row stays open, unclaimed, until its page is
    planned again, which chooses its papers and keeps its Message-ID."""
    (email,) = people(runtime, 1)
    digest_id = prepare(runtime, [email])
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(paper_ids=no_papers, reasons=None, recipient=None))
        ids = list(s.scalars(select(Subscriber.id)))
    planned_id = deliveries(session)[email].message_id
    assert send_batch(runtime, digest_id, ids).sent == 0
    waiting = deliveries(session)[email]
    assert waiting.status is DeliveryStatus.PENDING and waiting.attempts == 0 and smtp.messages == []
    assert run_inprocess(runtime, DAY).counts["sent"] == 1
    delivery = deliveries(session)[email]
    assert delivery.paper_ids and len(delivery.paper_ids) == runtime.settings.digest_size
    assert delivery.recipient == email and delivery.message_id == planned_id
    [message] = smtp.to(email)
    assert message["Message-ID"] == planned_id


def test_the_send_task_builds_no_ranker_and_loads_no_model(
    runtime: Runtime, smtp: SMTPSink, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Papers are chosen at planning: the send task (``digest.send_batch``) only renders them,
    so a worker that sends never ranks, reads vectors or loads the embedding model."""
    from digest.papers.embedding import Embedder
    from digest.ranking.ranker import Ranker
    from workers import tasks

    emails = people(runtime, 3)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        ids = list(s.scalars(select(Subscriber.id).order_by(Subscriber.id)))
    built: list[str] = []

    def refuse(what: str) -> object:
        def init(*args: object, **kwargs: object) -> None:
            built.append(what)
            raise AssertionError(f"the send path built a {what}")

        return init

    monkeypatch.setattr(Ranker, "__init__", refuse("Ranker"))
    monkeypatch.setattr(Embedder, "__init__", refuse("Embedder"))
    monkeypatch.setattr(tasks, "_runtime", runtime)
    monkeypatch.setattr(tasks, "_composers", {})  # a fresh worker process: nothing cached
    assert tasks.send_batch.run(digest_id, ids) == {"sent": 3, "failed": 0, "skipped": 0}
    assert built == []
    assert received_counts(smtp) == Counter(emails)


@pytest.mark.settings(smtp_pool_size=1)  # one message at a time, in id order
def test_unsubscribing_while_the_batch_is_sending_stops_the_waiting_message(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    emails = people(runtime, 3)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        ids = list(s.scalars(select(Subscriber.id).order_by(Subscriber.id)))
    smtp.behaviour.hold = threading.Event()  # the relay sits on the first message
    batch = threading.Thread(target=send_batch, args=(runtime, digest_id, ids))
    batch.start()
    assert smtp.behaviour.holding.wait(10)  # the first message is in DATA...
    with transaction(runtime.session_factory) as s:
        last = s.scalar(select(Subscriber).where(Subscriber.email == emails[2]))
        assert last is not None
        unsubscribe(s, last, now=utcnow())  # ...and the third reader leaves meanwhile
    time.sleep(1.2)  # longer than the batch waits between checks
    smtp.behaviour.hold.set()
    batch.join(timeout=30)
    assert received_counts(smtp) == Counter(emails[:2])
    left = deliveries(session)[emails[2]]
    assert left.status is DeliveryStatus.SKIPPED and left.last_error == "subscriber no longer active"


def test_unsubscribing_while_the_message_waits_for_the_rate_limit_stops_it(
    runtime: Runtime, smtp: SMTPSink, session: Session, redis_url: str
) -> None:
    emails = people(runtime, 2)
    digest_id = prepare(runtime, emails)
    with transaction(runtime.session_factory) as s:
        ids = list(s.scalars(select(Subscriber.id).order_by(Subscriber.id)))
    # One message every 2 s, shared through Redis: the sender's settings, this test's runtime.
    with runtime_with(runtime.settings, smtp_pool_size=1, redis_url=redis_url, rate_limit_per_second=0.5) as sender:
        batch = threading.Thread(target=send_batch, args=(sender, digest_id, ids))
        batch.start()
        assert smtp.wait_for(1, timeout=10)  # the first went out; the second now waits its turn...
        with transaction(runtime.session_factory) as s:
            second = s.scalar(select(Subscriber).where(Subscriber.email == emails[1]))
            assert second is not None
            unsubscribe(s, second, now=utcnow())  # ...when its reader leaves
        batch.join(timeout=30)
    assert received_counts(smtp) == Counter(emails[:1])
    assert deliveries(session)[emails[1]].status is DeliveryStatus.SKIPPED


def test_a_dispatch_onto_a_fresh_ledger_gives_the_planner_statistics(runtime: Runtime) -> None:
    """A new install's ledger has the statistics of an empty table; planning a big edition onto
    it then read the whole ledger per page (a sequential scan for each no-repeats look-up). The
    dispatcher refreshes them once it has planned more rows than they know of."""
    from sqlalchemy import text

    from tests.support.factories import add_subscribers

    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")

    def known_rows() -> float:
        with runtime.engine.connect() as conn:
            return float(conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'deliveries'")).scalar_one())

    add_subscribers(runtime, 300)
    with runtime.papers_client() as client, transaction(runtime.session_factory) as session:
        digest_id = collect_day(session, client, DAY, runtime).digest_id
    assert digest_id is not None and known_rows() <= 0

    def plan(check_at: int) -> None:
        plan_only = InProcess(runtime, lambda digest_id, ids: None)
        dispatch_edition(runtime, digest_id, plan_only, now=utcnow(), page_size=50, check_statistics_at=check_at)

    plan(check_at=10_000)  # an edition smaller than the first check: left to autovacuum
    assert known_rows() <= 0
    with transaction(runtime.session_factory) as session:
        session.execute(text("DELETE FROM deliveries"))
    plan(check_at=100)  # checked at 100 planned rows (then 400): the statistics knew of none
    assert known_rows() >= 100
