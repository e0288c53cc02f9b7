"""Planning benchmark (run by hand, not in CI): subscribers planned per second by 1, 2 and 4
planner processes, against the single-task planning of before, in the same run.

N active subscribers with varied topics in PostgreSQL (a database of its own) and the recorded
2026-04-16 edition. Each configuration starts from an empty ledger:

* ``before``: the single-task planning as it was before sharding (``digest.pipeline.dispatch``
  of commit f9d5888, run with that commit's own code, taken out with ``git archive``), one
  process walking and planning every page;
* ``P processes``: this process hands the pages out (``digest.orchestration.pipeline.dispatch_edition``
  with a ``Handout`` that queues them) to P spawned processes, each calling
  ``digest.orchestration.pipeline.plan_page`` in its own transaction with its own cached
  composer, as a ``digest.plan_page`` task does.

No Celery and no SMTP: the figure is planning alone (a Celery task adds one Redis round trip
per page of 500), and sending does not compete for the cores. CPU is the planners' own (user +
system, from ``getrusage``), and PostgreSQL's (its processes' CPU over the run).

    .venv/bin/python bench/planning.py                 # 100 000 subscribers
    .venv/bin/python bench/planning.py --n 20000 --processes 1 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.common import bench_env, empty_ledger, postgres_cpu, run_driver, take_out  # noqa: E402
from bench.delivery import DAY, insert_subscribers  # noqa: E402
from digest.core import db  # noqa: E402
from tests.support.processes import BIN  # noqa: E402
from tests.support.servers import PapersAPI, Postgres  # noqa: E402

# The last commit with one task planning a whole edition.
BEFORE = "f9d5888"
PAGE_SIZE = 500


# Run with that commit's own ``digest`` package (taken out with ``git archive``) first on the
# path: its single-task ``dispatch`` over its own ledger, composer and runtime.
BEFORE_DRIVER = """
import json, resource, sys, time
from digest.models import utcnow
from digest.pipeline import composer_of, dispatch
from digest.runtime import Runtime
from digest.settings import get_settings

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

runtime = Runtime(get_settings())
digest_id, page_size = int(sys.argv[1]), int(sys.argv[2])
composer = composer_of(runtime, digest_id, {})  # warm before the clock starts
start, clock = cpu(), time.perf_counter()
dispatch(runtime.session_factory, digest_id, now=utcnow(), page_size=page_size,
         stale_after=runtime.policy.stale_after, message_domain=runtime.message_domain,
         composer=composer, enqueue=lambda ids: None)
print(json.dumps({"seconds": time.perf_counter() - clock, "cpu": cpu() - start}))
"""


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def planner(digest_id: int, pages: Any, results: Any) -> None:
    """One planner process: pages from the queue until ``None``, each its own transaction."""
    from digest.core.db import transaction
    from digest.core.settings import get_settings
    from digest.orchestration import pipeline
    from digest.orchestration.runtime import Runtime

    runtime = Runtime(get_settings())
    composers: dict[int, Any] = {}
    # Started and warm before the clock starts, as a Celery worker is when an hour begins.
    pipeline.composer_of(runtime, digest_id, composers)
    results.put("ready")
    planned = 0
    start = own_cpu()
    while (page := pages.get()) is not None:
        composer = pipeline.composer_of(runtime, digest_id, composers)
        with transaction(runtime.session_factory) as session:
            planned += len(
                pipeline.plan_page(session, digest_id, page, composer=composer, message_domain=runtime.message_domain)
            )
    results.put((planned, own_cpu() - start))


def run_before(digest_id: int, tmp: Path) -> tuple[float, float]:
    """The single task of ``BEFORE``, in a process of its own running that commit's code."""
    before = tmp / "before"
    if not before.exists():
        take_out(BEFORE, before)
    figures = run_driver(
        before, BEFORE_DRIVER, [str(digest_id), str(PAGE_SIZE)], os.environ, tmp, f"the {BEFORE} planning"
    )
    return float(figures["seconds"]), float(figures["cpu"])


def run_sharded(runtime: Any, digest_id: int, now: dt.datetime, processes: int) -> tuple[float, float]:
    """Seconds from the first page handed out to the last planned, and the planners' CPU."""
    from digest.orchestration import pipeline

    context = mp.get_context("spawn")  # fresh processes, as Celery's pool children are
    pages, results = context.Queue(), context.Queue()
    children = [context.Process(target=planner, args=(digest_id, pages, results)) for _ in range(processes)]
    for child in children:
        child.start()
    for _ in children:
        assert results.get() == "ready"

    class ToPlanners(pipeline.Handout):
        """Each page into the planners' queue; sending is not measured."""

        def plan(self, digest_id: int, page: pipeline.Page) -> None:
            pages.put(page)

        def send(self, digest_id: int, subscriber_ids: list[int]) -> None:
            pass

    start = time.perf_counter()
    pipeline.dispatch_edition(runtime, digest_id, ToPlanners(), now=now, page_size=PAGE_SIZE)
    for _ in children:
        pages.put(None)
    outcome = [results.get() for _ in children]
    for child in children:
        child.join()
    return time.perf_counter() - start, sum(cpu for _, cpu in outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="active subscribers")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-before", action="store_true", help="skip the single-task reference")
    args = parser.parse_args()

    postgres, api = Postgres(), PapersAPI().start()
    tmp = Path(tempfile.mkdtemp(prefix="digest-bench-planning-"))
    name = f"digest_bench_planning_{os.getpid()}"
    url = postgres.create_database(name)
    try:
        db.upgrade(url)
        insert_subscribers(url, args.n)
        env = bench_env(database_url=url, papers_api_url=api.url, batch_size=PAGE_SIZE)
        subprocess.run([str(BIN / "digest"), "collect", "--date", DAY], env=env, check=True, capture_output=True)
        os.environ.clear()
        os.environ.update(env)  # the spawned planners read the same settings

        from digest.core.models import Digest, utcnow
        from digest.core.settings import get_settings
        from digest.orchestration.runtime import Runtime

        runtime = Runtime(get_settings())
        with runtime.session_factory() as session:
            digest_id = session.query(Digest.id).filter(Digest.date == dt.date.fromisoformat(DAY)).scalar()
        configurations: list[tuple[str, int]] = [] if args.no_before else [("before", 1)]
        configurations += [(f"{p} processes", p) for p in args.processes]
        figures: dict[str, dict[str, float]] = {}
        for label, processes in configurations:
            empty_ledger(url)
            now = utcnow()
            pg_before = postgres_cpu()
            if label == "before":
                wall, cpu = run_before(digest_id, tmp)
            else:
                wall, cpu = run_sharded(runtime, digest_id, now, processes)
            pg = postgres_cpu() - pg_before  # includes the planners' start-up: a little high
            with runtime.session_factory() as session:
                rows = session.scalar(text("SELECT count(*) FROM deliveries"))
            assert rows == args.n, f"{label}: {rows} rows for {args.n} subscribers"
            figures[label] = {
                "processes": processes,
                "seconds": round(wall, 2),
                "per_second": round(args.n / wall),
                "planner_cpu_ms_per_subscriber": round(1000 * cpu / args.n, 3),
                "postgres_cpu_ms_per_subscriber": round(1000 * pg / args.n, 3),
            }
            print(json.dumps({"n": args.n, "configuration": label, **figures[label]}), flush=True)
        one = figures.get("1 processes")
        if one is not None:
            ratios = {label: round(f["per_second"] / one["per_second"], 2) for label, f in figures.items()}
            print(json.dumps({"n": args.n, "ratio_to_one_process": ratios}), flush=True)
        runtime.dispose()
    finally:
        api.stop()
        postgres.drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
