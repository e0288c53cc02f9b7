"""Riding out a restart of PostgreSQL or Redis: which errors are outages, and waiting them out.

An outage is an error that a retry after the server comes back turns into success: a refused
or broken connection, not a bad query. Code that must not give up on one (``digest run``'s
watch loop, a batch recording what the SMTP server already accepted) retries through
``Outages``, which says in one line what it waits for, once per outage, and when it is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import transaction
from digest.core.errors import DigestError
from digest.core.text import error_line

log = logging.getLogger(__name__)

T = TypeVar("T")


def database_outage(exc: BaseException) -> bool:
    """A lost or refused database connection (server restarted, network cut), not a bad query."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def broker_errors() -> tuple[type[BaseException], ...]:
    """What Redis going away raises, through redis-py directly or through kombu/Celery."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, KombuOperationalError, ConnectionError, TimeoutError)


class GaveUp(DigestError):
    """The outage lasted longer than the caller would wait."""


class Outages:
    """Retries a call while its server is away, saying so in one line per outage."""

    def __init__(
        self, notify: Callable[[str], None], *, interval: float = 0.5, clock: Callable[[], float] = time.monotonic
    ):
        self.notify = notify
        self.interval = interval
        self.clock = clock
        self._waiting: set[str] = set()

    def retry(self, what: str, call: Callable[[], T], *, is_outage: Callable[[BaseException], bool], limit: float) -> T:
        """``call()`` until it returns, retrying outages for up to ``limit`` seconds."""
        deadline = self.clock() + limit
        while True:
            try:
                value = call()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if what not in self._waiting:
                    self._waiting.add(what)
                    self.notify(f"waiting for {what}: {error_line(exc, 200)}")
                if self.clock() > deadline:
                    raise GaveUp(f"{what} still unreachable after {limit:.0f} s: {error_line(exc, 200)}") from exc
                time.sleep(self.interval)
                continue
            if what in self._waiting:
                self._waiting.discard(what)
                self.notify(f"{what} is back")
            return value

    def database(self, call: Callable[[], T], limit: float = 600.0) -> T:
        return self.retry("the database", call, is_outage=database_outage, limit=limit)

    def transaction(self, factory: sessionmaker[Session], step: Callable[[Session], T], limit: float = 600.0) -> T:
        """``step(session)`` in a unit of work of its own, done again while the database is away."""

        def unit() -> T:
            with transaction(factory) as session:
                return step(session)

        return self.database(unit, limit=limit)

    def redis(self, call: Callable[[], T], limit: float = 600.0) -> T:
        errors = broker_errors()
        return self.retry("Redis", call, is_outage=lambda exc: isinstance(exc, errors), limit=limit)


def log_notify(message: str) -> None:
    log.warning("%s", message)
