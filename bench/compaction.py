"""Compaction: batched deletes against PostgreSQL native partitioning (run by hand, not in CI).

Both remove one day's ledger rows (N subscribers) from a ledger holding D days, while a
writer keeps updating rows of the newest day the way sending does (claims and records, 100
rows a statement); the writer's latency shows whether removing old rows gets in sending's way.

* **batched deletes**: ``digest.delivery.compaction.compact`` on the real ``deliveries`` table (5 000
  rows a transaction, counted into ``delivery_counts``), then its VACUUM.
* **partitions**: the same rows in a copy of the table partitioned by day (``PARTITION BY
  RANGE``, one partition a day, the same indexes); the day's counts read with one GROUP BY,
  then ``DETACH PARTITION ... CONCURRENTLY`` and ``DROP TABLE``.

Reference, measured in the same run: writing one day's rows (plan, claim, record).

    .venv/bin/python bench/compaction.py                  # 50 000 subscribers, 4 days
    .venv/bin/python bench/compaction.py --subscribers 200000

Uses the machine's PostgreSQL (127.0.0.1) like the tests, in a database of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402

from bench.year import FIRST_DAY, add_subscribers, weekdays, write_day  # noqa: E402
from digest.core import db  # noqa: E402
from digest.delivery.compaction import compact  # noqa: E402
from tests.support.servers import Postgres  # noqa: E402


class Writer(threading.Thread):
    """Updates 100 rows of the newest edition per statement, as claims and records do."""

    def __init__(self, engine: Engine, table: str, digest_id: int) -> None:
        super().__init__(daemon=True)
        self.engine, self.table, self.digest_id = engine, table, digest_id
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    text(f"SELECT id FROM {self.table} WHERE digest_id = :d ORDER BY id LIMIT 20000"),
                    {"d": self.digest_id},
                ).scalars()
            )
            n = 0
            while not self.stop.is_set():
                chunk = ids[(n * 100) % len(ids) :][:100]
                n += 1
                began = time.monotonic()
                conn.execute(
                    text(f"UPDATE {self.table} SET updated_at = now() WHERE id = ANY(:ids)"),
                    {"ids": chunk},
                )
                conn.commit()
                self.latencies.append(time.monotonic() - began)
                time.sleep(0.005)


def with_writer(engine: Engine, table: str, digest_id: int, work: Callable[[], None]) -> dict[str, float]:
    writer = Writer(engine, table, digest_id)
    writer.start()
    time.sleep(1.0)  # a baseline before the work starts
    baseline = len(writer.latencies)
    began = time.monotonic()
    work()
    took = time.monotonic() - began
    writer.stop.set()
    writer.join()
    before, during = writer.latencies[:baseline], writer.latencies[baseline:]
    return {
        "seconds": round(took, 3),
        "writer_p50_ms_before": round(statistics.median(before) * 1000, 2),
        "writer_p50_ms_during": round(statistics.median(during) * 1000, 2),
        "writer_max_ms_during": round(max(during) * 1000, 1),
    }


PARTITIONED = [
    "CREATE TABLE deliveries_by_day (LIKE deliveries INCLUDING DEFAULTS, day date NOT NULL) PARTITION BY RANGE (day)",
    "CREATE INDEX ON deliveries_by_day (digest_id, status)",
    "CREATE INDEX ON deliveries_by_day (subscriber_id, created_at)",
    "CREATE UNIQUE INDEX ON deliveries_by_day (subscriber_id, digest_id, day)",
    "CREATE UNIQUE INDEX ON deliveries_by_day (id, day)",
    "CREATE INDEX ON deliveries_by_day (sent_at) WHERE status = 'sent'",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=4)
    args = parser.parse_args()
    server = Postgres()
    name = "digest_bench_compaction"
    url = server.create_database(name)
    try:
        db.upgrade(url)
        engine = db.make_engine(url)
        n = args.subscribers
        with engine.begin() as conn:
            add_subscribers(conn, n)
        days = weekdays(FIRST_DAY, args.days)
        write_seconds = []
        for index, day in enumerate(days, start=1):
            began = time.monotonic()
            with engine.begin() as conn:
                write_day(conn, day, index)
            write_seconds.append(time.monotonic() - began)
        with engine.begin() as conn:
            for statement in PARTITIONED:
                conn.execute(text(statement))
            for day in days:
                part = f"deliveries_{day:%Y%m%d}"
                conn.execute(
                    text(
                        f"CREATE TABLE {part} PARTITION OF deliveries_by_day"
                        f" FOR VALUES FROM ('{day}') TO ('{day + dt.timedelta(days=1)}')"
                    )
                )
            conn.execute(
                text(
                    "INSERT INTO deliveries_by_day SELECT d.*, g.date"
                    " FROM deliveries d JOIN digests g ON g.id = d.digest_id"
                )
            )
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
            newest = conn.execute(text("SELECT max(id) FROM digests")).scalar_one()
        today = days[0] + dt.timedelta(days=2)  # retention 1: only the first day is due

        def batched() -> None:
            result = compact(db.make_session_factory(engine), today=today, retention_days=1, pause=0, vacuum=True)
            assert result.rows == n, result.line()
            out["longest_batch_ms"] = round(result.longest_batch_seconds * 1000, 1)

        def partitioned() -> None:
            part = f"deliveries_{days[0]:%Y%m%d}"
            with engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(text(f"SELECT status, count(*) FROM {part} GROUP BY status")).all()
                conn.execute(text(f"ALTER TABLE deliveries_by_day DETACH PARTITION {part} CONCURRENTLY"))
                conn.execute(text(f"DROP TABLE {part}"))

        out: dict[str, object] = {}
        delete_figures = with_writer(engine, "deliveries", newest, batched)
        print(json.dumps({"method": "batched deletes + vacuum", "rows": n, **delete_figures, **out}), flush=True)
        part_figures = with_writer(engine, "deliveries_by_day", newest, partitioned)
        print(json.dumps({"method": "detach + drop partition", "rows": n, **part_figures}), flush=True)
        reference = statistics.median(write_seconds)
        print(
            json.dumps(
                {
                    "reference": "writing one day's rows (plan, claim, record)",
                    "seconds": round(reference, 3),
                    "delete_share_of_writing": round(delete_figures["seconds"] / reference, 2),
                    "deleted_rows_per_second": round(n / delete_figures["seconds"]),
                }
            ),
            flush=True,
        )
        engine.dispose()
    finally:
        server.drop_database(name)
        server.stop()


if __name__ == "__main__":
    main()
