"""A year of the ledger (run by hand, not in CI): bytes per subscriber at steady state.

N daily subscribers x D weekdays. Each simulated weekday writes one edition's ledger rows the
way sending does (planned as pending with ten paper ids, a topic reason for a third of readers
and the Message-ID; claimed; recorded as sent with the server's reply), then runs the daily compaction exactly as beat
does (``digest.delivery.compaction.compact`` with its VACUUM) with ``--retention`` days. Every
``--every`` days it prints the ledger's size on disk (deliveries with their indexes, plus the
counts table) per subscriber. The reference, measured in the same run: the size per
subscriber just before compaction first removed anything, extrapolated linearly to D days,
which is what the ledger would take without compaction.

    .venv/bin/python bench/year.py                     # 10 000 x 250, retention 30
    .venv/bin/python bench/year.py --subscribers 2000 --days 60

Uses the machine's PostgreSQL (127.0.0.1) like the tests, in a database of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from digest.core import db  # noqa: E402
from digest.delivery.compaction import compact  # noqa: E402
from tests.support.servers import Postgres  # noqa: E402

FIRST_DAY = dt.date(2026, 1, 5)  # a Monday


def weekdays(first: dt.date, count: int) -> list[dt.date]:
    days: list[dt.date] = []
    day = first
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day += dt.timedelta(days=1)
    return days


def add_subscribers(conn: object, n: int) -> None:
    """``n`` active daily subscribers in one statement, on 50 domains."""
    conn.execute(  # type: ignore[attr-defined]
        text(
            "INSERT INTO subscribers (email, status, topics, excluded, frequency, send_hour, timezone,"
            " weekday, source, soft_bounce_score, created_at, updated_at, confirmed_at)"
            " SELECT 'reader' || g || '@example' || (g % 50) || '.org', 'active', '', '', 'daily', 8, 'UTC',"
            " 0, 'import', 0, now(), now(), now() FROM generate_series(1, :n) AS g"
        ),
        {"n": n},
    )


def ledger_bytes(conn: object) -> int:
    return int(
        conn.execute(  # type: ignore[attr-defined]
            text("SELECT pg_total_relation_size('deliveries') + pg_total_relation_size('delivery_counts')")
        ).scalar_one()
    )


def write_day(conn: object, day: dt.date, index: int) -> None:
    """One edition and its ledger rows, as a day's sending leaves them."""
    digest_id = conn.execute(  # type: ignore[attr-defined]
        text("INSERT INTO digests (kind, date, created_at) VALUES ('daily', :day, now()) RETURNING id"),
        {"day": day},
    ).scalar_one()
    papers = json.dumps([f"26{index % 12 + 1:02d}.{10000 + index * 10 + k}" for k in range(10)])
    reason = json.dumps({json.loads(papers)[0]: ["diffusion"]})
    conn.execute(  # type: ignore[attr-defined]
        text(
            "INSERT INTO deliveries (digest_id, subscriber_id, recipient, status, attempts, message_id,"
            " paper_ids, reasons, not_after, smtp_reply, created_at, updated_at, sent_at)"
            " SELECT :digest_id, s.id, s.email, 'pending', 0,"
            "  '<' || :day || '.daily.' || s.id || '.' || substr(md5(random()::text), 1, 12) || '@digest.example.org>',"
            "  CAST(:papers AS json), CASE WHEN s.id % 3 = 0 THEN CAST(:reason AS json) END,"
            "  CAST(:at AS timestamptz) + interval '20 hours', NULL,"
            "  CAST(:at AS timestamptz), CAST(:at AS timestamptz), NULL"
            " FROM subscribers s"
        ),
        {
            "digest_id": digest_id,
            "day": day.isoformat(),
            "papers": papers,
            "reason": reason,
            "at": dt.datetime.combine(day + dt.timedelta(days=1), dt.time(8), dt.UTC),
        },
    )
    # The claim and the record: each row's life in the real ledger leaves these row versions.
    conn.execute(  # type: ignore[attr-defined]
        text(
            "UPDATE deliveries SET status = 'sending', attempts = 1, lease_until = created_at + interval '2 minutes'"
            " WHERE digest_id = :digest_id"
        ),
        {"digest_id": digest_id},
    )
    conn.execute(  # type: ignore[attr-defined]
        text(
            "UPDATE deliveries SET status = 'sent', lease_until = NULL, sent_at = created_at + interval '30 minutes',"
            " updated_at = created_at + interval '30 minutes',"
            " smtp_reply = '250 2.0.0 Ok: queued as ' || upper(substr(md5(random()::text), 1, 10))"
            " WHERE digest_id = :digest_id"
        ),
        {"digest_id": digest_id},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=250, help="weekdays simulated")
    parser.add_argument("--retention", type=int, default=30, help="DIGEST_LEDGER_RETENTION_DAYS")
    parser.add_argument("--every", type=int, default=25, help="print the size every this many days")
    args = parser.parse_args()

    server = Postgres()
    name = "digest_bench_year"
    url = server.create_database(name)
    try:
        db.upgrade(url)
        engine = db.make_engine(url)
        factory = db.make_session_factory(engine)
        n = args.subscribers
        with engine.begin() as conn:
            add_subscribers(conn, n)
        reference: float | None = None
        compact_seconds: list[float] = []
        started = time.monotonic()
        days = weekdays(FIRST_DAY, args.days)
        for index, day in enumerate(days, start=1):
            with engine.begin() as conn:
                write_day(conn, day, index)
            today = day + dt.timedelta(days=1)
            if reference is None and (today - dt.timedelta(days=args.retention)) > days[0]:
                with engine.connect() as conn:
                    reference = ledger_bytes(conn) / n / (index - 1 if index > 1 else 1)
            began = time.monotonic()
            result = compact(factory, today=today, retention_days=args.retention, pause=0, vacuum=True)
            compact_seconds.append(time.monotonic() - began)
            if index % args.every == 0 or index == len(days):
                with engine.connect() as conn:
                    size = ledger_bytes(conn)
                    live = conn.execute(text("SELECT count(*) FROM deliveries")).scalar_one()
                print(
                    json.dumps(
                        {
                            "day": index,
                            "date": day.isoformat(),
                            "live_rows": live,
                            "ledger_bytes_per_subscriber": round(size / n),
                            "compacted_today": result.rows,
                            "compact_seconds_today": round(compact_seconds[-1], 3),
                            "longest_batch_ms": round(result.longest_batch_seconds * 1000, 1),
                        }
                    ),
                    flush=True,
                )
        with engine.connect() as conn:
            final = ledger_bytes(conn) / n
        print(
            json.dumps(
                {
                    "subscribers": n,
                    "weekdays": len(days),
                    "retention_days": args.retention,
                    "steady_bytes_per_subscriber": round(final),
                    "reference_bytes_per_subscriber_per_day": round(reference or 0),
                    "reference_without_compaction_at_end": round((reference or 0) * len(days)),
                    "compact_seconds_median": round(sorted(compact_seconds)[len(compact_seconds) // 2], 3),
                    "wall_seconds": round(time.monotonic() - started, 1),
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
