"""The subscription lifecycle: subscribe (double opt-in), confirm, preferences, unsubscribe, erase.

Functions take a session and values, may flush, never commit; callers decide what to send
after their commit (see ``SubscribeOutcome``).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from digest.addresses import normalise_address
from digest.errors import DigestError, InvalidToken, NotFound
from digest.links import subscriber_stamp
from digest.models import (
    Delivery,
    Frequency,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
)
from digest.ranking import parse_terms
from digest.tokens import Purpose, Tokens

MIN_DIGEST_SIZE = 5
MAX_DIGEST_SIZE = 30
MAX_TOPICS_CHARS = 500


@dataclass(frozen=True)
class SubscribeOutcome:
    subscriber_id: int
    send_confirmation: bool  # False when the address is active or a confirmation went out just now


def clean_topics(text: str | None) -> str:
    if text is None:
        return ""
    cleaned = ", ".join(parse_terms(text))
    # Checked after normalising too: "a,b,c" grows to "a, b, c" and the column holds 500.
    if len(text) > MAX_TOPICS_CHARS or len(cleaned) > MAX_TOPICS_CHARS:
        raise DigestError(f"Topics are limited to {MAX_TOPICS_CHARS} characters.")
    return cleaned


def find_by_email(session: Session, email: str) -> Subscriber | None:
    return session.scalar(select(Subscriber).where(Subscriber.email == email))


def subscribe(
    session: Session,
    email: str,
    *,
    now: dt.datetime,
    topics: str | None = None,
    source: str = "web",
    resend_after: dt.timedelta = dt.timedelta(minutes=2),
) -> SubscribeOutcome:
    """Start (or restart) double opt-in for ``email``; never reveals the address's state.

    New, unsubscribed and bounced addresses become pending and get a confirmation; a pending
    one gets a fresh confirmation unless one went out moments ago; an active one gets nothing.
    """
    address = normalise_address(email)
    wanted_topics = clean_topics(topics) if topics is not None else None
    subscriber = find_by_email(session, address)
    if subscriber is None:
        subscriber = Subscriber(
            email=address,
            status=SubscriberStatus.PENDING,
            topics=wanted_topics or "",
            source=source,
            created_at=now,
            updated_at=now,
        )
        session.add(subscriber)
        session.flush()
    elif subscriber.status is SubscriberStatus.ACTIVE:
        return SubscribeOutcome(subscriber.id, send_confirmation=False)
    else:
        if subscriber.status is not SubscriberStatus.PENDING:
            subscriber.status = SubscriberStatus.PENDING
        if wanted_topics:
            subscriber.topics = wanted_topics
        sent = subscriber.confirmation_sent_at
        if sent is not None and now - sent < resend_after:
            return SubscribeOutcome(subscriber.id, send_confirmation=False)
    subscriber.confirmation_sent_at = now
    session.flush()
    return SubscribeOutcome(subscriber.id, send_confirmation=True)


def add_confirmed(
    session: Session, email: str, *, now: dt.datetime, topics: str = "", source: str = "cli"
) -> Subscriber:
    """Operator path: an already confirmed subscriber (e.g. an import with consent on record)."""
    address = normalise_address(email)
    wanted_topics = clean_topics(topics)  # refuse bad input before anything is added
    subscriber = find_by_email(session, address)
    if subscriber is None:
        subscriber = Subscriber(email=address, source=source, created_at=now, updated_at=now)
        session.add(subscriber)
    subscriber.status = SubscriberStatus.ACTIVE
    subscriber.topics = wanted_topics
    subscriber.confirmed_at = subscriber.confirmed_at or now
    session.flush()
    return subscriber


def subscriber_from_token(session: Session, tokens: Tokens, purpose: Purpose, token: str) -> Subscriber:
    """The subscriber a token names, or ``InvalidToken`` (never says whether an address exists)."""
    subscriber_id, stamp = tokens.read(purpose, token)
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber_stamp(subscriber) != stamp:
        raise InvalidToken("This link is not valid.")
    return subscriber


def confirm(session: Session, subscriber: Subscriber, *, now: dt.datetime) -> bool:
    """Activate a pending subscriber; True when this call activated them (send a welcome)."""
    if subscriber.status is SubscriberStatus.ACTIVE:
        return False
    if subscriber.status is not SubscriberStatus.PENDING:
        # An old confirmation link must not undo a later unsubscribe or bounce.
        raise InvalidToken("This confirmation link is no longer valid.")
    subscriber.status = SubscriberStatus.ACTIVE
    subscriber.confirmed_at = now
    subscriber.unsubscribed_at = None
    subscriber.soft_bounce_score = 0.0
    session.flush()
    return True


def unsubscribe(session: Session, subscriber: Subscriber, *, now: dt.datetime) -> bool:
    """Stop all mail to a subscriber at once; idempotent. True when this call changed something.

    Deliveries not yet handed to a worker are skipped in the same transaction, so a digest
    that is queued right now is not sent after the click.
    """
    if subscriber.status is SubscriberStatus.UNSUBSCRIBED:
        return False
    subscriber.status = SubscriberStatus.UNSUBSCRIBED
    subscriber.unsubscribed_at = now
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber.id, Delivery.status == "pending")
        .values(status="skipped", last_error="unsubscribed", updated_at=now)
    )
    session.flush()
    return True


@dataclass(frozen=True)
class PreferencesUpdate:
    frequency: Frequency
    digest_size: int
    topics: str
    excluded: str
    send_hour: int
    timezone: str
    weekday: int = 0


def validate_preferences(values: PreferencesUpdate) -> PreferencesUpdate:
    if not MIN_DIGEST_SIZE <= values.digest_size <= MAX_DIGEST_SIZE:
        raise DigestError(f"Papers per email must be between {MIN_DIGEST_SIZE} and {MAX_DIGEST_SIZE}.")
    if not 0 <= values.send_hour <= 23:
        raise DigestError("The delivery hour must be between 0 and 23.")
    if not 0 <= values.weekday <= 6:
        raise DigestError("The weekday must be between Monday (0) and Sunday (6).")
    try:
        zoneinfo.ZoneInfo(values.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise DigestError(f"Unknown time zone {values.timezone[:64]!r}; use an IANA name like Europe/Berlin.") from exc
    return PreferencesUpdate(
        frequency=values.frequency,
        digest_size=values.digest_size,
        topics=clean_topics(values.topics),
        excluded=clean_topics(values.excluded),
        send_hour=values.send_hour,
        timezone=values.timezone,
        weekday=values.weekday,
    )


def update_preferences(session: Session, subscriber: Subscriber, values: PreferencesUpdate) -> None:
    clean = validate_preferences(values)
    subscriber.frequency = clean.frequency
    subscriber.digest_size = clean.digest_size
    subscriber.topics = clean.topics
    subscriber.excluded = clean.excluded
    subscriber.send_hour = clean.send_hour
    subscriber.timezone = clean.timezone
    subscriber.weekday = clean.weekday
    session.flush()


def export_data(session: Session, subscriber: Subscriber) -> dict[str, Any]:
    """Everything we hold about a person, as JSON-ready data (GDPR access)."""
    deliveries = session.execute(
        select(Delivery.digest_id, Delivery.status, Delivery.sent_at, Delivery.paper_ids)
        .where(Delivery.subscriber_id == subscriber.id)
        .order_by(Delivery.id)
    ).all()

    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "email": subscriber.email,
        "status": subscriber.status.value,
        "topics": subscriber.topics,
        "excluded": subscriber.excluded,
        "frequency": subscriber.frequency.value,
        "digest_size": subscriber.digest_size,
        "send_hour": subscriber.send_hour,
        "timezone": subscriber.timezone,
        "weekday": subscriber.weekday,
        "created_at": iso(subscriber.created_at),
        "confirmed_at": iso(subscriber.confirmed_at),
        "unsubscribed_at": iso(subscriber.unsubscribed_at),
        "deliveries": [
            {"digest_id": d.digest_id, "status": d.status.value, "sent_at": iso(d.sent_at), "papers": d.paper_ids or []}
            for d in deliveries
        ],
    }


def erase(session: Session, subscriber: Subscriber) -> None:
    """Delete a person: their row, and the personal data in their deliveries and events."""
    # Open deliveries are closed first: once the row is gone nothing could ever send or
    # finish them, and a run waiting for its edition to complete would wait forever.
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber.id, Delivery.status.in_(["pending", "sending"]))
        .values(status="skipped", last_error="erased", lease_until=None)
    )
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber.id)
        .values(subscriber_id=None, recipient=None, paper_ids=None, reasons=None, last_error=None)
    )
    session.execute(
        update(SubscriberEvent)
        .where(SubscriberEvent.subscriber_id == subscriber.id)
        .values(subscriber_id=None, detail="")
    )
    session.execute(delete(Subscriber).where(Subscriber.id == subscriber.id))
    session.flush()


def get_by_email(session: Session, email: str) -> Subscriber:
    subscriber = find_by_email(session, normalise_address(email))
    if subscriber is None:
        raise NotFound(f"no subscriber {email}")
    return subscriber
