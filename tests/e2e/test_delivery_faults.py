"""Exactly once under faults, with real processes: a Celery worker killed with SIGKILL, the SMTP
server going away, SMTP deferrals and refusals, Redis restarted, and a shared rate limit."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from digest.core.models import Delivery, DeliveryStatus, Subscriber, SubscriberStatus
from digest.delivery.batch import SENT_GROUP_SIZE
from digest.orchestration.runtime import Runtime
from tests.support.factories import add_subscribers
from tests.support.processes import BIN, ROOT, Process, digest_env, start_worker
from tests.support.servers import Redis, SMTPSink, wait_until
from tests.support.settings import TEST_SECRET

pytestmark = pytest.mark.e2e

DAY = dt.date(2024, 10, 25)


def env_for(runtime: Runtime, redis_url: str, **extra: str | int | float) -> dict[str, str]:
    s = runtime.settings
    values: dict[str, str | int | float] = {
        "environment": "test",
        "database_url": s.database_url,
        "redis_url": redis_url,
        "smtp_port": s.smtp_port,
        "papers_api_url": s.papers_api_url,
        "papers_api_backoff": 0.01,
        "secret_key": TEST_SECRET,
        "base_url": s.base_url,
        "mail_from": s.mail_from,
        "inbound_address": s.inbound_address,
        "lease_seconds": 8,
        "batch_size": 25,
        "smtp_pool_size": 2,
        "send_retry_base_seconds": 1,
        "send_retry_max_seconds": 8,
        "send_max_attempts": 20,
    }
    values.update(extra)
    return digest_env(**values)


def start_run(env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "digest"), "run", "--date", DAY.isoformat()],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(run: subprocess.Popen[str], log: Path, timeout: float = 240) -> str:
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    output = log.read_text()
    assert run.returncode in (0, 3), output
    return output


def ledger(runtime: Runtime) -> dict[str, tuple[DeliveryStatus, str]]:
    with runtime.session_factory() as session:
        rows = session.execute(
            select(Subscriber.email, Delivery.status, Delivery.message_id).join(
                Delivery, Delivery.subscriber_id == Subscriber.id
            )
        )
        return {email: (status, message_id) for email, status, message_id in rows}


def assert_exactly_once(runtime: Runtime, smtp: SMTPSink, emails: list[str], allowed_duplicates: int = 0) -> None:
    rows = ledger(runtime)
    assert {e for e, (status, _) in rows.items() if status is DeliveryStatus.SENT} == set(emails)
    counts = Counter(m.rcpt_tos[0] for m in smtp.messages)
    assert set(counts) == set(emails), "every active subscriber got the digest"
    duplicates = {e: n for e, n in counts.items() if n > 1}
    assert len(duplicates) <= allowed_duplicates, duplicates
    for message in smtp.messages:
        # Whatever arrived is the ledger's message for that subscriber (retries included).
        assert message.message["Message-ID"] == rows[message.rcpt_tos[0]][1]


@pytest.fixture
def worker_log(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"


@pytest.fixture
def workers() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def test_worker_killed_mid_run_then_restarted_delivers_everything_once(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    emails = add_subscribers(runtime, 240, domains=7)
    smtp.behaviour.delay = 0.02  # slow enough to kill the worker mid-batch
    env = env_for(runtime, redis_url)
    workers.append(start_worker(env, tmp_path / "worker1.log"))
    run = start_run(env, tmp_path / "run.log")
    assert wait_until(lambda: len(smtp.messages) >= 60, timeout=120)
    workers[0].kill()  # SIGKILL to the worker and its pool children
    killed_at = len(smtp.messages)
    assert killed_at < len(emails), "the kill must land mid-run"
    time.sleep(2)
    workers.append(start_worker(env, tmp_path / "worker2.log"))
    finish(run, tmp_path / "run.log")
    # Only messages in flight at the kill may repeat: per pool process, one per SMTP connection
    # plus the group of accepted messages not yet recorded.
    in_flight = 2 * (int(env["DIGEST_SMTP_POOL_SIZE"]) + SENT_GROUP_SIZE)
    assert_exactly_once(runtime, smtp, emails, allowed_duplicates=in_flight)


def test_smtp_server_down_for_a_minute_loses_nothing_and_sends_nothing_twice(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    emails = add_subscribers(runtime, 120, domains=7)
    smtp.behaviour.delay = 0.01
    env = env_for(runtime, redis_url)
    workers.append(start_worker(env, tmp_path / "worker.log"))
    run = start_run(env, tmp_path / "run.log")
    assert wait_until(lambda: len(smtp.messages) >= 30, timeout=120)
    smtp.stop()
    down_at = len(smtp.messages)
    time.sleep(60)
    smtp.start()
    finish(run, tmp_path / "run.log", timeout=300)
    assert down_at < len(emails)
    assert_exactly_once(runtime, smtp, emails)


def test_deferrals_are_retried_and_a_550_bounces_the_subscriber(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    emails = add_subscribers(runtime, 30, domains=7)
    refused = emails[7]
    smtp.behaviour.refuse[refused] = "550 5.1.1 <x>: Recipient address rejected"
    smtp.behaviour.temp_fail_data = 20
    smtp.behaviour.data_reply = "421 4.7.0 Too many connections, slow down"
    env = env_for(runtime, redis_url)
    workers.append(start_worker(env, tmp_path / "worker.log"))
    run = start_run(env, tmp_path / "run.log")
    output = finish(run, tmp_path / "run.log")
    assert "failed 1" in output and "550 5.1.1" in output
    rows = ledger(runtime)
    assert rows[refused][0] is DeliveryStatus.FAILED
    assert_exactly_once(runtime, smtp, [e for e in emails if e != refused])
    with runtime.session_factory() as session:
        status = session.scalar(select(Subscriber.status).where(Subscriber.email == refused))
        attempts = list(session.scalars(select(Delivery.attempts)))
    assert status is SubscriberStatus.BOUNCED
    assert sum(attempts) >= len(emails) + 20 - 1, "each deferral cost an attempt and was retried"


def test_redis_restarted_mid_run_completes_without_loss_or_duplicate(
    runtime: Runtime, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    redis = Redis(private=True)
    try:
        emails = add_subscribers(runtime, 150, domains=7)
        smtp.behaviour.delay = 0.02
        env = env_for(runtime, redis.url)
        workers.append(start_worker(env, tmp_path / "worker.log"))
        run = start_run(env, tmp_path / "run.log")
        assert wait_until(lambda: len(smtp.messages) >= 30, timeout=120)
        redis.stop()  # its queue goes with it: this Redis keeps nothing on disk
        time.sleep(3)
        redis.start()
        finish(run, tmp_path / "run.log", timeout=300)
        assert_exactly_once(runtime, smtp, emails)
    finally:
        redis.close()


def test_rate_limit_is_shared_by_two_worker_processes(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    emails = add_subscribers(runtime, 600, domains=7)
    env = env_for(runtime, redis_url, rate_limit_per_second=50, batch_size=20, smtp_pool_size=4)
    workers.append(start_worker(env, tmp_path / "worker1.log", ["-n", "one@%h"]))
    workers.append(start_worker(env, tmp_path / "worker2.log", ["-n", "two@%h"]))
    run = start_run(env, tmp_path / "run.log")
    finish(run, tmp_path / "run.log")
    assert_exactly_once(runtime, smtp, emails)
    times = sorted(m.at for m in smtp.messages)
    # The limiter's window allows one burst at the start; measure the steady rate after it.
    start = times[0] + 1.0
    steady = [t for t in times if t >= start]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 45.0 <= rate <= 55.0, f"measured {rate:.1f} messages/s"
    both = [w.output().count("succeeded") for w in workers]
    assert all(n > 0 for n in both), f"both workers sent: {both}"
