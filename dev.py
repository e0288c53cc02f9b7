#!/usr/bin/env python3
"""Set-up and the two everyday commands, needing nothing but Python 3.11+.

    python3 dev.py demo    # the main job on embedded defaults; digests land in ./outbox/
    python3 dev.py test    # the whole test suite (starts embedded PostgreSQL/Redis if needed)
    python3 dev.py lint    # ruff, mypy and the import contracts (import-linter) of pyproject.toml

Creates ./.venv and installs the project into it on first use (and again whenever
pyproject.toml changes); extra arguments go to `digest demo` or `pytest`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_env(extra: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"digest needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extra.encode()).hexdigest()
    stamp = VENV / f".installed-{extra or 'base'}"
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print("installing digest and its dependencies into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    target = f"{ROOT}[{extra}]" if extra else str(ROOT)
    subprocess.run([*pip, "--editable", target], check=True)
    stamp.write_text(wanted)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "lint"):
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "demo":
        ensure_env("")
        return subprocess.call([str(BIN / "digest"), "demo", *rest], cwd=ROOT)
    ensure_env("test")
    if command == "lint":
        checks = [
            [str(BIN / "ruff"), "check", "."],
            [str(BIN / "ruff"), "format", "--check", "."],
            [str(BIN / "lint-imports")],
            [str(BIN / "mypy")],
        ]
        # Every check runs, so one report names every problem; the exit code is the worst.
        return max(subprocess.call(check, cwd=ROOT) for check in checks)
    return subprocess.call([str(BIN / "python"), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
