"""The inbound SMTP listener (``digest mailin``): an MX, or the target of a relay that forwards.

It accepts mail only for the list's own address and its sub-addresses, refuses anything over
``DIGEST_MAILIN_MAX_BYTES`` (advertised as SIZE, 552 otherwise), and hands each message to
``digest.mailin.classify.process`` off the event loop. Junk is accepted and ignored (a refusal would only
make someone else send a bounce); a database failure answers 451 so the sender retries. A header
block too large to parse cheaply (``digest.mailin.classify.header_problem``) is refused with 552: no
real mail has one, and the sender's own server is the one to tell them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.exc import SQLAlchemyError

from digest.core.text import for_terminal
from digest.mailin.classify import (
    Inbound,
    Kind,
    MailinConfig,
    answer_first,
    classify,
    config_from,
    process_classified,
    send_replies,
)
from digest.orchestration.runtime import Runtime

log = logging.getLogger(__name__)


class MailinHandler:
    """aiosmtpd handler: RCPT filtering and DATA processing."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.config: MailinConfig = config_from(runtime)
        self._answers: set[asyncio.Task[None]] = set()  # kept referenced until they finish

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not self.config.accepts(address):
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        peer_host = session.peer[0] if isinstance(session.peer, tuple) and session.peer else None
        peer = str(peer_host) if peer_host else None
        inbound = await asyncio.to_thread(
            classify,
            self.config,
            data,
            envelope_sender=str(envelope.mail_from or ""),
            recipients=list(envelope.rcpt_tos),
        )
        if inbound.kind is Kind.OVERSIZE:
            log.warning(
                "mail in from %s (%s, %d bytes): refused, %s",
                for_terminal(str(envelope.mail_from or "<>")[:254]),
                inbound.kind.value,
                len(data),
                inbound.detail,
            )
            return f"552 5.3.4 Message header too large: {inbound.detail}"
        if answer_first(inbound):
            # A request about any address: answered before the database is touched, so neither
            # the answer nor its timing says whether the address is known. (A database failure
            # then costs this one request, logged; the person can simply ask again.)
            self._later(self._handle_later(inbound, len(data), peer))
            return "250 2.0.0 OK"
        try:
            processed = await asyncio.to_thread(process_classified, self.runtime, inbound, size=len(data), peer=peer)
        except SQLAlchemyError:
            log.exception("mail in: database unavailable; asked the sender to retry")
            return "451 4.3.0 Temporary failure, please retry"
        except Exception:
            log.exception("mail in: could not handle a message; asked the sender to retry")
            return "451 4.3.0 Temporary failure, please retry"
        if processed.replies:
            # After the answer: how long it takes must not say whether anything was sent.
            self._later(send_replies(self.runtime, processed.replies))
        return "250 2.0.0 OK"

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _handle_later(self, inbound: Inbound, size: int, peer: str | None) -> None:
        try:
            processed = await asyncio.to_thread(process_classified, self.runtime, inbound, size=size, peer=peer)
        except Exception:
            log.exception("mail in: could not handle a %s request after answering it", inbound.kind.value)
            return
        await send_replies(self.runtime, processed.replies)


async def serve(runtime: Runtime) -> None:
    """Listen on DIGEST_MAILIN_HOST:PORT until SIGTERM or SIGINT."""
    settings = runtime.settings
    handler = MailinHandler(runtime)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=settings.mailin_max_bytes,
            enable_SMTPUTF8=True,
            # Naming ourselves avoids a reverse-DNS lookup (socket.getfqdn) per connection.
            hostname=handler.config.domain,
        ),
        host=settings.mailin_host,
        port=settings.mailin_port,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.warning(
        "mail in: listening on %s:%d for %s (limit %d bytes)",
        settings.mailin_host,
        settings.mailin_port,
        settings.inbound_address,
        settings.mailin_max_bytes,
    )
    async with server:
        await stop.wait()
    log.warning("mail in: stopped")


def run(runtime: Runtime) -> None:
    asyncio.run(serve(runtime))
