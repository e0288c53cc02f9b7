"""The daily job's steps, shared by the Celery tasks and the in-process runner.

collect(day) -> papers and the day's edition; dispatch(edition) -> keyset pages of its due
subscribers, each planned by plan_page (ledger rows) here or by any worker, then handed to
``enqueue`` after its commit; send_batch(page) -> mail;
sweep(edition) -> re-hands pages whose retries are due or whose worker died.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import transaction
from digest.core.errors import DigestError, SendingPaused, UpstreamError
from digest.core.models import Digest, DigestKind, Subscriber, utcnow
from digest.core.outages import Outages, log_notify
from digest.delivery.batch import BatchResult, run_batch
from digest.delivery.composer import DigestComposer, build_digest
from digest.delivery.ledger import (
    STATISTICS_CHECK_FIRST,
    closed_edition,
    counts_by_status,
    due_subscriber_page,
    expire_stale,
    failure_reasons,
    is_closed,
    open_count,
    page_bounds,
    planned_among,
    refresh_statistics_if_blind,
    unfinished_subscribers,
)
from digest.delivery.planning import plan_deliveries
from digest.delivery.reputation import check_sending
from digest.orchestration.runtime import Runtime
from digest.papers.source import PapersClient, load_sample, papers_of_day, parse_items, store_papers

log = logging.getLogger(__name__)

T = TypeVar("T")

# An edition's candidates are refreshed by each collection; workers reload them this often.
COMPOSER_MAX_AGE_SECONDS = 300.0


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
    records = parse_items(items, day)
    stored = store_papers(session, records, embed=runtime.embed_papers)
    digest = build_digest(session, day, runtime.weights, DigestKind.DAILY)
    return CollectResult(day, stored, source, digest.id if digest and digest.items else None, note)


def ensure_digest(
    session: Session, runtime: Runtime, day: dt.date, kind: DigestKind = DigestKind.DAILY
) -> Digest | None:
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
    if is_closed(session, digest_id):
        # Its rows are gone (compacted): planning would find everyone unserved.
        log.info("edition %d is closed (compacted): nothing planned", digest_id)
        return []
    digest = session.get(Digest, digest_id)
    if digest is None:
        raise DigestError(f"digest {digest_id} does not exist")
    only = None if page.subscriber_ids is None else Subscriber.id.in_(page.subscriber_ids)
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


def dispatch(
    factory: sessionmaker[Session],
    digest_id: int,
    *,
    now: dt.datetime,
    page_size: int,
    stale_after: dt.timedelta,
    message_domain: str,
    composer: DigestComposer | None,
    enqueue: Callable[[list[int]], None],
    extra_filter: object | None = None,
    not_after: dt.datetime | None = None,
    after_id: int = 0,
    check_statistics_at: int = STATISTICS_CHECK_FIRST,
    hand_out: Callable[[Page], None] | None = None,
) -> int:
    """Split the edition's due subscribers into keyset pages of ``page_size`` and plan them;
    returns the number of pages.

    With ``hand_out`` (the workers) each page goes to it, for any planner to take; without it
    (``digest run`` in process) each page is planned here with ``composer`` and handed to
    ``enqueue`` after its commit. Rows are stale after ``not_after`` (default: ``now`` +
    ``stale_after``). ``after_id`` resumes a walk that was interrupted after that subscriber.
    At ``check_statistics_at`` planned rows, then at each factor of four, the ledger's planner
    statistics are refreshed if they know of fewer rows (see ``refresh_statistics_if_blind``)."""
    not_after = not_after or now + stale_after
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
        if hand_out is not None:
            hand_out(page)
        else:
            if composer is None:
                raise DigestError("planning in process needs the edition's composer")
            with transaction(factory) as session:
                ids = plan_page(session, digest_id, page, composer=composer, message_domain=message_domain)
            if ids:
                enqueue(ids)
        after_id = upto_id
    return len(bounds)


def sweep(
    factory: sessionmaker[Session],
    digest_id: int,
    *,
    now: dt.datetime,
    page_size: int,
    enqueue: Callable[[list[int]], None],
) -> int:
    """Close deliveries past their stale limit, then re-enqueue what is claimable now: due
    retries and leases of dead workers.

    Closing here, not only when a batch claims a row, matters while sending is paused: rows
    nobody claims would otherwise stay open for good.
    """
    with transaction(factory) as session:
        expire_stale(session, digest_id, now)
        ids = unfinished_subscribers(session, digest_id, now, limit=100 * page_size)
    for start in range(0, len(ids), page_size):
        enqueue(ids[start : start + page_size])
    return len(ids)


def composer_for(runtime: Runtime, session: Session, digest_id: int) -> DigestComposer:
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


def run_inprocess(
    runtime: Runtime,
    day: dt.date,
    *,
    allow_sample: bool = False,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    notify: Callable[[str], None] = log_notify,
) -> RunSummary:
    """``digest run`` without Redis: every step in this process, retries waited for here.

    A PostgreSQL restart is waited out (one line when it goes, one when it is back) and the
    step it interrupted is done again: collecting and planning are idempotent (upserts, ``ON
    CONFLICT DO NOTHING``), planning resumes after the last page it handed on, and a batch
    only claims rows nobody holds, so a repeated step never sends anything twice.
    """
    outages = Outages(notify)
    wait = runtime.settings.task_wait_seconds
    factory = runtime.session_factory

    def in_db(step: Callable[[Session], T]) -> T:
        return outages.transaction(factory, step, limit=wait)

    closed = outages.database(lambda: closed_run(runtime, day), limit=wait)
    if closed is not None:
        return closed
    digest_id, notes = outages.database(lambda: collect_if_needed(runtime, day, allow_sample=allow_sample), limit=wait)
    summary = RunSummary(day, digest_id, notes=notes)
    if digest_id is None:
        return summary
    composers: dict[int, DigestComposer] = {}
    total = BatchResult()
    planned_through = [0]  # the last subscriber id of the last page handed on

    def send(ids: list[int]) -> None:
        total.merge(outages.database(lambda: send_batch(runtime, digest_id, ids, composers, notify), limit=wait))
        if progress:
            progress(total.sent + total.failed + total.skipped)

    def enqueue(ids: list[int]) -> None:
        send(ids)
        planned_through[0] = ids[-1]

    s = runtime.settings
    now = utcnow()

    def plan() -> int:
        return dispatch(
            factory,
            digest_id,
            now=now,
            page_size=s.batch_size,
            stale_after=runtime.policy.stale_after,
            message_domain=runtime.message_domain,
            composer=composer_of(runtime, digest_id, composers),
            enqueue=enqueue,
            after_id=planned_through[0],
        )

    outages.database(plan, limit=wait)
    while True:
        remaining = in_db(lambda session: open_count(session, digest_id))
        if remaining == 0:
            break
        swept = outages.database(
            lambda: sweep(factory, digest_id, now=utcnow(), page_size=s.batch_size, enqueue=send), limit=wait
        )
        if not swept:
            sleep(0.5)  # waiting for a retry's backoff or a lease to run out

    def final(session: Session) -> None:
        summary.counts = counts_by_status(session, digest_id)
        summary.failures = failure_reasons(session, digest_id)

    in_db(final)
    return summary
