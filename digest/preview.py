"""``digest preview``: one subscriber's digest exactly as it would be sent, without sending it."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from digest.delivery.composer import message_id, recently_sent
from digest.errors import DigestError
from digest.models import Delivery, DeliveryStatus, utcnow
from digest.pipeline import composer_for, ensure_digest
from digest.runtime import Runtime
from digest.subscriptions import get_by_email


def render_preview(session: Session, runtime: Runtime, email: str, day: dt.date) -> bytes:
    subscriber = get_by_email(session, email)
    digest = ensure_digest(session, runtime, day)
    if digest is None:
        raise DigestError(f"no papers stored for {day}; run `digest collect --date {day}` first")
    composer = composer_for(runtime, session, digest.id)
    now = utcnow()
    reader = composer.prepare(session, [subscriber]).get(subscriber.id)
    already = recently_sent(session, [subscriber.id], now)[subscriber.id]
    paper_ids, reasons = composer.choose(subscriber, already, reader)
    if not paper_ids:
        raise DigestError(f"{subscriber.email} has already received every paper of {day}")
    # A transient ledger row: never added to the session, so nothing is recorded.
    delivery = Delivery(
        id=0,
        digest_id=digest.id,
        subscriber_id=subscriber.id,
        status=DeliveryStatus.PENDING,
        message_id=message_id(digest, subscriber.id, runtime.message_domain),
        paper_ids=paper_ids,
        reasons=reasons,
        created_at=now,
    )
    return composer.compose(delivery, subscriber)
