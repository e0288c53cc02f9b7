"""Mail-in fixtures: the ``digest mailin`` process, a private Dovecot, and database helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from digest.core.settings import Settings
from tests.support.mailin import (
    Dovecot,
    Listener,
    running_dovecot,
)
from tests.support.processes import BIN, Process, settings_env
from tests.support.servers import free_port, port_open, wait_until


@pytest.fixture
def listener(settings: Settings, tmp_path: Path) -> Iterator[Listener]:
    port = free_port()
    env = settings_env(
        settings,
        DIGEST_MAILIN_HOST="127.0.0.1",
        DIGEST_MAILIN_PORT=str(port),
        DIGEST_MAILIN_MAX_BYTES=str(1024 * 1024),
    )
    # cwd: an empty folder, so no stray .env file is read.
    process = Process([str(BIN / "digest"), "mailin"], env, tmp_path / "mailin.log", cwd=tmp_path).start()
    listener = Listener(process, port)
    try:
        if not wait_until(lambda: port_open("127.0.0.1", port) or not process.running, timeout=30) or not (
            process.running
        ):
            pytest.fail(f"digest mailin did not start:\n{listener.log()}")
        yield listener
    finally:
        process.stop()


# --------------------------------------------------------------------------- Dovecot


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server
