"""`digest run` end to end: a real Celery worker (the Procfile's command) on Redis and PostgreSQL,
the recorded API over local HTTP, and a real SMTP server receiving the digests."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from digest.core.db import transaction
from digest.core.models import Delivery, DeliveryStatus, DigestItem, Paper, Subscriber, utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed, subscribe, unsubscribe
from tests.support.processes import Process, digest_env, run_cli, start_worker
from tests.support.servers import PapersAPI, SMTPSink
from tests.support.settings import TEST_SECRET, make_settings

pytestmark = pytest.mark.e2e

DAY = dt.date(2024, 10, 25)
ACTIVE = ["ada@example.com", "grace@example.org", "alan@example.net"]
TOPICS = {"grace@example.org": "video, diffusion"}


def add_people(runtime: Runtime) -> None:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        for email in ACTIVE:
            add_confirmed(session, runtime.tokens, email, now=now, topics=TOPICS.get(email, ""))
        subscribe(session, runtime.tokens, "pending@example.com", now=now)
        gone = add_confirmed(session, runtime.tokens, "gone@example.com", now=now)
        unsubscribe(session, gone, now=now)


def env_for(runtime: Runtime, redis_url: str) -> dict[str, str]:
    s = runtime.settings
    return digest_env(
        environment="test",
        database_url=s.database_url,
        redis_url=redis_url,
        smtp_host="127.0.0.1",
        smtp_port=s.smtp_port,
        papers_api_url=s.papers_api_url,
        papers_api_backoff=0.01,
        secret_key=TEST_SECRET,
        base_url=s.base_url,
        mail_from=s.mail_from,
        inbound_address=s.inbound_address,
        lease_seconds=10,
    )


@pytest.fixture
def worker(runtime: Runtime, redis_url: str, tmp_path: Path) -> Iterator[Process]:
    process = start_worker(env_for(runtime, redis_url), tmp_path / "worker.log")
    yield process
    process.stop()


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def assert_in_order(haystack: str, needles: list[str]) -> None:
    """Each needle appears, in this order; line wrapping in the text part does not matter."""
    flat = " ".join(haystack.split())
    positions = [flat.find(" ".join(n.split())) for n in needles]
    assert -1 not in positions, [n for n, p in zip(needles, positions, strict=True) if p == -1]
    assert positions == sorted(positions)


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


def check_digests(runtime: Runtime, smtp: SMTPSink) -> dict[str, EmailMessage]:
    """Exactly one valid digest per active subscriber, listing their papers in order."""
    recipients = sorted(r for m in smtp.messages for r in m.rcpt_tos)
    assert recipients == sorted(ACTIVE)
    received = {m.rcpt_tos[0]: m.message for m in smtp.messages}
    with runtime.session_factory() as session:
        for email, message in received.items():
            assert message.get_content_type() == "multipart/alternative"
            assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
            subscriber = session.scalar(select(Subscriber).where(Subscriber.email == email))
            assert subscriber is not None
            delivery = session.scalar(select(Delivery).where(Delivery.subscriber_id == subscriber.id))
            assert delivery is not None and delivery.status is DeliveryStatus.SENT
            assert delivery.message_id == message["Message-ID"]
            titles = [session.get(Paper, pid).title for pid in delivery.paper_ids or []]  # type: ignore[union-attr]
            assert len(titles) == 10
            text, html = parts(message)
            assert_in_order(text, titles)
            assert_in_order(html, [html_escape(t) for t in titles])
            own_link = runtime.links.unsubscribe(subscriber)
            assert own_link in text and own_link in html
            assert message["List-Unsubscribe"].startswith(f"<{own_link}>, <mailto:")
            assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            if email not in TOPICS:
                trending = [
                    session.get(Paper, i.paper_id).title  # type: ignore[union-attr]
                    for i in session.scalars(select(DigestItem).order_by(DigestItem.position).limit(10))
                ]
                assert titles == trending
    return received


def test_digest_run_through_a_real_worker_sends_one_digest_per_active_subscriber(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, worker: Process, tmp_path: Path
) -> None:
    add_people(runtime)
    env = env_for(runtime, redis_url)
    result = run_cli(["run", "--date", DAY.isoformat()], env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "sent 3, failed 0" in result.stdout
    received = check_digests(runtime, smtp)
    assert "digest.send_batch" in worker.output()

    again = run_cli(["run", "--date", DAY.isoformat()], env)
    assert again.returncode == 0, again.stderr
    assert len(smtp.messages) == 3, "a second run must send nothing new"

    # The same flow in-process on SQLite (no Redis) gives the same emails.
    sqlite_smtp = SMTPSink().start()
    try:
        sqlite_runtime = Runtime(
            make_settings(
                f"sqlite:///{tmp_path / 'in-process.db'}",
                sqlite_smtp,
                None,
                papers_api_url=runtime.settings.papers_api_url,
            )
        )
        from digest.core import db

        db.upgrade(sqlite_runtime.settings.database_url)
        add_people(sqlite_runtime)
        summary = run_inprocess(sqlite_runtime, DAY)
        assert summary.counts["sent"] == 3
        in_process = check_digests(sqlite_runtime, sqlite_smtp)
    finally:
        sqlite_smtp.stop()
    for email in ACTIVE:
        assert normalised(in_process[email]) == normalised(received[email])


TOKEN = re.compile(r"(unsubscribe|preferences|confirm|bounce|feedback)([/-])[A-Za-z0-9_.\-]+")


def normalised(message: EmailMessage) -> tuple[str, str, str]:
    """A message without what must differ between two databases: tokens, ids, dates."""
    text, html = parts(message)
    return (str(message["Subject"]), TOKEN.sub(r"\1\2T", text), TOKEN.sub(r"\1\2T", html))


def test_run_without_workers_reports_a_clear_error(runtime: Runtime, redis_url: str, papers_api: PapersAPI) -> None:
    env = env_for(runtime, redis_url)
    result = run_cli(["run", "--date", DAY.isoformat()], {**env, "DIGEST_TASK_WAIT_SECONDS": "3"}, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: no Celery worker answered; is `celery -A workers worker` running?"


def test_run_with_redis_unreachable_is_a_one_line_error(runtime: Runtime) -> None:
    env = env_for(runtime, "redis://127.0.0.1:1/0")
    result = run_cli(["run", "--date", DAY.isoformat()], env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: Redis at DIGEST_REDIS_URL is not reachable")
    assert result.stderr.strip().count("\n") == 0


def test_a_dispatch_longer_than_the_wait_is_waited_for_while_it_makes_progress(
    runtime: Runtime, redis_url: str, papers_api: PapersAPI, smtp: SMTPSink, tmp_path: Path
) -> None:
    """Planning a big list takes minutes; `digest run` gives up only on a step that stops moving.

    Found by the million-subscriber benchmark: planning took longer than
    DIGEST_TASK_WAIT_SECONDS and `digest run` said "no Celery worker answered" while the worker
    was busy planning. Here the wait is two seconds and planning takes several times that.
    """
    from digest.orchestration.pipeline import collect_if_needed
    from tests.support.factories import add_subscribers

    collect_if_needed(runtime, DAY, allow_sample=False)  # the collect step answers at once
    emails = add_subscribers(runtime, 2000)
    # One subscriber a page makes planning slow whatever the machine (~9 s here; at four a page
    # it took 2.4 s on a fast day, too close to the wait to prove anything).
    env = {**env_for(runtime, redis_url), "DIGEST_BATCH_SIZE": "1", "DIGEST_TASK_WAIT_SECONDS": "2"}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        result = run_cli(["run", "--date", DAY.isoformat()], env, timeout=600)
        log = worker.output()
    finally:
        worker.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    # Planning is the digest.plan_page tasks, from the first one a worker took to the last done.
    stamps = [
        dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        for stamp in re.findall(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)[^]]*\] Task digest\.plan_page\[", log)
    ]
    assert len(stamps) >= 2, log[-3000:]
    planning = (max(stamps) - min(stamps)).total_seconds()
    assert planning > 4, f"planning ({planning:.1f} s) should outlast the wait several times over"
    assert f"sent {len(emails)}," in result.stdout
    assert {m.rcpt_tos[0] for m in smtp.messages} == set(emails)


def test_a_worker_whose_model_cannot_load_still_starts_and_delivers_a_day_whose_vectors_are_stored(
    runtime: Runtime, redis_url: str, smtp: SMTPSink, tmp_path: Path
) -> None:
    """Pool processes load the model as they start (``workers.tasks._warm``). A damaged model
    file must not keep them from starting: collecting and planning a day whose vectors are
    already stored need no model, and sending never does."""
    import shutil

    from digest.orchestration.pipeline import collect_if_needed
    from digest.papers.embedding import DEFAULT_MODEL_DIR

    damaged = tmp_path / "model"
    damaged.mkdir()
    for name in ("manifest.json", "tokenizer.json"):  # the same name, so stored vectors match
        shutil.copy(DEFAULT_MODEL_DIR / name, damaged / name)
    (damaged / "model.onnx").write_bytes(b"not a model")
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        for email in ACTIVE:  # no topics: planning needs no topic vector either
            add_confirmed(session, runtime.tokens, email, now=now)
    collect_if_needed(runtime, DAY, allow_sample=False)  # papers and their vectors, with the good model

    env = {**env_for(runtime, redis_url), "DIGEST_EMBEDDING_MODEL": str(damaged)}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        worker.wait_for_output("could not load the embedding model", timeout=60)
        result = run_cli(["run", "--date", DAY.isoformat()], env)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "sent 3, failed 0" in result.stdout
        assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == sorted(ACTIVE)
        assert "exited with" not in worker.output()
    finally:
        worker.stop()
