"""A throwaway PostgreSQL database for a single test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.servers import Postgres


@contextmanager
def fresh_database(postgres: Postgres, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{os.getpid()}"
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)
