"""`digest subscribers import/export/delete`, run as the real command against PostgreSQL."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from digest.core.models import SubscriberStatus
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.subscribers.importing import EXPORT_COLUMNS
from tests.support.processes import settings_env
from tests.support.rows import subscriber


def digest(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("digest")), *args]
    env = settings_env(settings)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_import_reports_bad_rows_and_imports_the_rest(
    settings: Settings, runtime: Runtime, smtp: object, tmp_path: Path
) -> None:
    source = tmp_path / "people.csv"
    source.write_text(
        "email,topics\n"
        "ada@example.org,diffusion\n"
        "not-an-address,robotics\n"
        "\n"
        "Grace@Example.org\n"
        'alan@example.org,"' + "x" * 600 + '"\n',
        encoding="utf-8",
    )
    done = digest(settings, tmp_path, "subscribers", "import", str(source))
    assert done.returncode != 0, done.stderr  # any refused row makes the import fail visibly
    assert "imported 2 subscribers; 2 rows refused" in done.stdout
    assert "line 3:" in done.stderr and "line 6:" in done.stderr
    ada = subscriber(runtime, "ada@example.org")
    assert ada is not None and ada.status is SubscriberStatus.ACTIVE and ada.confirmed_at is not None
    assert ada.topics == "diffusion"
    assert subscriber(runtime, "grace@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]
    assert subscriber(runtime, "alan@example.org") is None
    assert smtp.messages == []  # type: ignore[attr-defined]


def test_export_then_delete(settings: Settings, runtime: Runtime, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_text("ada@example.org,diffusion\nbob@example.org\n", encoding="utf-8")
    assert digest(settings, tmp_path, "subscribers", "import", str(source)).returncode == 0

    target = tmp_path / "out.csv"
    assert digest(settings, tmp_path, "subscribers", "export", str(target)).returncode == 0
    rows = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert [(r["email"], r["topics"], r["status"]) for r in rows] == [
        ("ada@example.org", "diffusion", "active"),
        ("bob@example.org", "", "active"),
    ]
    to_stdout = digest(settings, tmp_path, "subscribers", "export")
    assert to_stdout.stdout.splitlines()[0] == ",".join(EXPORT_COLUMNS)

    gone = digest(settings, tmp_path, "subscribers", "delete", "ADA@example.org")
    assert gone.returncode == 0, gone.stderr
    assert subscriber(runtime, "ada@example.org") is None
    missing = digest(settings, tmp_path, "subscribers", "delete", "nobody@example.org")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ")
