"""Issue 21's cost condition: bench/ranking.py now against the code of ``--before``, same run.

    .venv/bin/python bench/ranking_before.py [--before 48313dc] [--pairs 2] [subscribers]

The condition: the shipped time now (one reader in five taught) within 1.5x of the shipped time
of the code when the issue was filed (48313dc, the last commit before the issue-21 work, run by
its own bench/ranking.py: one reader in twenty taught). That commit's ``digest`` and ``bench``
are taken out with ``git archive`` into a temporary folder (the working tree is not touched)
and run with ``python -S`` and that folder first on ``PYTHONPATH``, so the editable install's
finder stays out, as bench/cli_startup.py does; the current code runs the same way from this
tree. Each code runs its own bench in a process of its own, in turns (now, before, now, ...),
``--pairs`` times; each bench already takes its best of 3 rounds, and the figures compared are
the best over the pairs. Only the timed configurations run: the per-subscriber reference
(``REFERENCE_SAMPLE``) is cut to 10 subscribers, as it does not enter the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 1.5
# Loads a bench as a module (not __main__), cuts its reference sample, runs its main().
RUN_BENCH = (
    "import importlib.util, sys; path = sys.argv[1]; sys.argv = [path, *sys.argv[2:]]; "
    "spec = importlib.util.spec_from_file_location('ranking_bench', path); "
    "bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench); "
    "bench.REFERENCE_SAMPLE = 10; bench.main()"
)


def run(folder: Path, count: int) -> dict[str, float]:
    """One bench run of the code in ``folder``: its JSON line, and the lines it printed."""
    packages = os.pathsep.join(site.getsitepackages())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGEST_")}
    env["PYTHONPATH"] = f"{folder}{os.pathsep}{packages}"
    command = [sys.executable, "-S", "-c", RUN_BENCH, str(folder / "bench" / "ranking.py"), str(count)]
    done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{folder}: bench/ranking.py failed: {done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    for line in lines[:-1]:
        if "CPU" in line or "taught" in line:
            print(f"    {line}")
    found: dict[str, float] = json.loads(lines[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="48313dc", help="the commit to compare against")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("subscribers", type=int, nargs="?", default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        # The package, its benches and, where the commit has them there, the migrations and the
        # e-mail templates (later commits' database and rendering modules look for them at import).
        tree = subprocess.run(
            ["git", "ls-tree", "--name-only", args.before], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        paths = ["digest", "bench", *(name for name in ("alembic", "email_templates") if name in tree)]
        archive = subprocess.run(["git", "archive", args.before, *paths], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        results: dict[str, list[dict[str, float]]] = {"now": [], "before": []}
        for pair in range(1, args.pairs + 1):
            for name, folder in (("now", ROOT), ("before", before)):
                print(f"pair {pair}, {name}:", flush=True)
                results[name].append(run(folder, args.subscribers))
    now = min(results["now"], key=lambda r: r["shipped_cpu_seconds"])
    then = min(results["before"], key=lambda r: r["shipped_cpu_seconds"])
    ratio = now["shipped_cpu_seconds"] / then["shipped_cpu_seconds"]
    print(
        f"shipped CPU seconds, best of {args.pairs} runs each taken in turns: "
        f"now {now['shipped_cpu_seconds']:.2f} ({now['readers_who_taught']} taught), "
        f"{args.before} {then['shipped_cpu_seconds']:.2f} ({then['readers_who_taught']} taught); "
        f"ratio {ratio:.3f} (budget {BUDGET}: {'met' if ratio <= BUDGET else 'not met'})"
    )
    for name, found in results.items():
        print(f"  {name}, every run: " + ", ".join(f"{r['shipped_cpu_seconds']:.2f}" for r in found))
    print(
        json.dumps(
            {
                "bench": "ranking_before",
                "before": args.before,
                "subscribers": args.subscribers,
                "now_shipped_cpu_seconds": now["shipped_cpu_seconds"],
                "before_shipped_cpu_seconds": then["shipped_cpu_seconds"],
                "now_lexical_cpu_seconds": now["lexical_only_cpu_seconds"],
                "before_lexical_cpu_seconds": then["lexical_only_cpu_seconds"],
                "ratio": round(ratio, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
