"""Engine and session factories, and running Alembic migrations from code."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Date, Engine, any_, bindparam, cast, create_engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import NullType

# Shipped inside the package, so an installed wheel migrates from any folder.
# Installed, the migrations ship inside the package; in a checkout they are alembic/ at its top.
MIGRATIONS_DIR = next(
    path
    for path in (Path(__file__).resolve().parents[1] / "migrations", Path(__file__).resolve().parents[2] / "alembic")
    if (path / "env.py").is_file()
)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys and a busy timeout for concurrent use."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    from digest.core import pg_arrays

    event.listen(engine, "connect", lambda dbapi_conn, _record: pg_arrays.register(dbapi_conn))

    @event.listens_for(engine, "connect")
    def _plan_with_the_values(dbapi_conn: Any, _record: Any) -> None:
        # psycopg prepares a statement after five runs, and PostgreSQL may then keep one generic
        # plan for it. A generic plan made while an edition's ledger rows were few (statistics
        # lag a day's inserts) stayed in use as they grew: at a million subscribers the claim
        # became a bitmap scan over every pending row, 2-5 s per 64 messages. Planning with the
        # actual values costs ~1 ms a statement and cannot go stale.
        cur = dbapi_conn.cursor()
        cur.execute("SET plan_cache_mode = force_custom_plan")
        cur.close()
        dbapi_conn.commit()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A unit of work for a boundary (task, request, command): commit on success, else roll back."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class IdArray(str):
    """Integer ids in PostgreSQL's array syntax, sent as one ``bigint[]`` parameter
    (``digest.core.pg_arrays``)."""


def among(session: Session, column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """``column IN ids`` for integer ids (a page's subscribers or deliveries).

    On PostgreSQL as ``column = ANY(:ids)`` with the ids in one ``bigint[]`` parameter: the
    server turns an IN list into exactly that array comparison (the same plan), but an
    expanded IN of 500 ids is a new 500-parameter statement text at every call, which
    SQLAlchemy expands and psycopg parses again (it caches only texts under 4 KB): ~10 % of a
    worker's CPU when sending. The array goes in its text form, formatted here (``int``
    refuses anything that is not one): psycopg's list dumping costs 0.36 ms for 500 ids, the
    text 0.05. Elsewhere a plain IN.
    """
    if session.get_bind().dialect.name != "postgresql":
        return column.in_(list(ids))  # type: ignore[no-any-return]
    array = IdArray("{" + ",".join(str(int(i)) for i in ids) + "}")
    # NullType: no bind cast rendered; the parameter's type comes from its dumper.
    return column == any_(bindparam(None, array, type_=NullType()))  # type: ignore[no-any-return]


def count_per_day(session: Session, column: Any, *conditions: Any, since: dt.datetime) -> dict[str, int]:
    """Rows per UTC calendar day of the timestamp ``column`` since ``since`` ("YYYY-MM-DD": count),
    grouped by the database."""
    day = _utc_day(column, session.get_bind().dialect.name)
    rows = session.execute(select(day, func.count()).where(column >= since, *conditions).group_by(day))
    return {str(d)[:10]: int(n) for d, n in rows}


def _utc_day(column: Any, dialect: str) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)


def alembic_config(url: str) -> Any:
    """Alembic's configuration for the packaged migrations; needs no alembic.ini (that is for the CLI)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def schema_heads() -> set[str]:
    """The newest revisions the packaged migrations know (one, unless a branch is open)."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    """The revisions the database at ``engine`` is migrated to (empty when never migrated)."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` with Alembic."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
