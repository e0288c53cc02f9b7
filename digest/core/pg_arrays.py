"""How ``digest.core.db.IdArray`` reaches PostgreSQL: as a ``bigint[]`` parameter in its text
form. Imported only for PostgreSQL engines (psycopg is not needed, nor cheap, elsewhere)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import Dumper

from digest.core.db import IdArray

INT8_ARRAY_OID = psycopg.postgres.types["int8"].array_oid


class IdArrayDumper(Dumper):
    """A bigint[] typed parameter, so a custom plan sees the array as a constant: the same
    text passed as ``text`` and cast in SQL is a per-row conversion the planner cannot fold
    (``array_in`` is only stable), which doubled PostgreSQL's CPU per message."""

    oid = INT8_ARRAY_OID

    def dump(self, obj: Any) -> bytes:
        return str(obj).encode("ascii")


def register(dbapi_connection: Any) -> None:
    dbapi_connection.adapters.register_dumper(IdArray, IdArrayDumper)
