"""Restarts of the infrastructure under a running `digest run`, with real processes.

A private Redis (its queue lost when it dies) is killed at the start, in the middle and near
the end of a run; a private PostgreSQL is restarted (immediate stop: every connection cut) in
the middle. Each run must end with every subscriber served exactly once (the SMTP sink and the
ledger agree), the Procfile worker still alive, and `digest run` exiting 0 after one-line
messages while it waited, without a traceback.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from digest.core import db
from digest.core.models import Delivery, DeliveryStatus, Subscriber
from digest.orchestration.runtime import Runtime
from tests.e2e.infra_servers import PrivatePostgres, PrivateRedis
from tests.support.factories import add_subscribers
from tests.support.processes import BIN, ROOT, Process, settings_env, start_worker
from tests.support.servers import PapersAPI, SMTPSink, wait_until
from tests.support.settings import make_settings

pytestmark = pytest.mark.e2e

DAY = dt.date(2024, 10, 25)
SUBSCRIBERS = 240


def env_for(runtime: Runtime, redis_url: str) -> dict[str, str]:
    return settings_env(
        runtime.settings.model_copy(
            update={
                "redis_url": redis_url,
                "lease_seconds": 6,
                "batch_size": 20,
                "smtp_pool_size": 2,
                "send_retry_base_seconds": 0.5,
                "send_retry_max_seconds": 2.0,
                "send_max_attempts": 30,
            }
        )
    )


_runs: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap_runs() -> Iterator[None]:
    """A run a failed assertion left behind is killed here, not reported later by another test."""
    yield
    while _runs:
        run = _runs.pop()
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)


def start_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        run = subprocess.Popen(
            [str(BIN / "digest"), "run", "--date", DAY.isoformat()], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    _runs.append(run)
    return run


def finish(run: subprocess.Popen[bytes], log: Path, timeout: float = 150) -> str:
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError(f"digest run did not finish:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert run.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def assert_served_exactly_once(runtime: Runtime, smtp: SMTPSink, emails: list[str]) -> None:
    with runtime.session_factory() as session:
        rows = dict(
            session.execute(
                select(Subscriber.email, Delivery.status).join(Delivery, Delivery.subscriber_id == Subscriber.id)
            ).all()
        )
    assert Counter(rows.values()) == {DeliveryStatus.SENT: len(emails)}
    received = Counter(m.rcpt_tos[0] for m in smtp.messages)
    assert set(received) == set(emails), "every subscriber got the digest"
    assert {e: n for e, n in received.items() if n > 1} == {}, "nobody got it twice"


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()  # the test has checked what it needed; a warm shutdown only costs time


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    yield server
    server.close()


def when_sent(smtp: SMTPSink, share: float) -> Callable[[], bool]:
    return lambda: len(smtp.messages) >= share * SUBSCRIBERS


@pytest.mark.parametrize("moment", ["start", "middle", "end"])
def test_redis_killed_during_a_run(
    moment: str,
    runtime: Runtime,
    smtp: SMTPSink,
    papers_api: PapersAPI,
    private_redis: PrivateRedis,
    tmp_path: Path,
    processes: list[Process],
) -> None:
    emails = add_subscribers(runtime, SUBSCRIBERS)
    smtp.behaviour.delay = 0.01  # a run of a few seconds, so each moment can be hit
    if moment == "start":
        # A slow upstream keeps the collect task busy until Redis is back (3 s away), so Redis
        # dies while collection runs and the run sees the restart before any result, however
        # fast or slow the machine.
        papers_api.behaviour.delay = 6.0
    env = env_for(runtime, private_redis.url)
    worker = start_worker(env, tmp_path / "worker.log")
    processes.append(worker)
    run = start_run(env, tmp_path / "run.log")
    if moment == "start":
        # The run's first task reached the worker: the run is collecting, nothing is sent yet.
        worker.wait_for_output("digest.collect[", timeout=60)
    else:
        assert wait_until(when_sent(smtp, 0.4 if moment == "middle" else 0.9), timeout=90, interval=0.02)
    private_redis.kill()
    sent_at_kill = len(smtp.messages)
    time.sleep(3)
    private_redis.start()
    papers_api.behaviour.delay = 0.0  # the collect step sent again is answered at once
    output = finish(run, tmp_path / "run.log")
    assert sent_at_kill < SUBSCRIBERS, "Redis died before the run ended"
    if moment == "start":
        assert "Redis restarted and lost its queue: sending the collect step again" in output, output
    assert_served_exactly_once(runtime, smtp, emails)
    assert worker.running, worker.output()[-3000:]
    # Gossip's and Mingle's broadcast channels crashed the reconnect (celery/kombu#582); the
    # Procfile's worker runs without them.
    assert "Unrecoverable error" not in worker.output()
    assert "Error on restarting" not in worker.output()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    yield server
    server.close()


@pytest.mark.parametrize("mode", ["workers", "in-process"])
def test_postgres_restarted_mid_run(
    mode: str,
    private_postgres: PrivatePostgres,
    redis_url: str,
    smtp: SMTPSink,
    tmp_path: Path,
    processes: list[Process],
) -> None:
    db.upgrade(private_postgres.url)
    from tests.support.servers import PapersAPI

    api = PapersAPI().start()
    runtime = Runtime(make_settings(private_postgres.url, smtp, api))
    try:
        emails = add_subscribers(runtime, SUBSCRIBERS)
        smtp.behaviour.delay = 0.01
        env = env_for(runtime, redis_url)
        if mode == "workers":
            worker = start_worker(env, tmp_path / "worker.log")
            processes.append(worker)
        else:
            del env["DIGEST_REDIS_URL"]  # no Redis: `digest run` sends everything itself
        run = start_run(env, tmp_path / "run.log")
        assert wait_until(when_sent(smtp, 0.4), timeout=90, interval=0.02)
        private_postgres.stop("immediate")
        time.sleep(2)
        private_postgres.start()
        output = finish(run, tmp_path / "run.log")
        lines = output.splitlines()
        waiting = [n for n, line in enumerate(lines) if line.startswith("waiting for the database: ")]
        assert waiting and lines[waiting[0] + 1] == "the database is back", output  # one line each
        assert_served_exactly_once(runtime, smtp, emails)
        if mode == "workers":
            assert worker.running, worker.output()[-3000:]
    finally:
        runtime.dispose()
        api.stop()
