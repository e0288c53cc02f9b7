"""Shared fixtures: real PostgreSQL (migrated with Alembic), Redis, SMTP and a local papers API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from digest.core import db
from digest.core.models import Base
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.web.app import create_app
from tests.support.mailin import Listener
from tests.support.processes import BIN, Process, settings_env
from tests.support.servers import PapersAPI, Postgres, Redis, SMTPSink, free_port, port_open, wait_until
from tests.support.settings import make_settings
from tests.web.live import server_thread


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_url(postgres: Postgres) -> Iterator[str]:
    """A fresh database for this test session, migrated with Alembic (not create_all)."""
    name = f"digest_test_{os.getpid()}"
    url = postgres.create_database(name)
    db.upgrade(url)
    yield url
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    server = Redis()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: Redis) -> str:
    redis_server.flush()
    return redis_server.url


def _truncate(url: str) -> None:
    engine = db.make_engine(url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            names = ", ".join(t.name for t in Base.metadata.sorted_tables)
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    engine.dispose()


@pytest.fixture
def database(pg_url: str) -> str:
    """The PostgreSQL URL with every table emptied before the test.

    The code under test commits at its boundaries (and across processes), so tests start from
    empty tables rather than a rolled-back transaction.
    """
    _truncate(pg_url)
    return pg_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'digest.db'}"
    db.upgrade(url)
    return url


@pytest.fixture
def smtp() -> Iterator[SMTPSink]:
    sink = SMTPSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def papers_api() -> Iterator[PapersAPI]:
    api = PapersAPI().start()
    yield api
    api.stop()


@pytest.fixture
def settings(request: pytest.FixtureRequest, database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Settings:
    """Built per test; ``@pytest.mark.settings(name=value, ...)`` changes some for one test."""
    marker = request.node.get_closest_marker("settings")
    return make_settings(database, smtp, papers_api, **(marker.kwargs if marker else {}))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.dispose()


@pytest.fixture
def session(runtime: Runtime) -> Iterator[Session]:
    with runtime.session_factory() as s:
        yield s


@pytest.fixture
def site(database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Iterator[tuple[Runtime, str]]:
    """The web app served on a real port, its links pointing there: (runtime, base URL)."""
    port = free_port()
    runtime = Runtime(make_settings(database, smtp, papers_api, base_url=f"http://127.0.0.1:{port}"))
    with server_thread(create_app(runtime), port) as base:
        yield runtime, base
    runtime.dispose()


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
