"""Complaint rate and the self-imposed pause (digest.delivery.reputation), on real ledger rows.

A pause stops everyone's mail, so these tests are about who can cause one: only complaints
from subscribers confirmed a week or more before they complained count, at least ten of them,
from at least three domains, and above the rate threshold.
"""

from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy import insert
from sqlalchemy.orm import Session

from digest.core.models import (
    Delivery,
    DeliveryStatus,
    Digest,
    DigestKind,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
)
from digest.delivery import reputation

NOW = dt.datetime(2026, 4, 20, 12, tzinfo=dt.UTC)
RULES = reputation.PauseRules()
_serial = itertools.count()


def edition(session: Session, at: dt.datetime) -> Digest:
    digest = Digest(kind=DigestKind.DAILY, date=dt.date(2000, 1, 1) + dt.timedelta(days=next(_serial)), created_at=at)
    session.add(digest)
    session.flush()
    return digest


def sent(session: Session, count: int, at: dt.datetime) -> None:
    digest = edition(session, at)
    session.execute(
        insert(Delivery),
        [
            {
                "digest_id": digest.id,
                "subscriber_id": None,
                "status": DeliveryStatus.SENT,
                "attempts": 1,
                "message_id": f"<{digest.date}.{i}@test>",
                "sent_at": at,
                "created_at": at,
                "updated_at": at,
            }
            for i in range(count)
        ],
    )


def complaints(
    session: Session, count: int, at: dt.datetime, *, domains: int = 5, confirmed_days_before: float = 30
) -> None:
    """``count`` subscribers, each sent one digest that they reported as abuse at ``at``."""
    digest = edition(session, at)
    for _ in range(count):
        n = next(_serial)
        address = f"reader{n}@domain{n % domains}.example"
        person = Subscriber(
            email=address,
            status=SubscriberStatus.COMPLAINED,
            confirmed_at=at - dt.timedelta(days=confirmed_days_before),
            created_at=at - dt.timedelta(days=confirmed_days_before),
        )
        session.add(person)
        session.flush()
        delivery = Delivery(
            digest_id=digest.id,
            subscriber_id=person.id,
            recipient=address,
            status=DeliveryStatus.SENT,
            message_id=f"<c{n}@test>",
            sent_at=at - dt.timedelta(hours=1),
        )
        session.add(delivery)
        session.flush()
        session.add(SubscriberEvent(subscriber_id=person.id, delivery_id=delivery.id, kind="complaint", created_at=at))
    session.flush()


def test_rate_is_complaints_per_sent_message_in_the_window(session: Session) -> None:
    assert reputation.complaint_rate(session, NOW) == 0.0
    sent(session, 390, NOW - dt.timedelta(days=1))
    sent(session, 590, NOW - dt.timedelta(days=30))  # outside the window
    complaints(session, 10, NOW - dt.timedelta(hours=3))
    complaints(session, 10, NOW - dt.timedelta(days=20))
    assert reputation.complaint_rate(session, NOW) == 10 / 400
    assert reputation.complaint_rate(session, NOW, dt.timedelta(days=60)) == 20 / 1000


def test_ten_aged_complaints_from_three_domains_above_the_rate_pause(session: Session) -> None:
    sent(session, 990, NOW - dt.timedelta(days=1))
    complaints(session, 9, NOW - dt.timedelta(hours=1))
    assert not reputation.sending_paused(session, NOW, RULES)  # 0.9 %, but only nine
    complaints(session, 1, NOW - dt.timedelta(hours=1))
    assert reputation.sending_paused(session, NOW, RULES)
    assert not reputation.sending_paused(session, NOW + dt.timedelta(days=8), RULES)  # they age out


def test_complaints_from_fewer_domains_or_fresh_subscribers_never_pause(session: Session) -> None:
    """What a stranger holding many mailboxes can do: sign them up and report every digest."""
    sent(session, 100, NOW - dt.timedelta(days=1))
    complaints(session, 40, NOW - dt.timedelta(hours=1), domains=2)  # one attacker, two domains
    complaints(session, 40, NOW - dt.timedelta(hours=1), confirmed_days_before=2)  # signed up for it
    assert reputation.complaint_rate(session, NOW) > 0.3
    assert reputation.counted_complaints(session, NOW, RULES) == (40, 2)
    assert not reputation.sending_paused(session, NOW, RULES)


def test_the_rate_decision_is_exact_at_the_threshold(session: Session) -> None:
    complaints(session, 10, NOW - dt.timedelta(hours=1))
    sent(session, 3324, NOW - dt.timedelta(days=1))  # 10 / 3334 = 0.29994 %
    assert not reputation.sending_paused(session, NOW, RULES)
    rules = reputation.PauseRules(threshold=0.00299)
    assert reputation.sending_paused(session, NOW, rules)  # above 0.299 %


def test_a_small_list_is_not_paused(session: Session) -> None:
    sent(session, 20, NOW - dt.timedelta(days=1))
    complaints(session, 10, NOW)
    assert not reputation.sending_paused(session, NOW, RULES)  # 30 sent: under min_sent
    assert reputation.sending_paused(session, NOW, reputation.PauseRules(min_sent=10))


def test_a_pause_is_latched_until_resumed_and_old_complaints_do_not_count_again(session: Session) -> None:
    sent(session, 990, NOW - dt.timedelta(days=1))
    complaints(session, 10, NOW - dt.timedelta(hours=1))
    pause = reputation.check_sending(session, NOW, RULES)
    assert pause is not None and "above 0.30%" in pause.reason
    later = NOW + dt.timedelta(days=10)  # the complaints have left the window
    assert reputation.check_sending(session, later, RULES) is pause
    assert reputation.resume(session, later, "operator@example.org") is pause
    assert reputation.check_sending(session, later, RULES) is None
    assert reputation.check_sending(session, NOW, RULES) is None  # counted only after the resume
