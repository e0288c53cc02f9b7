"""Ledger lifecycle: delivery rows of old editions reduced to what must stay.

A delivery row is needed while it can still matter to a rule: "no repeats" reads a
subscriber's rows of the last 15 days, the stale limit closes rows within a day, the complaint
rate and the soft-bounce window count the last days' rows. After ``retention_days`` (validated
in settings to exceed all of those) an edition's rows only still answer "how many were sent,
failed, skipped", so each is deleted and counted into ``delivery_counts`` in the same short
transaction: live rows plus counts always add up to the edition's true totals.

Subscriber state (unsubscribed, bounced, complained) lives on the subscriber and in
``subscriber_events``, not in delivery rows, so compaction never makes anyone sendable again.

The rows and their counts are the ledger's (``digest.delivery.ledger``); the first counts row
of an edition closes it, so it is never planned or sent again. This module decides when.

Batches are small (one edition's rows, ``batch_size`` at a time, in id order through the
(edition, status) index), each its own transaction, with ``SKIP LOCKED`` on PostgreSQL: rows of
an edition that old are not touched by sending, and compaction never waits for a lock.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import transaction
from digest.delivery.ledger import compact_rows, editions_with_rows_before, rows_by_status, vacuum_table

BATCH_ROWS = 5000


@dataclass
class CompactResult:
    cutoff: dt.date
    editions: int = 0
    rows: int = 0
    batches: int = 0
    longest_batch_seconds: float = 0.0
    by_status: Counter[str] = field(default_factory=Counter)

    def line(self, *, dry_run: bool = False) -> str:
        statuses = ", ".join(f"{status} {n}" for status, n in sorted(self.by_status.items())) or "nothing"
        if dry_run:
            return (
                f"dry run: would compact {self.rows} delivery rows of {self.editions} editions dated before"
                f" {self.cutoff} ({statuses}); nothing was written"
            )
        return (
            f"compacted {self.rows} delivery rows of {self.editions} editions dated before {self.cutoff} "
            f"({statuses}) in {self.batches} batches; longest batch {self.longest_batch_seconds * 1000:.0f} ms"
        )


def cutoff_for(today: dt.date, retention_days: int) -> dt.date:
    """Editions dated before this day are compacted."""
    return today - dt.timedelta(days=retention_days)


def would_compact(session: Session, *, today: dt.date, retention_days: int) -> CompactResult:
    """What ``compact`` would reduce now (rows by the status they would be counted as); reads only."""
    result = CompactResult(cutoff_for(today, retention_days))
    digest_ids = editions_with_rows_before(session, result.cutoff)
    if not digest_ids:
        return result
    result.by_status = rows_by_status(session, digest_ids)
    result.editions = len(digest_ids)
    result.rows = sum(result.by_status.values())
    return result


def compact(
    factory: sessionmaker[Session],
    *,
    today: dt.date,
    retention_days: int,
    batch_size: int = BATCH_ROWS,
    pause: float = 0.01,
    max_seconds: float | None = None,
    vacuum: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> CompactResult:
    """Compact every edition dated more than ``retention_days`` before ``today``, batch by batch.

    Each batch commits on its own; ``pause`` between batches leaves the database to sending.
    ``max_seconds`` bounds one run (the next one goes on where it stopped); ``vacuum`` ends a run
    that removed rows with ``vacuum_ledger``.
    """
    result = CompactResult(cutoff_for(today, retention_days))
    started = clock()
    with transaction(factory) as session:
        digest_ids = editions_with_rows_before(session, result.cutoff)
        engine = session.get_bind()

    def out_of_time() -> bool:
        return max_seconds is not None and clock() - started > max_seconds

    for digest_id in digest_ids:
        if out_of_time():
            break
        result.editions += 1
        while not out_of_time():
            began = clock()
            with transaction(factory) as session:
                removed = compact_rows(session, digest_id, batch_size)
            if not removed:
                break
            result.batches += 1
            result.rows += sum(removed.values())
            result.by_status.update(removed)
            result.longest_batch_seconds = max(result.longest_batch_seconds, clock() - began)
            if pause:
                time.sleep(pause)
    if vacuum and result.rows and isinstance(engine, Engine):
        vacuum_ledger(engine)
    return result


def vacuum_ledger(engine: Engine) -> None:
    """PostgreSQL: make the deleted rows' space reusable now (plain VACUUM locks out no writer).

    Autovacuum would get there too, but only once a fifth of the table is dead (its default
    scale factor): a daily compaction removes about 1/retention of it, so the table would carry
    several days of dead rows. Vacuuming after each run keeps it at its live size.
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        vacuum_table(conn)
        conn.execute(text("VACUUM (ANALYZE) subscriber_events"))
