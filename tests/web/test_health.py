"""Probes and metrics as a load balancer and Prometheus see them, over real HTTP."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from digest.core import db
from digest.core.db import transaction
from digest.core.models import utcnow
from digest.core.settings import Settings
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed, subscribe
from digest.web.app import create_app
from tests.support.servers import PapersAPI, SMTPSink, free_port, load_recorded
from tests.support.settings import make_settings
from tests.web.live import server_thread

TOKEN = "metrics-token-0123456789"


@contextmanager
def live_app(settings: Settings) -> Iterator[str]:
    runtime = Runtime(settings)
    try:
        with server_thread(create_app(runtime), free_port()) as base:
            yield base
    finally:
        runtime.dispose()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_healthz_answers_without_asking_the_database(smtp: SMTPSink, tmp_path: Path) -> None:
    # A database outage must not make a PaaS restart every web process.
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with live_app(make_settings(closed, smtp)) as base:
        answer = httpx.get(f"{base}/healthz")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok"}


def test_readyz_is_200_when_database_redis_and_schema_are_fine(settings: Settings, redis_url: str) -> None:
    with live_app(settings.model_copy(update={"redis_url": redis_url})) as base:
        answer = httpx.get(f"{base}/readyz")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "status": "ok",
            "checks": {"database": "ok", "schema": "ok", "redis": "ok"},
            "problems": [],
        }


def test_readyz_is_503_with_the_reason_when_the_database_is_unreachable(smtp: SMTPSink) -> None:
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with live_app(make_settings(closed, smtp)) as base:
        answer = httpx.get(f"{base}/readyz")
        assert answer.status_code == 503
        body = answer.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["database"] == "unavailable"
        assert body["checks"]["redis"] == "not configured"
        assert body["problems"] == ["database unavailable"]


def test_readyz_is_503_when_redis_is_configured_but_away(settings: Settings) -> None:
    away = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with live_app(away) as base:
        answer = httpx.get(f"{base}/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["database"] == "ok"
        assert answer.json()["checks"]["redis"] == "unavailable"
        assert answer.json()["problems"] == ["redis unavailable"]


def test_readyz_is_503_when_the_schema_is_behind(smtp: SMTPSink, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0002")
    with live_app(make_settings(url, smtp)) as base:
        answer = httpx.get(f"{base}/readyz")
        assert answer.status_code == 503
        schema = answer.json()["checks"]["schema"]
        assert schema.startswith("at 0002, this code needs ") and "digest db upgrade" in schema
    db.upgrade(url)
    with live_app(make_settings(url, smtp)) as base:
        assert httpx.get(f"{base}/readyz").status_code == 200


def test_metrics_show_the_sent_count_of_a_real_run(
    settings: Settings, papers_api: PapersAPI, smtp: SMTPSink, redis_url: str
) -> None:
    # Today's edition, so it falls in the window of digest_deliveries.
    today = utcnow().date()
    papers_api.behaviour.days[today.isoformat()] = load_recorded("2026-04-16")
    settings = settings.model_copy(update={"redis_url": redis_url, "metrics_token": TOKEN})
    runtime = Runtime(settings)
    try:
        now = utcnow()
        with transaction(runtime.session_factory) as session:
            for email in ("ada@example.com", "grace@example.org", "alan@example.net"):
                add_confirmed(session, runtime.tokens, email, now=now)
            subscribe(session, runtime.tokens, "pending@example.com", now=now)
        # In-process (no workers): the same ledger the workers write.
        sender = Runtime(settings.model_copy(update={"redis_url": None}))
        try:
            summary = run_inprocess(sender, today)
        finally:
            sender.dispose()
        assert summary.counts.get("sent") == 3
        smtp.wait_for(3)
        with server_thread(create_app(runtime), free_port()) as base:
            refused = httpx.get(f"{base}/metrics")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
            answer = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        runtime.dispose()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    got = samples(answer.text)
    assert got[("digest_deliveries", (("status", "sent"),))] == 3
    for status in ("failed", "pending", "sending", "skipped"):
        assert got[("digest_deliveries", (("status", status),))] == 0
    assert got[("digest_subscribers", (("status", "active"),))] == 3
    assert got[("digest_subscribers", (("status", "pending"),))] == 1
    assert got[("digest_sending_paused", ())] == 0
    assert got[("digest_database_up", ())] == 1
    collected = got[("digest_last_collection_timestamp_seconds", ())]
    assert abs(collected - dt.datetime.now(dt.UTC).timestamp()) < 300
    assert got[("digest_send_rate_per_second", ())] == pytest.approx(3 / 300)
    assert got[("digest_oldest_due_delivery_age_seconds", ())] == 0
    assert got[("digest_redis_up", ())] == 1
    assert got[("digest_queue_depth", ())] == 0
    assert ("digest_beat_heartbeat_age_seconds", ()) not in got  # no beat ran against this Redis


def test_metrics_say_the_database_is_down_instead_of_failing(smtp: SMTPSink) -> None:
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with live_app(make_settings(closed, smtp)) as base:
        answer = httpx.get(f"{base}/metrics")
    assert answer.status_code == 200
    got = samples(answer.text)
    assert got[("digest_database_up", ())] == 0
    assert not any(name == "digest_deliveries" for name, _ in got)


def test_metrics_show_queued_tasks_and_beats_heartbeat(settings: Settings, redis_url: str) -> None:
    from celery import Celery

    from digest.operations import heartbeat

    # Two tasks enqueued as Celery enqueues them, with no worker to take them.
    producer = Celery("digest", broker=redis_url)
    for _ in range(2):
        producer.send_task("digest.sweep")
    producer.close()
    r = heartbeat.client(redis_url)
    heartbeat.beat(r)
    r.close()
    with live_app(settings.model_copy(update={"redis_url": redis_url})) as base:
        got = samples(httpx.get(f"{base}/metrics").text)
    assert got[("digest_queue_depth", ())] == 2
    assert got[("digest_tasks_unacked", ())] == 0
    assert 0 <= got[("digest_beat_heartbeat_age_seconds", ())] < 5
