"""Sender reputation: the complaint rate, and the self-imposed pause above a threshold.

Mailbox providers throttle or junk a sender whose spam-complaint rate passes about 0.3 %
(Gmail and Yahoo's bulk-sender rules). Pausing ourselves first keeps the domain usable while an
operator looks at why people complain.

A pause stops everyone's mail, so it must not be something a stranger can cause. Only verified
complaints exist here (``digest.mailin.classify`` records one only for a delivery we signed, from an
abuse or fraud report, once per delivery, and it ends that subscription). A stranger who
controls k confirmed mailboxes can still forge k of them. So a pause also needs:

* at least ``min_complaints`` counted complaints (default 10), and the rate above ``threshold``;
* from at least ``min_domains`` recipient domains (default 3): one provider's hiccup or one
  attacker's domain is not enough;
* counted only from subscribers confirmed at least ``min_subscriber_age`` (default 7 days)
  before they complained: mailboxes signed up for the attack count for nothing, and each one
  is spent by its complaint (a new double opt-in restarts its week).

Once tripped, the pause is latched (``SendPause``) and logged as an error until an operator
resumes it (``digest sending resume``, or the console); complaints from before the resume are
not counted again.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.core.models import EventKind, SendPause, Subscriber, SubscriberEvent

log = logging.getLogger(__name__)

DEFAULT_WINDOW = dt.timedelta(days=7)
# Below this many sent messages a few complaints say little; a tiny list never pauses itself.
DEFAULT_MIN_SENT = 200
MAX_COMPLAINTS_READ = 100_000  # far above any list that has not already paused


@dataclass(frozen=True)
class PauseRules:
    threshold: float = 0.003
    window: dt.timedelta = DEFAULT_WINDOW
    min_sent: int = DEFAULT_MIN_SENT
    min_complaints: int = 10
    min_domains: int = 3
    min_subscriber_age: dt.timedelta = dt.timedelta(days=7)


def complaints_in(session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW) -> int:
    """Complaints received in ``window`` (distinct deliveries), counted or not."""
    return (
        session.scalar(
            select(func.count(func.distinct(func.coalesce(SubscriberEvent.delivery_id, -SubscriberEvent.id)))).where(
                SubscriberEvent.kind == EventKind.COMPLAINT, SubscriberEvent.created_at > now - window
            )
        )
        or 0
    )


def sent_in(
    session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW, *, at_most: int | None = None
) -> int:
    """Digests sent in ``window``; with ``at_most``, counting stops there (min(count, at_most))."""
    # Imported here: the runtime imports this module, and every command builds a runtime; the
    # ledger brings the subscriber code (ranking, numpy) that most commands never need.
    from digest.delivery.ledger import sent_since

    return sent_since(session, now - window, at_most=at_most)


def complaint_rate(session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW) -> float:
    """Complaints received in ``window`` per digest sent in it (0.0 when nothing was sent)."""
    sent = sent_in(session, now, window)
    return complaints_in(session, now, window) / sent if sent else 0.0


def active_pause(session: Session) -> SendPause | None:
    """The latched pause, if sending is paused now."""
    return session.scalar(
        select(SendPause).where(SendPause.resumed_at.is_(None)).order_by(SendPause.id.desc()).limit(1)
    )


def last_resume(session: Session) -> dt.datetime | None:
    return session.scalar(select(func.max(SendPause.resumed_at)))


def counted_complaints(session: Session, now: dt.datetime, rules: PauseRules) -> tuple[int, int]:
    """(complaints that count toward a pause, distinct recipient domains among them)."""
    start = now - rules.window
    resumed = last_resume(session)
    if resumed is not None and resumed > start:
        start = resumed
    from digest.delivery.ledger import recipients  # lazily, as in ``sent_in``

    # Only complaints about a delivery still in the ledger count (compaction sets the id NULL);
    # the addresses come from the ledger, which owns them.
    rows = session.execute(
        select(SubscriberEvent.delivery_id, SubscriberEvent.created_at, Subscriber.confirmed_at)
        .join(Subscriber, Subscriber.id == SubscriberEvent.subscriber_id)
        .where(
            SubscriberEvent.kind == EventKind.COMPLAINT,
            SubscriberEvent.created_at > start,
            SubscriberEvent.delivery_id.is_not(None),
        )
        .limit(MAX_COMPLAINTS_READ)
    ).all()
    addresses = recipients(session, [delivery_id for delivery_id, _, _ in rows if delivery_id is not None])
    counted = {
        (delivery_id, recipient)
        for delivery_id, complained_at, confirmed_at in rows
        if delivery_id is not None
        and (recipient := addresses.get(delivery_id))
        and confirmed_at is not None
        and confirmed_at <= complained_at - rules.min_subscriber_age
    }
    domains = {recipient.rpartition("@")[2] for _, recipient in counted}
    return len({delivery_id for delivery_id, _ in counted}), len(domains)


def pause_reason(session: Session, now: dt.datetime, rules: PauseRules) -> str | None:
    """Why sending must pause now (ignoring a latched pause), or None."""
    complaints, domains = counted_complaints(session, now, rules)
    if complaints < max(1, rules.min_complaints) or domains < rules.min_domains:
        return None
    # Checked before every batch, so it must not count a week of sent mail each time (millions
    # of rows for a large list): with c complaints the answer is the same for every count
    # above c / threshold. (Capped so that a tiny threshold cannot overflow LIMIT.)
    decisive = math.floor(complaints / rules.threshold) + 2 if rules.threshold > 0 else 0
    enough = max(1, rules.min_sent, min(2**62, decisive))
    sent = sent_in(session, now, rules.window, at_most=enough)
    if sent < max(1, rules.min_sent) or complaints / sent <= rules.threshold:
        return None
    return (
        f"complaint rate {complaints / sent:.2%} ({complaints} complaints from {domains} domains"
        f" about {sent} digests in {rules.window.days} days) is above {rules.threshold:.2%}"
    )


def sending_paused(session: Session, now: dt.datetime, rules: PauseRules) -> bool:
    """True when the complaints would pause sending now (whether or not a pause is latched)."""
    return pause_reason(session, now, rules) is not None


def check_sending(session: Session, now: dt.datetime, rules: PauseRules) -> SendPause | None:
    """The pause in force, latching a new one (and saying so loudly) when the rules trip.

    The caller commits, then refuses to send while this is not None.
    """
    pause = active_pause(session)
    if pause is not None:
        return pause
    reason = pause_reason(session, now, rules)
    if reason is None:
        return None
    pause = SendPause(reason=reason[:500], paused_at=now)
    session.add(pause)
    session.flush()
    log.error("SENDING PAUSED: %s; nothing is sent until an operator runs `digest sending resume`", reason)
    return pause


def pause(session: Session, now: dt.datetime, reason: str) -> SendPause:
    """An operator's own pause (e.g. while looking into a bad edition)."""
    current = active_pause(session)
    if current is not None:
        return current
    latched = SendPause(reason=reason[:500], paused_at=now)
    session.add(latched)
    session.flush()
    log.error("SENDING PAUSED by an operator: %s", reason)
    return latched


def resume(session: Session, now: dt.datetime, by: str) -> SendPause | None:
    """Lift the pause; complaints before now no longer count toward the next one."""
    current = active_pause(session)
    if current is None:
        return None
    current.resumed_at = now
    current.resumed_by = by[:254]
    session.flush()
    log.warning("sending resumed by %s (paused since %s: %s)", by, current.paused_at.isoformat(), current.reason)
    return current
