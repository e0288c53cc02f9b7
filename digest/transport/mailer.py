"""Sending mail: one interface, an SMTP implementation (pooled, persistent connections) and an
outbox implementation that writes files for the embedded default and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import tempfile
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
    normalize_message_line_endings,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_sending(main: Coroutine[Any, Any, T]) -> T:
    """Run a sending coroutine to its end on uvloop where it is installed, else asyncio's loop.

    uvloop's transports write and read in C: a batch's event loop costs less per message (see
    bench/README.md, "Tokens, issue 22"). Both loops run the same code, pipelining included.
    """
    try:
        import uvloop
    except ImportError:  # not on every platform (no Windows wheels)
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def wire_form(message: bytes) -> bytes:
    """The message as SMTP transfers it: every CR, LF and CRLF a CRLF, and a CRLF at the end
    (what aiosmtplib's ``normalize_message_line_endings`` does). DKIM signs exactly this.

    Our messages are built with LF endings (as the outbox writes them to files), so one
    ``bytes.replace`` usually does it; mixed endings take the library's own normalisation.
    """
    if b"\r" not in message:
        message = message.replace(b"\n", b"\r\n")
    else:
        bare = message.replace(b"\r\n", b"")
        if b"\r" in bare or b"\n" in bare:
            message = normalize_message_line_endings(message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


# A bare address of dot-atoms (RFC 5322 3.4.1), as every address is once normalised on
# subscribing: for it aiosmtplib's ``quote_address`` gives ``<address>``, after a pass through
# the email package's whole address parser (~10 us, 5 % of sending a digest).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_BARE_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")


def smtp_path(address: str) -> bytes:
    """The ``<address>`` of MAIL FROM and RCPT TO, exactly as ``quote_address`` makes it."""
    if _BARE_ADDRESS.match(address):
        return b"<" + address.encode("ascii") + b">"
    return _parsed_path(address)


@lru_cache(maxsize=16)  # the list's own sender, when given with a display name
def _parsed_path(address: str) -> bytes:
    return quote_address(address).encode("ascii")


# Searching for a period at a line's start: the regular expression engine finds it in half the
# time of ``bytes.find`` (12 against 25 us in a 37 KB digest: "." is common in text, which
# slows find's short-needle loop), and most digests have none.
_PERIOD_AFTER_NEWLINE = re.compile(rb"\n\.")


def data_payload(message: bytes) -> bytes:
    """The DATA payload exactly as aiosmtplib would send it: the wire form, lines starting with
    a period doubled (RFC 5321 4.5.2), the terminating ``.`` line.

    ``bytes.replace`` calls do the work of aiosmtplib's two regular-expression passes over the
    whole body: ~0.05 ms instead of ~0.3-0.6 ms for a 28 KB digest, the largest single cost of
    sending one.
    """
    message = wire_form(message)
    if message.startswith(b"."):
        message = b"." + message
    if _PERIOD_AFTER_NEWLINE.search(message):  # rare: only then the copy
        message = message.replace(b"\r\n.", b"\r\n..")
    return message + b".\r\n"


class _Stage:
    """Which reply a transaction waits for: what a failure is about (``SendError.stage``) and
    whether the message may be tried again on a fresh connection (only before DATA)."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "connect"


class _FastDataProtocol(SMTPProtocol):
    """aiosmtplib's protocol with ``data_payload`` in place of its per-message regexes, and a
    pipelined MAIL/RCPT/DATA (RFC 2920) for servers that offer PIPELINING.

    aiosmtplib reads one reply per command written: a reply arriving while the previous one
    waits to be picked up is dropped, and a second reply in the same segment stays unparsed in
    the buffer. So while a pipeline runs, ``data_received`` queues every complete reply here
    instead. The class is assigned to an existing instance (``SMTPConnection._connect``), so
    its state starts as class attributes.
    """

    _replies: deque[aiosmtplib.SMTPResponse] | None = None  # not None while a pipeline runs
    _replies_ready: asyncio.Future[None] | None = None
    _pipeline_error: BaseException | None = None

    async def execute_data_command(self, message: bytes, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        payload = data_payload(message)
        async with self._command_lock:
            # The same sequence as SMTPProtocol.execute_data_command (aiosmtplib 5.x).
            self._response_pending = True
            self.write(b"DATA\r\n")
            start = await self.read_response(timeout=timeout)
            if start.code != aiosmtplib.SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            self._response_pending = True
            self.write(payload)
            response = await self.read_response(timeout=timeout)
            if response.code != aiosmtplib.SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    def data_received(self, data: bytes) -> None:
        replies = self._replies
        if replies is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        try:
            while (response := self._read_response_from_buffer()) is not None:
                replies.append(response)
        except aiosmtplib.SMTPResponseException as exc:  # a malformed line
            self._wake(exc)
            return
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            self._wake(aiosmtplib.SMTPResponseException(aiosmtplib.SMTPStatus.invalid_response, "Response too long"))
        elif replies:
            self._wake(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._replies is not None:
            self._wake(aiosmtplib.SMTPServerDisconnected("Connection lost"))

    def eof_received(self) -> bool:
        if self._replies is not None:
            self._wake(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    def _wake(self, error: BaseException | None) -> None:
        if error is not None and self._pipeline_error is None:
            self._pipeline_error = error
        waiter = self._replies_ready
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_reply(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        assert self._replies is not None
        while not self._replies:
            if self._pipeline_error is not None:
                raise self._pipeline_error
            self._replies_ready = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._replies_ready, timeout)
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                self._replies_ready = None
        return self._replies.popleft()

    async def execute_pipelined(
        self, sender: str, recipient: str, message: bytes, stage: _Stage, timeout: float | None = None
    ) -> aiosmtplib.SMTPResponse:
        """MAIL FROM, RCPT TO and DATA in one write, then their three replies, then the payload.

        Raises what aiosmtplib's ``mail``, ``rcpt`` and ``data`` raise for the same replies,
        judged in the order of the commands: the first refusal decides, as it would have in
        the sequence. ``stage`` names the reply being waited for.
        """
        mail = b"MAIL FROM:" + smtp_path(sender)
        rcpt = b"RCPT TO:" + smtp_path(recipient)
        for command in (mail, rcpt):
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        payload = data_payload(message)
        async with self._command_lock:
            self._replies, self._pipeline_error = deque(), None
            try:
                stage.name = "mail"
                self.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
                mail_reply = await self._next_reply(timeout)
                refusal: aiosmtplib.SMTPResponseException | None = None
                if mail_reply.code != aiosmtplib.SMTPStatus.completed:
                    refusal = aiosmtplib.SMTPSenderRefused(mail_reply.code, mail_reply.message, sender)
                    if mail_reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
                        raise refusal  # 421: the server closes; the other replies may never come
                else:
                    stage.name = "rcpt"
                rcpt_reply = await self._later_reply(timeout, refusal)
                if refusal is None:
                    if rcpt_reply.code not in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward):
                        refusal = aiosmtplib.SMTPRecipientRefused(rcpt_reply.code, rcpt_reply.message, recipient)
                        if rcpt_reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
                            raise refusal
                    else:
                        stage.name = "data"
                data_reply = await self._later_reply(timeout, refusal)
                if refusal is None and data_reply.code != aiosmtplib.SMTPStatus.start_input:
                    refusal = aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
                if refusal is not None:
                    if data_reply.code == aiosmtplib.SMTPStatus.start_input:
                        # A server that answers DATA with 354 after refusing MAIL or RCPT now
                        # waits for a message. Closing drops that transaction; the lone "."
                        # RFC 2920 allows could deliver an empty message.
                        self._close_transport()
                    raise refusal
                self.write(payload)
                response = await self._next_reply(timeout)
                if response.code != aiosmtplib.SMTPStatus.completed:
                    raise aiosmtplib.SMTPDataError(response.code, response.message)
                if self._replies or self._buffer:
                    # More replies than commands: nothing later could be paired with its command.
                    self._close_transport()
                return response
            finally:
                self._replies = None
                self._pipeline_error = None

    async def _later_reply(
        self, timeout: float | None, refusal: aiosmtplib.SMTPResponseException | None
    ) -> aiosmtplib.SMTPResponse:
        """The next reply; after an earlier refusal, a connection that fails now ends with that
        refusal, as the sequence would have (it stopped there and never waited for this)."""
        try:
            return await self._next_reply(timeout)
        except aiosmtplib.SMTPException:
            if refusal is None:
                raise
            self._close_transport()
            raise refusal from None

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SendError(Exception):
    """A message was not accepted. ``permanent`` (5xx) must not be retried; the rest may.

    ``stage`` says where it failed: only a refusal at ``rcpt`` is about the recipient (a bounce);
    ``connect``, ``mail`` and ``data`` failures are about us, the relay or the content.
    """

    def __init__(self, reason: str, *, permanent: bool, code: int | None = None, stage: str = "data"):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.code = code
        self.stage = stage

    @property
    def about_recipient(self) -> bool:
        return self.stage == "rcpt" and self.code is not None


class Mailer(Protocol):
    async def send(self, sender: str, recipient: str, data: bytes) -> str:
        """Hand one message to the next hop; returns the server's reply or raises SendError."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SMTPConfig:
    host: str
    port: int
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"[:480]


class SMTPConnection:
    """One persistent SMTP session, opened lazily and reopened when the server drops it."""

    def __init__(self, config: SMTPConfig):
        self.config = config
        self._client: aiosmtplib.SMTP | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.config
        tls_context = ssl.create_default_context() if cfg.security != "none" else None
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            use_tls=cfg.security == "tls",
            start_tls=cfg.security == "starttls",
            tls_context=tls_context,
        )
        await client.connect()
        # aiosmtplib builds its protocol object inside connect() with no hook to choose the
        # class; the subclass adds no state, so switching the instance's class is safe. Only
        # when the protocol has the internals it relies on; otherwise the library's own path.
        if type(client.protocol) is SMTPProtocol and all(
            hasattr(client.protocol, name) for name in ("_command_lock", "_response_pending")
        ):
            client.protocol.__class__ = _FastDataProtocol
            if client.transport is not None:
                # uvloop's transports bind data_received when the connection is made; handing
                # them the protocol again binds the subclass's (asyncio's look it up per call).
                client.transport.set_protocol(client.protocol)
        if cfg.username and cfg.password:
            await client.login(cfg.username, cfg.password)
        self._client = client
        return client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                await client.quit()
        if client is not None:
            client.close()

    async def send(self, sender: str, recipient: str, data: bytes) -> str:
        # A connection that went stale between messages shows up at MAIL; only then is the
        # message tried once more on a fresh connection. Once DATA has started the server may
        # have the message, so a failure there goes back to the caller (the ledger's backoff)
        # rather than straight into a second copy.
        for fresh in (False, True):
            at = _Stage()
            try:
                client = self._client if (self._client and self._client.is_connected) else None
                if client is None:
                    client = await self._connect()
                    fresh = True
                message = await self._transaction(client, sender, recipient, data, at)
            except aiosmtplib.SMTPRecipientRefused as exc:
                await self._reset()
                raise SendError(
                    _reply(exc.code, exc.message), permanent=exc.code >= 500, code=exc.code, stage="rcpt"
                ) from exc
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421 or isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                    await self.close()
                    if not fresh and at.name == "mail":
                        continue
                else:
                    await self._reset()
                raise SendError(
                    _reply(exc.code, exc.message), permanent=exc.code >= 500, code=exc.code, stage=at.name
                ) from exc
            except (
                TimeoutError,
                aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPConnectError,
                aiosmtplib.SMTPTimeoutError,
                OSError,
            ) as exc:
                await self.close()
                if not fresh and at.name == "mail":
                    continue
                raise SendError(
                    f"connection problem: {type(exc).__name__}: {exc}", permanent=False, stage=at.name
                ) from exc
            except aiosmtplib.SMTPException as exc:
                await self.close()
                raise SendError(f"SMTP error: {exc}", permanent=False, stage=at.name) from exc
            return message or "250 OK"
        raise AssertionError("unreachable")

    async def _transaction(self, client: aiosmtplib.SMTP, sender: str, recipient: str, data: bytes, at: _Stage) -> str:
        """One message: MAIL, RCPT and DATA directly (one recipient per message, and sendmail()
        would parse both addresses again for every message; they were validated at subscribe
        time), pipelined when the server offers it: one write and one wait for the three
        replies instead of three round trips."""
        at.name = "mail"
        # EHLO (HELO if refused) as mail() would do it, before choosing: the reply lists PIPELINING.
        await client._ehlo_or_helo_if_needed()
        protocol = client.protocol
        if (
            (sender + recipient).isascii()
            and isinstance(protocol, _FastDataProtocol)
            and client.supports_extension("pipelining")
        ):
            try:
                return (await protocol.execute_pipelined(sender, recipient, data, at, client.timeout)).message
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
                client.close()  # as aiosmtplib does: a reply given up on would be mispaired
                raise
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == aiosmtplib.SMTPStatus.domain_unavailable:
                    client.close()
                raise
        options = [] if (sender + recipient).isascii() else ["SMTPUTF8"]
        await client.mail(sender, options=options)
        at.name = "rcpt"
        await client.rcpt(recipient)
        at.name = "data"
        return (await client.data(data)).message

    async def _reset(self) -> None:
        if self._client is not None and self._client.is_connected:
            try:
                await self._client.rset()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                await self.close()


class SMTPPool:
    """A small pool of persistent connections shared by the coroutines of one batch."""

    def __init__(self, config: SMTPConfig, size: int = 4):
        self.config = config
        self.size = size
        self._idle: asyncio.Queue[SMTPConnection] | None = None
        self._all: list[SMTPConnection] = []

    def _queue(self) -> asyncio.Queue[SMTPConnection]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                conn = SMTPConnection(self.config)
                self._all.append(conn)
                self._idle.put_nowait(conn)
        return self._idle

    async def send(self, sender: str, recipient: str, data: bytes) -> str:
        queue = self._queue()
        conn = await queue.get()
        try:
            return await conn.send(sender, recipient, data)
        finally:
            queue.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._all.clear()
        self._idle = None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class OutboxMailer:
    """Writes each message to a folder as ``.eml`` (and its HTML part as ``.html``).

    The embedded default's "mail server": the demo's SMTP receiver and, in development without
    an SMTP host, the web app and workers write here. Numbers continue after the files already
    in the folder (the served app adds to the demo's digests instead of overwriting them); each
    file appears whole, and two processes never take the same name.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.count = 0

    async def send(self, sender: str, recipient: str, data: bytes) -> str:
        return self.write(recipient, data)

    def _highest_number(self) -> int:
        numbers = [int(p.name[:4]) for p in self.directory.glob("*.eml") if p.name[:4].isdigit()]
        return max(numbers, default=0)

    def write(self, recipient: str, data: bytes) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        message = message_from_bytes(data, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.count = max(self.count, self._highest_number())
        # Written under a hidden name, then linked to its numbered one: whoever reads the folder
        # (a person, a test) never opens a message half written, and os.link fails on a name
        # another process took, as exclusive creation did.
        handle, name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".eml.part")
        written = Path(name)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        written.chmod(0o644)  # mkstemp's 0600 would stay on the linked name
        try:
            while True:
                self.count += 1
                stem = f"{self.count:04d}-{_UNSAFE.sub('_', recipient)[:80]}"
                try:
                    os.link(written, self.directory / f"{stem}.eml")
                    break
                except FileExistsError:
                    continue
        finally:
            written.unlink()
        html = message.get_body(preferencelist=("html",))
        if html is not None:
            handle, name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".html.part")
            with os.fdopen(handle, "w", encoding="utf-8") as page:
                page.write(html.get_content())
            Path(name).chmod(0o644)
            Path(name).replace(self.directory / f"{stem}.html")
        return f"250 written to {stem}.eml"

    async def close(self) -> None:
        return None
