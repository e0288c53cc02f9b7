"""``digest preview``: one subscriber's digest of a day, without sending or recording anything.

For a day the person was already sent, the preview is what they got: the papers (and reasons)
of their delivery record, composed again. Choosing afresh would show other papers, since the
no-repeat rule now removes the very ones they were sent. Otherwise it is the digest they
would get now.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session

from digest.core.errors import DigestError
from digest.core.models import utcnow
from digest.delivery.composer import message_id
from digest.delivery.ledger import Entry, recently_sent, sent_on
from digest.orchestration.pipeline import composer_for, ensure_digest
from digest.orchestration.runtime import Runtime
from digest.subscribers.recipients import Recipient
from digest.subscribers.subscriptions import get_by_email


@dataclass(frozen=True)
class Preview:
    email: str  # the address as stored
    data: bytes  # the message, as the SMTP server would receive it
    delivered: bool  # True: the digest the person was sent that day


def render_preview(session: Session, runtime: Runtime, email: str, day: dt.date) -> Preview:
    subscriber = Recipient.of(get_by_email(session, email))
    sent = sent_on(session, subscriber.id, day)
    if sent is not None:
        composer = composer_for(runtime, session, sent.digest_id)
        return Preview(subscriber.email, composer.compose(sent, subscriber), delivered=True)
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
    # A delivery that is never written: nothing is recorded.
    delivery = Entry(
        id=0,
        digest_id=digest.id,
        subscriber_id=subscriber.id,
        recipient=subscriber.email,
        message_id=message_id(digest, subscriber.id, runtime.message_domain),
        paper_ids=paper_ids,
        reasons=reasons,
        created_at=now,
    )
    return Preview(subscriber.email, composer.compose(delivery, subscriber), delivered=False)
