"""CPU per message of planning and sending, this code against a commit, in alternating rounds.

    .venv/bin/python bench/send_cpu.py [--n 5000] [--rounds 4] [--before 26aff96]

``bench/delivery.py`` measures the whole service (Celery, two worker processes, the CLI), and
on a shared machine its figures move by a quarter between neighbouring runs, more than most
changes to the send path. This one measures the send path alone, twice in each round: N active
subscribers with varied topics in PostgreSQL (a database of its own), the recorded 2026-04-16
day collected once, Postfix's ``smtp-sink`` receiving; each round empties the ledger and runs
``digest.orchestration.pipeline.run_inprocess`` (plan every page, compose, send over the SMTP
pool, record) in a fresh process, once with ``--before``'s code (taken out with ``git
archive``; the working tree is not touched) and once with this tree's. Both run with
``python -S`` and their folder first on the path, so the editable install (this tree) stays
out of the reference. The figures are the process's own CPU over the run (``getrusage``) and
PostgreSQL's (its processes, exited backends included) per message sent, and their medians;
a first round, not counted, fills the caches both use (topic vectors, bytecode).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_env, empty_ledger, keep_bytecode, postgres_cpu, run_driver, take_out  # noqa: E402
from bench.delivery import DAY, Sink, insert_subscribers  # noqa: E402
from digest.core import db  # noqa: E402
from tests.support.processes import BIN  # noqa: E402
from tests.support.servers import PapersAPI, Postgres  # noqa: E402

# The same calls in both codes: the in-process run has kept its signature.
DRIVER = """
import datetime as dt, json, resource, sys, time
from digest.core.settings import get_settings
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

runtime = Runtime(get_settings())
start, clock = cpu(), time.perf_counter()
summary = run_inprocess(runtime, dt.date.fromisoformat(sys.argv[1]))
print(json.dumps({"cpu": cpu() - start, "wall": time.perf_counter() - clock, "sent": summary.counts.get("sent", 0)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="active subscribers")
    parser.add_argument("--rounds", type=int, default=4, help="counted rounds, each code once per round")
    parser.add_argument("--before", default="26aff96", help="the commit to compare against")
    args = parser.parse_args()
    if not Path("/usr/sbin/smtp-sink").exists():
        sys.exit("needs Postfix's smtp-sink: apt-get install -y postfix")

    tmp = Path(tempfile.mkdtemp(prefix="digest-bench-send-"))
    codes = {"before": take_out(args.before, tmp / "before"), "now": ROOT}
    postgres, api, sink = Postgres(), PapersAPI().start(), Sink()
    name = f"digest_bench_send_{os.getpid()}"
    url = postgres.create_database(name)
    try:
        db.upgrade(url)
        insert_subscribers(url, args.n)
        env = bench_env(database_url=url, smtp_port=sink.port, papers_api_url=api.url, batch_size=500, smtp_pool_size=4)
        keep_bytecode(env, tmp)
        subprocess.run([str(BIN / "digest"), "collect", "--date", DAY], env=env, check=True, capture_output=True)
        per_message: dict[str, list[tuple[float, float]]] = {label: [] for label in codes}
        for round_ in range(args.rounds + 1):
            for label, folder in codes.items():
                empty_ledger(url)
                before_pg = postgres_cpu()
                run = run_driver(folder, DRIVER, [DAY], env, tmp, label)
                pg = postgres_cpu() - before_pg
                if run["sent"] != args.n:
                    raise SystemExit(f"{label}: sent {run['sent']} of {args.n}")
                if round_ == 0:
                    continue
                figures = (1000 * run["cpu"] / run["sent"], 1000 * pg / run["sent"])
                per_message[label].append(figures)
                print(
                    json.dumps(
                        {
                            "round": round_,
                            "code": label,
                            "cpu_ms_per_message": round(figures[0], 3),
                            "postgres_cpu_ms_per_message": round(figures[1], 3),
                            "wall_s": round(run["wall"], 2),
                        }
                    ),
                    flush=True,
                )
        medians = {
            label: {
                "cpu_ms_per_message": round(statistics.median(c for c, _ in rows), 3),
                "postgres_cpu_ms_per_message": round(statistics.median(p for _, p in rows), 3),
            }
            for label, rows in per_message.items()
        }
        print(json.dumps({"n": args.n, "before": args.before, "medians": medians}), flush=True)
    finally:
        sink.stop()
        api.stop()
        postgres.drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
