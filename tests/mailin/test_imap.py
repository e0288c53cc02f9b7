"""IMAP polling (digest.mailin.imap.poll_imap) against a real Dovecot from Debian's packages."""

from __future__ import annotations

import imaplib
import itertools
import time
from collections.abc import Iterator

import pytest

from digest.core.models import SubscriberStatus
from digest.core.settings import Settings
from digest.mailin.imap import poll_imap
from digest.orchestration.runtime import Runtime
from tests.mailin import messages
from tests.support.mailin import INBOUND, Dovecot, events, running_dovecot, send_digest, snapshot, subscriber
from tests.support.servers import PapersAPI, SMTPSink
from tests.support.settings import make_settings, runtime_with

pytestmark = pytest.mark.imap
_mailboxes = itertools.count()


@pytest.fixture
def imap_runtime(database: str, smtp: SMTPSink, papers_api: PapersAPI, dovecot: Dovecot) -> Iterator[Runtime]:
    """A runtime polling a mailbox of its own on the private Dovecot."""
    user = f"papers{next(_mailboxes)}-{time.monotonic_ns()}"
    settings: Settings = make_settings(
        database,
        smtp,
        papers_api,
        imap_host="127.0.0.1",
        imap_port=dovecot.port,
        imap_username=user,
        imap_password="secret",
        imap_ssl=False,
        imap_folder="INBOX",
        mailin_max_bytes=1024 * 1024,
    )
    runtime = Runtime(settings)
    yield runtime
    runtime.dispose()


def mailbox(runtime: Runtime) -> imaplib.IMAP4:
    s = runtime.settings
    assert s.imap_host and s.imap_username and s.imap_password
    client = imaplib.IMAP4(s.imap_host, s.imap_port)
    client.login(s.imap_username, s.imap_password)
    return client


def drop(runtime: Runtime, *items: bytes) -> None:
    client = mailbox(runtime)
    for data in items:
        status, _ = client.append("INBOX", None, None, data)
        assert status == "OK"
    client.logout()


def mark_all_unseen(runtime: Runtime) -> None:
    client = mailbox(runtime)
    client.select("INBOX")
    client.store("1:*", "-FLAGS", r"(\Seen)")
    client.logout()


def test_each_case_is_handled_once_across_polls(imap_runtime: Runtime, smtp: SMTPSink) -> None:
    runtime = imap_runtime
    digests = send_digest(
        runtime,
        smtp,
        "alice@example.net",
        "bob@example.net",
        "dave@example.net",
        "erin@example.net",
        "frank@example.net",
    )
    smtp.clear()
    alice, bob, dave, erin = (
        digests[e] for e in ("alice@example.net", "bob@example.net", "dave@example.net", "erin@example.net")
    )
    mailto = str(alice.message["List-Unsubscribe"]).split("<mailto:")[1].split(">")[0]
    subscribe_to = "papers+subscribe@digest.example.org"
    drop(
        runtime,
        messages.plain("carol@example.net", subscribe_to, "join"),
        messages.plain("alice@example.net", mailto, "unsubscribe"),
        messages.dsn(
            bob.mail_from,
            "bob@example.net",
            bob.data,
            status="5.1.1",
            action="failed",
            diagnostic="550 5.1.1 User unknown",
        ),
        messages.dsn(
            dave.mail_from,
            "dave@example.net",
            dave.data,
            status="4.2.2",
            action="delayed",
            diagnostic="452 4.2.2 Mailbox full",
        ),
        messages.arf(INBOUND, "erin@example.net", erin.data),
        messages.out_of_office("frank@example.net", INBOUND),
    )

    stats = poll_imap(runtime)

    assert (stats.seen, stats.handled, stats.ignored, stats.failed) == (6, 5, 1, 0)
    assert subscriber(runtime, "carol@example.net").status is SubscriberStatus.PENDING
    assert subscriber(runtime, "alice@example.net").status is SubscriberStatus.UNSUBSCRIBED
    assert subscriber(runtime, "bob@example.net").status is SubscriberStatus.BOUNCED
    assert subscriber(runtime, "dave@example.net").status is SubscriberStatus.ACTIVE
    assert events(runtime, "dave@example.net") == ["soft_bounce"]
    assert subscriber(runtime, "erin@example.net").status is SubscriberStatus.COMPLAINED
    assert events(runtime, "erin@example.net") == ["complaint"]
    assert subscriber(runtime, "frank@example.net").status is SubscriberStatus.ACTIVE
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == ["alice@example.net", "carol@example.net"]

    after_first = snapshot(runtime)
    assert poll_imap(runtime).seen == 0  # flagged \Seen: not fetched again
    mark_all_unseen(runtime)  # someone marks them unread: the database still remembers them
    again = poll_imap(runtime)
    assert (again.seen, again.handled) == (6, 0)
    assert snapshot(runtime) == after_first
    assert len(smtp.messages) == 2


def test_junk_in_the_mailbox_changes_nothing(imap_runtime: Runtime, smtp: SMTPSink) -> None:
    runtime = imap_runtime
    digest = send_digest(runtime, smtp, "alice@example.net")["alice@example.net"]
    smtp.clear()
    before = snapshot(runtime)
    forged = digest.mail_from.replace("+bounce-", "+bounce-x")
    drop(
        runtime,
        b"From: \xff\xfe <@@>\r\nTo: papers@digest.example.org\r\nSubject: \xe9\r\n"
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nbroken",
        messages.dsn(forged, "alice@example.net", digest.data, status="5.1.1", action="failed", diagnostic="550"),
        b"To: papers@digest.example.org\r\nSubject: huge\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2_000,  # 2 MB
    )
    stats = poll_imap(runtime)
    assert (stats.seen, stats.handled, stats.ignored) == (3, 0, 3)
    assert snapshot(runtime) == before
    assert smtp.messages == []
    assert poll_imap(runtime).seen == 0


def test_handled_mail_can_be_moved_out_of_the_inbox(imap_runtime: Runtime, smtp: SMTPSink) -> None:
    with runtime_with(imap_runtime.settings, imap_done_folder="Digest handled") as runtime:
        moves_handled_mail_out_of_the_inbox(runtime)


def moves_handled_mail_out_of_the_inbox(runtime: Runtime) -> None:
    drop(
        runtime,
        messages.plain("carol@example.net", "papers+subscribe@digest.example.org", "join"),
        b"To: papers@digest.example.org\r\nSubject: huge\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2_000,  # ignored
    )
    # Someone else's message, read and flagged deleted but not expunged: it must survive.
    client = mailbox(runtime)
    client.append("INBOX", r"(\Seen \Deleted)", None, messages.plain("x@example.net", INBOUND, "old"))
    client.logout()
    stats = poll_imap(runtime)
    assert (stats.seen, stats.handled, stats.ignored) == (2, 1, 1)
    assert subscriber(runtime, "carol@example.net").status is SubscriberStatus.PENDING
    client = mailbox(runtime)
    try:
        assert client.select("INBOX")[1] == [b"1"]  # only the other message is left
        status, count = client.select('"Digest handled"')
        assert status == "OK" and count == [b"2"]
        _, seen = client.search(None, "SEEN")
        assert len(seen[0].split()) == 2
    finally:
        client.logout()
    drop(runtime, messages.plain("dan@example.net", "papers+subscribe@digest.example.org", "join"))
    assert poll_imap(runtime).handled == 1  # the folder exists now: still fine
    assert subscriber(runtime, "dan@example.net").status is SubscriberStatus.PENDING


def test_without_move_handled_mail_is_copied_and_only_it_expunged(
    database: str, smtp: SMTPSink, papers_api: PapersAPI
) -> None:
    # A server that offers UIDPLUS but not MOVE (as older ones do).
    with running_dovecot("imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE UIDPLUS\n") as server:
        settings = make_settings(
            database,
            smtp,
            papers_api,
            imap_host="127.0.0.1",
            imap_port=server.port,
            imap_username="papers",
            imap_password="secret",
            imap_ssl=False,
            imap_done_folder="Done",
        )
        runtime = Runtime(settings)
        try:
            client = mailbox(runtime)
            _, caps = client.capability()
            assert b"MOVE" not in caps[0].split() and b"UIDPLUS" in caps[0].split()
            client.append("INBOX", r"(\Seen \Deleted)", None, messages.plain("x@example.net", INBOUND, "old"))
            client.logout()
            drop(runtime, messages.plain("carol@example.net", "papers+subscribe@digest.example.org", "join"))
            assert poll_imap(runtime).handled == 1
            client = mailbox(runtime)
            assert client.select("INBOX")[1] == [b"1"]  # the other message is still there
            assert client.select("Done")[1] == [b"1"]
            client.logout()
        finally:
            runtime.dispose()
