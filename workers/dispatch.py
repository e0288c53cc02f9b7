"""``digest run`` through the Celery workers: collect, dispatch (the workers plan its pages), then
watch the ledger.

It lives with the workers, not in ``digest``: it sends their tasks, and the domain knows no
Celery (the import-linter contract in pyproject.toml holds it to that).

The command returns when every delivery of the edition is sent, failed or skipped. If the
ledger stops moving (a worker died, Redis lost its queue), it re-enqueues what can be claimed,
which the ledger turns into exactly the missing messages.

Redis or PostgreSQL restarting under a run is waited out: every step here is idempotent
(collecting upserts, dispatching inserts only missing rows, a batch claims only what nobody
holds), so a step whose task was lost with Redis's queue is simply sent again once Redis is back.
A restart is recognised by the server's ``run_id`` changing, not guessed from a timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from digest.core.errors import DigestError
from digest.core.models import Digest, utcnow
from digest.core.outages import Outages
from digest.delivery.ledger import counts_by_status, failure_reasons, open_count, unplanned_due
from digest.orchestration import pipeline
from digest.orchestration.pipeline import RunSummary
from digest.orchestration.runtime import Runtime
from workers import tasks

log = logging.getLogger(__name__)

# How often the watch loop asks Redis whether it restarted (its queue then is gone).
EPOCH_CHECK_SECONDS = 1.0


def require_redis(url: str) -> None:
    """Fail in one clear line, rather than after Celery's own reconnect loop, when Redis is away."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise DigestError(f"Redis at DIGEST_REDIS_URL is not reachable: {exc}") from exc
    finally:
        client.close()


def redis_epoch(url: str) -> str:
    """The Redis server's ``run_id``: it changes when the server restarts (and loses its queue)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return str(client.info("server")["run_id"])
    finally:
        client.close()


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_of(result: Any) -> object | None:
    """What a running task last reported: which worker took it (``STARTED``), then how far it
    got (``PROGRESS``); None while no worker has it."""
    state = result.state
    return (state, result.info) if state in ("STARTED", "PROGRESS") else None


def release(result: Any) -> None:
    """Stop listening for a result we no longer wait for, now rather than in its ``__del__``:
    that runs at interpreter exit, when redis-py can no longer import, and prints a traceback
    under the one-line error."""
    try:
        result.backend.remove_pending_result(result)
    except Exception:  # best effort: the run is failing with its own message
        log.debug("could not release a pending result", exc_info=True)
    result.backend = None


def await_task(outages: Outages, url: str, what: str, send: Callable[[], Any], wait_seconds: float) -> Any:
    """Send a task and wait for its result, sending it again if Redis restarted meanwhile.

    Gives up after ``wait_seconds`` without an answer, counted from the task's last progress
    report: a worker planning a million subscribers for several minutes is not missing.
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    epoch = outages.redis(lambda: redis_epoch(url), limit=wait_seconds)
    result = outages.redis(send, limit=wait_seconds)
    deadline = time.monotonic() + wait_seconds
    progress: object | None = None
    while True:
        try:
            return outages.redis(lambda: result.get(timeout=1.0), limit=wait_seconds)  # noqa: B023 - called at once
        except CeleryTimeout:
            pass
        now = outages.redis(lambda: redis_epoch(url), limit=wait_seconds)
        if now != epoch:
            outages.notify(f"Redis restarted and lost its queue: sending {what} again")
            epoch, deadline, progress = now, time.monotonic() + wait_seconds, None
            result = outages.redis(send, limit=wait_seconds)
            continue
        reported = outages.redis(lambda: progress_of(result), limit=wait_seconds)  # noqa: B023 - called at once
        if reported is not None and reported != progress:
            progress, deadline = reported, time.monotonic() + wait_seconds
        elif time.monotonic() > deadline:
            release(result)
            if progress is not None:
                raise DigestError(f"{what} stopped making progress for {wait_seconds:.0f} s (last: {progress})")
            raise DigestError("no Celery worker answered; is `celery -A workers worker` running?")


def run_via_workers(
    runtime: Runtime,
    day: dt.date,
    *,
    allow_sample: bool = False,
    poll: float = 0.25,
    notify: Callable[[str], None] = stderr_line,
) -> RunSummary:
    url = str(runtime.settings.redis_url)
    wait = runtime.settings.task_wait_seconds
    require_redis(url)
    # The result backend logs each of its own reconnect attempts as an error; the run says in
    # one line of its own what it waits for.
    logging.getLogger("celery.backends.redis").setLevel(logging.CRITICAL)
    say: list[Callable[[str], None]] = [notify]  # the progress bar's console while it shows
    outages = Outages(lambda message: say[0](message))
    closed = outages.database(lambda: pipeline.closed_run(runtime, day), limit=wait)
    if closed is not None:
        return closed
    collected = await_task(
        outages, url, "the collect step", lambda: tasks.collect.delay(day.isoformat(), allow_sample), wait
    )
    summary = RunSummary(day, collected["digest_id"])
    if collected.get("note"):
        summary.notes.append(collected["note"])
    summary.notes.append(f"Collected {collected['stored']} papers for {day} ({collected['source']}).")
    if summary.digest_id is None:
        return summary
    digest_id = summary.digest_id
    await_task(outages, url, "the dispatch step", lambda: tasks.dispatch.delay(digest_id), wait)
    factory = runtime.session_factory

    def in_db(step: Callable[[Any], Any]) -> Any:
        return outages.transaction(factory, step, limit=wait)

    def still_planning(session: Any) -> bool:
        digest = session.get(Digest, digest_id)
        return digest is not None and unplanned_due(session, digest)

    def sweep() -> None:
        def once() -> None:
            pipeline.check_not_paused(runtime, utcnow())
            pipeline.sweep(
                factory,
                digest_id,
                now=utcnow(),
                page_size=runtime.settings.batch_size,
                enqueue=lambda ids: tasks.enqueue_batch(digest_id, ids),
            )

        # Inner: Redis away while enqueueing; outer: the database away while reading the ledger.
        outages.database(lambda: outages.redis(once, limit=wait), limit=wait)

    stall_after = max(5.0, runtime.policy.lease_seconds + 2.0)
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as progress:
        say[0] = lambda message: progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        bar = progress.add_task("sending", total=None)
        last_open, last_change = -1, time.monotonic()
        epoch, epoch_checked = outages.redis(lambda: redis_epoch(url), limit=wait), time.monotonic()
        planning = True  # the workers plan the edition's pages; the ledger says when all are
        while True:
            # One cheap count per poll (two while the workers still plan); the poll slows down
            # while much is left, so watching a million-row ledger costs the database little.
            if planning:
                planning = in_db(still_planning)
                total = in_db(lambda session: sum(counts_by_status(session, digest_id).values()))
            remaining = in_db(lambda session: open_count(session, digest_id))
            progress.update(bar, total=total, completed=total - remaining)
            if remaining == 0 and not planning:
                break
            restarted = False
            if time.monotonic() - epoch_checked > EPOCH_CHECK_SECONDS:
                now_epoch = outages.redis(lambda: redis_epoch(url), limit=wait)
                restarted, epoch, epoch_checked = now_epoch != epoch, now_epoch, time.monotonic()
            if restarted:
                outages.notify("Redis restarted and lost its queue: handing out the open deliveries again")
            if remaining != last_open and not restarted:
                last_open, last_change = remaining, time.monotonic()
            elif restarted or time.monotonic() - last_change > stall_after:
                # Stalled, or Redis came back without its queue: hand out again what is claimable
                # and, while someone due is still without a row, the pages (planned ones plan
                # nobody again).
                sweep()
                if planning:
                    outages.redis(lambda: tasks.dispatch.delay(digest_id), limit=wait)
                last_change = time.monotonic()
            time.sleep(poll if remaining < 4 * runtime.settings.batch_size else 4 * poll)
        say[0] = notify

    def final(session: Any) -> None:
        summary.counts = counts_by_status(session, digest_id)
        summary.failures = failure_reasons(session, digest_id)

    in_db(final)
    return summary
