"""``digest mailin`` as the Procfile runs it: real SMTP in, real database, real SMTP out."""

from __future__ import annotations

import datetime as dt
import re
import smtplib
from email.utils import parseaddr

import pytest

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.delivery import reputation
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Purpose
from digest.subscribers import subscriptions
from tests.mailin import messages
from tests.support.mailin import INBOUND, NEXT_DAY, Listener, digests_to, events, send_digest, snapshot, subscriber
from tests.support.servers import SMTPSink

pytestmark = pytest.mark.e2e


def send(listener: Listener, sender: str, to: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.sendmail(sender, [to], data)


def test_subscribe_by_email_sends_a_confirmation_and_confirming_activates(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    to = "papers+subscribe@digest.example.org"
    send(listener, "carol@example.net", to, messages.plain("Carol <carol@example.net>", to, "please add me"))
    smtp.wait_for(1)  # answers go out after the SMTP answer

    (confirmation,) = smtp.to("carol@example.net")
    assert confirmation["Auto-Submitted"] == "auto-generated"
    assert subscriber(runtime, "carol@example.net").status is SubscriberStatus.PENDING
    body = confirmation.get_body(preferencelist=("plain",))
    assert body is not None
    token = re.search(r"http://digest\.test/confirm/(\S+)", body.get_content())
    assert token is not None
    with transaction(runtime.session_factory) as session:
        person = subscriptions.subscriber_from_token(session, runtime.tokens, Purpose.CONFIRM, token.group(1))
        issued = dt.datetime.fromtimestamp(runtime.tokens.issued_at(Purpose.CONFIRM, token.group(1)), dt.UTC)
        assert subscriptions.confirm(session, runtime.tokens, person, now=utcnow(), issued_at=issued)
    assert subscriber(runtime, "carol@example.net").status is SubscriberStatus.ACTIVE
    assert subscriber(runtime, "carol@example.net").source == "email"


def test_subject_subscribe_to_the_plain_address_works_too(listener: Listener, runtime: Runtime, smtp: SMTPSink) -> None:
    send(listener, "dan@example.net", INBOUND, messages.plain("dan@example.net", INBOUND, "subscribe"))
    smtp.wait_for(1)
    assert len(smtp.to("dan@example.net")) == 1
    assert subscriber(runtime, "dan@example.net").status is SubscriberStatus.PENDING


def test_list_unsubscribe_mailto_unsubscribes_and_the_next_run_skips_them(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")["alice@example.net"]
    header = str(digest.message["List-Unsubscribe"])
    mailto = re.search(r"<mailto:([^>?]+)", header)
    assert mailto is not None
    smtp.clear()

    send(
        listener,
        "alice@example.net",
        mailto.group(1),
        messages.plain("alice@example.net", mailto.group(1), "Unsubscribe", "This message was sent by Gmail."),
    )

    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.UNSUBSCRIBED
    smtp.wait_for(1)
    (reply,) = smtp.to("alice@example.net")
    assert "unsubscribed" in str(reply["Subject"]).lower() or "unsubscribed" in reply.as_string().lower()
    smtp.clear()
    run_inprocess(runtime, NEXT_DAY)
    assert digests_to(smtp, "alice@example.net") == []
    assert len(digests_to(smtp, "bob@example.net")) == 1


def test_every_digest_is_sent_from_its_own_verp_bounce_address(runtime: Runtime, smtp: SMTPSink) -> None:
    received = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")
    senders = {email: got.mail_from for email, got in received.items()}
    assert len(set(senders.values())) == 2
    for got in received.values():
        assert re.fullmatch(r"papers\+bounce-[A-Za-z0-9_.\-]+@digest\.example\.org", got.mail_from)
        assert parseaddr(str(got.message["From"]))[1] == "papers@digest.example.org"


def test_hard_dsn_for_a_digest_bounces_its_subscriber(listener: Listener, runtime: Runtime, smtp: SMTPSink) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")["alice@example.net"]
    smtp.clear()
    report = messages.dsn(
        digest.mail_from,
        "alice@example.net",
        digest.data,
        status="5.1.1",
        action="failed",
        diagnostic="550 5.1.1 <alice@example.net>: Recipient address rejected: User unknown",
    )
    send(listener, "", digest.mail_from, report)

    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.BOUNCED
    assert events(runtime, "alice@example.net") == ["hard_bounce"]
    assert subscriber(runtime, "bob@example.net").status is SubscriberStatus.ACTIVE
    assert smtp.messages == []  # a report is never answered


def test_soft_dsn_below_the_threshold_keeps_the_subscriber(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    smtp.clear()
    report = messages.dsn(
        digest.mail_from,
        "alice@example.net",
        digest.data,
        status="4.2.2",
        action="delayed",
        diagnostic="452 4.2.2 <alice@example.net>: Mailbox full",
    )
    send(listener, "", digest.mail_from, report)

    alice = subscriber(runtime, "alice@example.net")
    assert alice.status is SubscriberStatus.ACTIVE
    assert alice.soft_bounce_score == 1.0
    assert events(runtime, "alice@example.net") == ["soft_bounce"]
    assert smtp.messages == []


def test_abuse_report_unsubscribes_and_counts_a_complaint(listener: Listener, runtime: Runtime, smtp: SMTPSink) -> None:
    digest = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")["alice@example.net"]
    smtp.clear()
    send(listener, "fbl@fbl.example.com", INBOUND, messages.arf(INBOUND, "alice@example.net", digest.data))

    # The report quotes the digest's headers, with our tokens in them: it names its delivery.
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.COMPLAINED
    assert events(runtime, "alice@example.net") == ["complaint"]
    with transaction(runtime.session_factory) as session:
        assert reputation.complaint_rate(session, utcnow()) == 0.5  # 1 complaint, 2 digests sent
    assert smtp.messages == []


def test_out_of_office_reply_changes_nothing_and_sends_nothing(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    send_digest(runtime, smtp, "alice@example.net")
    smtp.clear()
    before = snapshot(runtime)
    send(listener, "alice@example.net", INBOUND, messages.out_of_office("alice@example.net", INBOUND))

    assert snapshot(runtime) == before
    assert smtp.messages == []
    assert "auto_reply" in listener.log()


def test_junk_leaves_the_database_unchanged_and_the_listener_running(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    received = send_digest(runtime, smtp, "alice@example.net", "bob@example.net")
    digest = received["bob@example.net"]
    smtp.clear()
    before = snapshot(runtime)
    bounce = digest.mail_from
    alice_bounce = received["alice@example.net"].mail_from
    # Bob's signature on Alice's payload: naming another subscriber breaks the signature.
    bob_token = bounce.partition("+bounce-")[2].partition("@")[0]
    alice_token = alice_bounce.partition("+bounce-")[2].partition("@")[0]
    forged = alice_token.split(".")[0] + "." + ".".join(bob_token.split(".")[1:])
    tampered = f"papers+bounce-{forged}@digest.example.org"
    forged_dsn = messages.dsn(
        tampered,
        "alice@example.net",
        digest.data,
        status="5.1.1",
        action="failed",
        diagnostic="550 5.1.1 User unknown",
    )
    junk = [
        (bounce, b"\x00\xff\xfe garbage that is no message at all \x80\x81\r\n\r\n\xff"),
        (
            INBOUND,
            b"From: \xff\xfe\xfd <x@\xff.example>\r\nSubject: =?utf-8?b?!!!?= \xe9\xe8\r\n"
            b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n--never-closed\r\n'
            b"Content-Type: text/plain; charset=klingon\r\nContent-Transfer-Encoding: base64\r\n\r\n%%%\r\n",
        ),
        (tampered, forged_dsn),
        (
            "papers+unsubscribe-not.a.token@digest.example.org",
            messages.plain("mallory@example.com", "papers+unsubscribe-not.a.token@digest.example.org", "unsubscribe"),
        ),
        (
            "papers+bounce-abc@digest.example.org",
            messages.dsn(
                "papers+bounce-abc@digest.example.org",
                "bob@example.net",
                digest.data,
                status="5.1.1",
                action="failed",
                diagnostic="550 5.1.1 User unknown",
            ),
        ),
    ]
    for to, data in junk:
        send(listener, "mallory@example.com", to, data)

    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 30_000  # 30 MB
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=60) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:  # SIZE is advertised and checked
            client.sendmail("mallory@example.com", [INBOUND], big)
        assert declared.value.smtp_code == 552
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=60) as client:
        client.ehlo()
        client.mail("mallory@example.com")  # no SIZE parameter: the limit holds during DATA
        client.rcpt(INBOUND)
        code, _ = client.data(big)
        assert code == 552
    with (
        smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused),
    ):
        client.sendmail("mallory@example.com", ["someone@elsewhere.example"], b"Subject: relay?\r\n\r\nhi\r\n")

    assert snapshot(runtime) == before
    assert smtp.messages == []
    assert listener.running
    log = listener.log()
    assert "invalid bounce token" in log and "invalid unsubscribe token" in log
    # Still at work afterwards.
    to = "papers+subscribe@digest.example.org"
    send(listener, "erin@example.net", to, messages.plain("erin@example.net", to, "hello"))
    smtp.wait_for(1)
    assert len(smtp.to("erin@example.net")) == 1
