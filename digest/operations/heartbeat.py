"""Beat's heartbeat in Redis, and what every host can read from Redis about the task queue.

Beat writes the time every few seconds; ``digest status --check`` and ``/metrics`` read its
age. Both times are Redis's own clock (``TIME``), so hosts whose clocks disagree still agree on
the age.
"""

from __future__ import annotations

from typing import Any

import redis

HEARTBEAT_KEY = "digest:beat:heartbeat"
HEARTBEAT_EVERY_SECONDS = 15.0
# Kombu's Redis transport keeps a queue as one list per priority step; the default queue is
# "celery" and steps 3, 6 and 9 get a suffix ("\x06\x16" + step).
QUEUE = "celery"
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED_KEY = "unacked"  # tasks handed to a worker and not yet acknowledged (incl. countdowns)

# SET to the server's clock in one step; TIME answers [seconds, microseconds].
_BEAT = "local t = redis.call('TIME'); redis.call('SET', KEYS[1], t[1] .. '.' .. string.format('%06d', t[2]))"


def client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A Redis client that gives up quickly: health checks must answer, not hang."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def beat(r: redis.Redis) -> None:
    """Record that beat is alive now."""
    r.eval(_BEAT, 1, HEARTBEAT_KEY)


def heartbeat_age(r: redis.Redis) -> float | None:
    """Seconds since beat's last heartbeat, by Redis's clock; None when beat never ran here."""
    pipe = r.pipeline(transaction=False)
    pipe.get(HEARTBEAT_KEY)
    pipe.time()
    raw, (seconds, micros) = pipe.execute()
    if raw is None:
        return None
    age: float = seconds + micros / 1e6 - float(raw)
    return max(0.0, age)


def queue_depth(r: redis.Redis) -> tuple[int, int]:
    """(tasks waiting in the queue, tasks taken by a worker and not yet acknowledged)."""
    pipe = r.pipeline(transaction=False)
    for name in (QUEUE, *(f"{QUEUE}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS)):
        pipe.llen(name)
    pipe.hlen(UNACKED_KEY)
    answers: list[Any] = pipe.execute()
    return sum(int(n) for n in answers[:-1]), int(answers[-1])
