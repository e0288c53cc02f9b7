"""Fixtures for the web app: the app on the test runtime, a client, and helpers to read mail."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.models import Subscriber, SubscriberEvent
from digest.orchestration.runtime import Runtime
from digest.web.app import create_app
from tests.support.servers import SMTPSink


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    return create_app(runtime)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    # follow_redirects off: a redirect where none belongs must show up as a failure.
    with TestClient(app, follow_redirects=False) as c:
        yield c


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def link_in(message: EmailMessage, kind: str) -> str:
    """The first http(s) link to /{kind}/... in a message's text part."""
    found = re.search(rf"https?://\S+?/{kind}/[A-Za-z0-9_.\-]+", text_of(message))
    assert found, f"no /{kind}/ link in:\n{text_of(message)}"
    return found.group(0)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def only_mail_to(smtp: SMTPSink, address: str, count: int = 1) -> list[EmailMessage]:
    smtp.wait_for(count, timeout=10)
    received = smtp.to(address)
    assert len(received) == count, [m["Subject"] for m in received]
    return received


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
