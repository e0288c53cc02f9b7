"""Rows per second of ``digest subscribers import`` (digest.subscribers.importing) against PostgreSQL, with
the reference measured in the same run: a plain ``COPY … FROM STDIN (FORMAT csv)`` of the same
file into a bare table of the same columns (no validation, no index, no merge: the floor).

    .venv/bin/python bench/import.py [--rows 100000] [--sqlite]

Each file has every column (email, topics, exclude, frequency, timezone, hour), all rows valid.
The import is timed end to end as the command does it (read, decode, validate, stage, judge,
merge, commit) into an empty table, then again as a re-import of the same file (every row
already so: nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from digest.core import db  # noqa: E402
from digest.core.models import utcnow  # noqa: E402
from digest.rendering.tokens import Tokens  # noqa: E402
from digest.subscribers import importing  # noqa: E402
from tests.support.servers import Postgres  # noqa: E402

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]


def write_file(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write("email,topics,exclude,frequency,timezone,hour\n")
        for i in range(rows):
            frequency = "weekly" if i % 7 == 0 else "daily"
            out.write(f'reader{i}@example{i % 97}.org,"diffusion, agents",crypto,{frequency},{ZONES[i % 4]},{i % 24}\n')


def timed_import(url: str, path: Path, tokens: Tokens) -> tuple[float, importing.ImportResult]:
    factory = db.make_session_factory(db.make_engine(url))
    start = time.perf_counter()
    with path.open("rb") as handle, db.transaction(factory) as session:
        result = importing.import_csv(session, handle, tokens.address_fingerprint, now=utcnow())
    return time.perf_counter() - start, result


def plain_copy(url: str, path: Path) -> float:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(
            "CREATE TABLE bare (email text, topics text, exclude text, frequency text, timezone text, hour int)"
        )
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bare FROM STDIN (FORMAT csv, HEADER)") as copy, path.open("rb") as f:
            while chunk := f.read(1 << 20):
                copy.write(chunk)
        conn.commit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sqlite", action="store_true", help="Also time the SQLite path.")
    args = parser.parse_args()
    tokens = Tokens("bench-secret-0123456789abcdef0123456789")
    postgres = Postgres()
    name = f"digest_bench_import_{os.getpid()}"
    url = postgres.create_database(name)
    figures: dict[str, object] = {"rows": args.rows, "load_average": os.getloadavg()}
    try:
        db.upgrade(url)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "people.csv"
            write_file(path, args.rows)
            figures["file_mb"] = round(path.stat().st_size / 1e6, 1)
            reference = plain_copy(url, path)
            first, result = timed_import(url, path, tokens)
            assert result.created == args.rows and not result.refused, result
            again, result = timed_import(url, path, tokens)
            assert result.unchanged == args.rows, result
            figures["postgresql"] = {
                "import_rows_per_s": round(args.rows / first),
                "reimport_rows_per_s": round(args.rows / again),
                "reference_plain_copy_rows_per_s": round(args.rows / reference),
                "import_seconds": round(first, 2),
            }
            if args.sqlite:
                sqlite_url = f"sqlite:///{Path(folder) / 'bench.db'}"
                db.upgrade(sqlite_url)
                first, result = timed_import(sqlite_url, path, tokens)
                assert result.created == args.rows, result
                figures["sqlite"] = {"import_rows_per_s": round(args.rows / first)}
    finally:
        postgres.drop_database(name)
        postgres.stop()
    # The whole process (file writing included): flat across sizes means the import streams.
    figures["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
