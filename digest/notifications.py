"""Transactional emails (confirmation, welcome, unsubscribed), rendered and sent at once.

These are one-off messages triggered by a person, so they go straight out through the
configured mailer rather than through the digest ledger.
"""

from __future__ import annotations

import asyncio
import secrets
from email.utils import parseaddr

from digest.mailer import Mailer
from digest.models import Subscriber, utcnow
from digest.rendering import (
    ConfirmContext,
    Envelope,
    RenderedEmail,
    UnsubscribedContext,
    WelcomeContext,
    message_bytes,
)
from digest.runtime import Runtime


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


def confirmation_message(runtime: Runtime, subscriber: Subscriber) -> bytes:
    rendered = runtime.renderer.render(
        ConfirmContext(
            recipient=subscriber.email,
            confirm_url=runtime.links.confirm(subscriber),
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


async def deliver(runtime: Runtime, recipient: str, data: bytes) -> str:
    """Send one message now (envelope sender: the list's own address, so bounces come back)."""
    mailer: Mailer = runtime.mailer_factory()()
    try:
        return await mailer.send(parseaddr(runtime.settings.mail_from)[1], recipient, data)
    finally:
        await mailer.close()


def send_confirmation(runtime: Runtime, subscriber: Subscriber) -> str:
    """Synchronous form for the CLI and mail-in; the web app awaits ``deliver`` itself."""
    return asyncio.run(deliver(runtime, subscriber.email, confirmation_message(runtime, subscriber)))
