"""Alembic environment: migrates the database named by the config or ``DIGEST_DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context

from digest.core.db import make_engine
from digest.core.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    explicit = config.attributes.get("url")
    if explicit:
        return str(explicit)
    if config.cmd_opts is not None and os.environ.get("DIGEST_DATABASE_URL"):
        return os.environ["DIGEST_DATABASE_URL"]
    return str(config.get_main_option("sqlalchemy.url"))


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
