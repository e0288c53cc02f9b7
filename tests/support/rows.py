"""What the database holds about subscribers, to compare before and after a request."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.models import Subscriber, SubscriberEvent
from digest.orchestration.runtime import Runtime


def snapshot(runtime: Runtime) -> list[tuple[object, ...]]:
    """Everything a request could change about subscribers, to compare before and after."""
    with runtime.session_factory() as session:
        return _rows(session)


def _rows(session: Session) -> list[tuple[object, ...]]:
    subs = session.scalars(select(Subscriber).order_by(Subscriber.id)).all()
    events = session.scalars(select(SubscriberEvent).order_by(SubscriberEvent.id)).all()
    return [
        *[
            (
                s.id,
                s.email,
                s.status,
                s.topics,
                s.excluded,
                s.frequency,
                s.digest_size,
                s.send_hour,
                s.timezone,
                s.weekday,
                s.confirmation_sent_at,
                s.confirmed_at,
                s.unsubscribed_at,
            )
            for s in subs
        ],
        *[(e.id, e.kind, e.subscriber_id) for e in events],
    ]


def subscriber(runtime: Runtime, email: str) -> Subscriber | None:
    with runtime.session_factory() as session:
        return session.scalar(select(Subscriber).where(Subscriber.email == email))
