"""Issue 18, mail-in: no stranger can stall the listener or spend other people's budgets.

Through the real `digest mailin` process (and a real Dovecot for IMAP), answers landing in a
real SMTP sink. Every time bound is relative to what a normal message costs on this machine in
the same test, with generous factors: the machine is small and shared.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from aiosmtpd.controller import Controller

from digest.mailin.classify import classify, config_from
from digest.mailin.imap import poll_imap
from digest.mailin.listener import MailinHandler
from digest.orchestration.runtime import Runtime
from tests.mailin import messages, test_imap
from tests.mailin.test_imap import drop, mailbox
from tests.support.mailin import INBOUND, Listener
from tests.support.servers import SMTPSink, free_port, wait_until

pytestmark = pytest.mark.e2e

imap_runtime = test_imap.imap_runtime  # a runtime polling its own mailbox on a private Dovecot

SUBSCRIBE = "papers+subscribe@digest.example.org"
FORGER = "mallory@forger.example"
FORGED = 11  # one more than DIGEST_CONFIRMATION_LIMIT_PER_SOURCE's hourly 10


def smtp_data(port: int, sender: str, to: str, data: bytes) -> tuple[int, float]:
    """One SMTP transaction: the DATA reply code and how long the answer took."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("relay.example")
        client.mail(sender)
        client.rcpt(to)
        started = time.perf_counter()
        code, _ = client.data(data)
        return code, time.perf_counter() - started


def subscribe_latency(port: int, smtp: SMTPSink, address: str, timeout: float = 60.0) -> float:
    """Seconds from sending a +subscribe until its confirmation is in the sink."""
    started = time.perf_counter()
    code, _ = smtp_data(port, address, SUBSCRIBE, messages.plain(address, SUBSCRIBE, "subscribe"))
    assert code == 250
    assert wait_until(lambda: bool(smtp.to(address)), timeout=timeout, interval=0.005), address
    return time.perf_counter() - started


def baseline(port: int, smtp: SMTPSink, name: str) -> float:
    """The slowest of three normal subscriptions (after one to warm up): this run's yardstick."""
    subscribe_latency(port, smtp, f"warm-{name}@example.net")
    return max(subscribe_latency(port, smtp, f"{name}{i}@example.net") for i in range(3))


def folded_from(size: int, line: bytes = b" a@x.example,") -> bytes:
    """A message whose From: is one field of ``size`` bytes folded over many ``line``s: shapes
    the standard library's address parser takes quadratic time over (the finding's 297 kB of
    addresses cost 14 s; one-letter lines cost more)."""
    head = b"From:" + (b"\r\n" + line) * (size // (len(line) + 2))
    return head + b"\r\n" + messages.plain("x@example.org", SUBSCRIBE, "subscribe").split(b"\r\n", 1)[1]


def test_a_300_kB_folded_from_is_refused_promptly_and_a_normal_message_meanwhile_too(
    listener: Listener, smtp: SMTPSink
) -> None:
    normal = baseline(listener.port, smtp, "before")
    answer: dict[str, tuple[int, float]] = {}
    big = threading.Thread(
        target=lambda: answer.update(big=smtp_data(listener.port, FORGER, SUBSCRIBE, folded_from(300 * 1024)))
    )
    big.start()
    time.sleep(0.3)  # the big message is in the listener's hands now
    during = subscribe_latency(listener.port, smtp, "during@example.net")
    big.join(timeout=120)

    code, took = answer["big"]
    assert code == 552
    assert took < 1.0 + 20 * normal, (took, normal)
    assert during < 1.0 + 10 * normal, (during, normal)
    assert "(oversize, " in listener.log() and "refused, header block over 65536 bytes" in listener.log()
    assert subscribe_latency(listener.port, smtp, "after@example.net") < 1.0 + 10 * normal
    assert listener.running


def test_seven_41_kB_header_messages_at_once_do_not_hold_up_a_normal_one(listener: Listener, smtp: SMTPSink) -> None:
    normal = baseline(listener.port, smtp, "before")
    codes: list[int] = []
    heavy = [
        threading.Thread(
            target=lambda: codes.append(smtp_data(listener.port, FORGER, SUBSCRIBE, folded_from(41_000, b" a"))[0])
        )
        for _ in range(7)
    ]
    for thread in heavy:
        thread.start()
    time.sleep(0.3)  # all seven are being handled
    during = subscribe_latency(listener.port, smtp, "during@example.net")
    for thread in heavy:
        thread.join(timeout=120)

    assert during < 1.0 + 10 * normal, (during, normal)
    assert codes == [552] * 7
    assert listener.log().count("(oversize, ") == 7


def test_forged_subscribes_through_one_relay_leave_a_genuine_sender_its_confirmation(
    listener: Listener, smtp: SMTPSink
) -> None:
    """Every message comes from the same peer (a relay on 127.0.0.1), as behind a forwarder."""
    for i in range(FORGED):
        victim = f"victim{i}@org{i}.example.net"
        code, _ = smtp_data(listener.port, FORGER, SUBSCRIBE, messages.plain(victim, SUBSCRIBE, "subscribe"))
        assert code == 250
    smtp.wait_for(FORGED - 1)
    subscribe_latency(listener.port, smtp, "genuine@example.net", timeout=20)

    time.sleep(1.0)  # anything more would have gone out by now
    victims = [m for m in smtp.messages if m.rcpt_tos[0].startswith("victim")]
    assert len(victims) == FORGED - 1  # the forger's own budget still holds
    assert len(smtp.to("genuine@example.net")) == 1


@pytest.mark.imap
def test_forged_subscribes_in_the_imap_box_leave_a_genuine_sender_its_confirmation(
    imap_runtime: Runtime, smtp: SMTPSink
) -> None:
    forged = [
        messages.plain(f"victim{i}@org{i}.example.net", INBOUND, "subscribe", headers={"Return-Path": f"<{FORGER}>"})
        for i in range(FORGED)
    ]
    genuine = messages.plain(
        "genuine@example.net", INBOUND, "subscribe", headers={"Return-Path": "<genuine@example.net>"}
    )
    drop(imap_runtime, *forged, genuine)

    stats = poll_imap(imap_runtime)

    assert stats.seen == FORGED + 1
    smtp.wait_for(FORGED)
    victims = [m for m in smtp.messages if m.rcpt_tos[0].startswith("victim")]
    assert len(victims) == FORGED - 1
    assert len(smtp.to("genuine@example.net")) == 1


@pytest.mark.imap
def test_an_oversize_header_in_the_imap_box_is_skipped_once_and_never_read_again(
    imap_runtime: Runtime, smtp: SMTPSink
) -> None:
    drop(imap_runtime, messages.plain("first@example.net", INBOUND, "subscribe"))
    started = time.perf_counter()
    poll_imap(imap_runtime)
    normal = time.perf_counter() - started

    drop(imap_runtime, folded_from(300 * 1024), messages.plain("second@example.net", INBOUND, "subscribe"))
    started = time.perf_counter()
    stats = poll_imap(imap_runtime)
    took = time.perf_counter() - started

    assert (stats.seen, stats.handled, stats.ignored, stats.failed) == (2, 1, 1, 0)
    assert took < 1.0 + 10 * normal, (took, normal)
    assert poll_imap(imap_runtime).seen == 0  # flagged seen: no poll reads it again
    smtp.wait_for(2)
    assert smtp.to("second@example.net")
    client = mailbox(imap_runtime)
    client.select("INBOX")
    assert client.search(None, "UNSEEN")[1] == [b""]
    client.logout()


@pytest.fixture
def relay_listener(runtime: Runtime) -> Iterator[int]:
    """The listener's own handler in this process, trusting the Authentication-Results of one
    relay (``mx.relay.example``), as a DIGEST_ setting naming it would."""
    handler = MailinHandler(runtime)
    handler.config = replace(handler.config, trusted_authserv_ids=frozenset({"mx.relay.example"}))
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="digest.example.org")
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def test_a_forger_claiming_a_genuine_envelope_cannot_spend_that_senders_authenticated_budget(
    relay_listener: int, smtp: SMTPSink
) -> None:
    """The forger uses the genuine sender's own envelope address (nothing proves it); the
    genuine mail carries the relay's DKIM pass for its From domain."""
    genuine = "alice@example.net"
    for i in range(FORGED):
        victim = f"victim{i}@org{i}.example.net"
        code, _ = smtp_data(relay_listener, genuine, SUBSCRIBE, messages.plain(victim, SUBSCRIBE, "subscribe"))
        assert code == 250
    smtp.wait_for(FORGED - 1)
    time.sleep(1.0)
    assert len(smtp.messages) == FORGED - 1  # the claimed envelope's budget is spent

    signed = b"Authentication-Results: mx.relay.example; dkim=pass (2048-bit key) header.d=example.net;\r\n"
    signed += b"  spf=pass smtp.mailfrom=example.net\r\n" + messages.plain(genuine, SUBSCRIBE, "subscribe")
    assert smtp_data(relay_listener, genuine, SUBSCRIBE, signed)[0] == 250
    assert wait_until(lambda: bool(smtp.to(genuine)), timeout=20)


def test_a_sender_controlled_escape_sequence_is_logged_escaped(listener: Listener, smtp: SMTPSink) -> None:
    data = messages.plain("eve@example.net", INBOUND, "\x1b]0;owned\x07 hello \x1b[2J").replace(
        b"Message-ID: <", b"Message-ID: <\x1b[31m"
    )
    assert smtp_data(listener.port, "eve@example.net", INBOUND, data)[0] == 250
    assert wait_until(lambda: "owned" in listener.log(), timeout=20)

    log = listener.log()
    assert "\x1b" not in log and "\x07" not in log
    assert "\\x1b]0;owned\\x07 hello \\x1b[2J" in log
    assert "mid:<\\x1b[31m" in log


@pytest.mark.parametrize(
    ("results", "key"),
    [
        ("mx.relay.example; dkim=pass header.d=example.net", "auth:alice@example.net"),
        ("mx.relay.example 1; dmarc=pass (p=reject) header.from=example.net", "auth:alice@example.net"),
        ("mx.relay.example; spf=pass smtp.mailfrom=bounce@forger.example", "auth:bounce@forger.example"),
        ("mx.relay.example; dkim=fail header.d=example.net", "sender:bounce@forger.example"),
        ("mx.relay.example; dkim=pass header.d=other.example", "sender:bounce@forger.example"),  # not aligned
        ("forger.example; dkim=pass header.d=example.net", "sender:bounce@forger.example"),  # not our relay
    ],
)
def test_the_limit_source_is_what_a_trusted_relay_proves_else_the_claimed_envelope(
    runtime: Runtime, results: str, key: str
) -> None:
    config = replace(config_from(runtime), trusted_authserv_ids=frozenset({"mx.relay.example"}))
    data = f"Authentication-Results: {results}\r\n".encode() + messages.plain("Alice+x@Example.net", SUBSCRIBE, "hi")
    inbound = classify(config, data, envelope_sender="bounce@forger.example", recipients=[SUBSCRIBE])
    assert inbound.source == key
    # Without a relay named in settings nothing is believed.
    untrusting = classify(config_from(runtime), data, envelope_sender="bounce@forger.example", recipients=[SUBSCRIBE])
    assert untrusting.source == "sender:bounce@forger.example"
