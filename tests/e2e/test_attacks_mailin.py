"""Issue 11, tried as a stranger would, through the real `digest mailin` listener.

Every attack here goes over SMTP to a real `digest mailin` process (and, where a stranger signs
up first, over HTTP to a real `digest serve`); answers come back to a real SMTP sink. The mail
the listener sends in answer goes out *after* its 250, so every "it was sent" waits (bounded)
for the sink, and every "nothing was sent" waits a short bounded time before looking.
"""

from __future__ import annotations

import datetime as dt
import re
import smtplib
import statistics
import time
from collections.abc import Iterator
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.core.settings import Settings
from digest.delivery import reputation
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Purpose
from digest.subscribers import subscriptions
from digest.subscribers.confirmation_limits import mailbox_of
from tests.mailin import messages
from tests.support.mailin import INBOUND, NEXT_DAY, Listener, add_active, digests_to, send_digest, snapshot, subscriber
from tests.support.processes import run_cli, settings_env
from tests.support.servers import PapersAPI, Received, SMTPSink, wait_until
from tests.support.settings import make_settings
from tests.web.live import serve_process

pytestmark = pytest.mark.e2e


SUBSCRIBE = "papers+subscribe@digest.example.org"
UNSUBSCRIBE = "papers+unsubscribe@digest.example.org"
QUIET = 1.5  # seconds to wait before asserting that the listener sent nothing (more)

# Any recorded complaint pauses sending under these rules: what a forged report may not reach.
HAIR_TRIGGER = {
    "complaint_min_sent": 1,
    "complaint_pause_min_complaints": 1,
    "complaint_pause_min_domains": 1,
    "complaint_min_subscriber_age_days": 0,
}
# The real rules except that a tiny list may pause (min_sent 1) and 5 complaints from 3 domains
# are enough: then only the subscriber-age rule stands between k=5 fresh mailboxes and a pause.
FIVE_ARE_ENOUGH = {"complaint_min_sent": 1, "complaint_pause_min_complaints": 5, "complaint_pause_min_domains": 3}


@pytest.fixture
def settings(request: pytest.FixtureRequest, database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Settings:
    """The test settings, with ``indirect`` overrides; the listener and runtime both read them.

    ``{"redis": True}``: limits shared through Redis, as in production (where Celery needs it).
    """
    overrides = dict(getattr(request, "param", {}))
    if overrides.pop("redis", False):
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    return make_settings(database, smtp, papers_api, **overrides)


# --------------------------------------------------------------------------- helpers


def smtp_data(listener: Listener, sender: str, to: str, data: bytes) -> int:
    """One SMTP transaction; the listener's DATA reply code."""
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.ehlo("attacker.example")
        client.mail(sender)
        client.rcpt(to)
        code, _ = client.data(data)
        return code


def settle(smtp: SMTPSink, expected: int, timeout: float = 20.0) -> list[Received]:
    """Wait (bounded) for ``expected`` messages, then a little longer to see that no more come."""
    smtp.wait_for(expected, timeout=timeout)
    time.sleep(QUIET)
    return list(smtp.messages)


def stripped_headers(digest: Received, keep: tuple[str, ...] = ("From", "To", "Subject", "Date", "Message-ID")) -> str:
    """A digest's headers as a forger quotes them: nothing but what any recipient could show,
    no VERP return path, no List-Unsubscribe token."""
    original = message_from_bytes(digest.data, policy=email_policy.compat32)
    lines = [f"{name}: {' '.join(str(original[name]).split())}" for name in keep if original[name] is not None]
    block = "\r\n".join(lines)
    assert "+bounce-" not in block and "+unsubscribe-" not in block and "/unsubscribe/" not in block
    return block


def abuse_report(
    sender: str, to: str, recipient: str, quoted_headers: str, feedback_type: str, *, headers_only: bool = False
) -> bytes:
    """An ARF report (RFC 5965) as a forger writes it: any Feedback-Type, quoting given headers
    (as an attached message, or as a text/rfc822-headers part like many feedback loops)."""
    boundary = "----=_forged_report_0042"
    now = format_datetime(dt.datetime.now(dt.UTC))
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: Abuse report\r\nDate: {now}\r\n"
        f"Message-ID: {make_msgid(domain='forger.example')}\r\nAuto-Submitted: auto-generated\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is an email abuse report.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: Forger/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\nArrival-Date: {now}\r\n\r\n"
        + (
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n{quoted_headers}\r\n"
            if headers_only
            else f"--{boundary}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
            f"{quoted_headers}\r\n\r\nSpam spam spam.\r\n"
        )
        + f"--{boundary}--\r\n"
    ).encode()


def statuses(runtime: Runtime) -> dict[str, str]:
    with runtime.engine.connect() as conn:
        return {email: status for email, status in conn.execute(sa.text("SELECT email, status FROM subscribers"))}


def complaint_events(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT count(*) FROM subscriber_events WHERE kind = 'complaint'")) or 0)


def assert_sending_on(runtime: Runtime, settings: Settings) -> None:
    with transaction(runtime.session_factory) as session:
        assert reputation.active_pause(session) is None
        assert reputation.pause_reason(session, utcnow(), runtime.pause_rules) is None
    shown = run_cli(["status"], settings_env(settings), timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "sending on" in shown.stdout and "PAUSED" not in shown.stdout, shown.stdout


def link(message: EmailMessage, kind: str) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    found = re.search(rf"http://digest\.test/{kind}/(\S+)", body.get_content())
    assert found, body.get_content()
    return found.group(1)


@pytest.fixture
def web(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The public sign-up form, as a real `digest serve` process."""
    with serve_process(settings, tmp_path) as base:
        yield base


def sign_up_through_the_form(web: str, smtp: SMTPSink, address: str) -> None:
    """What a stranger does to get a confirmed throwaway: the form, the mailed link, the button."""
    before = len(smtp.messages)
    assert httpx.post(f"{web}/subscribe", data={"email": address}).status_code == 200
    assert wait_until(lambda: len(smtp.to(address)) >= 1, timeout=20), f"no confirmation for {address}"
    token = link(smtp.to(address)[-1], "confirm")
    assert httpx.post(f"{web}/confirm/{token}").status_code == 200
    assert wait_until(lambda: len(smtp.messages) >= before + 2, timeout=20)  # the welcome


# --------------------------------------------------------------------------- 1. forged complaints

VICTIMS = ["alice@example.net", "bob@example.com", "carol@example.org", "dave@mail.example.net"]
THROWAWAY = "throwaway@burner.example.com"


@pytest.mark.parametrize("settings", [HAIR_TRIGGER], indirect=True, ids=["any-recorded-complaint-pauses"])
def test_forged_complaints_change_nobody_and_the_next_run_sends_to_everyone(
    listener: Listener, web: str, runtime: Runtime, settings: Settings, smtp: SMTPSink
) -> None:
    sign_up_through_the_form(web, smtp, THROWAWAY)
    smtp.clear()
    digests = send_digest(runtime, smtp, *VICTIMS)
    (throwaway_digest,) = digests_to(smtp, THROWAWAY)
    smtp.clear()
    before = snapshot(runtime)

    forger = "abuse-desk@forger.example"
    reports: list[tuple[str, bytes]] = []
    for feedback_type in ("abuse", "abuse", "fraud", "not-spam", "other", "virus"):
        for victim in VICTIMS[:2]:
            quoted = stripped_headers(digests[victim])
            for headers_only in (False, True):
                report = abuse_report(forger, INBOUND, victim, quoted, feedback_type, headers_only=headers_only)
                reports.append((forger, report))
    # From the throwaway the form confirmed: the victims' Message-IDs, once bare and once
    # next to the throwaway's own (genuine) List-Unsubscribe token.
    own_unsubscribe = " ".join(str(throwaway_digest.message["List-Unsubscribe"]).split())
    for victim in VICTIMS:
        quoted = stripped_headers(digests[victim])
        reports.append((THROWAWAY, abuse_report(THROWAWAY, INBOUND, victim, quoted, "abuse")))
        with_token = f"{quoted}\r\nList-Unsubscribe: {own_unsubscribe}"
        reports.append((THROWAWAY, abuse_report(THROWAWAY, INBOUND, victim, with_token, "abuse")))
    codes = [smtp_data(listener, sender, INBOUND, data) for sender, data in reports]

    assert codes == [250] * len(reports)
    time.sleep(QUIET)
    assert snapshot(runtime) == before  # no subscriber, delivery or event changed
    assert complaint_events(runtime) == 0
    assert smtp.messages == []  # and nobody was answered
    assert_sending_on(runtime, settings)

    run_inprocess(runtime, NEXT_DAY)
    for person in [*VICTIMS, THROWAWAY]:
        assert len(digests_to(smtp, person)) == 1, person

    # The control: under these rules one report that does name a delivery of ours (the feedback
    # loop quoting the whole digest) is recorded and would pause, so the forgeries above could have.
    assert (
        smtp_data(listener, "fbl@fbl.example.com", INBOUND, messages.arf(INBOUND, VICTIMS[0], digests[VICTIMS[0]].data))
        == 250
    )
    assert wait_until(lambda: complaint_events(runtime) == 1, timeout=10)
    with transaction(runtime.session_factory) as session:
        assert reputation.pause_reason(session, utcnow(), runtime.pause_rules) is not None


# --------------------------------------------------------------------------- 2. k genuine complaints

ATTACKER_BOXES = [f"box{i}@attacker{i}.example.com" for i in range(5)]
REGULARS = ["alice@example.net", "bob@example.com", "carol@example.org"]


@pytest.mark.parametrize("settings", [FIVE_ARE_ENOUGH], indirect=True, ids=["five-from-three-domains-pause"])
def test_complaints_from_five_fresh_mailboxes_only_end_those_subscriptions(
    listener: Listener, web: str, runtime: Runtime, settings: Settings, smtp: SMTPSink
) -> None:
    for box in ATTACKER_BOXES:
        sign_up_through_the_form(web, smtp, box)
    smtp.clear()
    send_digest(runtime, smtp, *REGULARS)
    attacker_digests = {box: digests_to(smtp, box)[0] for box in ATTACKER_BOXES}
    smtp.clear()

    # Genuine reports: each sent to its own digest's VERP address (the token is really ours).
    for box, digest in attacker_digests.items():
        assert "+bounce-" in digest.mail_from
        report = abuse_report(box, digest.mail_from, box, messages.header_block(digest.data), "abuse")
        assert smtp_data(listener, box, digest.mail_from, report) == 250

    assert wait_until(lambda: complaint_events(runtime) == len(ATTACKER_BOXES), timeout=10)
    now = statuses(runtime)
    assert {box: now[box] for box in ATTACKER_BOXES} == dict.fromkeys(ATTACKER_BOXES, "complained")
    assert {r: now[r] for r in REGULARS} == dict.fromkeys(REGULARS, "active")
    assert_sending_on(runtime, settings)

    run_inprocess(runtime, NEXT_DAY)
    for regular in REGULARS:
        assert len(digests_to(smtp, regular)) == 1, regular
    for box in ATTACKER_BOXES:
        assert digests_to(smtp, box) == [], box

    # The control: the same five complaints from subscribers of more than a week would pause,
    # so it is the age rule (not the count, the domains or the rate) that held above.
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE subscribers SET confirmed_at = confirmed_at - interval '8 days' WHERE email LIKE 'box%'")
        )
    with transaction(runtime.session_factory) as session:
        assert reputation.pause_reason(session, utcnow(), runtime.pause_rules) is not None


# --------------------------------------------------------------------------- 3. forged unsubscribe

VICTIM = "victim@example.net"
FORGER = "mallory@forger.example"


@pytest.mark.parametrize(
    ("to", "subject"),
    [(INBOUND, "unsubscribe"), (UNSUBSCRIBE, "please remove me")],
    ids=["subject-to-the-plain-address", "plus-unsubscribe-without-token"],
)
def test_forged_unsubscribe_leaves_the_victim_subscribed_and_mails_only_the_victim(
    listener: Listener, runtime: Runtime, smtp: SMTPSink, to: str, subject: str
) -> None:
    add_active(runtime, VICTIM)
    forged = messages.plain(f"Victim <{VICTIM}>", to, subject, "Unsubscribe", {"Reply-To": FORGER})

    assert smtp_data(listener, FORGER, to, forged) == 250

    received = settle(smtp, 1)
    assert subscriber(runtime, VICTIM).status is SubscriberStatus.ACTIVE
    assert [m.rcpt_tos for m in received] == [[VICTIM]]  # nothing at all to the forger
    token = link(received[0].message, "unsubscribe")
    with transaction(runtime.session_factory) as session:
        named = subscriptions.subscriber_from_token(session, runtime.tokens, Purpose.UNSUBSCRIBE, token)
        assert named.email == VICTIM  # the victim's own one-click link

    # Repeating the forgery does not turn the list into a mail cannon at the victim.
    for _ in range(5):
        assert smtp_data(listener, FORGER, to, messages.plain(VICTIM, to, subject, "Unsubscribe")) == 250
    received = settle(smtp, 2)
    assert len(received) <= 2 and all(m.rcpt_tos == [VICTIM] for m in received)
    assert subscriber(runtime, VICTIM).status is SubscriberStatus.ACTIVE


# --------------------------------------------------------------------------- 4. floods

PER_SOURCE = 10  # DIGEST_CONFIRMATION_LIMIT_PER_SOURCE's default hourly part ("10/hour;30/day")
PER_MAILBOX = 2  # DIGEST_CONFIRMATION_LIMIT_PER_MAILBOX's default hourly part ("2/hour;5/day")


@pytest.mark.parametrize("settings", [{"redis": True}], indirect=True, ids=["limits-in-redis"])
def test_one_session_naming_a_hundred_third_parties_sends_at_most_the_per_source_limit(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    assert runtime.settings.confirmation_limit_per_source.startswith(f"{PER_SOURCE}/hour")
    codes = []
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.ehlo("attacker.example")
        for i in range(100):
            third_party = f"person{i}@org{i}.example.net"
            client.mail(FORGER)
            client.rcpt(SUBSCRIBE)
            codes.append(client.data(messages.plain(third_party, SUBSCRIBE, "subscribe"))[0])

    assert codes == [250] * 100
    received = settle(smtp, PER_SOURCE)
    assert len(received) == PER_SOURCE
    assert all(len(m.rcpt_tos) == 1 and m.rcpt_tos[0].endswith(".example.net") for m in received)
    assert not smtp.to(FORGER)


@pytest.mark.parametrize("settings", [{"redis": True}], indirect=True, ids=["limits-in-redis"])
def test_fifty_plus_address_variants_put_at_most_two_confirmations_in_one_mailbox(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    assert runtime.settings.confirmation_limit_per_mailbox.startswith(f"{PER_MAILBOX}/hour")
    codes = []
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.ehlo("attacker.example")
        for i in range(50):
            variant = f"Inbox+{i}@Victim.example" if i % 2 else f"inbox+{i}@victim.example"
            client.mail(FORGER)
            client.rcpt(SUBSCRIBE)
            codes.append(client.data(messages.plain(variant, SUBSCRIBE, "subscribe"))[0])

    assert codes == [250] * 50
    received = settle(smtp, PER_MAILBOX)
    landed = [m for m in received if {mailbox_of(r) for r in m.rcpt_tos} == {"inbox@victim.example"}]
    assert len(landed) == len(received) == PER_MAILBOX


# --------------------------------------------------------------------------- 5. timing oracle

PROBES = 15


@pytest.mark.parametrize(
    "settings", [{"confirmation_limit_per_source": "1000/hour"}], indirect=True, ids=["every-probe-mails"]
)
def test_the_smtp_answer_takes_as_long_for_an_active_address_as_for_a_new_one(
    listener: Listener, runtime: Runtime, smtp: SMTPSink
) -> None:
    """Per-source limit raised so that every new address really is mailed (the old oracle)."""
    active = [f"member{i}@example.net" for i in range(PROBES + 3)]
    for address in active:
        add_active(runtime, address)
    timings: dict[str, list[float]] = {"active": [], "new": []}
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.ehlo("attacker.example")
        for i in range(PROBES + 3):
            order = [("active", active[i]), ("new", f"fresh{i}@example.org")]
            for kind, address in order if i % 2 else reversed(order):
                client.mail(FORGER)
                client.rcpt(SUBSCRIBE)
                data = messages.plain(address, SUBSCRIBE, "subscribe")
                started = time.perf_counter()
                code, _ = client.data(data)
                elapsed = time.perf_counter() - started
                assert code == 250
                if i >= 3:  # the first rounds warm up connections and caches
                    timings[kind].append(elapsed)
                if kind == "new":  # let the answer go out, so it cannot slow the next probe
                    assert wait_until(lambda: bool(smtp.to(address)), timeout=10, interval=0.01)  # noqa: B023
    gap = abs(statistics.median(timings["new"]) - statistics.median(timings["active"]))
    assert gap < 0.010, {k: [round(t * 1000, 1) for t in v] for k, v in timings.items()}
    assert all(not smtp.to(a) for a in active)  # active members were not mailed at all
