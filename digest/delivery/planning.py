"""Planning: each subscriber's papers chosen for an edition, written to the ledger a page at a time.

Choosing here, not at send time, fixes every delivery's content before anything is sent (a
retry is the same message even if the edition is refreshed meanwhile), and keeps ranking out of
the send workers: they only render what planning chose.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy.orm import Session

from digest.core.models import Digest
from digest.delivery.composer import DigestComposer, message_id
from digest.delivery.ledger import Plan, add_planned, recently_sent
from digest.subscribers.recipients import recipients


def plan_deliveries(
    session: Session,
    digest: Digest,
    subscriber_ids: Sequence[int],
    *,
    composer: DigestComposer,
    now: dt.datetime,
    not_after: dt.datetime,
    message_domain: str,
) -> None:
    """Create the missing ledger rows for these subscribers, each with its papers already chosen.

    Someone with nothing new to read gets a ``skipped`` row. Two dispatchers planning the same
    page at once (beat's hour and an operator's ``digest run``) both succeed, once (the
    ledger's (subscriber, edition) key).
    """
    if not subscriber_ids:
        return
    subscribers = recipients(session, subscriber_ids)
    already = recently_sent(session, subscriber_ids, now)
    readers = composer.prepare(session, subscribers)
    plans = []
    for subscriber in subscribers:
        paper_ids, reasons = composer.choose(subscriber, already.get(subscriber.id, set()), readers.get(subscriber.id))
        plans.append(
            Plan(subscriber.id, subscriber.email, message_id(digest, subscriber.id, message_domain), paper_ids, reasons)
        )
    add_planned(session, digest.id, plans, now=now, not_after=not_after)
