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
from tests.support.servers import PapersAPI, Postgres, Redis, SMTPSink

TEST_SECRET = "test-secret-key-0123456789abcdef0123456789"


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


def make_settings(
    database_url: str, smtp: SMTPSink, papers_api: PapersAPI | None = None, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "database_url": database_url,
        "redis_url": None,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "secret_key": TEST_SECRET,
        "base_url": "http://digest.test",
        "mail_from": "Daily Papers <papers@digest.example.org>",
        "inbound_address": "papers@digest.example.org",
        "papers_api_url": papers_api.url if papers_api else "http://127.0.0.1:9",
        "papers_api_backoff": 0.01,
        "send_retry_base_seconds": 0.05,
        "send_retry_max_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Settings:
    return make_settings(database, smtp, papers_api)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.dispose()


@pytest.fixture
def session(runtime: Runtime) -> Iterator[Session]:
    with runtime.session_factory() as s:
        yield s
