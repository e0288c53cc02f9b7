"""The subscription lifecycle and the one place a subscriber's state changes.

Subscribe (double opt-in), confirm, preferences, unsubscribe, bounces, complaints, operator
activation, erasure: each asks ``digest.subscribers.consent.next_status`` whether its actor may make the
move, then makes it here. Functions take a session and values, may flush, never commit;
callers decide what to send after their commit (see ``SubscribeOutcome``).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from digest.core.addresses import normalise_address
from digest.core.errors import DigestError, InvalidToken, NotFound
from digest.core.models import (
    EventKind,
    Frequency,
    PaperMark,
    ReaderProfile,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
    Suppression,
)
from digest.core.text import has_unsafe, parse_terms
from digest.delivery import ledger
from digest.rendering.links import subscriber_stamp
from digest.rendering.tokens import Purpose, Tokens
from digest.subscribers.consent import ERASED, NEW, Action, Actor, State, next_status

MIN_DIGEST_SIZE = 5
MAX_DIGEST_SIZE = 30
MAX_TOPICS_CHARS = 500
MAX_TIMEZONE_CHARS = 64


@dataclass(frozen=True)
class SubscribeOutcome:
    subscriber_id: int
    send_confirmation: bool  # False when the address is active or a confirmation went out just now
    topics: str | None = None  # what the request asked for; applied only when the link is clicked


class BounceRules(Protocol):
    @property
    def soft_bounce_threshold(self) -> int: ...

    @property
    def soft_bounce_window(self) -> dt.timedelta: ...


def clean_topics(text: str | None, what: str = "Topics") -> str:
    """Topics (or excluded words, ``what``) normalised to "a, b, c"; ``DigestError`` for text too
    long or with characters no store accepts (a NUL fails on PostgreSQL, so it is refused on
    every database rather than only where it would break)."""
    if text is None:
        return ""
    # The length first, so no more than MAX_TOPICS_CHARS of a stranger's text is ever parsed.
    if len(text) > MAX_TOPICS_CHARS:
        raise DigestError(f"{what} are limited to {MAX_TOPICS_CHARS} characters.")
    if has_unsafe(text):
        raise DigestError(f"{what} cannot contain control characters; please remove them.")
    cleaned = ", ".join(parse_terms(text))
    # Checked after normalising too: "a,b,c" grows to "a, b, c" and the column holds 500.
    if len(cleaned) > MAX_TOPICS_CHARS:
        raise DigestError(f"{what} are limited to {MAX_TOPICS_CHARS} characters.")
    return cleaned


def find_by_email(session: Session, email: str) -> Subscriber | None:
    return session.scalar(select(Subscriber).where(Subscriber.email == email))


def is_suppressed(session: Session, tokens: Tokens, address: str) -> bool:
    """True when ``address`` (normalised) was erased or complained: only its hash is kept."""
    return session.get(Suppression, tokens.address_fingerprint(address)) is not None


def state_of(session: Session, tokens: Tokens, address: str) -> tuple[Subscriber | None, State]:
    """The subscriber row for a normalised address, and the state the rules see.

    A pending row for an address that was erased still counts as erased: a stranger's request
    may start an opt-in for it, but nothing but the person's confirmation lifts the suppression.
    """
    subscriber = find_by_email(session, address)
    if subscriber is not None and subscriber.status is not SubscriberStatus.PENDING:
        return subscriber, subscriber.status
    if is_suppressed(session, tokens, address):
        return subscriber, ERASED
    return subscriber, subscriber.status if subscriber is not None else NEW


def _suppress(session: Session, tokens: Tokens, address: str, reason: str, now: dt.datetime) -> None:
    key = tokens.address_fingerprint(address)
    if session.get(Suppression, key) is None:
        session.add(Suppression(address_hash=key, reason=reason, created_at=now))


def _move(subscriber: Subscriber, action: Action, actor: Actor, now: dt.datetime) -> bool:
    """Apply the rules to a stored subscriber; True when the status changed."""
    before = subscriber.status
    after = next_status(before, action, actor)
    if after == before:
        return False
    assert isinstance(after, SubscriberStatus), "erasure deletes the row instead"
    subscriber.status = after
    subscriber.updated_at = now
    if after is SubscriberStatus.ACTIVE:
        subscriber.confirmed_at = now if actor is Actor.OPT_IN else (subscriber.confirmed_at or now)
        subscriber.unsubscribed_at = None
        subscriber.soft_bounce_score = 0.0
    elif after is SubscriberStatus.UNSUBSCRIBED:
        subscriber.unsubscribed_at = now
    elif after is SubscriberStatus.BOUNCED:
        subscriber.bounced_at = now
    elif after is SubscriberStatus.COMPLAINED:
        subscriber.complained_at = now
    return True


def opted_out_at(subscriber: Subscriber) -> dt.datetime | None:
    """When the person last left (or was bounced): links made before that cannot bring them back."""
    stamps = [
        t
        for t in (subscriber.unsubscribed_at, subscriber.bounced_at, subscriber.complained_at)
        if t is not None and subscriber.status is not SubscriberStatus.ACTIVE
    ]
    return max(stamps) if stamps else None


def subscribe(
    session: Session,
    tokens: Tokens,
    email: str,
    *,
    now: dt.datetime,
    topics: str | None = None,
    source: str = "web",
    resend_after: dt.timedelta = dt.timedelta(minutes=2),
) -> SubscribeOutcome:
    """A request to subscribe ``email``, from anyone; never reveals the address's state.

    A new address becomes pending. An existing one is not changed at all — not its state, not
    its topics: a confirmation link goes out (unless one went out moments ago, or the address
    is already active), and only clicking it does anything (topics travel in the link).
    """
    address = normalise_address(email)
    wanted_topics = clean_topics(topics) if topics is not None else None
    subscriber, state = state_of(session, tokens, address)
    next_status(state, Action.REQUEST, Actor.STRANGER)  # a request is open to anyone
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
        sent = subscriber.confirmation_sent_at
        if sent is not None and now - sent < resend_after:
            return SubscribeOutcome(subscriber.id, send_confirmation=False)
    subscriber.confirmation_sent_at = now
    session.flush()
    return SubscribeOutcome(subscriber.id, send_confirmation=True, topics=wanted_topics)


def add_confirmed(
    session: Session,
    tokens: Tokens,
    email: str,
    *,
    now: dt.datetime,
    topics: str = "",
    source: str = "cli",
) -> Subscriber:
    """Operator path: an already confirmed subscriber (e.g. an import with consent on record).

    ``Suppressed`` for an address that opted out, bounced, complained or was erased: consent
    given to an operator once does not outlive the person taking it back.
    """
    address = normalise_address(email)
    wanted_topics = clean_topics(topics)  # refuse bad input before anything is added
    subscriber, state = state_of(session, tokens, address)
    next_status(state, Action.ACTIVATE, Actor.OPERATOR)
    if subscriber is None:
        subscriber = Subscriber(
            email=address, status=SubscriberStatus.PENDING, source=source, created_at=now, updated_at=now
        )
        session.add(subscriber)
    _move(subscriber, Action.ACTIVATE, Actor.OPERATOR, now)
    subscriber.topics = wanted_topics
    session.flush()
    return subscriber


def unsuppress(session: Session, email: str, *, now: dt.datetime) -> Subscriber:
    """Operator path: a hard-bounced address may be mailed again (the mailbox works again)."""
    subscriber = get_by_email(session, email)
    _move(subscriber, Action.UNSUPPRESS, Actor.OPERATOR, now)
    subscriber.soft_bounce_score = 0.0
    session.flush()
    return subscriber


def subscriber_from_token(session: Session, tokens: Tokens, purpose: Purpose, token: str) -> Subscriber:
    """The subscriber a token names, or ``InvalidToken`` (never says whether an address exists)."""
    subscriber_id, stamp = tokens.read(purpose, token)
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber_stamp(subscriber) != stamp:
        raise InvalidToken("This link is not valid.")
    return subscriber


def confirm(
    session: Session,
    tokens: Tokens,
    subscriber: Subscriber,
    *,
    now: dt.datetime,
    issued_at: dt.datetime,
    topics: str | None = None,
) -> bool:
    """The person's double opt-in; True when this call activated them (send a welcome).

    Brings back an address that had left only with a link made after it left: an old
    confirmation link must not undo a later unsubscribe, bounce or complaint.
    """
    if subscriber.status is SubscriberStatus.ACTIVE:
        return False
    left = opted_out_at(subscriber)
    if left is not None and issued_at <= left:
        raise InvalidToken("This confirmation link is no longer valid.")
    _move(subscriber, Action.CONFIRM, Actor.OPT_IN, now)
    if topics is not None:
        subscriber.topics = clean_topics(topics)
    key = tokens.address_fingerprint(subscriber.email)
    session.execute(delete(Suppression).where(Suppression.address_hash == key))
    session.flush()
    return True


def unsubscribe(session: Session, subscriber: Subscriber, *, now: dt.datetime, actor: Actor = Actor.PERSON) -> bool:
    """Stop all mail to a subscriber at once; idempotent. True when this call changed something."""
    changed = _move(subscriber, Action.UNSUBSCRIBE, actor, now)
    if changed:
        ledger.stop_open(session, subscriber.id, "unsubscribed", now)
    session.flush()
    return changed


def record_bounce(
    session: Session,
    subscriber_id: int,
    delivery_id: int | None,
    *,
    hard: bool,
    detail: str,
    now: dt.datetime,
    policy: BounceRules,
    actor: Actor = Actor.REPORT,
) -> bool:
    """Record a bounce; True when it made the subscriber ``bounced``.

    A hard bounce stops sending at once; soft bounces do when ``soft_bounce_threshold`` of them
    fall within ``soft_bounce_window`` (older ones no longer count).
    """
    session.add(
        SubscriberEvent(
            subscriber_id=subscriber_id,
            delivery_id=delivery_id,
            kind=EventKind.HARD_BOUNCE if hard else EventKind.SOFT_BOUNCE,
            detail=detail[:500],
            created_at=now,
        )
    )
    session.flush()
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status is not SubscriberStatus.ACTIVE:
        return False
    if not hard:
        recent = (
            session.scalar(
                select(func.count(SubscriberEvent.id)).where(
                    SubscriberEvent.subscriber_id == subscriber_id,
                    SubscriberEvent.kind == EventKind.SOFT_BOUNCE,
                    SubscriberEvent.created_at > now - policy.soft_bounce_window,
                )
            )
            or 0
        )
        subscriber.soft_bounce_score = float(recent)
        subscriber.soft_bounce_at = now
        if recent < policy.soft_bounce_threshold:
            session.flush()
            return False
    _move(subscriber, Action.BOUNCE, actor, now)
    ledger.stop_open(session, subscriber.id, "bounced", now)
    session.flush()
    return True


def record_complaint(
    session: Session,
    tokens: Tokens,
    subscriber: Subscriber,
    delivery_id: int | None,
    *,
    detail: str,
    now: dt.datetime,
) -> bool:
    """A verified abuse report about one delivery; False when that delivery's is already recorded.

    The person asked for nothing more from us: they stop getting mail at once, and the address
    is suppressed so that no import brings it back. ``delivery_id`` None: the delivery's ledger
    row was compacted; the report still ends the subscription, once.
    """
    if delivery_id is None:
        # Without the row there is nothing to key "once per delivery" on; once per person is
        # enough, as such a report never counts toward the sending pause anyway.
        if subscriber.status is SubscriberStatus.COMPLAINED:
            return False
        detail = f"(about a compacted delivery) {detail}"
    else:
        already = session.scalar(
            select(SubscriberEvent.id).where(
                SubscriberEvent.kind == EventKind.COMPLAINT, SubscriberEvent.delivery_id == delivery_id
            )
        )
        if already is not None:
            # One message draws at most one complaint, so nobody can push the complaint rate
            # (and pause everyone's mail) by reporting it again.
            return False
    session.add(
        SubscriberEvent(
            subscriber_id=subscriber.id,
            delivery_id=delivery_id,
            kind=EventKind.COMPLAINT,
            detail=detail[:500],
            created_at=now,
        )
    )
    if _move(subscriber, Action.COMPLAIN, Actor.REPORT, now):
        ledger.stop_open(session, subscriber.id, "complained", now)
    _suppress(session, tokens, subscriber.email, "complained", now)
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
    only_for_you: bool | None = None  # the digest only on days with a paper for them; None: as is


def validate_preferences(values: PreferencesUpdate) -> PreferencesUpdate:
    if not MIN_DIGEST_SIZE <= values.digest_size <= MAX_DIGEST_SIZE:
        raise DigestError(f"Papers per email must be between {MIN_DIGEST_SIZE} and {MAX_DIGEST_SIZE}.")
    if not 0 <= values.send_hour <= 23:
        raise DigestError("The delivery hour must be between 0 and 23.")
    if not 0 <= values.weekday <= 6:
        raise DigestError("The weekday must be between Monday (0) and Sunday (6).")
    if values.timezone not in iana_zones():
        shown = values.timezone[:MAX_TIMEZONE_CHARS].encode("unicode_escape").decode()
        raise DigestError(f"Unknown time zone {shown!r}; use an IANA name like Europe/Berlin.")
    return PreferencesUpdate(
        frequency=values.frequency,
        digest_size=values.digest_size,
        topics=clean_topics(values.topics),
        excluded=clean_topics(values.excluded, "Excluded words"),
        send_hour=values.send_hour,
        timezone=values.timezone,
        weekday=values.weekday,
        only_for_you=values.only_for_you,
    )


@lru_cache(maxsize=1)
def iana_zones() -> frozenset[str]:
    """The IANA zone names: "America" or "Etc" are folders, not zones, and no name is longer."""
    return frozenset(z for z in zoneinfo.available_timezones() if len(z) <= MAX_TIMEZONE_CHARS)


def update_preferences(session: Session, subscriber: Subscriber, values: PreferencesUpdate) -> None:
    clean = validate_preferences(values)
    subscriber.frequency = clean.frequency
    subscriber.digest_size = clean.digest_size
    subscriber.topics = clean.topics
    subscriber.excluded = clean.excluded
    subscriber.send_hour = clean.send_hour
    subscriber.timezone = clean.timezone
    subscriber.weekday = clean.weekday
    if clean.only_for_you is not None:
        subscriber.only_for_you = clean.only_for_you
    session.flush()


def export_data(session: Session, subscriber: Subscriber) -> dict[str, Any]:
    """Everything we hold about a person, as JSON-ready data (GDPR access)."""
    profile = session.get(ReaderProfile, subscriber.id)

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
        "deliveries": ledger.exported(session, subscriber.id),
        # What they taught the digest (digest.subscribers.feedback): marks and example papers, and follows.
        "marks": [
            {"paper": m.paper_id, "signal": "more" if m.signal > 0 else "less", "source": m.source.value}
            for m in session.scalars(
                select(PaperMark).where(PaperMark.subscriber_id == subscriber.id).order_by(PaperMark.created_at)
            )
        ],
        "follows": profile.follows if profile is not None else [],
    }


def erase(
    session: Session, tokens: Tokens, subscriber: Subscriber, *, now: dt.datetime, actor: Actor = Actor.PERSON
) -> None:
    """Delete a person: their row, and the personal data in their deliveries and events.

    What stays is a keyed hash of the address (``Suppression``): enough to refuse an import or
    an operator re-adding it, nothing that says who it was.
    """
    next_status(subscriber.status, Action.ERASE, actor)
    _suppress(session, tokens, subscriber.email, "erased", now)
    ledger.forget(session, subscriber.id)
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
