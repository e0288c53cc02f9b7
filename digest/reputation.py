"""Sender reputation: the complaint rate, and the self-imposed pause above a threshold.

Mailbox providers throttle or junk a sender whose spam-complaint rate passes about 0.3 %
(Gmail and Yahoo's bulk-sender rules). Pausing ourselves first keeps the domain usable while an
operator looks at why people complain.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.models import Delivery, DeliveryStatus, SubscriberEvent

DEFAULT_WINDOW = dt.timedelta(days=7)
# Below this many sent messages a single complaint says little; a tiny list never pauses itself.
DEFAULT_MIN_SENT = 200


def complaints_in(session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW) -> int:
    return (
        session.scalar(
            # Distinct deliveries: one message reported many times is one complaint (a complaint
            # without a delivery counts on its own).
            select(func.count(func.distinct(func.coalesce(SubscriberEvent.delivery_id, -SubscriberEvent.id)))).where(
                SubscriberEvent.kind == "complaint", SubscriberEvent.created_at > now - window
            )
        )
        or 0
    )


def sent_in(
    session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW, *, at_most: int | None = None
) -> int:
    """Digests sent in ``window``; with ``at_most``, counting stops there (min(count, at_most))."""
    sent = select(Delivery.id).where(Delivery.status == DeliveryStatus.SENT, Delivery.sent_at > now - window)
    if at_most is not None:
        sent = sent.limit(at_most)
    return session.scalar(select(func.count()).select_from(sent.subquery())) or 0


def complaint_rate(session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW) -> float:
    """Complaints received in ``window`` per digest sent in it (0.0 when nothing was sent)."""
    sent = sent_in(session, now, window)
    return complaints_in(session, now, window) / sent if sent else 0.0


def sending_paused(
    session: Session,
    now: dt.datetime,
    threshold: float,
    *,
    window: dt.timedelta = DEFAULT_WINDOW,
    min_sent: int = DEFAULT_MIN_SENT,
) -> bool:
    """True when the complaint rate over ``window`` is above ``threshold`` (e.g. 0.003).

    Needs ``min_sent`` messages in the window before it judges, so that one complaint on a
    small list does not stop everyone's mail.
    """
    # Checked before every batch, so it must not count a week of sent mail each time (millions
    # of rows for a large list): with no complaints nothing can pause, and with c complaints
    # the answer is the same for every count above c / threshold.
    complaints = complaints_in(session, now, window)
    if complaints == 0:
        return False
    decisive = math.floor(complaints / threshold) + 2 if threshold > 0 else 0
    # (Capped so that an absurdly small threshold cannot overflow the database's LIMIT.)
    enough = max(1, min_sent, min(2**62, decisive))
    sent = sent_in(session, now, window, at_most=enough)
    if sent < max(1, min_sent):
        return False
    return complaints / sent > threshold
