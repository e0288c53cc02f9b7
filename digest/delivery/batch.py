"""The batch sender: claim a page's deliveries, render them and send them over one SMTP pool.

``run_batch`` works through a page of subscribers a chunk at a time: claim (``ledger.claim``),
``prepare_claimed`` (render, skip who must not get mail), ``send_prepared`` (send concurrently,
record outcomes in small groups, keep the leases of what still waits alive, withdraw messages
whose reader left meanwhile). Each step commits on its own, so a crash costs at most the
messages in flight.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import transaction
from digest.core.models import Delivery, Subscriber, SubscriberStatus, utcnow
from digest.core.outages import Outages, log_notify
from digest.delivery.composer import DigestComposer, recently_sent
from digest.delivery.ledger import (
    NO_LONGER_ACTIVE,
    NOTHING_NEW,
    claim,
    extend_leases,
    mark_sent,
    mark_skipped,
    next_retry,
    record_failure,
    withdraw,
)
from digest.delivery.policy import DeliveryPolicy
from digest.transport.limiter import RateLimiter
from digest.transport.mailer import Mailer, SendError

log = logging.getLogger(__name__)

SENT_GROUP_SIZE = 16
SENT_GROUP_SECONDS = 0.02
# How often a batch that is still sending checks that its waiting recipients are still active.
STATUS_RECHECK_SECONDS = 1.0


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
    bounce_sender: Callable[[Delivery, Subscriber], str],
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
            _Prepared(delivery, subscriber, composer.compose(delivery, subscriber), bounce_sender(delivery, subscriber))
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
    notify: Callable[[str], None] = log_notify,
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
    recorded = Outages(notify)  # says in one line when recording waits for the database

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
    bounce_sender: Callable[[Delivery, Subscriber], str],
    limiter: RateLimiter | None = None,
    concurrency: int = 4,
    clock: Callable[[], dt.datetime] = utcnow,
    notify: Callable[[str], None] = log_notify,
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
                    factory, prepared, mailer, limiter or RateLimiter(), policy, concurrency, clock, notify
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
