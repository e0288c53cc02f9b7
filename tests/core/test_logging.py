"""DIGEST_LOG_FORMAT=json: one JSON object per line, carrying the ids of what a line is about."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from digest.core.logging_setup import configure_logging, log_context
from digest.core.settings import Settings
from tests.support.processes import run_cli, settings_env
from tests.support.servers import PapersAPI


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_about_a_delivery_carry_its_ids(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", logging.INFO)
    log = logging.getLogger("digest.delivery.batch")
    with log_context(digest_id=12):
        with log_context(delivery_id=345, subscriber_id=67):
            log.warning("SMTP said %s", "451 try later")
        log.info("bounce recorded", extra={"delivery_id": 346, "subscriber_id": 68})
        try:
            raise ConnectionResetError("relay hung up")
        except ConnectionResetError:
            log.exception("batch interrupted")
    log.info("outside any delivery")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    first, second, third, fourth = (json.loads(line) for line in lines)
    assert first["message"] == "SMTP said 451 try later"
    assert (first["level"], first["logger"]) == ("WARNING", "digest.delivery.batch")
    assert (first["digest_id"], first["delivery_id"], first["subscriber_id"]) == (12, 345, 67)
    assert (second["digest_id"], second["delivery_id"], second["subscriber_id"]) == (12, 346, 68)
    assert "ConnectionResetError: relay hung up" in third["exception"] and "delivery_id" not in third
    assert third["digest_id"] == 12
    assert set(fourth) == {"time", "level", "logger", "message"}
    assert fourth["time"].endswith("+00:00")


def test_the_cli_logs_json_lines(settings: Settings, papers_api: PapersAPI) -> None:
    papers_api.behaviour.faults = [503]  # one retry, which the client logs
    env = settings_env(settings, DIGEST_LOG_FORMAT="json")
    result = run_cli(["-v", "collect", "--date", "2024-10-25"], env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    retry = [r for r in records if r["logger"] == "digest.papers.source"]
    assert retry and "503" in retry[0]["message"] and retry[0]["level"] == "INFO"
