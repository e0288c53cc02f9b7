"""Complaint rate and the self-imposed pause (digest.reputation), on real ledger rows."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert
from sqlalchemy.orm import Session

from digest import reputation
from digest.models import Delivery, DeliveryStatus, Digest, DigestKind, SubscriberEvent

NOW = dt.datetime(2026, 4, 20, 12, tzinfo=dt.UTC)


def sent(session: Session, count: int, at: dt.datetime) -> None:
    digest = Digest(kind=DigestKind.DAILY, date=at.date(), created_at=at)
    session.add(digest)
    session.flush()
    session.execute(
        insert(Delivery),
        [
            {
                "digest_id": digest.id,
                "subscriber_id": None,
                "status": DeliveryStatus.SENT,
                "attempts": 1,
                "message_id": f"<{at.date()}.{i}@test>",
                "sent_at": at,
                "created_at": at,
                "updated_at": at,
            }
            for i in range(count)
        ],
    )


def complaints(session: Session, count: int, at: dt.datetime) -> None:
    session.add_all(SubscriberEvent(kind="complaint", created_at=at) for _ in range(count))
    session.flush()


def test_rate_is_complaints_per_sent_message_in_the_window(session: Session) -> None:
    assert reputation.complaint_rate(session, NOW) == 0.0
    sent(session, 400, NOW - dt.timedelta(days=1))
    sent(session, 600, NOW - dt.timedelta(days=30))  # outside the window
    complaints(session, 2, NOW - dt.timedelta(hours=3))
    complaints(session, 9, NOW - dt.timedelta(days=20))
    assert reputation.complaint_rate(session, NOW) == 2 / 400
    assert reputation.complaint_rate(session, NOW, dt.timedelta(days=60)) == 11 / 1000


def test_sending_pauses_above_the_threshold_only(session: Session) -> None:
    sent(session, 1000, NOW - dt.timedelta(days=1))
    complaints(session, 3, NOW - dt.timedelta(hours=1))
    assert not reputation.sending_paused(session, NOW, 0.003)  # exactly 0.3 % is not above it
    complaints(session, 1, NOW - dt.timedelta(hours=1))
    assert reputation.sending_paused(session, NOW, 0.003)
    assert not reputation.sending_paused(session, NOW + dt.timedelta(days=8), 0.003)  # it passes with time


def test_the_pause_decision_is_exact_at_the_threshold(session: Session) -> None:
    sent(session, 999, NOW - dt.timedelta(days=1))
    assert not reputation.sending_paused(session, NOW, 0.003)  # no complaints at all
    complaints(session, 3, NOW - dt.timedelta(hours=1))
    assert reputation.sending_paused(session, NOW, 0.003)  # 3 / 999 is above 0.3 %
    sent(session, 1, NOW - dt.timedelta(days=2))
    assert not reputation.sending_paused(session, NOW, 0.003)  # 3 / 1000 is not
    sent(session, 50_000, NOW - dt.timedelta(days=3))
    assert not reputation.sending_paused(session, NOW, 0.003)
    assert reputation.sending_paused(session, NOW, 0.00005)  # 3 / 51 000 is above 0.005 %


def test_a_small_list_is_not_paused_by_one_complaint(session: Session) -> None:
    sent(session, 20, NOW - dt.timedelta(days=1))
    complaints(session, 1, NOW)
    assert reputation.complaint_rate(session, NOW) == 0.05
    assert not reputation.sending_paused(session, NOW, 0.003)
    assert reputation.sending_paused(session, NOW, 0.003, min_sent=10)
