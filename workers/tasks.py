"""Thin Celery tasks: JSON arguments (ids, ISO dates), one domain call each, explicit names.

Each task opens its own units of work through the domain code; retries cover only what can
succeed later (database or broker hiccups, the papers API being down).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.signals import worker_init, worker_process_init
from sqlalchemy.exc import OperationalError

from digest.core.db import transaction
from digest.core.errors import UpstreamError
from digest.core.logging_setup import log_context
from digest.core.models import utcnow
from digest.core.settings import get_settings
from digest.orchestration import pipeline
from digest.orchestration.runtime import Runtime
from workers.celery_app import app

if TYPE_CHECKING:
    from digest.delivery.composer import DigestComposer

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_composers: dict[int, DigestComposer] = {}
# Keep countdowns well below the broker's visibility timeout (house style).
MAX_COUNTDOWN = 300.0


def runtime() -> Runtime:
    """One Runtime per worker process, created after the fork so no connection is shared."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
    return _runtime


@worker_init.connect
def _import_before_fork(**_: Any) -> None:
    """In the worker's main process, before its pool forks: import the model's runtime, the
    ranking, rendering and sending code once, so that each pool process starts with them (pages
    shared with the parent, not a copy each) instead of importing them, ~1 s, in its first task."""
    import digest.delivery.batch
    import digest.delivery.planning
    import digest.papers.embedding
    import digest.papers.source  # noqa: F401


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """In each pool process, after the fork (a model session and its threads do not survive
    one): load the model and compile the templates before the first task arrives. A model
    that cannot load must not stop the process starting: the tasks that need it say why."""
    try:
        runtime().warm()
    except Exception:
        log.warning("could not load the embedding model or the templates ahead of the first task", exc_info=True)


def enqueue_batch(digest_id: int, subscriber_ids: list[int], countdown: float | None = None) -> None:
    send_batch.apply_async((digest_id, subscriber_ids), countdown=countdown or 0)


@app.task(
    name="digest.collect",
    bind=True,
    autoretry_for=(UpstreamError, OperationalError),
    retry_backoff=60,
    max_retries=5,
)
def collect(self: Task[Any, Any], day: str, allow_sample: bool = False) -> dict[str, Any]:
    """Fetch and store one day's papers and build that day's edition."""
    rt = runtime()
    with rt.papers_client() as client, transaction(rt.session_factory) as session:
        result = pipeline.collect_day(session, client, dt.date.fromisoformat(day), rt, allow_sample=allow_sample)
    return {
        "day": day,
        "stored": result.stored,
        "digest_id": result.digest_id,
        "source": result.source,
        "note": result.note,
    }


@app.task(name="digest.collect_latest")
def collect_latest() -> None:
    """Beat: collect today's and yesterday's papers (UTC) as they accumulate."""
    today = utcnow().date()
    for day in (today - dt.timedelta(days=1), today):
        collect.delay(day.isoformat())


def enqueue_plan(digest_id: int, page: pipeline.Page) -> None:
    """Queue one page of an edition for whichever worker is free (called by a dispatcher)."""
    plan_page.delay(
        digest_id,
        page.after_id,
        page.upto_id,
        page.now.isoformat(),
        page.not_after.isoformat(),
        page.subscriber_ids,
        page.statistics_at,
    )


class Queues(pipeline.Handout):
    """Pages handed to the workers: ``digest.plan_page`` for any planner, ``digest.send_batch``
    for any sender. A worker can die or Redis lose its queue, so a watcher hands out again only
    when the ledger has not moved for longer than a lease (a live sender renews its leases)."""

    poll_seconds = 0.25

    def __init__(self, runtime: Runtime) -> None:
        self.stall_seconds = max(5.0, runtime.policy.lease_seconds + 2.0)

    def plan(self, digest_id: int, page: pipeline.Page) -> None:
        enqueue_plan(digest_id, page)

    def send(self, digest_id: int, subscriber_ids: list[int]) -> None:
        enqueue_batch(digest_id, subscriber_ids)


@app.task(name="digest.dispatch", autoretry_for=(OperationalError,), retry_backoff=5, max_retries=5)
def dispatch(digest_id: int) -> int:
    """Split one edition's due subscribers into keyset pages, one ``digest.plan_page`` task
    each, so that every worker process plans; returns the number of pages.

    Finding the pages reads ids only (seconds for a million); the planning itself, which took
    one task minutes per million, is shared by the workers, and sending starts with the first
    planned page.
    """
    rt = runtime()
    return pipeline.dispatch_edition(rt, digest_id, Queues(rt), now=utcnow())


@app.task(
    name="digest.plan_page",
    # A worker killed mid-page: its page is delivered again, and the ledger plans only who is
    # still missing a row.
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    max_retries=10,
)
def plan_page(
    digest_id: int,
    after_id: int,
    upto_id: int,
    now: str,
    not_after: str,
    subscriber_ids: list[int] | None = None,
    statistics_at: int | None = None,
) -> int:
    """Plan one page of an edition, then queue its send: ledger rows first, mail after commit.

    The composer (the edition's candidates, its ranking and the model's vectors) comes from
    this process's cache, so a worker planning many pages of one edition loads it once.
    """
    rt = runtime()
    at, until = dt.datetime.fromisoformat(now), dt.datetime.fromisoformat(not_after)
    page = pipeline.Page(after_id, upto_id, at, until, subscriber_ids, statistics_at)
    with log_context(digest_id=digest_id):
        return pipeline.InProcess(rt, enqueue_batch, _composers).plan_and_send(digest_id, page)


@app.task(name="digest.dispatch_due")
def dispatch_due() -> int:
    """Beat, every five minutes: hand out the pages of the editions of subscribers whose local
    delivery hour has just begun, for the workers to plan."""
    from digest.orchestration.schedule import dispatch_due as plan_due

    rt = runtime()
    return plan_due(rt, utcnow(), Queues(rt))


@app.task(
    name="digest.send_batch",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    max_retries=10,
)
def send_batch(digest_id: int, subscriber_ids: list[int]) -> dict[str, int]:
    """Send one page of an edition; temporary failures come back as a delayed batch."""
    with log_context(digest_id=digest_id):  # every line this batch logs names its edition
        result = pipeline.send_batch(runtime(), digest_id, subscriber_ids, _composers)
    if result.retry_at is not None:
        countdown = min(MAX_COUNTDOWN, max(0.0, (result.retry_at - utcnow()).total_seconds()))
        enqueue_batch(digest_id, subscriber_ids, countdown=countdown)
    return {"sent": result.sent, "failed": result.failed, "skipped": result.skipped}


@app.task(name="digest.sweep")
def sweep() -> int:
    """Beat: re-enqueue deliveries whose worker died (lease expired) or whose retry is due."""
    rt = runtime()
    return pipeline.sweep_open(rt, Queues(rt), now=utcnow())


@app.task(name="digest.poll_imap")
def poll_imap() -> dict[str, int] | None:
    """Beat: read the inbound IMAP mailbox when one is configured."""
    rt = runtime()
    if not rt.settings.imap_host:
        return None
    from digest.mailin.imap import poll_imap as poll

    return dataclasses.asdict(poll(rt))


@app.task(name="digest.compact_ledger", autoretry_for=(OperationalError,), retry_backoff=60, max_retries=3)
def compact_ledger() -> dict[str, int]:
    """Beat, daily: reduce old editions' delivery rows to counts (``digest.delivery.compaction``)."""
    from digest.delivery.compaction import compact

    rt = runtime()
    # Bounded well under the visibility timeout; tomorrow's run goes on where this one stopped.
    result = compact(
        rt.session_factory,
        today=utcnow().date(),
        retention_days=rt.settings.ledger_retention_days,
        max_seconds=rt.settings.task_visibility_timeout / 2,
        vacuum=True,
    )
    log.info("%s", result.line())
    return {"rows": result.rows, "editions": result.editions, "batches": result.batches}
