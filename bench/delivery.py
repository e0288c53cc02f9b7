"""Delivery benchmark (run by hand, not in CI): personalised digests per second end to end.

N active subscribers with varied topics in PostgreSQL, the 2026-04-16 digest from the recorded
data, Celery worker processes on Redis, and Postfix's ``smtp-sink`` as the receiving server.
In the same run it measures the ceiling: Postfix's ``smtp-source`` sending messages of the same
size over 8 sessions to the same sink. Prints one JSON line per N.

    apt-get install -y postfix        # for smtp-sink / smtp-source; the daemon is not started
    .venv/bin/python bench/delivery.py --n 10000 --n 100000
    .venv/bin/python bench/delivery.py --n 10000 --dkim    # every digest DKIM-signed
    .venv/bin/python bench/delivery.py --n 20000 --taught 0.05   # one reader in 20 taught it

Uses the machine's PostgreSQL and Redis (127.0.0.1) like the tests, in a database of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.common import bench_env, keep_bytecode  # noqa: E402
from digest.core import db  # noqa: E402
from tests.support.processes import BIN, Process, procfile_command  # noqa: E402
from tests.support.servers import PapersAPI, Postgres, free_port, port_open  # noqa: E402

DAY = "2026-04-16"
TOPIC_POOL = [
    "",
    "",
    "",
    "diffusion",
    "video generation",
    "reinforcement learning",
    "LLM agents",
    "reasoning",
    "multimodal",
    "robotics",
    "speech",
    "benchmark",
    "efficient inference",
    "diffusion, video generation",
    "agents, reasoning",
    "vision language models",
]
EXCLUDED_POOL = ["", "", "", "", "robot", "survey", "medical"]


def insert_subscribers(url: str, n: int) -> None:
    """Bulk-load with COPY: the benchmark measures sending, not loading."""
    import psycopg

    rng = random.Random(42)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY subscribers (email, status, topics, excluded, frequency, send_hour, timezone, weekday,"
            " source, soft_bounce_score, created_at, updated_at, confirmed_at) FROM STDIN"
        ) as copy:
            for i in range(n):
                copy.write_row(
                    (
                        f"reader{i}@example{i % 50}.org",
                        "active",
                        rng.choice(TOPIC_POOL),
                        rng.choice(EXCLUDED_POOL),
                        "daily",
                        8,
                        "UTC",
                        0,
                        "bench",
                        0.0,
                        "2026-01-01T00:00:00Z",
                        "2026-01-01T00:00:00Z",
                        "2026-01-01T00:00:00Z",
                    )
                )
        conn.commit()
        # A list that has been running has planner statistics (autovacuum, or the ANALYZE that
        # `digest subscribers import` ends with); a freshly copied table has none, and without
        # them the dispatcher's keyset page took 0.47 s at a million rows instead of ~1 ms.
        # (This machine's PostgreSQL runs with autovacuum off.)
        cur.execute("ANALYZE subscribers")
        conn.commit()


def insert_readers(url: str, n: int, fraction: float) -> int:
    """Make ``fraction`` of the subscribers readers who taught it, as bench/ranking.py does:
    3-17 liked papers and 0-7 disliked (vectors of recorded papers' titles, made with the
    shipped model), 30 % following an organisation. Returns how many."""
    import numpy as np
    import psycopg

    from digest.papers.embedding import load_embedder, to_blob
    from digest.papers.source import SAMPLE_DATES, load_sample

    titles = [item["paper"]["title"] for day in SAMPLE_DATES for item in load_sample(day) or []]
    embedder = load_embedder()
    vectors = embedder.embed(titles)
    rng = np.random.default_rng(7)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    count = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY reader_profiles (subscriber_id, follows, model, liked, liked_titles, disliked, updated_at) FROM STDIN"
        ) as copy:
            for subscriber_id in range(1, n + 1):  # a fresh table's ids
                if rng.random() >= fraction:
                    continue
                liked = rng.choice(len(titles), int(rng.integers(3, 18)), replace=False)
                disliked = rng.choice(len(titles), int(rng.integers(0, 8)), replace=False)
                copy.write_row(
                    (
                        subscriber_id,
                        json.dumps(["Qwen"] if rng.random() < 0.3 else []),
                        embedder.name,
                        to_blob(vectors[liked]),
                        json.dumps([titles[i] for i in liked]),
                        to_blob(vectors[disliked]) if len(disliked) else None,
                        "2026-01-01T00:00:00Z",
                    )
                )
                count += 1
        conn.commit()
    return count


class Sink:
    """smtp-sink on a free port (-u: as root it must drop privileges; 1000 = backlog)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["/usr/sbin/smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("smtp-sink did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def ceiling(sample: Path, count: int) -> float:
    """Messages per second smtp-source reaches against a fresh sink, 8 sessions, same size."""
    sink = Sink()
    try:
        start = time.perf_counter()
        subprocess.run(
            [
                "/usr/sbin/smtp-source",
                "-s",
                "8",
                "-m",
                str(count),
                "-F",
                str(sample),
                "-f",
                "bench@example.org",
                "-t",
                "reader@example.org",
                f"127.0.0.1:{sink.port}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return count / (time.perf_counter() - start)
    finally:
        sink.stop()


def cpu_by_program() -> dict[str, float]:
    """CPU seconds so far of the other programs sharing the machine (database, sink, broker)."""
    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        name, times = proc.info["name"], proc.info["cpu_times"]
        if times is None or name not in ("postgres", "smtp-sink", "redis-server", "digest"):
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


class PostgresMemory:
    """Peak memory of the PostgreSQL server while the run lasts, sampled every 2 s: the largest
    backend's RSS (shared buffers it touched included) and all its processes' PSS (shared pages
    divided among them, so the sum is what the server really holds)."""

    def __init__(self) -> None:
        self.max_backend_rss_mb = 0.0
        self.max_total_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(2.0):
            total = 0.0
            for proc in psutil.process_iter(["name"]):
                if proc.info["name"] != "postgres":
                    continue
                try:
                    info = proc.memory_full_info()
                except (psutil.Error, OSError):
                    continue
                self.max_backend_rss_mb = max(self.max_backend_rss_mb, info.rss / 2**20)
                total += getattr(info, "pss", info.rss) / 2**20
            self.max_total_pss_mb = max(self.max_total_pss_mb, total)

    def __enter__(self) -> PostgresMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def pool_processes(worker: Process) -> list[psutil.Process]:
    assert worker.proc is not None
    children: list[psutil.Process] = psutil.Process(worker.proc.pid).children(recursive=True)
    return children


def dkim_settings(tmp: Path) -> dict[str, str]:
    """A fresh 2048-bit key, as DIGEST_DKIM_* settings (the DNS record is not needed here)."""
    key = tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    return {"dkim_selector": "bench", "dkim_domain": "example.org", "dkim_private_key_path": str(key)}


def planning_seconds(worker_log: str) -> float | None:
    found = re.search(r"Task digest\.dispatch\[[^\]]+\] succeeded in ([0-9.]+)s", worker_log)
    return round(float(found[1]), 2) if found else None


def run_once(
    n: int,
    postgres: Postgres,
    api: PapersAPI,
    redis_url: str,
    workers: int,
    tmp: Path,
    dkim: bool = False,
    taught: float = 0.0,
) -> dict[str, object]:
    name = f"digest_bench_{os.getpid()}"
    url = postgres.create_database(name)
    db.upgrade(url)
    insert_subscribers(url, n)
    readers = insert_readers(url, n, taught) if taught else 0
    sink = Sink()
    env = bench_env(
        database_url=url,
        redis_url=redis_url,
        smtp_port=sink.port,
        papers_api_url=api.url,
        batch_size=500,
        smtp_pool_size=4,
        lease_seconds=600,
        **(dkim_settings(tmp) if dkim else {}),
    )
    subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=False, stdout=subprocess.DEVNULL)
    # The Procfile's worker line, with the process count under test (the last flag wins).
    worker = Process([*procfile_command("worker"), f"--concurrency={workers}"], env, tmp / f"worker-{n}.log").start()
    worker.wait_for_output("ready.", timeout=60)
    children = pool_processes(worker)
    cpu_before = sum(p.cpu_times().user + p.cpu_times().system for p in children)
    others_before = cpu_by_program()
    start, started_at = time.perf_counter(), time.time()
    with PostgresMemory() as pg_memory:
        run = subprocess.run([str(BIN / "digest"), "run", "--date", DAY], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ended_at = time.time()
    cpu_after = sum(p.cpu_times().user + p.cpu_times().system for p in children)
    others = {k: v - others_before.get(k, 0.0) for k, v in cpu_by_program().items()}
    peak_rss = []
    for p in children:
        with open(f"/proc/{p.pid}/status") as status:
            hwm = next(line for line in status if line.startswith("VmHWM"))
        peak_rss.append(int(hwm.split()[1]) / 1024)
    worker.stop()
    sink.stop()
    engine = db.make_engine(url)
    with engine.connect() as conn:
        # What the run asked of PostgreSQL, per message: commits, statements' row writes, and
        # how many updates were HOT (no index entries written).
        commits = conn.execute(
            text("select xact_commit from pg_stat_database where datname = current_database()")
        ).scalar_one()
        upd, hot, ins = conn.execute(
            text("select n_tup_upd, n_tup_hot_upd, n_tup_ins from pg_stat_user_tables where relname = 'deliveries'")
        ).one()
        sent = conn.execute(text("select count(*) from deliveries where status = 'sent'")).scalar_one()
        first_sent, last_sent, planned = conn.execute(
            text("select min(sent_at), max(sent_at), min(created_at) from deliveries")
        ).one()
        # What the day leaves on disk, for the capacity plan (ledger with its indexes, whole database).
        ledger_bytes, database_bytes = conn.execute(
            text("select pg_total_relation_size('deliveries'), pg_database_size(current_database())")
        ).one()
    engine.dispose()
    postgres.drop_database(name)
    if run.returncode != 0:
        raise RuntimeError(run.stderr + run.stdout)
    return {
        "n": n,
        "dkim": dkim,
        "readers_who_taught": readers,
        "sent": sent,
        "wall_s": round(wall, 2),
        "digests_per_s": round(sent / wall, 1),
        "sending_s": round((last_sent - first_sent).total_seconds(), 2),
        "send_phase_digests_per_s": round(sent / max(0.001, (last_sent - first_sent).total_seconds()), 1),
        "start_to_first_send_s": round((first_sent - planned).total_seconds(), 2),
        # Where the wall time outside the send phase goes: from `digest run` starting to the
        # first delivery row (start-up, collect, dispatch), and from the last send to its exit.
        "run_start_to_first_row_s": round(planned.timestamp() - started_at, 2),
        "last_send_to_exit_s": round(ended_at - last_sent.timestamp(), 2),
        # The dispatch task's own time: it finds the pages' bounds and queues one plan_page
        # task each; the workers plan them between sends (see bench/README.md, Sharded planning).
        "planning_s": planning_seconds(worker.output()),
        "ledger_mb": round(ledger_bytes / 2**20, 1),
        "database_mb": round(database_bytes / 2**20, 1),
        "worker_cpu_ms_per_message": round(1000 * (cpu_after - cpu_before) / max(1, sent), 3),
        "other_cpu_ms_per_message": {
            k: round(1000 * v / max(1, sent), 3) for k, v in sorted(others.items()) if v > 0.5
        },
        "peak_rss_mb_per_worker_process": [round(r, 1) for r in peak_rss],
        "postgres_peak_backend_rss_mb": round(pg_memory.max_backend_rss_mb, 1),
        "postgres_peak_total_pss_mb": round(pg_memory.max_total_pss_mb, 1),
        "postgres_per_message": {
            "commits": round(commits / max(1, sent), 3),
            "delivery_row_updates": round(upd / max(1, sent), 3),
            "of_which_hot": round(hot / max(1, sent), 3),
            "delivery_row_inserts": round(ins / max(1, sent), 3),
        },
    }


def sample_message(api: PapersAPI, postgres: Postgres, tmp: Path) -> Path:
    """One real digest of the run's shape, rendered by `digest preview`, for smtp-source."""
    name = f"digest_bench_sample_{os.getpid()}"
    url = postgres.create_database(name)
    db.upgrade(url)
    insert_subscribers(url, 1)
    env = bench_env(database_url=url, papers_api_url=api.url)
    subprocess.run([str(BIN / "digest"), "collect", "--date", DAY], env=env, check=True, capture_output=True)
    target = tmp / "sample.eml"
    subprocess.run(
        [str(BIN / "digest"), "preview", "reader0@example0.org", "--date", DAY, "-o", str(target)],
        env=env,
        check=True,
        capture_output=True,
    )
    postgres.drop_database(name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, action="append", help="subscribers (repeatable); default 10000 and 100000")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--dkim", action="store_true", help="sign every digest (DIGEST_DKIM_* with a fresh key)")
    parser.add_argument("--taught", type=float, default=0.0, help="share of readers who taught it (e.g. 0.05)")
    args = parser.parse_args()
    if not shutil.which("smtp-sink") and not Path("/usr/sbin/smtp-sink").exists():
        sys.exit("needs Postfix's smtp-sink: apt-get install -y postfix")
    tmp = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    keep_bytecode(os.environ, tmp)  # for every process it starts; the sample step fills the cache
    postgres, api = Postgres(), PapersAPI().start()
    redis_url = "redis://127.0.0.1:6379/15"
    try:
        sample = sample_message(api, postgres, tmp)
        size = sample.stat().st_size
        for n in args.n or [10_000, 100_000]:
            # The ceiling before and after the run, and their mean as the reference: on a shared
            # machine one measurement can land in a quiet or a busy minute (the same sink took
            # 1 174/s and 2 030/s ten minutes apart), which moved the ratio more than a change did.
            before = ceiling(sample, min(n, 50_000))
            result = run_once(n, postgres, api, redis_url, args.workers, tmp, dkim=args.dkim, taught=args.taught)
            after = ceiling(sample, min(n, 50_000))
            ceiling_rate = (before + after) / 2
            result.update(
                message_bytes=size,
                ceiling_smtp_source_8_sessions_per_s=round(ceiling_rate, 1),
                ceiling_before_after_per_s=[round(before, 1), round(after, 1)],
                ratio_to_ceiling=round(float(result["digests_per_s"]) / ceiling_rate, 3),  # type: ignore[arg-type]
            )
            print(json.dumps(result), flush=True)
    finally:
        api.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
