"""What one ``/metrics`` scrape costs (run by hand, not in CI), against ``/healthz`` in the same run.

A PostgreSQL database of its own with a ledger of N delivery rows over ``--days`` daily
editions (N / days subscribers, mostly sent, some failed and skipped, the newest edition still
sending), bounce and complaint events at healthy rates, and Redis configured; the web app under uvicorn on
real HTTP. Prints one JSON line per N: median and p95 milliseconds per request for
``/metrics``, ``/readyz`` and ``/healthz``, and the database part of a scrape on its own.

    .venv/bin/python bench/metrics.py --ledger 100000 --ledger 1000000

Uses the machine's PostgreSQL and Redis (127.0.0.1) like the tests, in a database of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from digest.core import db  # noqa: E402
from digest.delivery.reputation import PauseRules  # noqa: E402
from digest.operations.metrics import ledger_figures  # noqa: E402
from digest.orchestration.runtime import Runtime  # noqa: E402
from digest.web.app import create_app  # noqa: E402
from tests.support.servers import Postgres, Redis, free_port  # noqa: E402
from tests.support.settings import TEST_SECRET  # noqa: E402
from tests.web.live import server_thread  # noqa: E402

RULE = PauseRules()


def load(url: str, ledger: int, days: int) -> None:
    """Subscribers, editions, deliveries and events with COPY: the benchmark measures reading."""
    import psycopg

    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    people = max(1, ledger // days)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY subscribers (email, status, topics, excluded, frequency, send_hour, timezone, weekday,"
            " source, soft_bounce_score, created_at, updated_at) FROM STDIN"
        ) as copy:
            for i in range(people):
                status = "active" if i % 20 else rng.choice(["pending", "unsubscribed", "bounced"])
                copy.write_row((f"r{i}@example.org", status, "", "", "daily", 8, "UTC", 0, "import", 0, now, now))
        editions = []
        for back in range(days - 1, -1, -1):
            day = (now - dt.timedelta(days=back)).date()
            cur.execute(
                "INSERT INTO digests (kind, date, created_at) VALUES ('daily', %s, %s) RETURNING id", (day, now)
            )
            row = cur.fetchone()
            assert row is not None
            editions.append((row[0], back))
        with cur.copy(
            "COPY deliveries (digest_id, subscriber_id, recipient, status, attempts, message_id, created_at,"
            " updated_at, sent_at, next_attempt_at) FROM STDIN"
        ) as copy:
            for digest_id, back in editions:
                planned = now - dt.timedelta(days=back, hours=1)
                for i in range(people):
                    roll = rng.random()
                    if back == 0 and roll < 0.3:  # today's edition is still going out
                        status, sent = "pending", None
                    elif roll < 0.02:
                        status, sent = "failed", None
                    elif roll < 0.05:
                        status, sent = "skipped", None
                    else:
                        status, sent = "sent", planned + dt.timedelta(seconds=i * 3600 / people)
                    copy.write_row(
                        (
                            digest_id,
                            i + 1,
                            f"r{i}@example.org",
                            status,
                            1,
                            f"<{digest_id}.{i}@bench>",
                            planned,
                            planned,
                            sent,
                            None,
                        )
                    )
        # Per delivery: 1 % bounce reports, 0.02 % complaints (a healthy list; the pause check
        # counts sent mail only up to complaints / threshold, so more complaints cost more).
        with cur.copy("COPY subscriber_events (subscriber_id, kind, detail, created_at) FROM STDIN") as copy:
            for kind, share in (("hard_bounce", 0.003), ("soft_bounce", 0.007), ("complaint", 0.0002)):
                for _ in range(int(ledger * share)):
                    at = now - dt.timedelta(hours=rng.uniform(0, 24 * days))
                    copy.write_row((rng.randint(1, people), kind, "", at))
        cur.execute(
            "INSERT INTO papers (id, title, abstract, authors, upvotes, num_comments, ai_keywords,"
            " daily_date, fetched_at) VALUES ('2604.00001', 't', '', '[]', 0, 0, '[]', %s, %s)",
            (now.date(), now),
        )
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")


def timed(call: object, repeat: int) -> tuple[float, float]:
    """Median and p95 in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def run(ledger: int, days: int, repeat: int, postgres: Postgres, redis_url: str) -> dict[str, object]:
    from digest.core.models import utcnow
    from digest.core.settings import Settings

    name = f"digest_bench_metrics_{ledger}"
    url = postgres.create_database(name)
    try:
        db.upgrade(url)
        started = time.perf_counter()
        load(url, ledger, days)
        loading = time.perf_counter() - started
        settings = Settings(
            _env_file=None,
            environment="test",
            database_url=url,
            redis_url=redis_url,
            secret_key=TEST_SECRET,
        )
        runtime = Runtime(settings)
        try:

            def figures() -> None:
                with runtime.session_factory() as session:  # a session per scrape, as the collector
                    ledger_figures(session, utcnow(), RULE)

            figures()  # warm the pool and the buffers
            query = timed(figures, repeat)
            with server_thread(create_app(runtime), free_port()) as base, httpx.Client(base_url=base) as client:
                client.get("/metrics").raise_for_status()
                metrics = timed(lambda: client.get("/metrics").raise_for_status(), repeat)
                readyz = timed(lambda: client.get("/readyz").raise_for_status(), repeat)
                healthz = timed(lambda: client.get("/healthz").raise_for_status(), repeat)
                page = client.get("/metrics").text
        finally:
            runtime.dispose()
    finally:
        postgres.drop_database(name)
    sent_line = next(line for line in page.splitlines() if line.startswith('digest_deliveries{status="sent"}'))
    return {
        "ledger_rows": ledger,
        "editions": days,
        "load_s": round(loading, 1),
        "metrics_ms_median_p95": [round(v, 2) for v in metrics],
        "ledger_queries_ms_median_p95": [round(v, 2) for v in query],
        "readyz_ms_median_p95": [round(v, 2) for v in readyz],
        "healthz_ms_median_p95": [round(v, 2) for v in healthz],
        "metrics_over_healthz": round(metrics[0] / healthz[0], 1),
        "sample": sent_line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", type=int, action="append", help="delivery rows (repeatable); default 100000")
    parser.add_argument("--days", type=int, default=10, help="daily editions the rows spread over")
    parser.add_argument("--repeat", type=int, default=50, help="requests per endpoint")
    args = parser.parse_args()
    postgres, redis_server = Postgres(), Redis()
    try:
        for ledger in args.ledger or [100_000]:
            print(json.dumps(run(ledger, args.days, args.repeat, postgres, redis_server.url)), flush=True)
    finally:
        redis_server.close()
        postgres.stop()


if __name__ == "__main__":
    main()
