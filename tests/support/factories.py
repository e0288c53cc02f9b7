"""One way to make what tests need: a subscriber, a day's papers, an edition.

`add_subscriber` is a reader who confirmed (the row the state machine leaves after a confirmation);
`collect` fetches a recorded day through the local papers API as beat does, and `add_papers` makes
a quiet day's papers and its edition for dates the recording does not cover. Tests that need a
state change (unsubscribing, a bounce) make it through `digest.subscribers.subscriptions`."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import (
    DigestKind,
    Frequency,
    Paper,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from digest.delivery.composer import build_digest
from digest.orchestration import pipeline
from digest.orchestration.runtime import Runtime

THURSDAY = dt.date(2026, 4, 16)


def collect(runtime: Runtime, day: dt.date) -> int:
    """The recorded day, fetched from the local papers API like beat does; returns the edition id."""
    with runtime.papers_client() as client, transaction(runtime.session_factory) as session:
        result = pipeline.collect_day(session, client, day, runtime)
    assert result.digest_id is not None
    return result.digest_id


def add_subscriber(
    session: Session,
    email: str,
    *,
    timezone: str = "UTC",
    hour: int = 8,
    frequency: Frequency = Frequency.DAILY,
    weekday: int = 0,
    topics: str = "",
    excluded: str = "",
    digest_size: int | None = None,
) -> Subscriber:
    subscriber = Subscriber(
        email=email,
        status=SubscriberStatus.ACTIVE,
        timezone=timezone,
        send_hour=hour,
        frequency=frequency,
        weekday=weekday,
        topics=topics,
        excluded=excluded,
        digest_size=digest_size,
        confirmed_at=utcnow(),
    )
    session.add(subscriber)
    session.flush()
    return subscriber


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[arg-type,misc]


def add_papers(runtime: Runtime, day: dt.date, count: int = 3) -> None:
    """A quiet day's papers (factory data for dates the recording does not cover) and its edition."""
    with transaction(runtime.session_factory) as session:
        for i in range(count):
            session.add(
                Paper(
                    id=f"{day:%y%m%d}.{i:05d}",
                    title=f"Paper {i} of {day}",
                    abstract="An abstract.",
                    authors=["A. Author"],
                    upvotes=10 - i,
                    daily_date=day,
                    submitted_at=dt.datetime.combine(day, dt.time(6), dt.UTC),
                )
            )
        session.flush()
        build_digest(session, day, runtime.weights, DigestKind.DAILY)


def add_subscribers(runtime: Runtime, count: int, *, domains: int = 5) -> list[str]:
    """``count`` confirmed readers in one statement, spread over ``domains`` domains (the send
    limits and the sending pause count per domain)."""
    emails = [f"reader{n:04d}@example{n % domains}.org" for n in range(count)]
    now = utcnow()
    rows = [
        {"email": e, "status": SubscriberStatus.ACTIVE, "created_at": now, "updated_at": now, "confirmed_at": now}
        for e in emails
    ]
    with transaction(runtime.session_factory) as session:
        session.execute(insert(Subscriber), rows)
    return emails
