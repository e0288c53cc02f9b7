"""Sharded planning with real Celery workers: an edition's pages are planned by whichever worker
process is free, and neither several planners at once nor a planner killed mid-page plans anyone
twice or leaves anyone out (issue 22)."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text

from digest.core.models import Delivery, DeliveryStatus, Subscriber, utcnow
from digest.delivery.batch import SENT_GROUP_SIZE
from digest.orchestration.pipeline import collect_if_needed
from digest.orchestration.runtime import Runtime
from tests.e2e.test_delivery_faults import DAY, env_for, finish, start_run
from tests.support.factories import add_subscribers
from tests.support.processes import Process, start_worker
from tests.support.servers import SMTPSink, wait_until

pytestmark = pytest.mark.e2e

PLANNED = re.compile(r"Task digest\.plan_page\[([0-9a-f-]+)\] succeeded")
RECEIVED = re.compile(r"Task digest\.plan_page\[([0-9a-f-]+)\] received")


@pytest.fixture
def workers() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def rows_per_subscriber(runtime: Runtime) -> Counter[str]:
    with runtime.session_factory() as session:
        rows = session.execute(select(Subscriber.email).join(Delivery, Delivery.subscriber_id == Subscriber.id))
        return Counter(email for (email,) in rows)


def assert_each_once(runtime: Runtime, smtp: SMTPSink, emails: list[str], resent: int = 0) -> None:
    """One ledger row and one message per due subscriber; up to ``resent`` messages may repeat,
    each the same planned delivery (its Message-ID), never a second plan."""
    assert rows_per_subscriber(runtime) == Counter(emails), "one ledger row per due subscriber"
    with runtime.session_factory() as session:
        statuses = Counter(session.scalars(select(Delivery.status)))
        rows = session.execute(select(Subscriber.email, Delivery.message_id).join(Subscriber))
        message_ids = {email: message_id for email, message_id in rows}
    assert statuses == Counter({DeliveryStatus.SENT: len(emails)})
    received = Counter(m.rcpt_tos[0] for m in smtp.messages)
    assert set(received) == set(emails), "everyone got the digest"
    repeated = {e: n for e, n in received.items() if n > 1}
    assert len(repeated) <= resent, repeated
    for message in smtp.messages:
        assert message.message["Message-ID"] == message_ids[message.rcpt_tos[0]]


def test_an_edition_planned_by_several_workers_at_once_gives_everyone_one_delivery(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    emails = add_subscribers(runtime, 600, domains=7)
    env = env_for(runtime, redis_url)  # 25 a page: 24 pages for four pool processes
    workers.extend(start_worker(env, tmp_path / f"worker{n}.log") for n in range(2))
    run = start_run(env, tmp_path / "run.log")
    output = finish(run, tmp_path / "run.log")
    assert f"sent {len(emails)}," in output, output
    assert_each_once(runtime, smtp, emails)
    planned = [len(PLANNED.findall(w.output())) for w in workers]
    assert sum(planned) >= 24, planned
    assert all(planned), f"every worker took pages: {planned}"


def test_a_worker_killed_mid_page_leaves_no_one_out_and_plans_no_one_twice(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path, workers: list[Process]
) -> None:
    digest_id, _ = collect_if_needed(runtime, DAY, allow_sample=False)
    emails = add_subscribers(runtime, 300, domains=7)
    with runtime.session_factory() as session:
        ids = list(session.scalars(select(Subscriber.id).order_by(Subscriber.id)))
    # Hold one subscriber's ledger key in an open transaction: the planner of that page stops
    # on it in the middle of its own transaction (its rows inserted, not committed), where it
    # is killed. The page comes back (Redis redelivers an unacknowledged task after the
    # visibility timeout; `digest run` hands the pages out again sooner when the ledger stalls)
    # and is planned again by the next worker.
    env = env_for(runtime, redis_url, task_visibility_timeout=5)
    blocker_engine = runtime.session_factory.kw["bind"]
    blocker = blocker_engine.connect()
    trap = blocker.begin()
    now = utcnow()
    blocker.execute(
        insert(Delivery).values(
            digest_id=digest_id,
            subscriber_id=ids[150],
            recipient=emails[150],
            status=DeliveryStatus.PENDING,
            attempts=0,
            message_id="<held@test>",
            not_after=now,
            created_at=now,
            updated_at=now,
        )
    )
    try:
        workers.append(start_worker(env, tmp_path / "worker1.log"))
        run = start_run(env, tmp_path / "run.log")

        def planner_waits_on_the_key() -> bool:
            with blocker_engine.connect() as probe:
                waiting = probe.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO deliveries%'"
                    )
                )
            return bool(waiting)

        assert wait_until(planner_waits_on_the_key, timeout=120), workers[0].output()[-3000:]
        workers[0].kill()  # SIGKILL to the worker and its pool children, mid-page
        received = set(RECEIVED.findall(workers[0].output()))
        done = set(PLANNED.findall(workers[0].output()))
    finally:
        trap.rollback()
        blocker.close()
    with runtime.session_factory() as session:
        count = session.scalar(select(func.count()).select_from(Delivery).where(Delivery.subscriber_id == ids[150]))
    assert count == 0, "the killed page's transaction took its rows with it"
    assert received - done, "a page was in progress when the worker died"
    time.sleep(1)
    workers.append(start_worker(env, tmp_path / "worker2.log"))
    output = finish(run, tmp_path / "run.log")
    assert f"sent {len(emails)}," in output, output
    # The kill also lands on the other pool process, sending: the messages it had handed to the
    # server and not yet recorded go out again (the send path's window, as in
    # test_delivery_faults), the same deliveries, not new plans.
    in_flight = 2 * (int(env["DIGEST_SMTP_POOL_SIZE"]) + SENT_GROUP_SIZE)
    assert_each_once(runtime, smtp, emails, resent=in_flight)
