"""The `digest` command as an operator meets it, run as the real command.

Start-up and help, a one-line failure for every broken dependency (unmigrated database,
PostgreSQL, Redis or the SMTP server away), `subscribers list` and the export/import round
trip, and `preview` of a day that was delivered.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlalchemy import update

from digest import __version__ as digest_version
from digest import cli
from digest.core.db import transaction
from digest.core.models import Frequency, Subscriber, SubscriberStatus, utcnow
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.subscribers import importing, subscriptions
from tests.support.inbox import only_mail_to
from tests.support.processes import digest_env, settings_env
from tests.support.rows import snapshot, subscriber
from tests.support.servers import SMTPSink, free_port
from tests.web.test_cli_subscribers import digest

PAPER_LINK = re.compile(r"huggingface\.co/papers/([0-9.]+)")
HEAVY = ("sqlalchemy", "pydantic", "jinja2", "numpy", "onnxruntime", "httpx", "aiosmtplib", "redis")


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("digest")), *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_help_and_version_load_nothing_heavy_and_cut_nothing(tmp_path: Path) -> None:
    env = digest_env()
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, digest.cli; print([m for m in {HEAVY!r} if m in sys.modules])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
    version = run(env, tmp_path, "--version")
    assert (version.returncode, version.stdout) == (0, f"digest {digest_version}\n")
    shown = run(env, tmp_path, "--help")
    assert shown.returncode == 0, shown.stderr
    words = " ".join(shown.stdout.split())
    assert "The web app (subscribe, confirm, preferences, unsubscribe, JSON API) under uvicorn." in words
    assert "..." not in shown.stdout.split("Commands:")[1]
    nested = " ".join(run(env, tmp_path, "subscribers", "--help").stdout.split())
    assert "List subscribers, tab-separated under a header: email, status, schedule, topics." in nested


def test_the_choices_written_out_for_a_fast_help_are_the_models() -> None:
    assert tuple(s.value for s in SubscriberStatus) == cli.STATUSES
    assert cli.WEEKDAYS == importing.WEEKDAYS
    # monthly is not (yet) a frequency of the model: only what it accepts is offered.
    assert set(importing.FREQUENCIES) == {f.value for f in Frequency} - {"paused"}


UNMIGRATED = [
    ["status"],
    ["status", "--check"],
    ["subscribers", "list"],
    ["subscribers", "export"],
    ["subscribers", "add", "--confirmed", "ada@example.org"],
    ["subscribers", "delete", "ada@example.org"],
    ["sending", "pause", "testing"],
    ["compact", "--dry-run"],
    ["preview", "ada@example.org", "--date", "2024-10-25"],
]
POSTGRES_DOWN = [["status"], ["status", "--check"], ["subscribers", "list"], ["db", "upgrade"], ["compact"]]


def one_line_failure(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr, done.stderr


@pytest.mark.parametrize("args", UNMIGRATED, ids=" ".join)
def test_an_unmigrated_database_says_run_db_upgrade(args: list[str], tmp_path: Path) -> None:
    env = digest_env(database_url=f"sqlite:///{tmp_path / 'empty.db'}", smtp_port=free_port())
    one_line_failure(run(env, tmp_path, *args), "run `digest db upgrade`")


@pytest.mark.parametrize("args", POSTGRES_DOWN, ids=" ".join)
def test_postgresql_away_is_one_line(args: list[str], tmp_path: Path) -> None:
    env = digest_env(database_url=f"postgresql://root@127.0.0.1:{free_port()}/test")
    one_line_failure(run(env, tmp_path, *args), "error: database: connection failed")


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["status", "--check"], "Redis is not reachable"), (["run", "--date", "2024-10-25", "--sample"], "Redis")],
    ids=["status --check", "run"],
)
def test_redis_away_is_one_line(args: list[str], expected: str, sqlite_url: str, tmp_path: Path) -> None:
    env = digest_env(database_url=sqlite_url, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    one_line_failure(run(env, tmp_path, *args), expected)


def test_add_with_the_mail_server_away_stores_nothing_and_says_how_to_retry(
    settings: Settings, runtime: Runtime, smtp: SMTPSink, tmp_path: Path
) -> None:
    away = settings_env(settings, DIGEST_SMTP_PORT=str(free_port()))
    failed = run(away, tmp_path, "subscribers", "add", "ada@example.org", "--topics", "diffusion")
    one_line_failure(failed, "the confirmation could not be sent")
    assert "run the same command again" in failed.stderr
    assert subscriber(runtime, "ada@example.org") is None  # not pending with nothing sent
    again = run(settings_env(settings), tmp_path, "subscribers", "add", "ada@example.org", "--topics", "diffusion")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "ada@example.org: pending; confirmation sent\n"
    only_mail_to(smtp, "ada@example.org")


def test_list_has_a_header_and_the_schedule_and_shows_escapes_inert(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    added = digest(
        settings,
        tmp_path,
        *("subscribers", "add", "ada@example.org", "--confirmed", "--frequency", "weekly", "--weekday", "fri"),
        *("--timezone", "Asia/Kolkata", "--hour", "7", "--topics", "diffusion"),
    )
    assert added.returncode == 0, added.stderr
    ada = subscriber(runtime, "ada@example.org")
    assert ada is not None and (ada.frequency, ada.weekday) == (Frequency.WEEKLY, 4)
    bad_day = digest(settings, tmp_path, "subscribers", "add", "bob@example.org", "--weekday", "someday")
    assert bad_day.returncode == 2 and subscriber(runtime, "bob@example.org") is None
    # Text stored before input was cleaned (or by any other way in) must not drive the terminal.
    with transaction(runtime.session_factory) as session:
        session.execute(update(Subscriber).values(topics="\x1b]0;owned\x07\x1b[2Jdiffusion"))
    listed = digest(settings, tmp_path, "subscribers", "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split("\t") == ["email", "status", "frequency", "weekday", "timezone", "hour", "topics"]
    assert row.split("\t") == [
        "ada@example.org",
        "active",
        "weekly",
        "fri",
        "Asia/Kolkata",
        "07:00",
        "\\x1b]0;owned\\x07\\x1b[2Jdiffusion",
    ]
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout


def test_export_then_import_changes_nothing(settings: Settings, runtime: Runtime, tmp_path: Path) -> None:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        ada = subscriptions.add_confirmed(session, runtime.tokens, "ada@example.org", now=now, topics="diffusion")
        importing.apply_fields(
            session, ada, importing.parse_fields("diffusion", "crypto", "weekly", "Asia/Kathmandu", 6, "sun")
        )
        subscriptions.add_confirmed(session, runtime.tokens, "bob@example.org", now=now, topics="=formula, agents")
        left = subscriptions.add_confirmed(session, runtime.tokens, "left@example.org", now=now)
        subscriptions.unsubscribe(session, left, now=now)
        subscriptions.subscribe(session, runtime.tokens, "pending@example.org", now=now, source="cli")
    before = snapshot(runtime)
    target = tmp_path / "all.csv"
    exported = digest(settings, tmp_path, "subscribers", "export", str(target))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert list(rows[0]) == list(importing.EXPORT_COLUMNS)
    assert {k: rows[0][k] for k in ("exclude", "frequency", "timezone", "hour", "weekday")} == {
        "exclude": "crypto",
        "frequency": "weekly",
        "timezone": "Asia/Kathmandu",
        "hour": "6",
        "weekday": "sun",
    }
    imported = digest(settings, tmp_path, "subscribers", "import", str(target))
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 subscribers; 0 rows refused" in imported.stdout
    assert "0 new, 0 changed, 2 already so" in imported.stdout
    assert "2 rows whose status is not active: left as they are" in imported.stdout
    assert snapshot(runtime) == before  # the pending and the unsubscribed person stay so


def test_preview_of_a_delivered_day_is_what_the_person_got(
    settings: Settings, runtime: Runtime, smtp: SMTPSink, tmp_path: Path
) -> None:
    for address in ("ada@example.org", "bob@example.org"):
        assert digest(settings, tmp_path, "subscribers", "add", address, "--confirmed").returncode == 0
    sent = digest(settings, tmp_path, "run", "--date", "2024-10-25")
    assert sent.returncode == 0, sent.stderr
    delivered = only_mail_to(smtp, "ada@example.org")[0]
    got = PAPER_LINK.findall(delivered.get_body(preferencelist=("plain",)).get_content())  # type: ignore[union-attr]
    assert got
    for address in ("ada@example.org", "bob@example.org"):
        shown = digest(settings, tmp_path, "preview", address, "--date", "2024-10-25")
        assert shown.returncode == 0, shown.stderr
        assert "(as delivered)" in shown.stdout
    files = sorted(p.name for p in tmp_path.glob("preview-*.eml"))
    assert files == ["preview-2024-10-25-ada@example.org.eml", "preview-2024-10-25-bob@example.org.eml"]
    message = message_from_bytes((tmp_path / files[0]).read_bytes(), policy=policy.default)
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    assert PAPER_LINK.findall(body.get_content()) == got
