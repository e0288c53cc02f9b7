"""Start-up time of the ``digest`` command, with the reference measured in the same run.

    .venv/bin/python bench/cli_startup.py [--runs 9] [--before 496dc42]

Times (median of ``--runs``, wall clock of the whole process) ``digest --help``,
``digest --version`` and ``digest status`` on an empty, migrated SQLite database, run as an
operator runs them: the installed ``digest`` script. The references, in the same run:
``python -c pass`` (the interpreter's own start), and the code of commit ``--before`` (taken
out with ``git archive`` into a temporary folder; the working tree is not touched) doing the
same commands and ``import digest.cli``. That code runs with ``python -S`` and its folder first
on ``PYTHONPATH``, so the editable install's finder (which points at this tree) stays out; the
current code's ``import digest.cli`` is measured the same way, so those two compare like for
like. The target (issue 20): ``--help`` and ``status`` under 0.3 s on this machine.

Each figure is the wall time and, in brackets, the CPU time (user + system) of the process. Both
codes run with compiled bytecode kept (in a private ``PYTHONPYCACHEPREFIX``; a first run fills
it), as an installed wheel has it: where ``PYTHONDONTWRITEBYTECODE`` is set, every run would
otherwise compile the project's modules again, which costs more than importing them.
"""

from __future__ import annotations

import argparse
import os
import resource
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import take_out  # noqa: E402

DIGEST = Path(sys.executable).with_name("digest")
FLOOR = "import sqlalchemy.orm, pydantic_settings"
RUN_MAIN = "import sys; from digest.cli import main; sys.argv[0] = 'digest'; main()"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median_seconds(command: list[str], env: dict[str, str], runs: int, cwd: Path) -> str:
    """``wall (cpu)``: medians over ``runs``, after one run that fills the bytecode cache."""
    walls, cpus = [], []
    for run in range(runs + 1):
        started, cpu = time.perf_counter(), children_cpu()
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=False)
        if run:
            walls.append(time.perf_counter() - started)
            cpus.append(children_cpu() - cpu)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return f"{statistics.median(walls):.3f} ({statistics.median(cpus):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--before", default="496dc42", help="the commit to compare against")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        before = take_out(args.before, tmp / "before", names=("digest", "alembic"))

        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGEST_") and k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "bytecode")
        env["DIGEST_DATABASE_URL"] = f"sqlite:///{tmp / 'empty.db'}"
        subprocess.run([str(DIGEST), "db", "upgrade"], env=env, cwd=tmp, capture_output=True, check=True)
        packages = os.pathsep.join(site.getsitepackages())
        old_env = {**env, "PYTHONPATH": f"{before}{os.pathsep}{packages}"}
        new_env = {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{packages}"}
        python = [sys.executable, "-S"]

        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], env, None),
            ("import digest.cli", [*python, "-c", "import digest.cli"], new_env, old_env),
            ("digest --help", [str(DIGEST), "--help"], env, [*python, "-c", RUN_MAIN, "--help"]),
            ("digest --version", [str(DIGEST), "--version"], env, None),
            ("digest status (empty DB)", [str(DIGEST), "status"], env, [*python, "-c", RUN_MAIN, "status"]),
            # What any command that reads the database must load: the floor under `status`.
            ("import sqlalchemy.orm, pydantic_settings", [sys.executable, "-c", FLOOR], env, None),
        ]
        print(f"median of {args.runs} runs, seconds: wall (CPU); before = {args.before} (git archive)")
        print(f"{'command':40} {'now':>15} {'before':>15}")
        for name, command, now_env, reference in rows:
            now = median_seconds(command, now_env, args.runs, tmp)
            then = ""
            if isinstance(reference, dict):
                then = median_seconds(command, reference, args.runs, tmp)
            elif isinstance(reference, list):
                then = median_seconds(reference, old_env, args.runs, tmp)
            elif name == "digest --version":
                then = "n/a"  # the command had no --version
            print(f"{name:40} {now:>15} {then:>15}")


if __name__ == "__main__":
    main()
