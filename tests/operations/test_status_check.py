"""`digest status --check`, as cron or a monitoring probe runs it: exit status and one line."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from digest.core.db import transaction
from digest.core.models import utcnow
from digest.core.settings import Settings
from digest.delivery import reputation
from digest.operations import heartbeat
from digest.orchestration.pipeline import InProcess, collect_if_needed, dispatch_edition, run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed
from tests.support.processes import Process, procfile_command, run_cli, settings_env, start_worker
from tests.support.servers import PapersAPI, load_recorded, wait_until

PEOPLE = ("ada@example.com", "grace@example.org")


def check(settings: Settings) -> subprocess.CompletedProcess[str]:
    return run_cli(["status", "--check"], settings_env(settings), timeout=60)


def todays_edition(runtime: Runtime, papers_api: PapersAPI) -> int:
    today = utcnow().date()
    papers_api.behaviour.days[today.isoformat()] = load_recorded("2026-04-16")
    digest_id, _ = collect_if_needed(runtime, today, allow_sample=False)
    assert digest_id is not None
    with transaction(runtime.session_factory) as session:
        for email in PEOPLE:
            add_confirmed(session, runtime.tokens, email, now=utcnow())
    return digest_id


def plan_without_sending(runtime: Runtime, digest_id: int, planned_at: dt.datetime) -> None:
    """What beat's dispatch leaves when no worker ever takes the batches."""
    dispatch_edition(runtime, digest_id, InProcess(runtime, lambda digest_id, ids: None), now=planned_at)


def assert_fails_with(result: subprocess.CompletedProcess[str], *reasons: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    for reason in reasons:
        assert re.search(reason, result.stderr), result.stderr


def test_a_late_delivery_then_ok_once_sent_then_a_pause(
    runtime: Runtime, settings: Settings, papers_api: PapersAPI
) -> None:
    digest_id = todays_edition(runtime, papers_api)
    plan_without_sending(runtime, digest_id, utcnow() - dt.timedelta(minutes=95))
    assert_fails_with(check(settings), r"a delivery is late: due 9[56] min ago")
    # Within DIGEST_DELIVERY_LATE_AFTER_MINUTES it is only waiting.
    assert check(settings.model_copy(update={"delivery_late_after_minutes": 120})).stdout == "ok\n"

    summary = run_inprocess(runtime, utcnow().date())
    assert summary.counts["sent"] == 2
    result = check(settings)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")

    # A latched pause (as a worker latches it when complaints trip the rules) fails the check.
    with transaction(runtime.session_factory) as session:
        reputation.pause(session, utcnow(), "complaint rate 2.1% is above 0.30%")
    assert_fails_with(check(settings), "sending is paused")


def test_stale_or_missing_beat_heartbeat_and_no_worker(settings: Settings, redis_url: str) -> None:
    with_redis = settings.model_copy(update={"redis_url": redis_url})
    assert_fails_with(check(with_redis), r"beat has never written a heartbeat", "no Celery worker answered a ping")

    r = redis.Redis.from_url(redis_url)
    seconds, _ = r.time()
    r.set(heartbeat.HEARTBEAT_KEY, str(seconds - 900))
    r.close()
    assert_fails_with(check(with_redis), r"beat heartbeat is stale: last written 90\d s ago")


def test_redis_away_is_the_reason(settings: Settings) -> None:
    from tests.support.servers import free_port

    away = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert_fails_with(check(away), "Redis is not reachable")


@pytest.fixture
def beat_and_worker(settings: Settings, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """The Procfile's beat and worker on this Redis and database."""
    with_redis = settings.model_copy(update={"redis_url": redis_url})
    env = settings_env(with_redis)
    beat = Process(procfile_command("beat"), env, tmp_path / "beat.log", cwd=tmp_path).start()
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        yield with_redis
    finally:
        worker.stop()
        beat.stop()


def test_ok_with_a_live_beat_and_worker(beat_and_worker: Settings) -> None:
    r = redis.Redis.from_url(str(beat_and_worker.redis_url))
    try:
        assert wait_until(lambda: r.exists(heartbeat.HEARTBEAT_KEY) == 1, timeout=60), "beat wrote no heartbeat"
        age = heartbeat.heartbeat_age(r)
    finally:
        r.close()
    assert age is not None and age < heartbeat.HEARTBEAT_EVERY_SECONDS + 5
    result = check(beat_and_worker)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
