"""Celery configuration and beat schedule, read from ``Settings`` once per process."""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab
from celery.signals import after_setup_logger, after_setup_task_logger

from digest.core.settings import get_settings

settings = get_settings()
broker = settings.redis_url or "memory://"

app = Celery("digest", broker=broker, backend=settings.redis_url or "cache+memory://", include=["workers.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_expires=3600,
    timezone="UTC",
    enable_utc=True,
    # A task is acknowledged only when it finished, so a killed worker's task is redelivered;
    # the ledger makes the redelivery send only what is missing.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A task says when a worker takes it (state STARTED): `digest run` waits for a long step
    # (planning a big list) as long as a worker has it, not a fixed time.
    task_track_started=True,
    # An edition's pages to plan wait on the lowest priority step (Redis pops the steps in
    # order): a worker takes a planned page's send, and beat's own tasks, before the next page
    # to plan, so sending starts with the first planned page and thousands of queued pages hold
    # nothing else up.
    task_routes={"digest.plan_page": {"priority": 9}},
    broker_transport_options={"visibility_timeout": settings.task_visibility_timeout},
    result_backend_transport_options={"visibility_timeout": settings.task_visibility_timeout},
    broker_connection_retry_on_startup=True,
    # Keep running tasks when the broker connection drops (Redis restarting): a send_batch
    # cancelled mid-send could leave accepted messages unrecorded, to be sent twice.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
    # A pool process loads the embedding model before it says it is up (workers.tasks._warm):
    # on a loaded machine that can take longer than Celery's 4 s default, which would kill it.
    worker_proc_alive_timeout=60.0,
    # Celery's default scheduler plus a heartbeat in Redis (digest status --check, /metrics).
    beat_scheduler="workers.heartbeat:HeartbeatScheduler",
    beat_schedule={
        # The API fills a day during that day (UTC); collect a few times so late papers count.
        "collect-latest": {"task": "digest.collect_latest", "schedule": crontab(minute=15, hour="*/3")},
        # Local hours start on the quarter hour somewhere (+5:30, +5:45, +12:45): every five
        # minutes (digest.orchestration.schedule.TICK), each run planning what became due since the last and
        # what a late or missed run left, so H:00 local is kept to within 10 minutes everywhere.
        "dispatch-due": {"task": "digest.dispatch_due", "schedule": crontab(minute="*/5")},
        "sweep": {"task": "digest.sweep", "schedule": 60.0},
        "poll-imap": {"task": "digest.poll_imap", "schedule": 120.0},
        # Ledger housekeeping once a day, at a quiet hour for most time zones' sending.
        "compact-ledger": {"task": "digest.compact_ledger", "schedule": crontab(minute=30, hour=2)},
    },
)


if settings.log_format == "json":
    from typing import Any

    from digest.core.logging_setup import reformat

    # Keep Celery's handlers and levels; only the lines become JSON objects.
    @after_setup_logger.connect
    @after_setup_task_logger.connect
    def _json_logs(logger: Any, **_: Any) -> None:
        reformat(logger, "json")
