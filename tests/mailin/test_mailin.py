"""Reading and handling inbound mail (digest.mailin.classify) against the real database and SMTP server."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import Subscriber, SubscriberStatus
from digest.mailin.classify import Kind, MailinConfig, classify, config_from, handle, process, send_replies
from digest.orchestration.runtime import Runtime
from digest.rendering.links import subscriber_stamp
from digest.rendering.tokens import Purpose, Tokens
from tests.mailin import messages
from tests.support.mailin import DAY, INBOUND, add_active, digests_to, events, send_digest, snapshot, subscriber
from tests.support.servers import PapersAPI, Received, SMTPSink


def config(runtime: Runtime) -> MailinConfig:
    return config_from(runtime)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("papers@digest.example.org", ("", "")),
        ("PAPERS+Subscribe@Digest.Example.org", ("subscribe", "")),
        ("<papers+bounce-abc.DEF-x@digest.example.org>", ("bounce", "abc.DEF-x")),
        ("papers+unsubscribe-tok@digest.example.org", ("unsubscribe", "tok")),
        ("other@digest.example.org", None),
        ("papers@elsewhere.example", None),
    ],
)
def test_only_our_address_and_its_sub_addresses_are_ours(
    address: str, expected: tuple[str, str] | None, runtime: Runtime
) -> None:
    assert config(runtime).tag_of(address) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto-Submitted": "auto-replied"},
        {"X-Autoreply": "yes"},
        {"Precedence": "bulk"},
        {"Precedence": "junk"},
    ],
)
def test_auto_replies_are_recognised(headers: dict[str, str], runtime: Runtime) -> None:
    data = messages.plain("alice@example.net", INBOUND, "subscribe", headers=headers)
    assert classify(config(runtime), data, envelope_sender="alice@example.net", recipients=[INBOUND]).kind is (
        Kind.AUTO_REPLY
    )


@pytest.mark.parametrize("subject", ["Out of Office: back Monday", "Automatic reply: Daily Papers", "Auto: away"])
def test_out_of_office_subjects_are_auto_replies(subject: str, runtime: Runtime) -> None:
    data = messages.plain("alice@example.net", INBOUND, subject)
    assert classify(config(runtime), data, envelope_sender="a@example.net", recipients=[INBOUND]).kind is (
        Kind.AUTO_REPLY
    )


def test_a_command_from_a_null_sender_is_never_answered(runtime: Runtime) -> None:
    data = messages.plain("alice@example.net", INBOUND, "subscribe")
    inbound = classify(config(runtime), data, envelope_sender="", recipients=[INBOUND])
    assert inbound.kind is Kind.UNRECOGNISED and inbound.sender is None


def test_first_body_line_can_carry_the_command(runtime: Runtime) -> None:
    data = messages.plain("alice@example.net", INBOUND, "hi", "\n  Unsubscribe\nthanks")
    inbound = classify(config(runtime), data, envelope_sender="alice@example.net", recipients=[INBOUND])
    assert inbound.kind is Kind.UNSUBSCRIBE and inbound.sender == "alice@example.net"


def test_non_utf8_headers_and_broken_mime_never_raise(runtime: Runtime) -> None:
    for data in (
        b"",
        b"\xff\xfe\x00",
        b"Subject: \xe9t\xe9\r\nFrom: \xff@\xfe\r\nContent-Type: multipart/report; boundary=x\r\n\r\n--x\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: message/delivery-status\r\n\r\nStatus: \xff5.1.1\r\n--b--\r\n",
    ):
        inbound = classify(
            config(runtime), data, envelope_sender=None, recipients=["papers+bounce-x@digest.example.org"]
        )
        assert inbound.kind in (Kind.MALFORMED, Kind.UNRECOGNISED, Kind.DSN)


def test_unsubscribe_subject_from_an_unknown_address_changes_nothing(runtime: Runtime, smtp: SMTPSink) -> None:
    add_active(runtime, "alice@example.net")
    before = snapshot(runtime)
    processed = process(
        runtime,
        messages.plain("stranger@example.com", INBOUND, "unsubscribe"),
        envelope_sender="stranger@example.com",
        recipients=[INBOUND],
    )
    assert processed.replies == [] and not processed.changed
    assert snapshot(runtime) == before


def test_a_forged_unsubscribe_only_mails_the_victim_a_link(runtime: Runtime, smtp: SMTPSink) -> None:
    """``From: victim`` and "unsubscribe", no token: the victim stays subscribed and is asked."""
    add_active(runtime, "alice@example.net")
    for to in (INBOUND, "papers+unsubscribe@digest.example.org"):
        processed = process(
            runtime,
            messages.plain("Alice <Alice@Example.net>", to, "UNSUBSCRIBE"),
            envelope_sender="mallory@example.com",
            recipients=[to],
            peer="203.0.113.9",
        )
        assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.ACTIVE
        asyncio.run(send_replies(runtime, processed.replies))
    asks = smtp.to("alice@example.net")
    assert len(asks) == 2 and smtp.to("mallory@example.com") == []
    assert asks[0]["Auto-Submitted"] == "auto-generated"
    body = asks[0].get_body(preferencelist=("plain",))
    assert body is not None
    link = re.search(r"(http://digest\.test/unsubscribe/\S+)", body.get_content())
    assert link is not None
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.ACTIVE


def test_the_same_message_is_handled_once(runtime: Runtime, smtp: SMTPSink) -> None:
    to = "papers+subscribe@digest.example.org"
    data = messages.plain("carol@example.net", to, "")
    first = process(runtime, data, envelope_sender="carol@example.net", recipients=[to])
    second = process(runtime, data, envelope_sender="carol@example.net", recipients=[to])
    assert first.changed and len(first.replies) == 1
    assert second.outcome == "duplicate" and second.replies == []


def test_subscribe_requests_from_our_own_domain_are_ignored(runtime: Runtime) -> None:
    to = "papers+subscribe@digest.example.org"
    before = snapshot(runtime)
    processed = process(
        runtime, messages.plain("papers@digest.example.org", to, ""), envelope_sender="", recipients=[to]
    )
    assert processed.replies == []
    assert snapshot(runtime) == before


def bounce_token_ids(runtime: Runtime, received: Received) -> tuple[int, int, int]:
    """(delivery id, subscriber id, the row's creation second) a real VERP address names."""
    token = received.mail_from.partition("+bounce-")[2].partition("@")[0]
    with runtime.session_factory() as session:
        created = {s.id: subscriber_stamp(s) for s in session.scalars(select(Subscriber))}
    delivery_id, subscriber_id, bound = runtime.tokens.read_bound(Purpose.BOUNCE, token, lambda _, s: created.get(s))
    assert bound
    return delivery_id, subscriber_id, created[subscriber_id]


def test_a_token_signed_with_another_key_bounces_nobody(runtime: Runtime, smtp: SMTPSink) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    delivery_id, subscriber_id, created = bounce_token_ids(runtime, digest)
    forged = Tokens("an attacker's guess at the key").make_bound(Purpose.BOUNCE, delivery_id, subscriber_id, created)
    to = f"papers+bounce-{forged}@digest.example.org"
    before = snapshot(runtime)
    report = messages.dsn(to, "alice@example.net", digest.data, status="5.1.1", action="failed", diagnostic="550")
    processed = process(runtime, report, envelope_sender="", recipients=[to])
    assert processed.outcome == "ignored: invalid bounce token"
    assert snapshot(runtime) == before


def test_a_valid_token_for_a_delivery_of_someone_else_is_refused(runtime: Runtime, smtp: SMTPSink) -> None:
    received = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")
    alice_delivery, _, _ = bounce_token_ids(runtime, received["alice@example.net"])
    _, bob_id, bob_created = bounce_token_ids(runtime, received["bob@example.net"])
    # Even a correctly signed token must name the delivery's own subscriber.
    mixed = runtime.tokens.make_bound(Purpose.BOUNCE, alice_delivery, bob_id, bob_created)
    to = f"papers+bounce-{mixed}@digest.example.org"
    report = messages.dsn(
        to,
        "bob@example.net",
        received["bob@example.net"].data,
        status="5.1.1",
        action="failed",
        diagnostic="550",
    )
    assert process(runtime, report, envelope_sender="", recipients=[to]).outcome == "ignored: invalid bounce token"
    assert subscriber(runtime, "bob@example.net").status is SubscriberStatus.ACTIVE
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.ACTIVE


def test_soft_bounces_bounce_past_the_threshold_within_the_window_and_decay_outside_it(
    runtime: Runtime, smtp: SMTPSink
) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    cfg = config(runtime)  # threshold 3 in 7 days

    def soft(now: dt.datetime, n: int) -> None:
        report = messages.dsn(
            digest.mail_from,
            "alice@example.net",
            digest.data,
            status="4.2.2",
            action="delayed",
            diagnostic=f"452 4.2.2 Mailbox full ({n})",
        )
        inbound = classify(cfg, report, envelope_sender="", recipients=[digest.mail_from])
        assert inbound.kind is Kind.DSN and inbound.status == "4.2.2"
        with transaction(runtime.session_factory) as session:
            handle(session, cfg, inbound, now=now)

    start = dt.datetime.now(dt.UTC)
    soft(start - dt.timedelta(days=20), 1)
    soft(start - dt.timedelta(days=10), 2)
    soft(start, 3)
    alice = subscriber(runtime, "alice@example.net")
    assert alice.status is SubscriberStatus.ACTIVE  # the older two have decayed out of the window
    assert alice.soft_bounce_score == 1.0
    soft(start + dt.timedelta(days=1), 4)
    soft(start + dt.timedelta(days=2), 5)
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.BOUNCED
    assert events(runtime, "alice@example.net") == ["soft_bounce"] * 5


def test_an_abuse_report_sent_to_the_bounce_address_names_its_delivery(runtime: Runtime, smtp: SMTPSink) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    # Some feedback loops quote only headers, without the Message-ID; the VERP token still tells.
    stripped = b"Subject: Daily Papers\r\n\r\nbody\r\n"
    report = messages.arf(digest.mail_from, "alice@example.net", stripped)
    processed = process(runtime, report, envelope_sender="", recipients=[digest.mail_from])
    assert processed.outcome == "complaint (unsubscribed)" and processed.replies == []
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.COMPLAINED
    assert events(runtime, "alice@example.net") == ["complaint"]


def test_a_successful_delivery_report_changes_nothing(runtime: Runtime, smtp: SMTPSink) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    before = snapshot(runtime)
    report = messages.dsn(
        digest.mail_from,
        "alice@example.net",
        digest.data,
        status="2.0.0",
        action="delivered",
        diagnostic="250 2.0.0 OK",
    )
    assert not process(runtime, report, envelope_sender="", recipients=[digest.mail_from]).changed
    assert snapshot(runtime) == before


def test_reporting_the_same_digest_again_adds_no_complaint(runtime: Runtime, smtp: SMTPSink) -> None:
    from digest.core.models import utcnow
    from digest.delivery import reputation

    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    for n in range(5):
        # Each report is a new message (new Message-ID), as a forger would send them.
        report = messages.arf(digest.mail_from, "alice@example.net", digest.data).replace(
            b"Message-ID: <", f"Message-ID: <again{n}.".encode(), 1
        )
        process(runtime, report, envelope_sender="", recipients=[digest.mail_from])
    assert events(runtime, "alice@example.net") == ["complaint"]
    with runtime.session_factory() as session:
        assert reputation.complaints_in(session, utcnow()) == 1


def test_subscribe_requests_cannot_mail_bomb_an_address(runtime: Runtime, smtp: SMTPSink) -> None:
    import time_machine

    to = "papers+subscribe@digest.example.org"
    start = dt.datetime(2026, 4, 16, 9, 0, tzinfo=dt.UTC)
    sent = 0
    for n in range(5):
        # A forger sending "subscribe" in the victim's name every three minutes.
        request = messages.plain("victim@example.net", to, "subscribe").replace(
            b"Subject:", f"Message-ID: <bomb{n}@forger.example>\r\nSubject:".encode(), 1
        )
        with time_machine.travel(start + dt.timedelta(minutes=3 * n), tick=False):
            processed = process(runtime, request, envelope_sender="victim@example.net", recipients=[to])
        sent += len(processed.replies)
    assert sent == 1, "one confirmation in twenty minutes, not one per forged request"


def test_reports_about_compacted_deliveries_still_end_the_subscription(runtime: Runtime, smtp: SMTPSink) -> None:
    """A month on, compaction has removed the ledger rows; the signed tokens still prove whom a
    report is about. Complaints and hard bounces stop the mail, once; nothing counts toward the
    sending pause; a soft bounce that old and tampered tokens change nothing."""
    from digest.core.models import utcnow
    from digest.delivery import reputation
    from digest.delivery.compaction import compact

    people = ["alice@example.net", "bob@example.net", "carol@example.net", "dave@example.net"]
    digests = send_digest(runtime, smtp, *people)
    result = compact(runtime.session_factory, today=utcnow().date(), retention_days=30, pause=0)
    assert result.rows == len(people), "the 2024 edition's rows are compacted"

    alice, bob, carol, dave = (digests[p] for p in people)
    # Alice's feedback loop reports to the VERP address; twice (a forger replaying it).
    for _ in range(2):
        report = messages.arf(alice.mail_from, people[0], alice.data)
        process(runtime, report, envelope_sender="", recipients=[alice.mail_from])
    # Bob's provider reports to the VERP address too.
    report = messages.arf(bob.mail_from, people[1], bob.data)
    processed = process(runtime, report, envelope_sender="", recipients=[bob.mail_from])
    assert processed.outcome == "complaint (unsubscribed)"
    # A report to the plain address quoting only the mailto token names no delivery once its
    # row is gone (a Message-ID next to a token proves nothing about whose message it was).
    report = messages.arf(INBOUND, people[3], dave.data)
    assert not process(runtime, report, envelope_sender="", recipients=[INBOUND]).changed
    # Carol's mailbox is gone; Dave's is only full.
    hard = messages.dsn(carol.mail_from, people[2], carol.data, status="5.1.1", action="failed", diagnostic="550 5.1.1")
    soft = messages.dsn(dave.mail_from, people[3], dave.data, status="4.2.2", action="delayed", diagnostic="452 4.2.2")
    process(runtime, hard, envelope_sender="", recipients=[carol.mail_from])
    assert not process(runtime, soft, envelope_sender="", recipients=[dave.mail_from]).changed
    # Tampered tokens (the VERP address, and the mailto in the quoted digest) name nobody, and
    # an old date in the Message-ID proves nothing by itself.
    forged = dave.mail_from.replace("bounce-", "bounce-x", 1)
    quoted = dave.data.replace(b"papers+unsubscribe-", b"papers+unsubscribe-x")
    assert quoted != dave.data
    report = messages.arf(forged, people[3], quoted)
    assert not process(runtime, report, envelope_sender="", recipients=[forged]).changed

    statuses = {p: subscriber(runtime, p).status for p in people}
    assert statuses == {
        people[0]: SubscriberStatus.COMPLAINED,
        people[1]: SubscriberStatus.COMPLAINED,
        people[2]: SubscriberStatus.BOUNCED,
        people[3]: SubscriberStatus.ACTIVE,
    }
    assert events(runtime, people[0]) == ["complaint"], "once, however often it is reported"
    assert events(runtime, people[3]) == []
    with runtime.session_factory() as session:
        now = utcnow()
        assert reputation.counted_complaints(session, now, runtime.pause_rules) == (0, 0)
        assert reputation.check_sending(session, now, runtime.pause_rules) is None


def test_an_erased_subscribers_old_reports_never_reach_whoever_gets_their_id(
    sqlite_url: str, smtp: SMTPSink, papers_api: PapersAPI
) -> None:
    """On SQLite the next subscriber gets an erased newest subscriber's id. A report about the
    erased person's compacted delivery (signed by us, so forgery is not the question) must
    not end the new person's subscription; a token made before the bound form proves only an
    id, so it is not enough once the row is gone either."""
    from digest.core.models import utcnow
    from digest.delivery.compaction import compact
    from digest.orchestration.pipeline import run_inprocess
    from digest.subscribers.subscriptions import erase
    from tests.support.settings import make_settings

    runtime = Runtime(make_settings(sqlite_url, smtp, papers_api))
    try:
        alice_id = add_active(runtime, "alice@example.net")
        with transaction(runtime.session_factory) as session:
            # She joined weeks before that digest (the new row's second must differ from hers).
            subscriptions_get(session, alice_id).created_at -= dt.timedelta(days=40)
        run_inprocess(runtime, DAY)
        (alice,) = digests_to(smtp, "alice@example.net")
        delivery_id, _, _ = bounce_token_ids(runtime, alice)
        assert compact(runtime.session_factory, today=utcnow().date(), retention_days=30, pause=0).rows == 1
        with transaction(runtime.session_factory) as session:
            erase(session, runtime.tokens, subscriptions_get(session, alice_id), now=utcnow())
        mallory_id = add_active(runtime, "mallory@example.net")
        assert mallory_id == alice_id, "SQLite reuses the newest row's id (the case under test)"
        complaint = messages.arf(alice.mail_from, "alice@example.net", alice.data)
        processed = process(runtime, complaint, envelope_sender="", recipients=[alice.mail_from])
        assert not processed.changed, processed.outcome
        # The same delivery and id in the form earlier releases sent: an id, no row, no proof.
        old_form = runtime.tokens.make(Purpose.BOUNCE, delivery_id, alice_id)
        to = f"papers+bounce-{old_form}@digest.example.org"
        hard = messages.dsn(to, "mallory@example.net", alice.data, status="5.1.1", action="failed", diagnostic="550")
        assert not process(runtime, hard, envelope_sender="", recipients=[to]).changed
        assert subscriber(runtime, "mallory@example.net").status is SubscriberStatus.ACTIVE
        assert events(runtime, "mallory@example.net") == []
    finally:
        runtime.dispose()


def subscriptions_get(session: Session, subscriber_id: int) -> Subscriber:
    found = session.get(Subscriber, subscriber_id)
    assert found is not None
    return found
