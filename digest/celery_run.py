"""``digest run`` through the Celery workers: collect, dispatch, then watch the ledger.

The command returns when every delivery of the edition is sent, failed or skipped. If the
ledger stops moving (a worker died, Redis lost its queue), it re-enqueues what can be claimed,
which the ledger turns into exactly the missing messages.
"""

from __future__ import annotations

import datetime as dt
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from digest import pipeline
from digest.db import transaction
from digest.delivery import counts_by_status, failure_reasons, open_count
from digest.errors import DigestError
from digest.models import utcnow
from digest.pipeline import RunSummary
from digest.runtime import Runtime


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


def run_via_workers(runtime: Runtime, day: dt.date, *, allow_sample: bool = False, poll: float = 0.25) -> RunSummary:
    from celery.exceptions import TimeoutError as CeleryTimeout

    from workers import tasks

    require_redis(str(runtime.settings.redis_url))
    try:
        collected = tasks.collect.delay(day.isoformat(), allow_sample).get(timeout=runtime.settings.task_wait_seconds)
        summary = RunSummary(day, collected["digest_id"])
        if collected.get("note"):
            summary.notes.append(collected["note"])
        summary.notes.append(f"Collected {collected['stored']} papers for {day} ({collected['source']}).")
        if summary.digest_id is None:
            return summary
        tasks.dispatch.delay(summary.digest_id).get(timeout=runtime.settings.task_wait_seconds)
    except CeleryTimeout as exc:
        raise DigestError("no Celery worker answered; is `celery -A workers worker` running?") from exc
    digest_id = summary.digest_id
    factory = runtime.session_factory
    stall_after = max(5.0, runtime.policy.lease_seconds + 2.0)
    with Progress(
        TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        bar = progress.add_task("sending", total=None)
        last_open, last_change = -1, time.monotonic()
        with transaction(factory) as session:
            total = sum(counts_by_status(session, digest_id).values())
        while True:
            # One cheap count per poll; the poll slows down while much is left, so watching a
            # million-row ledger costs the database little.
            with transaction(factory) as session:
                remaining = open_count(session, digest_id)
            progress.update(bar, total=total, completed=total - remaining)
            if remaining == 0:
                break
            if remaining != last_open:
                last_open, last_change = remaining, time.monotonic()
            elif time.monotonic() - last_change > stall_after:
                pipeline.check_not_paused(runtime, utcnow())
                pipeline.sweep(
                    factory,
                    digest_id,
                    now=utcnow(),
                    page_size=runtime.settings.batch_size,
                    enqueue=lambda ids: tasks.enqueue_batch(digest_id, ids),
                )
                last_change = time.monotonic()
            time.sleep(poll if remaining < 4 * runtime.settings.batch_size else 4 * poll)
    with transaction(factory) as session:
        summary.counts = counts_by_status(session, digest_id)
        summary.failures = failure_reasons(session, digest_id)
    return summary
