"""The SMTP client's own DATA encoding: what the receiving server gets must be the message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from digest.transport.mailer import SendError, SMTPConfig, SMTPConnection, data_payload, run_sending, smtp_path
from tests.support.servers import SMTPSink

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Each behaviour on both event loops a batch may run on (``run_sending`` picks uvloop)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        return run_sending
    return asyncio.run


def config(smtp: SMTPSink) -> SMTPConfig:
    # A short timeout: a reply lost between the loop and the protocol fails the test in seconds.
    return SMTPConfig("127.0.0.1", smtp.port, timeout=5)


def aiosmtplib_payload(message: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


# Atoms, the characters around them in addresses and display names, and a non-ASCII letter.
ADDRESS_PARTS = [
    "a",
    "Zed",
    "0",
    "!#$%&'*+/=?^_`{|}~-",
    ".",
    "..",
    "@",
    "@@",
    " ",
    '"',
    "<",
    ">",
    "(",
    ")",
    ",",
    ";",
    ":",
    "[",
    "]",
    "\\",
    "\u00e9",
]


@given(st.lists(st.sampled_from(ADDRESS_PARTS), max_size=12))
def test_the_envelope_address_is_what_aiosmtplib_would_send(parts: list[str]) -> None:
    address = "".join(parts)
    try:
        expected = quote_address(address).encode("ascii")
    except UnicodeEncodeError:
        return  # an SMTPUTF8 address: sent through aiosmtplib's own commands, not this path
    except ValueError:  # a character that could smuggle a parameter onto the command line
        with pytest.raises(ValueError):
            smtp_path(address)
        return
    assert smtp_path(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "reader@example.org",
        "o'brien+papers@mail.example.co.uk",
        "Daily Papers <papers@example.org>",
        "a..b@example.org",
    ],
)
def test_everyday_envelope_addresses(address: str) -> None:
    assert smtp_path(address) == quote_address(address).encode("ascii")


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"From x", b" "]), max_size=40))
def test_the_payload_is_byte_for_byte_what_aiosmtplib_would_send(parts: list[bytes]) -> None:
    message = b"".join(parts)
    assert data_payload(message) == aiosmtplib_payload(message)


def test_lines_starting_with_a_period_arrive_intact(smtp: SMTPSink, run: Run) -> None:
    body = (
        b"Subject: dots\r\n\r\n"
        b".leading dot\r\n"
        b"..two dots\r\n"
        b"a lone period line follows\r\n"
        b".\r\n"
        b"bare LF line\n"
        b"last line without an ending"
    )

    async def send() -> tuple[str, str]:
        connection = SMTPConnection(config(smtp))
        try:
            reply = await connection.send("digest@example.org", "reader@example.net", body)
            assert connection._client is not None and connection._client.protocol is not None
            return reply, type(connection._client.protocol).__name__
        finally:
            await connection.close()

    reply, protocol = run(send())
    # The fast (pipelined) path is in use with the installed aiosmtplib, on either loop.
    assert protocol == "_FastDataProtocol"
    assert "queued" in reply
    [received] = smtp.messages
    # The server undoes the dot-stuffing; only line endings are made canonical on the way.
    assert received.data.replace(b"\r\n", b"\n").rstrip(b"\n") == body.replace(b"\r\n", b"\n")
    assert received.message["Subject"] == "dots"
    assert received.message.get_content().splitlines()[:4] == [
        ".leading dot",
        "..two dots",
        "a lone period line follows",
        ".",
    ]


class _Writes:
    """Records what the client writes on an open connection (one entry per transport write)."""

    def __init__(self, connection: SMTPConnection):
        assert connection._client is not None and connection._client.protocol is not None
        transport = connection._client.protocol.transport
        assert isinstance(transport, asyncio.WriteTransport)
        self.seen: list[bytes] = []
        original = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            self.seen.append(bytes(data))
            original(data)

        transport.write = write  # type: ignore[method-assign]

    def commands(self) -> list[bytes]:
        return [w for w in self.seen if not w.startswith(b"Subject")]


BODY = b"Subject: hi\r\n\r\nhello\r\n"


def _send_all(
    smtp: SMTPSink, recipients: list[str], run: Run = asyncio.run
) -> tuple[list[str | SendError], list[bytes]]:
    """Send one message to each recipient over one connection, in order; the first opens it.
    The writes are seen on asyncio's loop only (uvloop's transport methods are C)."""

    async def go() -> tuple[list[str | SendError], list[bytes]]:
        connection = SMTPConnection(config(smtp))
        outcomes: list[str | SendError] = []
        try:
            outcomes.append(await connection.send("digest@example.org", "first@example.net", BODY))
            writes = _Writes(connection) if run is asyncio.run else None
            for recipient in recipients:
                try:
                    outcomes.append(await connection.send("digest@example.org", recipient, BODY))
                except SendError as exc:
                    outcomes.append(exc)
            return outcomes, writes.commands() if writes else []
        finally:
            await connection.close()

    sent: tuple[list[str | SendError], list[bytes]] = run(go())
    return sent


def test_mail_rcpt_and_data_go_in_one_write_when_the_server_offers_pipelining(smtp: SMTPSink) -> None:
    outcomes, writes = _send_all(smtp, ["second@example.net"])
    assert all(isinstance(o, str) and "queued" in o for o in outcomes)
    assert writes == [b"MAIL FROM:<digest@example.org>\r\nRCPT TO:<second@example.net>\r\nDATA\r\n"]
    assert [m.rcpt_tos for m in smtp.wait_for(2)] == [["first@example.net"], ["second@example.net"]]


def test_without_pipelining_the_commands_go_one_at_a_time(smtp: SMTPSink) -> None:
    smtp.behaviour.pipelining = False
    outcomes, writes = _send_all(smtp, ["second@example.net"])
    assert all(isinstance(o, str) and "queued" in o for o in outcomes)
    assert writes == [b"MAIL FROM:<digest@example.org>\r\n", b"RCPT TO:<second@example.net>\r\n", b"DATA\r\n"]
    assert len(smtp.wait_for(2)) == 2


def test_a_recipient_refused_mid_pipeline_is_a_bounce_and_the_session_stays_in_step(smtp: SMTPSink, run: Run) -> None:
    smtp.behaviour.refuse = {"gone@example.net": "550 5.1.1 no such user", "full@example.net": "452 4.2.2 full"}
    outcomes, _ = _send_all(smtp, ["gone@example.net", "full@example.net", "after@example.net"], run)
    _, gone, full, after = outcomes
    assert isinstance(gone, SendError) and (gone.stage, gone.code, gone.permanent) == ("rcpt", 550, True)
    assert gone.about_recipient and gone.reason == "550 5.1.1 no such user"
    assert isinstance(full, SendError) and (full.stage, full.code, full.permanent) == ("rcpt", 452, False)
    # The refused transactions' DATA replies were read: the next message pairs with its replies.
    assert isinstance(after, str) and "queued" in after
    assert [m.rcpt_tos for m in smtp.wait_for(2)] == [["first@example.net"], ["after@example.net"]]


def test_a_refused_sender_and_a_refused_message_keep_their_stage(smtp: SMTPSink, run: Run) -> None:
    async def go() -> tuple[SendError, SendError, str]:
        connection = SMTPConnection(config(smtp))
        try:
            smtp.behaviour.mail_reply = "530 5.7.0 authentication required"
            with pytest.raises(SendError) as mail:
                await connection.send("digest@example.org", "a@example.net", BODY)
            smtp.behaviour.mail_reply = None
            smtp.behaviour.temp_fail_data = 1
            with pytest.raises(SendError) as data:
                await connection.send("digest@example.org", "b@example.net", BODY)
            return mail.value, data.value, await connection.send("digest@example.org", "c@example.net", BODY)
        finally:
            await connection.close()

    mail, data, last = run(go())
    assert (mail.stage, mail.code, mail.permanent, mail.about_recipient) == ("mail", 530, True, False)
    assert (data.stage, data.code, data.permanent) == ("data", 451, False)
    assert "queued" in last
    assert [m.rcpt_tos for m in smtp.wait_for(1)] == [["c@example.net"]]
