"""Delivering a digest exactly once per subscriber: plan, claim, send, record.

The ledger is the ``deliveries`` table. A delivery is

* planned (``pending``) by the dispatcher, one keyset page of subscribers at a time;
* claimed (``sending`` with a lease) in its own committed transaction *before* its message
  goes out, so a second worker, a retry or a rerun leaves it alone;
* marked ``sent`` (with the server's reply) in a transaction right after the server accepts it,
  or put back to ``pending`` with a backoff for temporary failures, or ``failed`` for
  permanent ones and after the last attempt.

A worker killed between the server's acceptance and the ``sent`` commit leaves a ``sending``
row whose lease expires; the next claim sends the same message again with the same
``Message-ID`` (receivers de-duplicate on it). That window of one in-flight message per SMTP
connection is the only way a message can arrive twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from functools import cached_property

import numpy as np
from sqlalchemy import Table, and_, bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digest import feedback
from digest.consent import Actor
from digest.db import transaction
from digest.dkim import DkimSigner
from digest.embedding import Embedder, paper_vectors, topic_vectors
from digest.links import Links
from digest.mailer import Mailer, SendError
from digest.models import (
    Delivery,
    DeliveryStatus,
    Digest,
    DigestItem,
    DigestKind,
    Frequency,
    Paper,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from digest.outages import Outages, log_notify
from digest.ranking import Profile, Ranker, Reader, TrendingWeights, candidate_of, parse_terms, trending_order
from digest.rendering import DigestContext, EmailRenderer, Envelope, PaperView, date_label, message_bytes
from digest.subscriptions import record_bounce

log = logging.getLogger(__name__)

SENT_GROUP_SIZE = 16
SENT_GROUP_SECONDS = 0.02
# How often a batch that is still sending checks that its waiting recipients are still active.
STATUS_RECHECK_SECONDS = 1.0
# Candidates of a weekly digest span 7 days; a paper can only repeat within that reach.
# Papers in these deliveries count as received (failed and skipped ones never arrived).
NOTHING_NEW = "no new papers for this subscriber"
NO_LONGER_ACTIVE = "subscriber no longer active"
REPEAT_STATUSES = frozenset({DeliveryStatus.SENT, DeliveryStatus.SENDING, DeliveryStatus.PENDING})
NO_REPEAT_LOOKBACK = dt.timedelta(days=15)


@dataclass(frozen=True)
class DeliveryPolicy:
    digest_size: int = 10
    max_attempts: int = 6
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    lease_seconds: int = 120
    stale_after: dt.timedelta = dt.timedelta(hours=20)
    relevance_weight: float = 0.7
    soft_bounce_threshold: int = 3
    soft_bounce_window: dt.timedelta = dt.timedelta(days=7)
    # Rows claimed at a time within a batch: small, so an unsubscribe or a dead worker holds
    # few rows, yet large enough that claiming costs little per message.
    claim_chunk: int = 100

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped."""
        ceiling = min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


# ---------------------------------------------------------------------------------------------
# Building a digest edition


def build_digest(
    session: Session,
    day: dt.date,
    weights: TrendingWeights,
    kind: DigestKind = DigestKind.DAILY,
    max_items: int = 100,
) -> Digest | None:
    """The edition of ``day`` with its candidates in trending order; None when there are no papers.

    Every collection refreshes the candidates and their order (votes keep coming in, late papers
    join); each delivery keeps the papers it chose, so nobody's message changes under them.
    """
    first = day - dt.timedelta(days=6) if kind is DigestKind.WEEKLY else day
    papers = list(session.scalars(select(Paper).where(Paper.daily_date.between(first, day))))
    digest = session.scalar(select(Digest).where(Digest.kind == kind, Digest.date == day))
    if not papers:
        return digest
    if digest is None:
        digest = Digest(kind=kind, date=day, created_at=utcnow())
        session.add(digest)
        session.flush()
    as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    digest.items.clear()
    session.flush()
    for position, (paper, score) in enumerate(trending_order(papers, as_of, weights)[:max_items]):
        digest.items.append(DigestItem(paper_id=paper.id, position=position, score=score))
    session.flush()
    return digest


def latest_digest(session: Session, kind: DigestKind = DigestKind.DAILY) -> Digest | None:
    return session.scalar(select(Digest).where(Digest.kind == kind).order_by(Digest.date.desc()).limit(1))


# ---------------------------------------------------------------------------------------------
# Planning (the dispatcher's work, one keyset page at a time)


def frequency_of(kind: DigestKind) -> Frequency:
    return Frequency.WEEKLY if kind is DigestKind.WEEKLY else Frequency.DAILY


def due_subscriber_page(
    session: Session,
    digest: Digest,
    after_id: int,
    limit: int,
    extra_filter: object | None = None,
) -> list[int]:
    """Ids of active subscribers of this edition's frequency, after ``after_id``, in id order."""
    query = (
        select(Subscriber.id)
        .where(
            Subscriber.status == SubscriberStatus.ACTIVE,
            Subscriber.frequency == frequency_of(digest.kind),
            Subscriber.id > after_id,
        )
        .order_by(Subscriber.id)
        .limit(limit)
    )
    if extra_filter is not None:
        query = query.where(extra_filter)  # type: ignore[arg-type]
    return list(session.scalars(query))


def message_id(digest: Digest, subscriber_id: int, domain: str) -> str:
    """Fixed at planning, so every attempt of a delivery is the same message to receivers."""
    # Random, not the subscriber id: a Message-ID travels in forwards and reports, and must name
    # nobody (complaints are matched to deliveries by it only together with a token of ours).
    return f"<{digest.date.isoformat()}.{digest.kind.value}.{secrets.token_hex(12)}@{domain}>"


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

    Choosing here, not at send time, fixes every delivery's content before anything is sent (a
    retry is the same message even if the edition is refreshed meanwhile) and spares each row
    an update on the way out. Someone with nothing new to read gets a ``skipped`` row.

    ``ON CONFLICT DO NOTHING`` on the (subscriber, edition) key: two dispatchers planning the
    same page at once (beat's hour and an operator's ``digest run``) both succeed, once.
    """
    if not subscriber_ids:
        return
    subscribers = list(
        session.scalars(select(Subscriber).where(Subscriber.id.in_(subscriber_ids)).order_by(Subscriber.id))
    )
    already = recently_sent(session, subscriber_ids, now)
    readers = composer.prepare(session, subscribers)
    rows = []
    for subscriber in subscribers:
        paper_ids, reasons = composer.choose(subscriber, already.get(subscriber.id, set()), readers.get(subscriber.id))
        rows.append(
            {
                "digest_id": digest.id,
                "subscriber_id": subscriber.id,
                "recipient": subscriber.email,
                "status": DeliveryStatus.PENDING if paper_ids else DeliveryStatus.SKIPPED,
                "last_error": None if paper_ids else NOTHING_NEW,
                "paper_ids": paper_ids,
                "reasons": reasons,
                "attempts": 0,
                "message_id": message_id(digest, subscriber.id, message_domain),
                "not_after": not_after,
                "created_at": now,
                "updated_at": now,
            }
        )
    if not rows:
        return
    dialect_insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(Delivery).on_conflict_do_nothing(index_elements=["subscriber_id", "digest_id"])
    session.execute(statement, rows)
    session.flush()


# ---------------------------------------------------------------------------------------------
# Claiming and recording


def claim(
    session: Session,
    digest_id: int,
    subscriber_ids: Sequence[int],
    *,
    now: dt.datetime,
    lease_seconds: int,
) -> list[int]:
    """Atomically take the sendable deliveries of these subscribers; returns delivery ids.

    Sendable: pending and due, or sending with an expired lease (its worker died). The
    conditional UPDATE is the lock: of two workers racing for a row only one matches it.
    """
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    claimable = or_(
        and_(
            Delivery.status == DeliveryStatus.PENDING,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        ),
        and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now),
    )
    # Rows are found by their exact (subscriber, edition) key and updated by primary key, a
    # shape no planner gets wrong: right after a dispatch the statistics still say the edition
    # has no rows, and a plan through the (edition, status) index read every row of it per
    # chunk. RETURNING says which rows this worker won.
    keys = [(sid, digest_id) for sid in subscriber_ids]
    delivery_ids = list(
        session.scalars(select(Delivery.id).where(tuple_(Delivery.subscriber_id, Delivery.digest_id).in_(keys)))
    )
    if not delivery_ids:
        return []
    claimed = session.scalars(
        update(Delivery)
        .where(Delivery.id.in_(delivery_ids), claimable)
        .values(
            status=DeliveryStatus.SENDING,
            lease_until=lease_until,
            attempts=Delivery.attempts + 1,
            updated_at=now,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).all()
    session.flush()
    return sorted(claimed)


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
        .where(Delivery.id.in_(delivery_ids), Delivery.status == DeliveryStatus.SENDING)
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
    delivery: Delivery,
    error: SendError,
    policy: DeliveryPolicy,
    now: dt.datetime,
) -> dt.datetime | None:
    """Retry later (returns when) or fail for good; hard and repeated soft bounces stop the subscriber."""
    reason = error.reason[:500]
    # One line per failed attempt, tagged so a JSON log can be searched by delivery or reader.
    log.info(
        "delivery attempt %d failed: %s",
        delivery.attempts,
        reason,
        extra={"delivery_id": delivery.id, "subscriber_id": delivery.subscriber_id},
    )
    if not error.permanent and delivery.attempts < policy.max_attempts:
        when = now + dt.timedelta(seconds=policy.backoff(delivery.attempts))
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id)
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
        .where(Delivery.id == delivery.id)
        .values(status=DeliveryStatus.FAILED, lease_until=None, last_error=reason, updated_at=now)
    )
    # Only a refusal of the recipient is about them; a refused sender, rejected content or an
    # unreachable relay must not bounce anyone.
    if delivery.subscriber_id is not None and error.about_recipient:
        record_bounce(
            session,
            delivery.subscriber_id,
            delivery.id,
            hard=error.permanent,
            detail=reason,
            now=now,
            policy=policy,
            actor=Actor.SENDER,
        )
    return None


# ---------------------------------------------------------------------------------------------
# Composing a subscriber's message


@dataclass
class DigestComposer:
    """Builds each subscriber's message for one edition; ranking is cached per profile."""

    digest_id: int
    kind: DigestKind
    day: dt.date
    papers: dict[str, Paper]
    ranker: Ranker
    renderer: EmailRenderer
    links: Links
    mail_from: str
    postal_address: str
    default_size: int
    extra_headers: dict[str, str] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.monotonic)
    _views: dict[tuple[str, tuple[str, ...]], PaperView] = field(default_factory=dict)
    dkim: DkimSigner | None = None  # set by the runtime when DIGEST_DKIM_* are configured
    embedding_model: str | None = None  # the name of the vectors this composer compares
    embedder: Callable[[], Embedder] | None = None  # loads the model, only for missing vectors
    dimensions: int = 0
    _topic_vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        session: Session,
        digest_id: int,
        *,
        renderer: EmailRenderer,
        links: Links,
        mail_from: str,
        postal_address: str,
        policy: DeliveryPolicy,
        embedding_model: str | None = None,
        embedder: Callable[[], Embedder] | None = None,
    ) -> DigestComposer:
        digest = session.get(Digest, digest_id)
        if digest is None:
            raise LookupError(f"digest {digest_id} does not exist")
        papers = {item.paper_id: item.paper for item in digest.items}
        candidates = [candidate_of(i.paper, i.score) for i in digest.items]
        vectors = paper_vectors(session, list(papers.values()), embedding_model, embedder) if embedding_model else {}
        for paper in papers.values():
            session.expunge(paper)
        matrix, dimensions = None, 0
        if vectors:
            dimensions = len(next(iter(vectors.values())))
            zero = np.zeros(dimensions, dtype=np.float32)  # a paper without a vector is about nothing
            matrix = np.vstack([vectors.get(c.paper_id, zero) for c in candidates])
        topic_cache: dict[str, np.ndarray] = {}
        return cls(
            digest_id=digest.id,
            kind=digest.kind,
            day=digest.date,
            papers=papers,
            ranker=Ranker(
                candidates, relevance_weight=policy.relevance_weight, vectors=matrix, topic_vector=topic_cache.get
            ),
            renderer=renderer,
            links=links,
            mail_from=mail_from,
            postal_address=postal_address,
            default_size=policy.digest_size,
            embedding_model=embedding_model if matrix is not None else None,
            embedder=embedder,
            dimensions=dimensions,
            _topic_vectors=topic_cache,
        )

    @cached_property
    def sender_domain(self) -> str:
        return parseaddr(self.mail_from)[1].partition("@")[2]

    def prepare(self, session: Session, subscribers: Sequence[Subscriber]) -> dict[int, Reader]:
        """Before choosing for a page: the vectors of its topics (computed once per topic, ever)
        and what its readers taught (one row each)."""
        if self.embedding_model is None:
            return {}
        topics = {t for s in subscribers for t in parse_terms(s.topics)} - self._topic_vectors.keys()
        if topics:
            self._topic_vectors.update(topic_vectors(session, sorted(topics), self.embedding_model, self.embedder))
        return feedback.readers(session, [s.id for s in subscribers], self.embedding_model, self.dimensions)

    def choose(
        self, subscriber: Subscriber, already_sent: set[str], reader: Reader | None = None
    ) -> tuple[list[str], dict[str, list[str]]]:
        """Papers and, per paper, the reasons shown ("Matches: ...", "Like: ...", "From: ...")."""
        profile = Profile.from_text(subscriber.topics, subscriber.excluded, reader)
        picks = self.ranker.pick(profile, subscriber.digest_size or self.default_size, already_sent)
        return [p.paper_id for p in picks], {p.paper_id: list(p.lines) for p in picks if p.reasons or p.why}

    def load_papers(self, session: Session, paper_ids: set[str]) -> None:
        """Make sure these papers can be shown. Deliveries keep the papers chosen at planning,
        and a collection since may have rebuilt the edition without some of them."""
        missing = paper_ids - self.papers.keys()
        if missing:
            for paper in session.scalars(select(Paper).where(Paper.id.in_(missing))):
                session.expunge(paper)
                self.papers[paper.id] = paper

    def _view(self, paper_id: str, reasons: tuple[str, ...]) -> PaperView:
        # Shared by every subscriber with the same pick: built once per edition and reason.
        key = (paper_id, reasons)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = PaperView.from_paper(self.papers[paper_id], reasons)
        return view

    def compose(self, delivery: Delivery, subscriber: Subscriber) -> bytes:
        reasons = delivery.reasons or {}
        views = [self._view(pid, tuple(reasons.get(pid, ()))) for pid in delivery.paper_ids or [] if pid in self.papers]
        unsubscribe_url = self.links.unsubscribe(subscriber)
        context = DigestContext(
            date_label=date_label(self.day) if self.kind is DigestKind.DAILY else f"Week to {date_label(self.day)}",
            papers=views,
            recipient=subscriber.email,
            frequency=subscriber.frequency.value,
            unsubscribe_url=unsubscribe_url,
            preferences_url=self.links.preferences(subscriber),
            view_url=self.links.digest_view(self.day),
            postal_address=self.postal_address,
            feedback=tuple(self.links.feedback(subscriber, view.id) for view in views),
        )
        rendered = self.renderer.render(context)
        envelope = Envelope(
            mail_from=self.mail_from,
            recipient=subscriber.email,
            message_id=delivery.message_id,
            date=delivery.created_at,
            list_id=self.links.list_id(),
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.links.unsubscribe_mailto(subscriber),
            extra_headers={
                "Feedback-ID": f"{self.digest_id}:{self.kind.value}:digest:{self.sender_domain}",
                **self.extra_headers,
            },
        )
        data = message_bytes(rendered, envelope)
        return self.dkim.sign(data) if self.dkim else data


def recently_sent(session: Session, subscriber_ids: Sequence[int], now: dt.datetime) -> dict[int, set[str]]:
    """Papers each subscriber already got (or is about to get) within the no-repeat reach."""
    sent: dict[int, set[str]] = {sid: set() for sid in subscriber_ids}
    rows = session.execute(
        select(Delivery.subscriber_id, Delivery.paper_ids, Delivery.status).where(
            Delivery.subscriber_id.in_(subscriber_ids),
            Delivery.created_at > now - NO_REPEAT_LOOKBACK,
            Delivery.paper_ids.is_not(None),
        )
    )
    # Status is checked here, not in SQL, so the query stays on the (subscriber, created) index.
    for sid, paper_ids, status in rows:
        if sid is not None and status in REPEAT_STATUSES:
            sent[sid].update(paper_ids or [])
    return sent


# ---------------------------------------------------------------------------------------------
# One batch, end to end


@dataclass
class BatchResult:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retry_at: dt.datetime | None = None  # earliest time a retry is due, if any
    errors: list[str] = field(default_factory=list)

    def merge(self, other: BatchResult) -> None:
        self.sent += other.sent
        self.failed += other.failed
        self.skipped += other.skipped
        self.errors.extend(other.errors)
        if other.retry_at and (self.retry_at is None or other.retry_at < self.retry_at):
            self.retry_at = other.retry_at


class RateLimiter:
    """No limit; the Redis-backed limiter in ``digest.ratelimit`` shares one across workers."""

    async def acquire(self, domain: str) -> None:
        return None


@dataclass
class _Prepared:
    delivery: Delivery
    subscriber: Subscriber
    data: bytes
    sender: str


def prepare_claimed(
    session: Session,
    composer: DigestComposer,
    delivery_ids: Sequence[int],
    bounce_sender: Callable[[Delivery], str],
    now: dt.datetime,
) -> tuple[list[_Prepared], int]:
    """Decide papers (first attempt only), render and skip what must not go out."""
    deliveries = list(session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)).order_by(Delivery.id)))
    subscribers = {
        s.id: s
        for s in session.scalars(
            select(Subscriber).where(Subscriber.id.in_([d.subscriber_id for d in deliveries if d.subscriber_id]))
        )
    }
    need_choice = [d.subscriber_id for d in deliveries if d.paper_ids is None and d.subscriber_id]
    already = recently_sent(session, need_choice, now) if need_choice else {}
    composer.load_papers(session, {pid for d in deliveries for pid in d.paper_ids or ()})
    prepared: list[_Prepared] = []
    skipped = 0
    for delivery in deliveries:
        subscriber = subscribers.get(delivery.subscriber_id or -1)
        reason = None
        if subscriber is None or subscriber.status is not SubscriberStatus.ACTIVE:
            reason = NO_LONGER_ACTIVE
        elif delivery.not_after is not None and now > delivery.not_after:
            reason = f"stale: not sent before {delivery.not_after.isoformat()}"
        if reason is None and subscriber is not None and delivery.paper_ids is None:
            # Planned without papers (by an older release): choose now, once, as planning would.
            reader = composer.prepare(session, [subscriber]).get(subscriber.id)
            paper_ids, reasons = composer.choose(subscriber, already.get(subscriber.id, set()), reader)
            delivery.paper_ids = paper_ids
            delivery.reasons = reasons
            if not paper_ids:
                reason = NOTHING_NEW
        if reason is None and not any(pid in composer.papers for pid in delivery.paper_ids or ()):
            reason = "its papers are no longer stored"  # never an empty digest
        if reason is not None or subscriber is None:
            mark_skipped(session, delivery.id, reason or "skipped", now)
            skipped += 1
            continue
        if delivery.recipient != subscriber.email:
            delivery.recipient = subscriber.email
        prepared.append(
            _Prepared(delivery, subscriber, composer.compose(delivery, subscriber), bounce_sender(delivery))
        )
    session.flush()
    return prepared, skipped


async def send_prepared(
    factory: sessionmaker[Session],
    prepared: Sequence[_Prepared],
    mailer: Mailer,
    limiter: RateLimiter,
    policy: DeliveryPolicy,
    concurrency: int,
    clock: Callable[[], dt.datetime] = utcnow,
) -> BatchResult:
    """Send concurrently over the mailer's pool, recording outcomes as they come.

    Accepted messages are recorded in small groups (``SENT_GROUP_SIZE`` messages or
    ``SENT_GROUP_SECONDS``, whichever comes first): one statement and one commit per group
    instead of per message. A crash can therefore cost at most one unrecorded group per
    process, which the lease sends again with the same Message-ID.
    """
    result = BatchResult()
    queue: asyncio.Queue[_Prepared] = asyncio.Queue()
    for item in prepared:
        queue.put_nowait(item)
    accepted: list[tuple[int, str, dt.datetime]] = []
    last_flush = time.monotonic()
    unsent = {item.delivery.id for item in prepared}
    queued = {item.delivery.id: item for item in prepared}
    withdrawn: set[int] = set()  # deliveries whose subscriber left while they waited here
    recorded = Outages(log_notify)

    def recheck() -> None:
        # A chunk can take a while to send (rate limits, a slow relay): someone who
        # unsubscribes meanwhile must not get the message still waiting for them here.
        if not queued:
            return
        skipped: list[int] = []
        try:
            with transaction(factory) as session:
                waiting = {item.subscriber.id for item in queued.values()}
                active = set(
                    session.scalars(
                        select(Subscriber.id).where(
                            Subscriber.id.in_(waiting), Subscriber.status == SubscriberStatus.ACTIVE
                        )
                    )
                )
                for delivery_id, item in list(queued.items()):
                    gone = item.subscriber.id not in active and delivery_id not in withdrawn
                    if gone and withdraw(session, delivery_id, item.delivery.attempts, clock()):
                        skipped.append(delivery_id)
        except SQLAlchemyError:
            log.warning("could not re-check the batch's recipients; trying again shortly", exc_info=True)
            return
        withdrawn.update(skipped)  # only once committed

    def flush() -> None:
        nonlocal last_flush
        if accepted:

            def record() -> None:
                with transaction(factory) as session:
                    mark_sent(session, accepted)

            # The server has these messages: giving up on the record (a database restart)
            # would send them again once their lease runs out. Blocking the loop is right:
            # nothing else here can be recorded either until the database is back.
            recorded.database(record, limit=policy.lease_seconds)
            result.sent += len(accepted)
            accepted.clear()
        last_flush = time.monotonic()

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            domain = item.subscriber.email.rpartition("@")[2]
            await limiter.acquire(domain)  # may wait long: the re-check covers this too
            queued.pop(item.delivery.id, None)
            if item.delivery.id in withdrawn:
                unsent.discard(item.delivery.id)
                result.skipped += 1
                continue
            try:
                reply = await mailer.send(item.sender, item.subscriber.email, item.data)
            except SendError as exc:
                unsent.discard(item.delivery.id)

                def record_failed(exc: SendError = exc, item: _Prepared = item) -> dt.datetime | None:
                    with transaction(factory) as session:
                        return record_failure(session, item.delivery, exc, policy, clock())

                when = recorded.database(record_failed, limit=policy.lease_seconds)
                if when is None:
                    result.failed += 1
                    result.errors.append(f"{item.subscriber.email}: {exc.reason}")
                elif result.retry_at is None or when < result.retry_at:
                    result.retry_at = when
                continue
            unsent.discard(item.delivery.id)
            accepted.append((item.delivery.id, reply, clock()))
            if len(accepted) >= SENT_GROUP_SIZE or time.monotonic() - last_flush >= SENT_GROUP_SECONDS:
                flush()

    async def keep_checking() -> None:
        while True:
            await asyncio.sleep(STATUS_RECHECK_SECONDS)
            recheck()

    async def keep_leases() -> None:
        # A slow send (rate limits, a slow relay) must not let the lease of rows still waiting
        # here run out: the sweep would hand them to another worker and both would send.
        while True:
            await asyncio.sleep(policy.lease_seconds / 3)
            if unsent:
                try:
                    with transaction(factory) as session:
                        extend_leases(session, sorted(unsent), clock() + dt.timedelta(seconds=policy.lease_seconds))
                except SQLAlchemyError:
                    # Keep trying: a lease that runs out hands waiting rows to another worker.
                    log.warning("could not extend the batch's leases; trying again shortly", exc_info=True)

    heartbeat, checker = asyncio.create_task(keep_leases()), asyncio.create_task(keep_checking())
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        heartbeat.cancel()
        checker.cancel()
        flush()
    return result


def run_batch(
    factory: sessionmaker[Session],
    composer: DigestComposer,
    subscriber_ids: Sequence[int],
    *,
    mailer_factory: Callable[[], Mailer],
    policy: DeliveryPolicy,
    bounce_sender: Callable[[Delivery], str],
    limiter: RateLimiter | None = None,
    concurrency: int = 4,
    clock: Callable[[], dt.datetime] = utcnow,
) -> BatchResult:
    """Claim, compose and send one page of subscribers' deliveries of ``composer``'s edition.

    Works through the page ``policy.claim_chunk`` rows at a time, claiming each chunk just
    before sending it, over one pool of SMTP connections. Commits in small steps on purpose
    (claim, then outcomes in small groups): that is what makes a crash cost at most the
    messages in flight.
    """

    async def go() -> BatchResult:
        total = BatchResult()
        mailer = mailer_factory()
        passed_over = False  # rows of the page not claimed: some may wait for a retry
        try:
            for start in range(0, len(subscriber_ids), policy.claim_chunk):
                chunk = subscriber_ids[start : start + policy.claim_chunk]
                with transaction(factory) as session:
                    claimed = claim(session, composer.digest_id, chunk, now=clock(), lease_seconds=policy.lease_seconds)
                passed_over = passed_over or len(claimed) < len(chunk)
                if not claimed:
                    continue
                with transaction(factory) as session:
                    prepared, skipped = prepare_claimed(session, composer, claimed, bounce_sender, clock())
                    for item in prepared:
                        session.expunge(item.delivery)
                        session.expunge(item.subscriber)
                total.skipped += skipped
                sent = await send_prepared(
                    factory, prepared, mailer, limiter or RateLimiter(), policy, concurrency, clock
                )
                total.merge(sent)
        finally:
            await mailer.close()
        if passed_over:
            with transaction(factory) as session:
                waiting = next_retry(session, composer.digest_id, subscriber_ids)
            if waiting is not None and (total.retry_at is None or waiting < total.retry_at):
                total.retry_at = waiting
        return total

    return asyncio.run(go())


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


# ---------------------------------------------------------------------------------------------
# Progress and sweeping


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
                or_(
                    and_(
                        Delivery.status == DeliveryStatus.PENDING,
                        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                    ),
                    and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now),
                ),
            )
            .order_by(Delivery.subscriber_id)
            .limit(limit)
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
