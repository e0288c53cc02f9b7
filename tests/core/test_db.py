"""Migrations: `digest db upgrade` builds the schema the models describe, on PostgreSQL and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from digest.core import db
from digest.core.models import Base
from digest.orchestration.runtime import Runtime
from tests.support.postgres_url import fresh_database
from tests.support.processes import digest_env, run_cli
from tests.support.servers import Postgres


def assert_matches_models(url: str) -> None:
    engine = db.make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_db_upgrade_on_sqlite_creates_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run_cli(["db", "upgrade"], digest_env(database_url=url))
    assert result.returncode == 0, result.stderr
    assert "newest schema" in result.stdout
    assert_matches_models(url)
    # Running it again is a no-op, not an error.
    assert run_cli(["db", "upgrade"], digest_env(database_url=url)).returncode == 0


def test_db_upgrade_on_postgresql_creates_the_models_schema(postgres: Postgres) -> None:
    with fresh_database(postgres, "digest_migrations") as url:
        result = run_cli(["db", "upgrade"], digest_env(database_url=url))
        assert result.returncode == 0, result.stderr
        assert_matches_models(url)
        command.downgrade(db.alembic_config(url), "base")
        command.upgrade(db.alembic_config(url), "head")
        assert_matches_models(url)


def test_a_broken_database_url_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli(["db", "upgrade"], digest_env(database_url="postgresql://nobody@127.0.0.1:1/none"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error:")


def test_postgresql_connections_plan_each_statement_with_its_values(runtime: Runtime) -> None:
    """A generic plan cached while the ledger was small made claiming 2-5 s per chunk at a
    million subscribers; every connection must plan with the actual values."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SHOW plan_cache_mode")).scalar_one() == "force_custom_plan"
        conn.rollback()
    # A connection the pool hands out again (pre-ping, rollbacks) keeps the setting.
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SHOW plan_cache_mode")).scalar_one() == "force_custom_plan"


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_among_finds_exactly_the_ids_asked_for(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("database" if backend == "postgresql" else "sqlite_url")
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)
    with db.transaction(factory) as session:
        session.execute(text("CREATE TEMPORARY TABLE numbers (n bigint)"))
        session.execute(text("INSERT INTO numbers VALUES " + ", ".join(f"({n})" for n in range(1, 1001))))
        numbers = sa.table("numbers", sa.column("n", sa.BigInteger))
        asked = [3, 500, 999, 2**40, 7, 7]
        for ids in ([], [1], asked, list(range(2, 1002, 2))):
            found = set(session.scalars(sa.select(numbers.c.n).where(db.among(session, numbers.c.n, ids))))
            assert found == set(ids) & set(range(1, 1001))
        if backend == "postgresql":  # the ids are formatted into the parameter: only integers
            with pytest.raises(ValueError):
                db.among(session, numbers.c.n, ["1} OR {1"])  # type: ignore[list-item]
    engine.dispose()


def test_among_is_one_statement_text_whatever_the_count(runtime: Runtime) -> None:
    """The point of ``among`` on PostgreSQL: psycopg converts and caches one text, instead of
    a new 500-placeholder text per page."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    texts: list[str] = []
    sa.event.listen(runtime.engine, "before_cursor_execute", lambda *args: texts.append(args[2]))
    numbers = sa.table("subscribers", sa.column("id", sa.BigInteger))
    with db.transaction(runtime.session_factory) as session:
        for ids in ([1], list(range(500)), list(range(77))):
            session.execute(sa.select(numbers.c.id).where(db.among(session, numbers.c.id, ids))).all()
    assert len(texts) == 3 and len(set(texts)) == 1 and len(texts[0]) < 200
