"""The ledger: the ``deliveries`` table, one row per (subscriber, edition).

Rows are planned a keyset page at a time (their papers chosen by ``digest.delivery.planning``),
claimed with a lease before their message goes out, and recorded as sent, failed (or put back
for a retry, as ``policy`` says) or skipped. The look-ups here say what is still open: due
retries, expired leases, counts per status.

No other module reads or writes the table (``tests/test_table_owners.py``): they call the
functions here, which answer with plain values (``Entry`` and the like), never rows.

An edition whose rows were compacted is *closed*: its counts row in ``delivery_counts`` is the
only record left of who had it, so it is never planned or sent again (``is_closed``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    SQLColumnExpression,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from digest.core.db import among, count_per_day
from digest.core.models import (
    Delivery,
    DeliveryCount,
    DeliveryStatus,
    Digest,
    DigestKind,
    Frequency,
    Subscriber,
    SubscriberStatus,
)
from digest.core.retention import NO_REPEAT_LOOKBACK
from digest.delivery.policy import DeliveryPolicy

if TYPE_CHECKING:  # only named: the mailer (aiosmtplib) would load for every `digest status`
    from digest.transport.mailer import SendError

log = logging.getLogger(__name__)

NOTHING_NEW = "no new papers for this subscriber"
NO_LONGER_ACTIVE = "subscriber no longer active"


def _upsert_for(session: Session) -> Any:
    """The dialect's INSERT with ON CONFLICT, imported when first used: loading the PostgreSQL
    dialect costs every command that reads the ledger (``digest status``) ~20 ms."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def frequency_of(kind: DigestKind) -> Frequency:
    """Who an edition of ``kind`` is for: the subscribers of the same name's frequency."""
    return Frequency(kind.value)


def is_closed(session: Session, digest_id: int) -> bool:
    """True once compaction has reduced any of the edition's rows to counts.

    The rows were the only answer to "who has had this edition": planning it again would find
    nobody served and send everyone a second copy. The counts row is written in the same
    transaction as the first deletion, so no edition is ever half-forgotten and still open.
    """
    closed = select(DeliveryCount.digest_id).where(DeliveryCount.digest_id == digest_id).limit(1)
    return session.scalar(closed) is not None


def closed_edition(session: Session, day: dt.date, kind: DigestKind = DigestKind.DAILY) -> int | None:
    """The id of ``day``'s edition of this kind when it is closed (see ``is_closed``), else None."""
    digest_id = session.scalar(select(Digest.id).where(Digest.date == day, Digest.kind == kind))
    return digest_id if digest_id is not None and is_closed(session, digest_id) else None


def _due(digest: Digest, after_id: int, upto_id: int | None, extra_filter: object | None) -> list[object]:
    """The conditions of "due for this edition": active, of its frequency, in the id range."""
    conditions: list[object] = [
        Subscriber.status == SubscriberStatus.ACTIVE,
        Subscriber.frequency == frequency_of(digest.kind),
        Subscriber.id > after_id,
    ]
    if upto_id is not None:
        conditions.append(Subscriber.id <= upto_id)
    if extra_filter is not None:
        conditions.append(extra_filter)
    return conditions


def due_subscriber_page(
    session: Session,
    digest: Digest,
    after_id: int,
    limit: int | None,
    extra_filter: object | None = None,
    *,
    upto_id: int | None = None,
) -> list[int]:
    """Ids of active subscribers of this edition's frequency, after ``after_id`` (up to
    ``upto_id``), in id order."""
    query = select(Subscriber.id).where(*_due(digest, after_id, upto_id, extra_filter)).order_by(Subscriber.id)  # type: ignore[arg-type]
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def page_bounds(
    session: Session, digest: Digest, after_id: int, page_size: int, extra_filter: object | None = None
) -> list[int]:
    """The last id of each page of ``page_size`` due subscribers after ``after_id``: every
    ``page_size``-th due id and the very last, so page k is (bounds[k-1], bounds[k]].

    One query that reads ids only (the subscribers' primary key), so a dispatcher can hand out
    a big edition's pages to many planners long before one planner could have walked it.
    """
    numbered = (
        select(
            Subscriber.id.label("id"),
            func.row_number().over(order_by=Subscriber.id).label("n"),
            func.count().over().label("total"),
        )
        .where(*_due(digest, after_id, None, extra_filter))  # type: ignore[arg-type]
        .subquery()
    )
    last_of_page = or_(numbered.c.n % page_size == 0, numbered.c.n == numbered.c.total)
    return list(session.scalars(select(numbered.c.id).where(last_of_page).order_by(numbered.c.id)))


# Papers in these deliveries count as received (failed and skipped ones never arrived).
REPEAT_STATUSES = frozenset({DeliveryStatus.SENT, DeliveryStatus.SENDING, DeliveryStatus.PENDING})


@dataclass(frozen=True)
class Entry:
    """One delivery as plain values: what composing, sending and the read-outs need of a row."""

    id: int
    digest_id: int
    subscriber_id: int | None
    recipient: str | None
    message_id: str
    paper_ids: list[str] | None
    reasons: dict[str, list[str]] | None
    created_at: dt.datetime
    not_after: dt.datetime | None = None
    attempts: int = 0


@dataclass(frozen=True)
class Plan:
    """A subscriber's row of an edition as planning chose it (no papers: nothing new for them)."""

    subscriber_id: int
    recipient: str
    message_id: str
    paper_ids: list[str]
    reasons: dict[str, list[str]]


def _without_papers() -> ColumnElement[bool]:
    """A row planned without papers (by an older release that chose at send time). A JSON
    column stores Python's None as JSON ``null``, so both that and SQL NULL are looked for."""
    return or_(Delivery.paper_ids.is_(None), cast(Delivery.paper_ids, Text) == "null")


def planned_among(session: Session, digest_id: int, subscriber_ids: Sequence[int]) -> set[int]:
    """Which of these subscribers already have their row of this edition (a page planned again).

    An open row without papers does not count: only planning chooses papers, so such a row
    waits for its page to be planned again (``add_planned`` fills it in).
    """
    if not subscriber_ids:
        return set()
    query = select(Delivery.subscriber_id).where(
        Delivery.digest_id == digest_id,
        among(session, Delivery.subscriber_id, subscriber_ids),
        ~and_(Delivery.status == DeliveryStatus.PENDING, _without_papers()),
    )
    return set(session.scalars(query))


def unplanned_due(session: Session, digest: Digest) -> bool:
    """True while some subscriber due for this edition has no row of it yet (planning goes on)."""
    query = select(Subscriber.id).where(
        *_due(digest, 0, None, not_planned_for(digest.id, Subscriber.id))  # type: ignore[arg-type]
    )
    return session.scalar(query.limit(1)) is not None


def add_planned(
    session: Session, digest_id: int, plans: Sequence[Plan], *, now: dt.datetime, not_after: dt.datetime
) -> None:
    """Write planned rows: pending with their papers, or skipped when there is nothing new.

    On the (subscriber, edition) key a row already there is left as it is (two dispatchers
    planning the same page at once both succeed, once), unless it is still open without papers:
    then it gets these papers and keeps its ``Message-ID``.
    """
    if not plans:
        return
    if session.get_bind().dialect.name == "postgresql":
        _add_planned_postgresql(session, digest_id, plans, now=now, not_after=not_after)
        return
    rows = [
        {
            "digest_id": digest_id,
            "subscriber_id": plan.subscriber_id,
            "recipient": plan.recipient,
            "status": DeliveryStatus.PENDING if plan.paper_ids else DeliveryStatus.SKIPPED,
            "last_error": None if plan.paper_ids else NOTHING_NEW,
            "paper_ids": plan.paper_ids,
            "reasons": plan.reasons,
            "attempts": 0,
            "message_id": plan.message_id,
            "not_after": not_after,
            "created_at": now,
            "updated_at": now,
        }
        for plan in plans
    ]
    dialect_insert = _upsert_for(session)
    statement = dialect_insert(Delivery)
    chosen = ("recipient", "status", "last_error", "paper_ids", "reasons", "updated_at")
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["subscriber_id", "digest_id"],
            set_={
                **{name: statement.excluded[name] for name in chosen},
                "not_after": func.coalesce(Delivery.not_after, statement.excluded.not_after),
            },
            where=and_(Delivery.status == DeliveryStatus.PENDING, _without_papers()),
        ),
        rows,
    )
    session.flush()


# ``add_planned`` on PostgreSQL: a page's rows as one JSON document, one statement planned once.
# The ORM's executemany ran one INSERT per row (pipelined, but each parsed and planned by the
# server under ``force_custom_plan``), and arrays per column cost more to pass than the JSON
# (psycopg dumps array elements in Python). Same rows, same conflict rule.
ADD_PLANNED_POSTGRESQL = text(
    "INSERT INTO deliveries (digest_id, subscriber_id, recipient, status, last_error, paper_ids, reasons,"
    " attempts, message_id, not_after, created_at, updated_at)"
    " SELECT :digest_id, a.subscriber_id, a.recipient, a.status, a.last_error, a.paper_ids, a.reasons, 0,"
    " a.message_id, :not_after, :now, :now"
    " FROM json_to_recordset(CAST(:rows AS json)) AS a(subscriber_id bigint, recipient text, status text,"
    " last_error text, paper_ids json, reasons json, message_id text)"
    " ON CONFLICT (subscriber_id, digest_id) DO UPDATE SET recipient = excluded.recipient,"
    " status = excluded.status, last_error = excluded.last_error, paper_ids = excluded.paper_ids,"
    " reasons = excluded.reasons, updated_at = excluded.updated_at,"
    " not_after = coalesce(deliveries.not_after, excluded.not_after)"
    " WHERE deliveries.status = 'pending'"
    " AND (deliveries.paper_ids IS NULL OR CAST(deliveries.paper_ids AS text) = 'null')"
)


def _add_planned_postgresql(
    session: Session, digest_id: int, plans: Sequence[Plan], *, now: dt.datetime, not_after: dt.datetime
) -> None:
    if now.tzinfo is None or not_after.tzinfo is None:
        raise ValueError("naive datetime stored; use timezone-aware UTC timestamps")
    pending, skipped = DeliveryStatus.PENDING.value, DeliveryStatus.SKIPPED.value
    rows = [
        {
            "subscriber_id": plan.subscriber_id,
            "recipient": plan.recipient,
            "status": pending if plan.paper_ids else skipped,
            "last_error": None if plan.paper_ids else NOTHING_NEW,
            "paper_ids": plan.paper_ids,  # [] when skipped: a plan always has a list
            "reasons": plan.reasons,
            "message_id": plan.message_id,
        }
        for plan in plans
    ]
    session.connection().execute(
        ADD_PLANNED_POSTGRESQL,
        {
            "digest_id": digest_id,
            "now": now.astimezone(dt.UTC),
            "not_after": not_after.astimezone(dt.UTC),
            "rows": json.dumps(rows),
        },
    )


def recently_sent(session: Session, subscriber_ids: Sequence[int], now: dt.datetime) -> dict[int, set[str]]:
    """Papers each subscriber already got (or is about to get) within the no-repeat reach."""
    sent: dict[int, set[str]] = {sid: set() for sid in subscriber_ids}
    rows = session.execute(
        select(Delivery.subscriber_id, Delivery.paper_ids, Delivery.status).where(
            among(session, Delivery.subscriber_id, subscriber_ids),
            Delivery.created_at > now - NO_REPEAT_LOOKBACK,
            Delivery.paper_ids.is_not(None),
        )
    )
    # Status is checked here, not in SQL, so the query stays on the (subscriber, created) index.
    for sid, paper_ids, status in rows:
        if sid is not None and status in REPEAT_STATUSES:
            sent[sid].update(paper_ids or [])
    return sent


# A dispatch checks the ledger's planner statistics when it has planned this many rows, then at
# each further factor of four.
STATISTICS_CHECK_FIRST = 10_000


def refresh_statistics_if_blind(session: Session, planned: int) -> bool:
    """ANALYZE the ledger when its statistics know of fewer rows than this dispatch has planned.

    A fresh ledger (a new install, or a server whose autovacuum lags or is off) has statistics
    from when it was empty. PostgreSQL then reads a million-row ledger by sequential scan for
    each page's no-repeats look-up (0.28 s a page at 250 000 rows instead of a few ms) and
    plans claims through the status index. One ANALYZE samples 30 000 rows, far less than one
    such page costs, and is needed only while the table outgrows what the statistics know.
    """
    if session.get_bind().dialect.name != "postgresql":
        return False
    known = session.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'deliveries'::regclass"))
    if known is not None and known >= planned:
        return False
    session.execute(text("ANALYZE deliveries"))
    return True


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    """Sendable at ``now``: pending and due, or sending with an expired lease (its worker died).

    A row without papers is not: senders choose none (that takes the ranker), it waits for its
    page to be planned again (``planned_among``).
    """
    return and_(
        or_(
            and_(
                Delivery.status == DeliveryStatus.PENDING,
                or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
            ),
            and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now),
        ),
        ~_without_papers(),
    )


def claim(
    session: Session,
    digest_id: int,
    subscriber_ids: Sequence[int],
    *,
    now: dt.datetime,
    lease_seconds: int,
) -> list[Entry]:
    """Atomically take the sendable deliveries of these subscribers; returns them, in id order.

    The conditional UPDATE is the lock: of two workers racing for a row only one matches it.
    """
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    # Rows are found by their exact (subscriber, edition) key and updated by primary key, a
    # shape no planner gets wrong: right after a dispatch the statistics still say the edition
    # has no rows, and a plan through the (edition, status) index read every row of it per
    # chunk. RETURNING says which rows this worker won, with what sending needs of them.
    keys = [(sid, digest_id) for sid in subscriber_ids]
    delivery_ids = list(
        session.scalars(select(Delivery.id).where(tuple_(Delivery.subscriber_id, Delivery.digest_id).in_(keys)))
    )
    if not delivery_ids:
        return []
    claimed = session.execute(
        update(Delivery)
        .where(among(session, Delivery.id, delivery_ids), _claimable(now))
        .values(
            status=DeliveryStatus.SENDING,
            lease_until=lease_until,
            attempts=Delivery.attempts + 1,
            updated_at=now,
        )
        .returning(*ENTRY_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    entries = sorted((Entry(*row) for row in claimed), key=lambda entry: entry.id)
    session.flush()
    return entries


MARK_SENT_POSTGRESQL = text(
    "UPDATE deliveries SET status = 'sent', smtp_reply = a.reply, sent_at = a.at, updated_at = a.at,"
    " lease_until = NULL, last_error = NULL"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:replies AS text[]), CAST(:ats AS timestamptz[])) AS a(id, reply, at)"
    " WHERE deliveries.id = a.id"
)


def mark_sent(session: Session, outcomes: Sequence[tuple[int, str, dt.datetime]]) -> None:
    """Record (delivery id, server reply, when) for a group of accepted messages at once."""
    if not outcomes:
        return
    if any(at.tzinfo is None for _, _, at in outcomes):
        raise ValueError("naive datetime stored; use timezone-aware UTC timestamps")
    rows = [(d, r[:500], at) for d, r, at in outcomes]
    if session.get_bind().dialect.name == "postgresql":
        # One statement for the group, the same text every time (compiled once, prepared by the
        # server): the ledger's busiest write. SQLite takes the executemany below.
        session.connection().execute(
            MARK_SENT_POSTGRESQL,
            {
                "ids": [d for d, _, _ in rows],
                "replies": [r for _, r, _ in rows],
                "ats": [at.astimezone(dt.UTC) for _, _, at in rows],
            },
        )
        return
    table = Delivery.__table__
    assert isinstance(table, Table)
    session.connection().execute(
        update(table)
        .where(table.c.id == bindparam("delivery_id"))
        .values(
            status=DeliveryStatus.SENT,
            smtp_reply=bindparam("reply"),
            sent_at=bindparam("at"),
            updated_at=bindparam("at"),
            lease_until=None,
            last_error=None,
        ),
        [{"delivery_id": d, "reply": r, "at": at} for d, r, at in rows],
    )


def extend_leases(session: Session, delivery_ids: Sequence[int], lease_until: dt.datetime) -> None:
    session.execute(
        update(Delivery)
        .where(among(session, Delivery.id, delivery_ids), Delivery.status == DeliveryStatus.SENDING)
        .values(lease_until=lease_until)
        .execution_options(synchronize_session=False)
    )


def mark_skipped(session: Session, delivery_id: int, reason: str, now: dt.datetime) -> None:
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id)
        .values(status=DeliveryStatus.SKIPPED, last_error=reason[:500], lease_until=None, updated_at=now)
    )


def withdraw(session: Session, delivery_id: int, attempts: int, now: dt.datetime) -> bool:
    """Skip a claimed delivery whose subscriber left before it was sent; False when the row is
    no longer this claim's to skip (sent, or claimed again by another worker: a new attempt)."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.SENDING, Delivery.attempts == attempts)
        .values(status=DeliveryStatus.SKIPPED, last_error=NO_LONGER_ACTIVE, lease_until=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_failure(
    session: Session,
    entry: Entry,
    error: SendError,
    policy: DeliveryPolicy,
    now: dt.datetime,
) -> dt.datetime | None:
    """Retry later (returns when) or fail for good (returns None).

    What a bounce does to the subscriber is the state machine's to decide; the caller asks it
    in the same transaction (``digest.delivery.batch``).
    """
    reason = error.reason[:500]
    # One line per failed attempt, tagged so a JSON log can be searched by delivery or reader.
    log.info(
        "delivery attempt %d failed: %s",
        entry.attempts,
        reason,
        extra={"delivery_id": entry.id, "subscriber_id": entry.subscriber_id},
    )
    when = policy.retry_at(error, entry.attempts, now)
    if when is not None:
        session.execute(
            update(Delivery)
            .where(Delivery.id == entry.id)
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=when,
                lease_until=None,
                last_error=reason,
                updated_at=now,
            )
        )
        return when
    session.execute(
        update(Delivery)
        .where(Delivery.id == entry.id)
        .values(status=DeliveryStatus.FAILED, lease_until=None, last_error=reason, updated_at=now)
    )
    return None


def next_retry(session: Session, digest_id: int, subscriber_ids: Sequence[int]) -> dt.datetime | None:
    """When the earliest retry still waiting in this page is due.

    A batch is handed out again at its earliest retry; rows whose backoff (with its jitter) ends
    a little later were not claimable then, and must say when they are, or they would wait for
    the stall sweep instead of their backoff.
    """
    keys = [(sid, digest_id) for sid in subscriber_ids]
    # Found by the (subscriber, edition) key and filtered here, as in ``claim``: a status filter
    # in SQL lets the planner read every pending row of the edition through (edition, status).
    rows = session.execute(
        select(Delivery.status, Delivery.next_attempt_at).where(
            tuple_(Delivery.subscriber_id, Delivery.digest_id).in_(keys)
        )
    )
    waiting = [at for status, at in rows if status == DeliveryStatus.PENDING and at is not None]
    return min(waiting, default=None)


def expire_stale(session: Session, digest_id: int, now: dt.datetime) -> int:
    """Record as skipped the open deliveries of an edition that are past their ``not_after``."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.digest_id == digest_id,
            Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
            Delivery.not_after < now,
            # A row being sent right now (live lease) is left to its worker.
            or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
        )
        .values(status=DeliveryStatus.SKIPPED, last_error="stale: not sent in time", lease_until=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def unfinished_subscribers(session: Session, digest_id: int, now: dt.datetime, limit: int) -> list[int]:
    """Subscribers whose delivery can be claimed now (due retries, expired leases)."""
    return list(
        session.scalars(
            select(Delivery.subscriber_id)
            .where(
                Delivery.digest_id == digest_id,
                Delivery.subscriber_id.is_not(None),
                _claimable(now),
            )
            .order_by(Delivery.subscriber_id)
            .limit(limit)
        )
    )


def editions_with_open_rows(session: Session, since: dt.datetime) -> list[int]:
    """Editions with pending or sending rows planned after ``since`` (what beat's sweep walks)."""
    return list(
        session.scalars(
            select(Delivery.digest_id)
            .where(Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]), Delivery.created_at > since)
            .distinct()
        )
    )


def counts_by_status(session: Session, digest_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Delivery.status, func.count()).where(Delivery.digest_id == digest_id).group_by(Delivery.status)
    )
    counts = {s.value: 0 for s in DeliveryStatus}
    for status, count in rows:
        counts[DeliveryStatus(status).value] = count
    return counts


def open_count(session: Session, digest_id: int) -> int:
    """Deliveries of an edition not yet sent, failed or skipped (two ranges of one index)."""
    open_statuses = [DeliveryStatus.PENDING, DeliveryStatus.SENDING]
    query = select(func.count()).where(Delivery.digest_id == digest_id, Delivery.status.in_(open_statuses))
    return session.scalar(query) or 0


def failure_reasons(session: Session, digest_id: int, limit: int = 50) -> list[str]:
    """'recipient: reason' for failed deliveries of an edition, for operators."""
    rows = session.execute(
        select(Delivery.recipient, Delivery.last_error)
        .where(Delivery.digest_id == digest_id, Delivery.status == DeliveryStatus.FAILED)
        .order_by(Delivery.id)
        .limit(limit)
    )
    return [f"{recipient or '(erased)'}: {error}" for recipient, error in rows]


# Read-outs for operators (status, metrics, reputation) and the scheduler.


def send_span(session: Session, digest_id: int) -> tuple[dt.datetime | None, dt.datetime | None, int]:
    """(first, last sent_at, how many sent) of an edition's live rows, for its send rate."""
    first, last, sent = session.execute(
        select(func.min(Delivery.sent_at), func.max(Delivery.sent_at), func.count(Delivery.sent_at)).where(
            Delivery.digest_id == digest_id, Delivery.status == DeliveryStatus.SENT
        )
    ).one()
    return first, last, int(sent)


def oldest_open(session: Session, digest_id: int) -> dt.datetime | None:
    """When the edition's oldest still-open delivery was planned."""
    return session.scalar(
        select(func.min(Delivery.created_at)).where(
            Delivery.digest_id == digest_id,
            Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
        )
    )


def oldest_due(session: Session, digest_ids: Sequence[int], now: dt.datetime) -> list[dt.datetime]:
    """Since when these editions' sendable rows wait: the earliest due pending row and the
    earliest expired lease (each None-free; empty when nothing is due).

    Ids as values, not a subquery: given a join, PostgreSQL estimated that most of the table
    matched and scanned all of it (114 ms against 29 ms at a million rows).
    """
    pending = select(func.min(func.coalesce(Delivery.next_attempt_at, Delivery.created_at))).where(
        Delivery.digest_id.in_(digest_ids),
        Delivery.status == DeliveryStatus.PENDING,
        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
    )
    abandoned = select(func.min(Delivery.lease_until)).where(
        Delivery.digest_id.in_(digest_ids), Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now
    )
    return [t for t in (session.scalar(pending), session.scalar(abandoned)) if t is not None]


def counts_of_editions(session: Session, digest_ids: Sequence[int]) -> dict[str, int]:
    """Live rows of these editions by status (every status present, 0 when none)."""
    counts = {s.value: 0 for s in DeliveryStatus}
    rows = session.execute(
        select(Delivery.status, func.count()).where(Delivery.digest_id.in_(digest_ids)).group_by(Delivery.status)
    )
    for status, n in rows:
        counts[DeliveryStatus(status).value] = n
    return counts


def sent_since(session: Session, since: dt.datetime, *, at_most: int | None = None) -> int:
    """Digests sent after ``since``; with ``at_most``, counting stops there (min(count, at_most))."""
    sent = select(Delivery.id).where(Delivery.status == DeliveryStatus.SENT, Delivery.sent_at > since)
    if at_most is not None:
        sent = sent.limit(at_most)
    return session.scalar(select(func.count()).select_from(sent.subquery())) or 0


def recipients(session: Session, delivery_ids: Sequence[int]) -> dict[int, str | None]:
    """The address each of these deliveries went to (None once erased); absent ids have no row."""
    if not delivery_ids:
        return {}
    rows = session.execute(select(Delivery.id, Delivery.recipient).where(Delivery.id.in_(delivery_ids)))
    return {delivery_id: recipient for delivery_id, recipient in rows}


def entries(session: Session, delivery_ids: Sequence[int]) -> list[Entry]:
    """These deliveries (absent ids have no row), in id order."""
    if not delivery_ids:
        return []
    # The columns, not ORM objects: the values are all a reader needs, and building mapped
    # instances (identity map, state) costs more than they do.
    rows = session.execute(select(*ENTRY_COLUMNS).where(Delivery.id.in_(delivery_ids)).order_by(Delivery.id))
    return [Entry(*row) for row in rows]


# In ``Entry``'s field order.
ENTRY_COLUMNS: tuple[InstrumentedAttribute[Any], ...] = (
    Delivery.id,
    Delivery.digest_id,
    Delivery.subscriber_id,
    Delivery.recipient,
    Delivery.message_id,
    Delivery.paper_ids,
    Delivery.reasons,
    Delivery.created_at,
    Delivery.not_after,
    Delivery.attempts,
)


def _entry(row: Delivery) -> Entry:
    return Entry(*(getattr(row, column.key) for column in ENTRY_COLUMNS))


def set_recipients(session: Session, addresses: dict[int, str]) -> None:
    """Record the address each of these deliveries goes to (a subscriber may change it after planning)."""
    for delivery_id, address in addresses.items():
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(recipient=address))


def with_message_id(session: Session, message_id: str, subscriber_id: int) -> int | None:
    """The id of this subscriber's delivery that carried ``message_id``, while its row is kept."""
    return session.scalar(
        select(Delivery.id).where(Delivery.message_id == message_id, Delivery.subscriber_id == subscriber_id)
    )


def sent_on(session: Session, subscriber_id: int, day: dt.date) -> Entry | None:
    """The sent delivery of ``day``'s edition to a subscriber, if the ledger still holds it."""
    query = (
        select(Delivery)
        .join(Digest, Digest.id == Delivery.digest_id)
        .where(
            Delivery.subscriber_id == subscriber_id,
            Digest.date == day,
            Delivery.status == DeliveryStatus.SENT,
            Delivery.paper_ids.is_not(None),
        )
        .order_by(Digest.kind)
        .limit(1)
    )
    row = session.scalars(query).first()
    return None if row is None else _entry(row)


@dataclass(frozen=True)
class Received:
    """A sent digest as its reader got it: its papers and their reasons, which edition, when."""

    paper_ids: list[str]
    reasons: dict[str, list[str]]
    sent_at: dt.datetime | None  # None for rows sent before sent_at existed
    day: dt.date
    kind: DigestKind


def received(session: Session, subscriber_id: int, limit: int) -> list[Received]:
    """A subscriber's sent digests, newest first (on the (subscriber, created) index)."""
    rows = session.execute(
        select(Delivery.paper_ids, Delivery.reasons, Delivery.sent_at, Digest.date, Digest.kind)
        .join(Digest, Digest.id == Delivery.digest_id)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.status == DeliveryStatus.SENT)
        .order_by(Delivery.created_at.desc())
        .limit(limit)
    )
    return [
        Received(paper_ids or [], reasons or {}, sent_at, day, kind) for paper_ids, reasons, sent_at, day, kind in rows
    ]


@dataclass(frozen=True)
class Attempt:
    """One delivery as the operator console lists it."""

    date: dt.date
    kind: DigestKind
    recipient: str | None
    status: DeliveryStatus
    attempts: int
    sent_at: dt.datetime | None
    last_error: str | None
    updated_at: dt.datetime


def of_subscriber(session: Session, subscriber_id: int, limit: int) -> list[Attempt]:
    """A subscriber's deliveries, newest first."""
    return _listed(session, Delivery.subscriber_id == subscriber_id, Delivery.id.desc(), limit)


def recent_failures(session: Session, limit: int) -> list[Attempt]:
    """The latest failed deliveries of any edition, newest first."""
    return _listed(session, Delivery.status == DeliveryStatus.FAILED, Delivery.updated_at.desc(), limit)


def _listed(session: Session, where: ColumnElement[bool], order: ColumnElement[Any], limit: int) -> list[Attempt]:
    rows = session.execute(
        select(
            Digest.date,
            Digest.kind,
            Delivery.recipient,
            Delivery.status,
            Delivery.attempts,
            Delivery.sent_at,
            Delivery.last_error,
            Delivery.updated_at,
        )
        .join(Digest, Digest.id == Delivery.digest_id)
        .where(where)
        .order_by(order)
        .limit(limit)
    )
    return [Attempt(*row) for row in rows]


def sent_per_day(session: Session, since: dt.datetime) -> dict[str, int]:
    """Digests sent per UTC day since ``since`` ("YYYY-MM-DD": count)."""
    return count_per_day(session, Delivery.sent_at, Delivery.status == DeliveryStatus.SENT, since=since)


# For the state machine (digest.subscribers.subscriptions): what a subscriber's move does to
# their rows, in the same transaction as the move.


def stop_open(session: Session, subscriber_id: int, reason: str, now: dt.datetime) -> None:
    """Skip deliveries not yet handed to a worker, so a digest queued right now is not sent
    after an opt-out (batches re-check the rest before sending)."""
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.status == DeliveryStatus.PENDING)
        .values(status=DeliveryStatus.SKIPPED, last_error=reason, updated_at=now)
    )


def forget(session: Session, subscriber_id: int) -> None:
    """Erasure: close the subscriber's open rows, then remove what in them was personal.

    Open rows are closed first: once the subscriber row is gone nothing could ever send or
    finish them, and a run waiting for its edition to complete would wait forever. The rows
    themselves stay (without subscriber, address or papers), so counts stay true.
    """
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.status.in_(OPEN))
        .values(status=DeliveryStatus.SKIPPED, last_error="erased", lease_until=None)
    )
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id)
        .values(subscriber_id=None, recipient=None, paper_ids=None, reasons=None, last_error=None)
    )


def exported(session: Session, subscriber_id: int) -> list[dict[str, object]]:
    """A subscriber's deliveries for their data export: edition, status, when sent, papers."""
    rows = session.execute(
        select(Delivery.digest_id, Delivery.status, Delivery.sent_at, Delivery.paper_ids)
        .where(Delivery.subscriber_id == subscriber_id)
        .order_by(Delivery.id)
    )
    return [
        {
            "digest_id": digest_id,
            "status": DeliveryStatus(status).value,
            "sent_at": sent_at.isoformat() if sent_at else None,
            "papers": paper_ids or [],
        }
        for digest_id, status, sent_at, paper_ids in rows
    ]


def not_planned_for(digest_id: int, subscriber_id: SQLColumnExpression[int]) -> ColumnElement[bool]:
    """A filter: the subscriber (a column of the enclosing query) has no planned row of this
    edition (an open row without papers is not one, as in ``planned_among``)."""
    return ~exists().where(
        Delivery.subscriber_id == subscriber_id,
        Delivery.digest_id == digest_id,
        ~and_(Delivery.status == DeliveryStatus.PENDING, _without_papers()),
    )


# Compaction (digest.delivery.compaction decides when; the rows and their counts are the ledger's).

# An open row that old can never be sent (it is far past its stale limit): it counts as skipped.
OPEN = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)


def counted_as(status: str) -> str:
    """The status a compacted row is counted under."""
    return (DeliveryStatus.SKIPPED if status in OPEN else DeliveryStatus(status)).value


def editions_with_rows_before(session: Session, cutoff: dt.date) -> list[int]:
    """Editions dated before ``cutoff`` that still have ledger rows (one index probe each)."""
    has_rows = select(Delivery.id).where(Delivery.digest_id == Digest.id).limit(1).exists()
    return list(session.scalars(select(Digest.id).where(Digest.date < cutoff, has_rows).order_by(Digest.date)))


def rows_by_status(session: Session, digest_ids: Sequence[int]) -> Counter[str]:
    """These editions' rows by the status compaction would count them as."""
    counted: Counter[str] = Counter()
    rows = session.execute(
        select(Delivery.status, func.count()).where(Delivery.digest_id.in_(digest_ids)).group_by(Delivery.status)
    )
    for status, n in rows:
        counted[counted_as(status)] += n
    return counted


def compact_rows(session: Session, digest_id: int, limit: int) -> Counter[str]:
    """Delete up to ``limit`` of an edition's rows, adding them to its counts; what was removed.

    The first counts row also closes the edition (``is_closed``), in the same transaction.
    """
    batch = (
        select(Delivery.id)
        .where(Delivery.digest_id == digest_id)
        .order_by(Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    # One statement: the rows go and say what they were (no id list sent back and forth).
    statuses = session.scalars(
        delete(Delivery)
        .where(Delivery.id.in_(batch.scalar_subquery()))
        .returning(Delivery.status)
        .execution_options(synchronize_session=False)
    ).all()
    if not statuses:
        return Counter()
    removed: Counter[str] = Counter(counted_as(status) for status in statuses)
    dialect_insert = _upsert_for(session)
    statement = dialect_insert(DeliveryCount).values(
        [{"digest_id": digest_id, "status": status, "count": n} for status, n in removed.items()]
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["digest_id", "status"], set_={"count": DeliveryCount.count + statement.excluded.count}
        )
    )
    session.flush()
    return removed


def compacted_counts(session: Session, digest_id: int) -> dict[str, int]:
    """How many of an edition's deliveries were compacted away, by status."""
    rows = session.execute(
        select(DeliveryCount.status, func.sum(DeliveryCount.count))
        .where(DeliveryCount.digest_id == digest_id)
        .group_by(DeliveryCount.status)
    )
    return {DeliveryStatus(status).value: int(n or 0) for status, n in rows}


def vacuum_table(connection: Connection) -> None:
    """PostgreSQL: VACUUM (ANALYZE) the ledger; ``connection`` in autocommit (``digest.delivery.compaction``)."""
    connection.execute(text("VACUUM (ANALYZE) deliveries"))
