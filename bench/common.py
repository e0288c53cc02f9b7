"""What the benches that run the project against PostgreSQL share: the settings of a bench run,
a commit's code taken out to compare against, the ledger emptied between rounds, CPU counters."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import text

from digest.core import db
from tests.support.processes import digest_env

ROOT = Path(__file__).resolve().parents[1]

# The list's identity in every bench run (nothing is sent outside the machine).
LIST_SETTINGS: dict[str, Any] = {
    "environment": "test",
    "secret_key": "bench-secret-key-0123456789abcdef0123",
    "base_url": "https://papers.example.org",
    "mail_from": "Daily Papers <papers@example.org>",
    "inbound_address": "papers@example.org",
}


def bench_env(**settings: Any) -> dict[str, str]:
    """``digest_env`` with the list's identity; ``settings`` add to it or override it."""
    return digest_env(**{**LIST_SETTINGS, **settings})


def keep_bytecode(env: dict[str, str] | os._Environ[str], tmp: Path) -> None:
    """Processes run with their modules' bytecode kept, as an installed wheel has it: where
    PYTHONDONTWRITEBYTECODE is set, every worker and command would compile the project's
    modules at each start (~0.2 s inside a measured run). The first run fills the cache."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "bytecode")


def take_out(commit: str, into: Path, names: tuple[str, ...] = ("digest", "alembic", "email_templates")) -> Path:
    """``commit``'s package, migrations and templates (whichever of ``names`` it has) in a
    folder of their own; the working tree is not touched."""
    present = subprocess.run(
        ["git", "ls-tree", "--name-only", commit], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = [name for name in names if name in present]
    archive = subprocess.run(["git", "archive", commit, *wanted], cwd=ROOT, capture_output=True, check=True)
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def empty_ledger(url: str) -> None:
    """No delivery rows or events, and fresh statistics, so that each round plans from nothing."""
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE deliveries, subscriber_events"))
        conn.execute(text("ANALYZE deliveries"))
    engine.dispose()


def postgres_cpu() -> float:
    """CPU of PostgreSQL's processes so far, backends that have exited included (the server
    process counts its reaped children's time): a run's connections end with it."""
    total = 0.0
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.info["name"] in ("postgres", "postmaster") and times is not None:
            total += times.user + times.system + times.children_user + times.children_system
    return total


def run_driver(folder: Path, driver: str, args: list[str], env: Any, cwd: Path, label: str) -> dict[str, Any]:
    """Run ``driver`` (a script's text) with the code in ``folder`` and return the JSON object of
    its last output line. ``-S`` and the site-packages on the path: the editable install's
    finder (this tree) stays out, so a commit taken out runs its own code."""
    path = os.pathsep.join([str(folder), *site.getsitepackages()])
    done = subprocess.run(
        [sys.executable, "-S", "-c", driver, *args],
        env={**env, "PYTHONPATH": path},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{label}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
