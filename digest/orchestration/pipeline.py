"""The daily job's steps, one orchestration shared by beat's tasks, ``digest run`` (through
the workers or in process) and the demo.

collect(day) -> papers and the day's edition; dispatch_edition(edition, handout) -> keyset pages
of its due subscribers, each planned by plan_page (ledger rows), here or by any worker, then
sent after its commit; send_batch(page) -> mail; sweep(edition) -> re-hands pages whose retries
are due or whose worker died; wait_for_edition -> until the ledger has everyone done;
summarise_edition -> the RunSummary. A ``Handout`` says how pages travel: ``InProcess`` here,
``workers.tasks.Queues`` through Celery (the domain knows no Celery).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from digest.core.db import among, transaction
from digest.core.errors import DigestError, SendingPaused, UpstreamError
from digest.core.models import Digest, DigestKind, Subscriber, utcnow
from digest.core.outages import Outages, log_notify
from digest.delivery.ledger import (
    STATISTICS_CHECK_FIRST,
    closed_edition,
    counts_by_status,
    due_subscriber_page,
    editions_with_open_rows,
    expire_stale,
    failure_reasons,
    is_closed,
    open_count,
    page_bounds,
    planned_among,
    refresh_statistics_if_blind,
    unfinished_subscribers,
    unplanned_due,
)
from digest.delivery.reputation import check_sending
from digest.orchestration.runtime import Runtime

if TYPE_CHECKING:
    from digest.delivery.batch import BatchResult
    from digest.delivery.composer import DigestComposer
    from digest.papers.source import PapersClient

# The composer, the ranking and the sending code are imported where a step uses them: `digest
# run` through the workers only watches the ledger, and its start-up should not load them
# (workers.tasks imports them before its pool forks).

log = logging.getLogger(__name__)

T = TypeVar("T")

# An edition's candidates are refreshed by each collection; workers reload them this often.
COMPOSER_MAX_AGE_SECONDS = 300.0
# How far back beat's sweep looks for open rows: past the stale limit, so that editions stuck
# while sending was paused get closed.
SWEEP_REACH = dt.timedelta(days=7)


@dataclass(frozen=True)
class CollectResult:
    day: dt.date
    stored: int
    source: str  # "api" or "sample"
    digest_id: int | None
    note: str = ""


def collect_day(
    session: Session,
    client: PapersClient,
    day: dt.date,
    runtime: Runtime,
    *,
    allow_sample: bool = False,
) -> CollectResult:
    """Fetch every page of ``day`` first, then store: a failing upstream stores nothing half way."""
    from digest.papers.source import load_sample

    note = ""
    try:
        items = client.fetch_day(day)
        source = "api"
    except UpstreamError as exc:
        sample = load_sample(day) if allow_sample else None
        if sample is None:
            raise
        note = f"papers API not reachable ({exc}); using the recorded sample for {day}"
        items, source = sample, "sample"
    return store_day(session, runtime, day, items, source, note)


def store_day(
    session: Session, runtime: Runtime, day: dt.date, items: list[Any], source: str, note: str = ""
) -> CollectResult:
    """Parse (skipping malformed items), upsert, and (re)build the day's edition."""
    from digest.delivery.composer import build_digest
    from digest.papers.source import parse_items, store_papers

    records = parse_items(items, day)
    stored = store_papers(session, records, embed=runtime.embed_papers)
    digest = build_digest(session, day, runtime.weights, DigestKind.DAILY)
    return CollectResult(day, stored, source, digest.id if digest and digest.items else None, note)


def ensure_digest(
    session: Session, runtime: Runtime, day: dt.date, kind: DigestKind = DigestKind.DAILY
) -> Digest | None:
    from digest.delivery.composer import build_digest

    digest = build_digest(session, day, runtime.weights, kind)
    return digest if digest is not None and digest.items else None


@dataclass(frozen=True)
class Page:
    """One planning page of an edition: the due subscribers with ``after_id < id <= upto_id``,
    only ``subscriber_ids`` among them when given (a dispatcher's SQL filter, beat's slots,
    cannot travel in a task's JSON; the ids it selected can). Planned rows stay pending until
    ``not_after``; at ``statistics_at`` planned rows the ledger's statistics are checked."""

    after_id: int
    upto_id: int
    now: dt.datetime
    not_after: dt.datetime
    subscriber_ids: list[int] | None = None
    statistics_at: int | None = None


def plan_page(
    session: Session, digest_id: int, page: Page, *, composer: DigestComposer, message_domain: str
) -> list[int]:
    """Plan one page of an edition (papers chosen by ``composer``); returns its subscribers'
    ids, to be sent once the caller has committed.

    Planning a page again (a redelivered task, a worker lost mid-page, two dispatchers) plans
    nobody twice: only subscribers without their row are chosen for, and the (subscriber,
    edition) key stops any race. All of the page's ids are returned, planned now or before, so
    a page whose send was lost with its worker is sent (a batch claims only what is open).
    """
    from digest.delivery.planning import plan_deliveries

    if is_closed(session, digest_id):
        # Its rows are gone (compacted): planning would find everyone unserved.
        log.info("edition %d is closed (compacted): nothing planned", digest_id)
        return []
    digest = session.get(Digest, digest_id)
    if digest is None:
        raise DigestError(f"digest {digest_id} does not exist")
    only = None if page.subscriber_ids is None else among(session, Subscriber.id, page.subscriber_ids)
    ids = due_subscriber_page(session, digest, page.after_id, None, only, upto_id=page.upto_id)
    planned = planned_among(session, digest_id, ids)
    plan_deliveries(
        session,
        digest,
        [i for i in ids if i not in planned],
        composer=composer,
        now=page.now,
        not_after=page.not_after,
        message_domain=message_domain,
    )
    if page.statistics_at is not None:
        refresh_statistics_if_blind(session, page.statistics_at)
    return ids


class Handout(abc.ABC):
    """How an edition's pages are handed out: planned and sent in this process (``InProcess``)
    or queued for whichever worker is free (``workers.tasks.Queues``).

    ``dispatch_edition``, ``sweep`` and ``wait_for_edition`` take one, so beat, ``digest run``
    (with Redis or without) and the demo share one orchestration. The waiting knobs: the ledger
    is read every ``poll_seconds``; when it has not moved for ``stall_seconds``, or ``lost()``
    says the queue went, what can be claimed is handed out again.
    """

    poll_seconds = 0.5
    # In process nobody else moves the ledger: whatever is open is waiting for this process.
    stall_seconds = 0.0

    @abc.abstractmethod
    def plan(self, digest_id: int, page: Page) -> None:
        """Plan ``page`` (ledger rows), then hand its subscribers to ``send`` after the commit."""

    @abc.abstractmethod
    def send(self, digest_id: int, subscriber_ids: list[int]) -> None:
        """Send these subscribers' digests of the edition (a batch claims only open rows)."""

    def lost(self) -> bool:
        """True when what was handed out since the last call may be gone (a broker restart)."""
        return False


class InProcess(Handout):
    """Each page planned in this process, in its own transaction, and handed to ``sender`` after
    its commit: ``digest run`` without Redis, the demo, a ``digest.plan_page`` task (whose sender
    queues the send). The default sender sends the batch at once, here. ``composers``: the
    editions' composers, kept while fresh (one cache per process)."""

    def __init__(
        self,
        runtime: Runtime,
        sender: Callable[[int, list[int]], None] | None = None,
        composers: dict[int, DigestComposer] | None = None,
    ) -> None:
        self.runtime = runtime
        self.composers: dict[int, DigestComposer] = {} if composers is None else composers
        self.sender = sender or (lambda digest_id, ids: send_batch(runtime, digest_id, ids, self.composers))
        # Per edition, the last subscriber id of the last page planned and sent: a dispatch
        # interrupted by an outage resumes after it.
        self.planned_through: dict[int, int] = {}

    def plan(self, digest_id: int, page: Page) -> None:
        self.plan_and_send(digest_id, page)

    def plan_and_send(self, digest_id: int, page: Page) -> int:
        """``plan``, returning the number of the page's subscribers handed to the sender."""
        rt = self.runtime
        composer = composer_of(rt, digest_id, self.composers)
        with transaction(rt.session_factory) as session:
            ids = plan_page(session, digest_id, page, composer=composer, message_domain=rt.message_domain)
        if ids:
            self.send(digest_id, ids)
        self.planned_through[digest_id] = page.upto_id
        return len(ids)

    def send(self, digest_id: int, subscriber_ids: list[int]) -> None:
        self.sender(digest_id, subscriber_ids)


def dispatch_edition(
    runtime: Runtime,
    digest_id: int,
    handout: Handout,
    *,
    now: dt.datetime,
    extra_filter: object | None = None,
    not_after: dt.datetime | None = None,
    after_id: int = 0,
    page_size: int | None = None,
    check_statistics_at: int = STATISTICS_CHECK_FIRST,
) -> int:
    """Plan and dispatch an edition: split its due subscribers into keyset pages of
    ``page_size`` (default ``DIGEST_BATCH_SIZE``) and hand each to ``handout.plan``; returns the
    number of pages.

    Rows are stale after ``not_after`` (default: ``now`` + the policy's ``stale_after``).
    ``extra_filter`` narrows the due subscribers (beat's slots); ``after_id`` resumes a walk
    that was interrupted after that subscriber. At ``check_statistics_at`` planned rows, then at
    each factor of four, the ledger's planner statistics are refreshed if they know of fewer
    rows (see ``refresh_statistics_if_blind``)."""
    factory = runtime.session_factory
    page_size = page_size or runtime.settings.batch_size
    not_after = not_after or now + runtime.policy.stale_after
    with transaction(factory) as session:
        if is_closed(session, digest_id):
            # Whoever asks (beat, a worker, `digest run`): its rows are gone, planning would
            # find everyone unserved and send a second copy.
            log.info("edition %d is closed (compacted): nothing planned", digest_id)
            return 0
        digest = session.get(Digest, digest_id)
        if digest is None:
            raise DigestError(f"digest {digest_id} does not exist")
        bounds = page_bounds(session, digest, after_id, page_size, extra_filter)
    planned = 0
    for upto_id in bounds:
        planned += page_size
        statistics_at = None
        if planned >= check_statistics_at:
            statistics_at, check_statistics_at = planned, check_statistics_at * 4
        page = Page(after_id, upto_id, now, not_after, statistics_at=statistics_at)
        if extra_filter is not None:
            with transaction(factory) as session:
                digest = session.get(Digest, digest_id)
                assert digest is not None  # read above; editions are never deleted
                selected = due_subscriber_page(session, digest, after_id, None, extra_filter, upto_id=upto_id)
            page = dataclasses.replace(page, subscriber_ids=selected)
        handout.plan(digest_id, page)
        after_id = upto_id
    return len(bounds)


def sweep(runtime: Runtime, digest_id: int, handout: Handout, *, now: dt.datetime) -> int:
    """Close the edition's deliveries past their stale limit, then hand to ``handout.send`` what
    is claimable now: due retries and leases of dead workers; returns how many subscribers.

    Closing here, not only when a batch claims a row, matters while sending is paused: rows
    nobody claims would otherwise stay open for good.
    """
    page_size = runtime.settings.batch_size
    with transaction(runtime.session_factory) as session:
        expire_stale(session, digest_id, now)
        ids = unfinished_subscribers(session, digest_id, now, limit=100 * page_size)
    for start in range(0, len(ids), page_size):
        handout.send(digest_id, ids[start : start + page_size])
    return len(ids)


def sweep_open(runtime: Runtime, handout: Handout, *, now: dt.datetime) -> int:
    """``sweep`` every edition with open deliveries (beat's sweep); returns how many subscribers."""
    with transaction(runtime.session_factory) as session:
        digest_ids = editions_with_open_rows(session, now - SWEEP_REACH)
    return sum(sweep(runtime, digest_id, handout, now=now) for digest_id in digest_ids)


def composer_for(runtime: Runtime, session: Session, digest_id: int) -> DigestComposer:
    from digest.delivery.composer import DigestComposer

    s = runtime.settings
    composer = DigestComposer.load(
        session,
        digest_id,
        renderer=runtime.renderer,
        links=runtime.links,
        mail_from=s.mail_from,
        postal_address=s.postal_address,
        policy=runtime.policy,
        embedding_model=runtime.embedding_model,
        embedder=lambda: runtime.embedder,
    )
    composer.dkim = runtime.dkim_signer
    return composer


def composer_of(runtime: Runtime, digest_id: int, cache: dict[int, DigestComposer] | None = None) -> DigestComposer:
    """The edition's composer, from ``cache`` (one per worker process) while it is fresh."""
    composer = (cache or {}).get(digest_id)
    if composer is None or time.monotonic() - composer.loaded_at > COMPOSER_MAX_AGE_SECONDS:
        with transaction(runtime.session_factory) as session:
            composer = composer_for(runtime, session, digest_id)
        if cache is not None:
            cache[digest_id] = composer
    return composer


def check_not_paused(runtime: Runtime, now: dt.datetime) -> None:
    """Stop sending while a pause is latched, or latch one when complaints trip the rules
    (mailbox providers punish a sender people report); committed before it raises."""
    with transaction(runtime.session_factory) as session:
        pause = check_sending(session, now, runtime.pause_rules)
        message = (
            None if pause is None else f"sending paused since {pause.paused_at:%Y-%m-%d %H:%M} UTC: {pause.reason}"
        )
    if message is not None:
        raise SendingPaused(f"{message}; deliveries stay pending until `digest sending resume`")


def send_batch(
    runtime: Runtime,
    digest_id: int,
    subscriber_ids: Sequence[int],
    composers: dict[int, DigestComposer] | None = None,
    notify: Callable[[str], None] = log_notify,
) -> BatchResult:
    """One page of one edition: claim, render, send, record (see ``digest.delivery.batch.run_batch``)."""
    from digest.delivery.batch import run_batch

    factory = runtime.session_factory
    check_not_paused(runtime, utcnow())
    return run_batch(
        factory,
        composer_of(runtime, digest_id, composers),
        subscriber_ids,
        mailer_factory=runtime.mailer_factory(),
        policy=runtime.policy,
        bounce_sender=runtime.bounce_sender(),
        limiter=runtime.rate_limiter(),
        concurrency=runtime.settings.smtp_pool_size,
        notify=notify,
    )


@dataclass
class RunSummary:
    day: dt.date
    digest_id: int | None
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    closed: bool = False  # the edition was compacted: nothing was collected, planned or sent

    def lines(self) -> list[str]:
        if self.closed:
            return [f"Digest {self.day} is closed: its deliveries were compacted; nothing sent."]
        out = list(self.notes)
        if self.digest_id is None:
            out.append(f"No papers for {self.day}: no digest sent.")
            return out
        c = self.counts
        out.append(
            f"Digest {self.day}: sent {c.get('sent', 0)}, failed {c.get('failed', 0)}, "
            f"skipped {c.get('skipped', 0)}, pending {c.get('pending', 0) + c.get('sending', 0)}"
        )
        out.extend(f"  failed: {f}" for f in self.failures)
        return out


def closed_run(runtime: Runtime, day: dt.date) -> RunSummary | None:
    """The summary of a run for a closed day (see ``digest.delivery.ledger.is_closed``), else None.

    Checked before collecting: a closed edition's candidates are not rebuilt either.
    """
    with transaction(runtime.session_factory) as session:
        digest_id = closed_edition(session, day)
    return None if digest_id is None else RunSummary(day, digest_id, closed=True)


def collect_if_needed(runtime: Runtime, day: dt.date, *, allow_sample: bool) -> tuple[int | None, list[str]]:
    from digest.papers.source import papers_of_day

    factory = runtime.session_factory
    with transaction(factory) as session:
        if papers_of_day(session, day):
            digest = ensure_digest(session, runtime, day)
            return (digest.id if digest else None), []
    with runtime.papers_client() as client, transaction(factory) as session:
        result = collect_day(session, client, day, runtime, allow_sample=allow_sample)
    notes = [result.note] if result.note else []
    notes.append(
        f"Collected {result.stored} papers for {day} from the "
        + ("recorded sample." if result.source == "sample" else "papers API.")
    )
    return result.digest_id, notes


def wait_for_edition(
    runtime: Runtime,
    digest_id: int,
    handout: Handout,
    outages: Outages,
    *,
    progress: Callable[[int, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once everyone due for the edition has a row and no row is open (each is sent,
    failed or skipped); ``progress(done, total)`` after each look at the ledger.

    Whenever the ledger stands still for ``handout.stall_seconds`` (in process: at once; with
    workers: a lease and a bit, a worker died) or ``handout.lost()`` (Redis lost its queue), what
    can be claimed is handed out again and, while someone due is still without a row, the pages;
    the ledger turns that into exactly the missing messages. PostgreSQL going away is waited
    out: every step here is idempotent.
    """
    wait = runtime.settings.task_wait_seconds
    factory = runtime.session_factory

    def in_db(step: Callable[[Session], T]) -> T:
        return outages.transaction(factory, step, limit=wait)

    def still_planning(session: Session) -> bool:
        digest = session.get(Digest, digest_id)
        return digest is not None and unplanned_due(session, digest)

    def hand_out_again(planning: bool) -> int:
        now = utcnow()
        check_not_paused(runtime, now)
        handed = sweep(runtime, digest_id, handout, now=now)
        if planning:  # pages planned before plan nobody again
            handed += dispatch_edition(runtime, digest_id, handout, now=now)
        return handed

    planning, total = True, 0
    last_open, last_change = -1, time.monotonic()
    while True:
        # One cheap count per poll (two while the edition is still being planned); the poll
        # slows down while much is left, so watching a million-row ledger costs the database little.
        if planning:
            planning = in_db(still_planning)
            total = in_db(lambda session: sum(counts_by_status(session, digest_id).values()))
        remaining = in_db(lambda session: open_count(session, digest_id))
        if progress is not None:
            progress(total - remaining, total)
        if remaining == 0 and not planning:
            return
        lost = handout.lost()
        if remaining != last_open:
            last_open, last_change = remaining, time.monotonic()
        handed = 0
        if lost or time.monotonic() - last_change >= handout.stall_seconds:
            handed = outages.database(lambda: hand_out_again(planning), limit=wait)  # noqa: B023 - called at once
            last_change = time.monotonic()
        if not handed:  # waiting for a retry's backoff, a lease to run out, or the workers
            sleep(poll_interval(handout.poll_seconds, remaining, runtime.settings.batch_size))


def poll_interval(poll: float, remaining: int, batch_size: int) -> float:
    """How long the watch waits before its next look: longer while much is left (watching a big
    ledger costs the database little), shorter once the last page is out, so that the run ends
    soon after its last message rather than up to a whole poll later."""
    if remaining >= 4 * batch_size:
        return 4 * poll
    return poll if remaining > batch_size else poll * 0.4


def summarise_edition(
    runtime: Runtime, day: dt.date, digest_id: int, outages: Outages, notes: Sequence[str] = ()
) -> RunSummary:
    """What the ledger says of the edition now: its counts and its failures' reasons."""

    def read(session: Session) -> RunSummary:
        counts, failures = counts_by_status(session, digest_id), failure_reasons(session, digest_id)
        return RunSummary(day, digest_id, counts, list(notes), failures)

    return outages.transaction(runtime.session_factory, read, limit=runtime.settings.task_wait_seconds)


def run_inprocess(
    runtime: Runtime,
    day: dt.date,
    *,
    allow_sample: bool = False,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    notify: Callable[[str], None] = log_notify,
) -> RunSummary:
    """``digest run`` without Redis: every step in this process, retries waited for here;
    ``progress(handled)`` after each batch.

    A PostgreSQL restart is waited out (one line when it goes, one when it is back) and the
    step it interrupted is done again: collecting and planning are idempotent (upserts, ``ON
    CONFLICT DO NOTHING``), planning resumes after the last page it handed on, and a batch
    only claims rows nobody holds, so a repeated step never sends anything twice.
    """
    outages = Outages(notify)
    wait = runtime.settings.task_wait_seconds
    closed = outages.database(lambda: closed_run(runtime, day), limit=wait)
    if closed is not None:
        return closed
    digest_id, notes = outages.database(lambda: collect_if_needed(runtime, day, allow_sample=allow_sample), limit=wait)
    if digest_id is None:
        return RunSummary(day, None, notes=notes)
    from digest.delivery.batch import BatchResult

    total = BatchResult()

    def deliver(digest_id: int, ids: list[int]) -> None:
        total.merge(
            outages.database(lambda: send_batch(runtime, digest_id, ids, handout.composers, notify), limit=wait)
        )
        if progress:
            progress(total.sent + total.failed + total.skipped)

    handout = InProcess(runtime, deliver)
    now = utcnow()
    outages.database(
        lambda: dispatch_edition(
            runtime, digest_id, handout, now=now, after_id=handout.planned_through.get(digest_id, 0)
        ),
        limit=wait,
    )
    wait_for_edition(runtime, digest_id, handout, outages, sleep=sleep)
    return summarise_edition(runtime, day, digest_id, outages, notes)
