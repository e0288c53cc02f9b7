"""Transactional emails (confirmation, welcome, unsubscribed), rendered and sent at once.

These are one-off messages triggered by a person, so they go straight out through the
configured mailer rather than through the digest ledger.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from email.utils import parseaddr
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import transaction
from digest.core.models import Subscriber, utcnow
from digest.core.settings import Settings
from digest.rendering.emails import (
    ConfirmContext,
    EmailRenderer,
    Envelope,
    LinkContext,
    RenderedEmail,
    UnsubscribedContext,
    WelcomeContext,
    message_bytes,
)
from digest.rendering.links import Links
from digest.subscribers.confirmation_limits import ConfirmationLimits
from digest.transport.dkim import DkimSigner
from digest.transport.mailer import Mailer, SendError

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """What transactional mail needs from the wiring (``digest.orchestration.runtime.Runtime``).

    Declared here so this module depends on the parts it uses, not on the orchestration above it.
    """

    @property
    def settings(self) -> Settings: ...
    @property
    def session_factory(self) -> sessionmaker[Session]: ...
    @property
    def links(self) -> Links: ...
    @property
    def renderer(self) -> EmailRenderer: ...
    @property
    def dkim_signer(self) -> DkimSigner | None: ...
    @property
    def confirmation_limits(self) -> ConfirmationLimits: ...
    @property
    def message_domain(self) -> str: ...
    def mailer_factory(self) -> Callable[[], Mailer]: ...


def _message(runtime: Runtime, rendered: RenderedEmail, recipient: str, with_unsubscribe: Subscriber | None) -> bytes:
    domain = runtime.message_domain
    envelope = Envelope(
        mail_from=runtime.settings.mail_from,
        recipient=recipient,
        message_id=f"<notice.{secrets.token_hex(10)}@{domain}>",
        date=utcnow(),
        unsubscribe_url=runtime.links.unsubscribe(with_unsubscribe) if with_unsubscribe else None,
        unsubscribe_mailto=runtime.links.unsubscribe_mailto(with_unsubscribe) if with_unsubscribe else None,
        extra_headers={"Auto-Submitted": "auto-generated"},
    )
    data = message_bytes(rendered, envelope)
    signer = runtime.dkim_signer
    return signer.sign(data) if signer else data


def confirmation_message(runtime: Runtime, subscriber: Subscriber, topics: str | None = None) -> bytes:
    rendered = runtime.renderer.render(
        ConfirmContext(
            recipient=subscriber.email,
            confirm_url=runtime.links.confirm(subscriber, topics),
            valid_hours=runtime.settings.confirm_token_max_age_hours,
            postal_address=runtime.settings.postal_address,
        )
    )
    return _message(runtime, rendered, subscriber.email, None)


def welcome_message(runtime: Runtime, subscriber: Subscriber) -> bytes:
    rendered = runtime.renderer.render(
        WelcomeContext(
            recipient=subscriber.email,
            frequency=subscriber.frequency.value,
            send_hour=subscriber.send_hour,
            timezone=subscriber.timezone,
            preferences_url=runtime.links.preferences(subscriber),
            unsubscribe_url=runtime.links.unsubscribe(subscriber),
            postal_address=runtime.settings.postal_address,
        )
    )
    return _message(runtime, rendered, subscriber.email, subscriber)


def unsubscribed_message(runtime: Runtime, subscriber: Subscriber) -> bytes:
    rendered = runtime.renderer.render(
        UnsubscribedContext(
            recipient=subscriber.email,
            home_url=runtime.links.home,
            postal_address=runtime.settings.postal_address,
        )
    )
    return _message(runtime, rendered, subscriber.email, None)


def unsubscribe_link_message(runtime: Runtime, subscriber: Subscriber) -> bytes:
    """For an unsubscribe mail without a token: From proves nothing, so we ask the mailbox."""
    rendered = runtime.renderer.render(
        LinkContext(
            recipient=subscriber.email,
            heading="Unsubscribe from Daily Papers",
            explanation="A message asked us to stop sending the digest to this address. "
            "We only act on it when you confirm with the button below.",
            action="Unsubscribe me",
            url=runtime.links.unsubscribe(subscriber),
            validity="The link opens a page with one button.",
            postal_address=runtime.settings.postal_address,
        )
    )
    return _message(runtime, rendered, subscriber.email, None)


def data_access_message(runtime: Runtime, subscriber: Subscriber) -> bytes:
    rendered = runtime.renderer.render(
        LinkContext(
            recipient=subscriber.email,
            heading="Your data at Daily Papers",
            explanation="Use the link to download everything we keep about you, or to delete it.",
            action="See my data",
            url=runtime.links.data_access(subscriber),
            validity="The link works for one hour.",
            postal_address=runtime.settings.postal_address,
        )
    )
    return _message(runtime, rendered, subscriber.email, None)


async def deliver(runtime: Runtime, recipient: str, data: bytes) -> str:
    """Send one message now (envelope sender: the list's own address, so bounces come back)."""
    mailer: Mailer = runtime.mailer_factory()()
    try:
        return await mailer.send(parseaddr(runtime.settings.mail_from)[1], recipient, data)
    finally:
        await mailer.close()


MessageBuilder = Callable[[Runtime, Subscriber], bytes]


async def send_requested(
    runtime: Runtime, kind: str, source: str, subscriber_id: int, build: MessageBuilder, *, limited: bool = True
) -> bool:
    """Mail a subscriber something a request asked for (a link), within the confirmation limits.

    Runs after the request was answered; the subscriber is read again here, so a message goes
    only to the address on record, never to whoever asked. False when withheld or not sent.
    """
    from starlette.concurrency import run_in_threadpool

    def prepare() -> tuple[str, bytes] | None:
        with transaction(runtime.session_factory) as session:
            subscriber = session.get(Subscriber, subscriber_id)
            if subscriber is None:
                return None
            if limited and not runtime.confirmation_limits.allow(kind, source, subscriber.email):
                return None
            return subscriber.email, build(runtime, subscriber)

    try:
        prepared = await run_in_threadpool(prepare)
        if prepared is None:
            return False
        await deliver(runtime, *prepared)
    except SendError as exc:
        log.warning(
            "a requested %s email could not be sent: %s", kind, exc.reason, extra={"subscriber_id": subscriber_id}
        )
        return False
    except Exception:  # after the answer: nobody to tell but the log
        log.exception("a requested %s email could not be sent", kind)
        return False
    return True


def send_confirmation(runtime: Runtime, subscriber: Subscriber, topics: str | None = None) -> str:
    """Synchronous form for the CLI; the web app and mail-in send after answering."""
    return asyncio.run(deliver(runtime, subscriber.email, confirmation_message(runtime, subscriber, topics)))
