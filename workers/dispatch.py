"""``digest run`` through the Celery workers: collect, dispatch (the workers plan its pages), then
watch the ledger (``digest.orchestration.pipeline.wait_for_edition``, handing out through
``WatchedQueues``).

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
from digest.core.outages import Outages
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


class WatchedQueues(tasks.Queues):
    """The workers' queues as ``digest run`` hands pages out while it watches: each hand-out
    waits Redis out, and ``lost()`` says when Redis restarted (its queue gone with it)."""

    def __init__(self, runtime: Runtime, outages: Outages) -> None:
        super().__init__(runtime)
        self.outages = outages
        self.url = str(runtime.settings.redis_url)
        self.wait = runtime.settings.task_wait_seconds
        self.epoch = self._epoch()
        self.epoch_checked = time.monotonic()

    def _epoch(self) -> str:
        return self.outages.redis(lambda: redis_epoch(self.url), limit=self.wait)

    def plan(self, digest_id: int, page: pipeline.Page) -> None:
        self.outages.redis(lambda: super(WatchedQueues, self).plan(digest_id, page), limit=self.wait)

    def send(self, digest_id: int, subscriber_ids: list[int]) -> None:
        self.outages.redis(lambda: super(WatchedQueues, self).send(digest_id, subscriber_ids), limit=self.wait)

    def lost(self) -> bool:
        if time.monotonic() - self.epoch_checked <= EPOCH_CHECK_SECONDS:
            return False
        epoch, self.epoch_checked = self._epoch(), time.monotonic()
        restarted, self.epoch = epoch != self.epoch, epoch
        if restarted:
            self.outages.notify("Redis restarted and lost its queue: handing out the open deliveries again")
        return restarted


def run_via_workers(
    runtime: Runtime,
    day: dt.date,
    *,
    allow_sample: bool = False,
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
    notes = [collected["note"]] if collected.get("note") else []
    notes.append(f"Collected {collected['stored']} papers for {day} ({collected['source']}).")
    digest_id: int | None = collected["digest_id"]
    if digest_id is None:
        return RunSummary(day, None, notes=notes)
    await_task(outages, url, "the dispatch step", lambda: tasks.dispatch.delay(digest_id), wait)
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
        pipeline.wait_for_edition(
            runtime,
            digest_id,
            WatchedQueues(runtime, outages),
            outages,
            progress=lambda done, total: progress.update(bar, total=total, completed=done),
        )
        say[0] = notify
    return pipeline.summarise_edition(runtime, day, digest_id, outages, notes)
