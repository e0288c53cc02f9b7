"""The SMTP client's own DATA encoding: what the receiving server gets must be the message."""

from __future__ import annotations

import asyncio

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from digest.transport.mailer import SMTPConfig, SMTPConnection, data_payload
from tests.support.servers import SMTPSink


def aiosmtplib_payload(message: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"From x", b" "]), max_size=40))
def test_the_payload_is_byte_for_byte_what_aiosmtplib_would_send(parts: list[bytes]) -> None:
    message = b"".join(parts)
    assert data_payload(message) == aiosmtplib_payload(message)


def test_lines_starting_with_a_period_arrive_intact(smtp: SMTPSink) -> None:
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
        connection = SMTPConnection(SMTPConfig("127.0.0.1", smtp.port))
        try:
            reply = await connection.send("digest@example.org", "reader@example.net", body)
            assert connection._client is not None and connection._client.protocol is not None
            return reply, type(connection._client.protocol).__name__
        finally:
            await connection.close()

    reply, protocol = asyncio.run(send())
    # The fast path is in use with the installed aiosmtplib (it falls back silently otherwise).
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
