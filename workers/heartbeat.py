"""Beat's scheduler with a heartbeat: the beat process itself records every 15 s that it is alive.

A periodic task would only prove that beat *and* a worker run; writing from the scheduler's
own loop lets ``digest status --check`` and ``/metrics`` tell a dead beat from idle workers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery.beat import PersistentScheduler

from digest.core.settings import get_settings
from digest.operations import heartbeat

log = logging.getLogger(__name__)


class HeartbeatScheduler(PersistentScheduler):
    """Celery's default scheduler, plus a heartbeat in Redis between its ticks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        url = get_settings().redis_url
        self._redis = heartbeat.client(url) if url else None
        self._next_beat = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if self._redis is not None and now >= self._next_beat:
            try:
                heartbeat.beat(self._redis)
            except redis.RedisError:
                log.warning("beat: could not write the heartbeat to Redis", exc_info=True)
            self._next_beat = now + heartbeat.HEARTBEAT_EVERY_SECONDS
        wait = float(super().tick(*args, **kwargs))
        # Sleep no longer than until the next heartbeat is due.
        return min(wait, max(0.0, self._next_beat - time.monotonic()))
