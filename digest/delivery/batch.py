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
from digest.core.models import Subscriber, SubscriberStatus, utcnow
from digest.core.outages import Outages, log_notify
from digest.delivery.composer import DigestComposer
from digest.delivery.ledger import (
    NO_LONGER_ACTIVE,
    Entry,
    claim,
    extend_leases,
    mark_sent,
    mark_skipped,
    next_retry,
    record_failure,
    set_recipients,
    withdraw,
)
from digest.delivery.policy import DeliveryPolicy, is_bounce
from digest.subscribers.consent import Actor
from digest.subscribers.recipients import Recipient, recipients
from digest.subscribers.subscriptions import record_bounce
from digest.transport.limiter import RateLimiter
from digest.transport.mailer import Mailer, SendError, run_sending

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
        self.note_retry(other.retry_at)

    def note_retry(self, when: dt.datetime | None) -> None:
        """Keep the earliest retry: the page is handed out again then."""
        if when is not None and (self.retry_at is None or when < self.retry_at):
            self.retry_at = when


@dataclass
class _Prepared:
    entry: Entry
    subscriber: Recipient
    data: bytes
    sender: str


def _skip_reason(entry: Entry, subscriber: Recipient | None, composer: DigestComposer, now: dt.datetime) -> str | None:
    """Why a claimed delivery must not go out, or None."""
    if subscriber is None or subscriber.status is not SubscriberStatus.ACTIVE:
        return NO_LONGER_ACTIVE
    if entry.not_after is not None and now > entry.not_after:
        return f"stale: not sent before {entry.not_after.isoformat()}"
    if not any(pid in composer.papers for pid in entry.paper_ids or ()):
        return "its papers are no longer stored"  # never an empty digest
    return None


def prepare_claimed(
    session: Session,
    composer: DigestComposer,
    claimed: Sequence[Entry],
    bounce_sender: Callable[[int, Recipient], str],
    now: dt.datetime,
) -> tuple[list[_Prepared], int]:
    """Render the claimed deliveries with the papers planning chose; skip what must not go out.

    Rows planned without papers are never claimed (``digest.delivery.ledger``): a sender
    chooses nothing, so it needs no ranker.
    """
    wanted = [e.subscriber_id for e in claimed if e.subscriber_id]
    subscribers = {s.id: s for s in recipients(session, wanted)}
    composer.load_papers(session, {pid for e in claimed for pid in e.paper_ids or ()})
    prepared: list[_Prepared] = []
    moved: dict[int, str] = {}  # deliveries whose subscriber changed address since planning
    for entry in claimed:
        subscriber = subscribers.get(entry.subscriber_id or -1)
        reason = _skip_reason(entry, subscriber, composer, now)
        if reason is not None or subscriber is None:
            mark_skipped(session, entry.id, reason or NO_LONGER_ACTIVE, now)
            continue
        if entry.recipient != subscriber.email:
            moved[entry.id] = subscriber.email
        data = composer.compose(entry, subscriber)
        prepared.append(_Prepared(entry, subscriber, data, bounce_sender(entry.id, subscriber)))
    set_recipients(session, moved)
    session.flush()
    return prepared, len(claimed) - len(prepared)


def record_failed(
    session: Session, entry: Entry, error: SendError, policy: DeliveryPolicy, now: dt.datetime
) -> dt.datetime | None:
    """A failed attempt: retried later (returns when) or failed; a bounce also goes to the
    state machine, which stops the subscriber after a hard or repeated soft bounces."""
    when = record_failure(session, entry, error, policy, now)
    if when is None and entry.subscriber_id is not None and is_bounce(error):
        record_bounce(
            session,
            entry.subscriber_id,
            entry.id,
            hard=error.permanent,
            detail=error.reason[:500],
            now=now,
            policy=policy,
            actor=Actor.SENDER,
        )
    return when


@dataclass
class _Sending:
    """One chunk on its way out over the mailer's pool, and what is known of it so far."""

    factory: sessionmaker[Session]
    mailer: Mailer
    limiter: RateLimiter
    policy: DeliveryPolicy
    clock: Callable[[], dt.datetime]
    recorded: Outages  # says in one line when recording waits for the database
    result: BatchResult = field(default_factory=BatchResult)
    waiting: asyncio.Queue[_Prepared] = field(default_factory=asyncio.Queue)
    queued: dict[int, _Prepared] = field(default_factory=dict)  # not yet taken by a sender
    unsent: set[int] = field(default_factory=set)  # not yet sent or failed: their leases are kept
    withdrawn: set[int] = field(default_factory=set)  # whose subscriber left while they waited here
    accepted: list[tuple[int, str, dt.datetime]] = field(default_factory=list)  # not yet recorded
    last_flush: float = field(default_factory=time.monotonic)

    def add(self, item: _Prepared) -> None:
        self.waiting.put_nowait(item)
        self.queued[item.entry.id] = item
        self.unsent.add(item.entry.id)

    async def sender(self) -> None:
        while True:
            try:
                item = self.waiting.get_nowait()
            except asyncio.QueueEmpty:
                return
            await self.send(item)

    async def send(self, item: _Prepared) -> None:
        await self.limiter.acquire(item.subscriber.email.rpartition("@")[2])  # may wait long: recheck
        self.queued.pop(item.entry.id, None)
        if item.entry.id in self.withdrawn:
            self.unsent.discard(item.entry.id)
            self.result.skipped += 1
            return
        try:
            reply = await self.mailer.send(item.sender, item.subscriber.email, item.data)
        except SendError as exc:
            self.unsent.discard(item.entry.id)
            self.failed(item, exc)
            return
        self.unsent.discard(item.entry.id)
        self.accepted.append((item.entry.id, reply, self.clock()))
        if len(self.accepted) >= SENT_GROUP_SIZE or time.monotonic() - self.last_flush >= SENT_GROUP_SECONDS:
            self.flush()

    def failed(self, item: _Prepared, error: SendError) -> None:
        def record() -> dt.datetime | None:
            with transaction(self.factory) as session:
                return record_failed(session, item.entry, error, self.policy, self.clock())

        when = self.recorded.database(record, limit=self.policy.lease_seconds)
        if when is None:
            self.result.failed += 1
            self.result.errors.append(f"{item.subscriber.email}: {error.reason}")
        self.result.note_retry(when)

    def flush(self) -> None:
        """Record the accepted messages as sent, one statement and one commit for the group."""
        if self.accepted:

            def record() -> None:
                with transaction(self.factory) as session:
                    mark_sent(session, self.accepted)

            # The server has these messages: giving up on the record (a database restart)
            # would send them again once their lease runs out. Blocking the loop is right:
            # nothing else here can be recorded either until the database is back.
            self.recorded.database(record, limit=self.policy.lease_seconds)
            self.result.sent += len(self.accepted)
            self.accepted.clear()
        self.last_flush = time.monotonic()

    def recheck(self) -> None:
        """Withdraw the waiting messages of subscribers who left: a chunk can take a while to send
        (rate limits, a slow relay), and someone who unsubscribes meanwhile must not get one."""
        if not self.queued:
            return
        try:
            with transaction(self.factory) as session:
                gone = self._withdraw_departed(session)
        except SQLAlchemyError:
            log.warning("could not re-check the batch's recipients; trying again shortly", exc_info=True)
            return
        self.withdrawn.update(gone)  # only once committed

    def _withdraw_departed(self, session: Session) -> list[int]:
        waiting = {item.subscriber.id for item in self.queued.values()}
        active = set(
            session.scalars(
                select(Subscriber.id).where(Subscriber.id.in_(waiting), Subscriber.status == SubscriberStatus.ACTIVE)
            )
        )
        now = self.clock()
        return [
            delivery_id
            for delivery_id, item in list(self.queued.items())
            if item.subscriber.id not in active
            and delivery_id not in self.withdrawn
            and withdraw(session, delivery_id, item.entry.attempts, now)
        ]

    async def keep_checking(self) -> None:
        while True:
            await asyncio.sleep(STATUS_RECHECK_SECONDS)
            self.recheck()

    async def keep_leases(self) -> None:
        """A slow send (rate limits, a slow relay) must not let the lease of rows still waiting
        here run out: the sweep would hand them to another worker and both would send."""
        while True:
            await asyncio.sleep(self.policy.lease_seconds / 3)
            if not self.unsent:
                continue
            try:
                with transaction(self.factory) as session:
                    until = self.clock() + dt.timedelta(seconds=self.policy.lease_seconds)
                    extend_leases(session, sorted(self.unsent), until)
            except SQLAlchemyError:
                # Keep trying: a lease that runs out hands waiting rows to another worker.
                log.warning("could not extend the batch's leases; trying again shortly", exc_info=True)


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
    sending = _Sending(factory, mailer, limiter, policy, clock, Outages(notify))
    for item in prepared:
        sending.add(item)
    heartbeat, checker = asyncio.create_task(sending.keep_leases()), asyncio.create_task(sending.keep_checking())
    try:
        await asyncio.gather(*(sending.sender() for _ in range(max(1, concurrency))))
    finally:
        heartbeat.cancel()
        checker.cancel()
        sending.flush()
    return sending.result


@dataclass
class _Page:
    """What every chunk of one page is sent with."""

    factory: sessionmaker[Session]
    composer: DigestComposer
    policy: DeliveryPolicy
    bounce_sender: Callable[[int, Recipient], str]
    limiter: RateLimiter
    concurrency: int
    clock: Callable[[], dt.datetime]
    notify: Callable[[str], None]

    async def send_chunk(self, chunk: Sequence[int], mailer: Mailer, total: BatchResult) -> bool:
        """Claim, prepare and send one chunk of the page; False when some of it was not claimed."""
        with transaction(self.factory) as session:
            claimed = claim(
                session, self.composer.digest_id, chunk, now=self.clock(), lease_seconds=self.policy.lease_seconds
            )
        if not claimed:
            return not chunk
        with transaction(self.factory) as session:
            prepared, skipped = prepare_claimed(session, self.composer, claimed, self.bounce_sender, self.clock())
        total.skipped += skipped
        total.merge(
            await send_prepared(
                self.factory, prepared, mailer, self.limiter, self.policy, self.concurrency, self.clock, self.notify
            )
        )
        return len(claimed) == len(chunk)


def run_batch(
    factory: sessionmaker[Session],
    composer: DigestComposer,
    subscriber_ids: Sequence[int],
    *,
    mailer_factory: Callable[[], Mailer],
    policy: DeliveryPolicy,
    bounce_sender: Callable[[int, Recipient], str],
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
    page = _Page(factory, composer, policy, bounce_sender, limiter or RateLimiter(), concurrency, clock, notify)

    async def go() -> BatchResult:
        total = BatchResult()
        mailer = mailer_factory()
        all_claimed = True  # else rows of the page were passed over: some may wait for a retry
        try:
            for start in range(0, len(subscriber_ids), policy.claim_chunk):
                chunk = subscriber_ids[start : start + policy.claim_chunk]
                all_claimed = await page.send_chunk(chunk, mailer, total) and all_claimed
        finally:
            await mailer.close()
        if not all_claimed:
            with transaction(factory) as session:
                total.note_retry(next_retry(session, composer.digest_id, subscriber_ids))
        return total

    return run_sending(go())
