"""Prometheus metrics computed at scrape time from the ledger and Redis.

Nothing is counted in a process's memory: every web host reads the same database and Redis,
so whichever host Prometheus scrapes, the numbers agree, and a restart loses nothing. Each
query is an index range or an index-only aggregate (see ``bench/metrics.py`` for the cost).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digest.core.models import Digest, EventKind, Paper, Subscriber, SubscriberEvent, SubscriberStatus, utcnow
from digest.delivery.ledger import counts_of_editions, sent_since
from digest.delivery.reputation import PauseRules
from digest.operations import heartbeat
from digest.operations.status import oldest_due, sending_paused_now

log = logging.getLogger(__name__)
EDITION_DAYS = 2  # digest_deliveries covers the editions dated today and the two days before
RATE_WINDOW = dt.timedelta(minutes=5)
EVENT_WINDOW = dt.timedelta(hours=24)


@dataclass
class LedgerFigures:
    """What the database says, at one moment."""

    deliveries: dict[str, int]
    subscribers: dict[str, int]
    paused: bool
    last_collection: dt.datetime | None
    sent_last_5_minutes: int
    events_24h: dict[str, int]
    oldest_due: dt.datetime | None


@dataclass
class QueueFigures:
    """What Redis says; ``up`` is False when it did not answer."""

    up: bool
    waiting: int = 0
    unacked: int = 0
    beat_age_seconds: float | None = None
    error: str | None = field(default=None, repr=False)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


def ledger_figures(session: Session, now: dt.datetime, rule: PauseRules) -> LedgerFigures:
    # Ids as values, not a subquery, so the planner reads only those editions (see status.oldest_due).
    recent = list(session.scalars(select(Digest.id).where(Digest.date >= now.date() - dt.timedelta(days=EDITION_DAYS))))
    deliveries = counts_of_editions(session, recent)
    subscribers = dict.fromkeys((s.value for s in SubscriberStatus), 0)
    for sub_status, count in session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status)):
        subscribers[SubscriberStatus(sub_status).value] = count
    sent_recently = sent_since(session, now - RATE_WINDOW)
    events = dict.fromkeys((k.value for k in EventKind), 0)
    for kind, count in session.execute(
        select(SubscriberEvent.kind, func.count())
        .where(SubscriberEvent.kind.in_(list(events)), SubscriberEvent.created_at > now - EVENT_WINDOW)
        .group_by(SubscriberEvent.kind)
    ):
        events[kind] = count
    return LedgerFigures(
        deliveries=deliveries,
        subscribers=subscribers,
        paused=sending_paused_now(session, now, rule),
        last_collection=_aware(session.scalar(select(func.max(Paper.fetched_at)))),
        sent_last_5_minutes=sent_recently or 0,
        events_24h=events,
        oldest_due=oldest_due(session, now),
    )


def queue_figures(r: redis.Redis) -> QueueFigures:
    try:
        waiting, unacked = heartbeat.queue_depth(r)
        return QueueFigures(up=True, waiting=waiting, unacked=unacked, beat_age_seconds=heartbeat.heartbeat_age(r))
    except redis.RedisError as exc:
        return QueueFigures(up=False, error=str(exc))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _by(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def families(ledger: LedgerFigures | None, queue: QueueFigures | None, now: dt.datetime) -> Iterable[Metric]:
    """The metric families for one scrape; ``ledger`` is None without the database, ``queue`` without Redis."""
    if ledger is not None:
        yield from ledger_families(ledger, now)
    if queue is not None:
        yield from queue_families(queue)


def ledger_families(ledger: LedgerFigures, now: dt.datetime) -> Iterable[Metric]:
    yield _by(
        "digest_deliveries",
        f"Deliveries of the editions dated in the last {EDITION_DAYS} days and today, by status.",
        "status",
        ledger.deliveries,
    )
    yield _by("digest_subscribers", "Subscribers by status.", "status", ledger.subscribers)
    yield _gauge("digest_sending_paused", "1 while complaints keep sending paused, else 0.", float(ledger.paused))
    if ledger.last_collection is not None:
        yield _gauge(
            "digest_last_collection_timestamp_seconds",
            "When papers were last stored by a collection (Unix time).",
            ledger.last_collection.timestamp(),
        )
    yield _gauge(
        "digest_send_rate_per_second",
        "Digests sent per second over the last 5 minutes.",
        ledger.sent_last_5_minutes / RATE_WINDOW.total_seconds(),
    )
    yield _by(
        "digest_bounces_last_24h",
        "Bounce reports in the last 24 hours, by kind.",
        "kind",
        {"hard": ledger.events_24h["hard_bounce"], "soft": ledger.events_24h["soft_bounce"]},
    )
    yield _gauge("digest_complaints_last_24h", "Spam complaints in the last 24 hours.", ledger.events_24h["complaint"])
    due_age = (now - ledger.oldest_due).total_seconds() if ledger.oldest_due is not None else 0.0
    yield _gauge(
        "digest_oldest_due_delivery_age_seconds",
        "How long the longest-waiting sendable delivery has been due (0: none waiting).",
        max(0.0, due_age),
    )


def queue_families(queue: QueueFigures) -> Iterable[Metric]:
    yield _gauge("digest_redis_up", "1 when Redis answered this scrape, else 0.", float(queue.up))
    if not queue.up:
        return
    yield _gauge("digest_queue_depth", "Celery tasks waiting in the Redis queue.", queue.waiting)
    yield _gauge("digest_tasks_unacked", "Celery tasks taken by workers, not yet acknowledged.", queue.unacked)
    if queue.beat_age_seconds is not None:
        yield _gauge(
            "digest_beat_heartbeat_age_seconds",
            "Seconds since celery beat last wrote its heartbeat.",
            queue.beat_age_seconds,
        )


class DigestCollector(Collector):
    """Reads the ledger (and Redis, when configured) on every scrape."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        rule: PauseRules,
        redis_client: redis.Redis | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.session_factory = session_factory
        self.rule = rule
        self.redis_client = redis_client
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; every scrape queries afresh

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        ledger: LedgerFigures | None = None
        try:
            with self.session_factory() as session:
                ledger = ledger_figures(session, now, self.rule)
        except SQLAlchemyError as exc:
            log.warning("metrics: the database did not answer: %s", " ".join(str(exc).split())[:300])
        # A scrape still answers without the database, saying so: an alert on
        # digest_database_up == 0 is clearer than a failed scrape.
        yield _gauge(
            "digest_database_up", "1 when the database answered this scrape, else 0.", float(ledger is not None)
        )
        queue = queue_figures(self.redis_client) if self.redis_client is not None else None
        yield from families(ledger, queue, now)
