"""Importing subscribers whose consent is on record: validate every row, then one bulk write.

A CSV file's header row names its columns (``email`` required; ``topics``, ``exclude``,
``frequency``, ``weekday``, ``timezone``, ``hour`` optional). The other columns of
``digest subscribers export`` are accepted so that an export reads back, but set nothing: a row
whose ``status`` is not ``active`` is left alone (an import never activates anyone the file
itself says is pending or gone), ``created_at`` and ``confirmed_at`` are not read. The import
happens in two phases inside the caller's transaction:

1. **Validate and stage.** Each line is decoded on its own, so one line that is not UTF-8 is a
   bad row with its number, not an aborted file; so is a cell holding NUL or another control
   character (no store takes it; on PostgreSQL it would abort the whole ``COPY``), and a
   quote that is never closed (reported with its line: the lines after it are not read as
   rows, since there is no telling where the quote meant to end). Every row goes through the same checks as the
   web forms (``digest.core.addresses.normalise_address``, ``digest.subscribers.subscriptions.validate_preferences``);
   good rows stream into a temporary staging table (PostgreSQL ``COPY``, batched
   ``executemany`` on SQLite), so memory stays flat at a million rows.
2. **Judge, then merge.** The staging table is checked against the database in a few set-wise
   queries: repeated addresses, and addresses that opted out or were erased (the consent rules
   of ``digest.subscribers.consent``: an import never re-activates them). What is left is written by one
   ``UPDATE … FROM`` for known addresses that change and one ``INSERT … SELECT`` for new ones.

The caller commits (or, for a dry run, rolls back): a failure anywhere leaves nothing behind,
never half a file. Columns the header does not name are left as they are on known subscribers;
an empty ``frequency``, ``timezone`` or ``hour`` cell also keeps what is stored (or the default).
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, BinaryIO

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from digest.core.addresses import MAX_ADDRESS_LENGTH, normalise_address
from digest.core.errors import DigestError, InvalidAddress
from digest.core.models import Frequency, Subscriber, SubscriberStatus, UTCDateTime
from digest.core.text import FORMULA_START, has_unsafe
from digest.subscribers.subscriptions import PreferencesUpdate, validate_preferences

# The columns an import sets.
COLUMNS = ("email", "topics", "exclude", "frequency", "weekday", "timezone", "hour")
# What `digest subscribers export` writes; an import reads all of them.
EXPORT_COLUMNS = (
    "email",
    "status",
    "topics",
    "exclude",
    "frequency",
    "timezone",
    "hour",
    "weekday",
    "created_at",
    "confirmed_at",
)
# Read but never set: the status only decides whether a row is imported at all.
READ_ONLY_COLUMNS = ("status", "created_at", "confirmed_at")
KNOWN_COLUMNS = (*COLUMNS, *READ_ONLY_COLUMNS)
# Files written before the header named the columns: ``email[,topics]`` without a header.
LEGACY_COLUMNS = ("email", "topics")
# Every frequency a person can choose (``paused`` is the preferences page's own switch).
FREQUENCIES = {f.value: f for f in Frequency if f is not Frequency.PAUSED}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DEFAULT_HOUR = 8
DEFAULT_TIMEZONE = "UTC"
STAGING = "import_staging"
BATCH_ROWS = 10_000
# An import creating this many subscribers ends by refreshing their planner statistics.
ANALYZE_AFTER_ROWS = 10_000
# Every statement below is put together from this module's constants and column names only
# (hence the S608 exemptions); the file's content travels as bound values or COPY data.

# (line, email, fingerprint, topics, excluded, frequency, timezone, hour, weekday); None: keep / default.
StagedRow = tuple[int, str, str, str | None, str | None, str | None, str | None, int | None, int | None]


class BadFile(DigestError):
    """The file as a whole cannot be imported (no usable header)."""


@dataclass(frozen=True)
class Fields:
    """Preferences given for one subscriber; None means "not given"."""

    topics: str | None = None
    excluded: str | None = None
    frequency: Frequency | None = None
    timezone: str | None = None
    hour: int | None = None
    weekday: int | None = None  # Monday = 0


def parse_weekday(value: str | int | None) -> int | None:
    """``mon``..``sun`` (or a full name, or 0-6 with Monday 0) as 0-6; None when not given."""
    if value is None or isinstance(value, int):
        return value
    word = value.strip().lower()
    if not word:
        return None
    for names in (WEEKDAYS, WEEKDAY_NAMES, tuple("0123456")):
        if word in names:
            return names.index(word)
    raise DigestError(f"weekday must be one of {', '.join(WEEKDAYS)}, not {value.strip()[:20]!r}")


@lru_cache(maxsize=4096)
def parse_fields(
    topics: str | None = None,
    exclude: str | None = None,
    frequency: str | None = None,
    timezone: str | None = None,
    hour: str | int | None = None,
    weekday: str | int | None = None,
) -> Fields:
    """Validate preferences given as text (a CSV row, command-line options); ``DigestError`` if bad.

    The checks are the preferences page's (``validate_preferences``), so an import cannot store
    what a subscriber could not choose themselves. Cached: a list repeats the same few values.
    """
    wanted_frequency: Frequency | None = None
    if frequency is not None and frequency.strip():
        wanted_frequency = FREQUENCIES.get(frequency.strip().lower())
        if wanted_frequency is None:
            choices = " or ".join(FREQUENCIES)
            raise DigestError(f"frequency must be {choices}, not {frequency.strip()[:20]!r}")
    wanted_hour: int | None = None
    if isinstance(hour, int):
        wanted_hour = hour
    elif hour is not None and hour.strip():
        try:
            wanted_hour = int(hour.strip())
        except ValueError as exc:
            raise DigestError(f"hour must be a whole number from 0 to 23, not {hour.strip()[:20]!r}") from exc
    wanted_zone = timezone.strip() if timezone is not None and timezone.strip() else None
    wanted_weekday = parse_weekday(weekday)
    clean = validate_preferences(
        PreferencesUpdate(
            frequency=wanted_frequency or Frequency.DAILY,
            digest_size=10,  # not importable; any valid value
            topics=topics or "",
            excluded=exclude or "",
            send_hour=DEFAULT_HOUR if wanted_hour is None else wanted_hour,
            timezone=wanted_zone or DEFAULT_TIMEZONE,
            weekday=wanted_weekday or 0,
        )
    )
    return Fields(
        topics=None if topics is None else clean.topics,
        excluded=None if exclude is None else clean.excluded,
        frequency=wanted_frequency,
        timezone=wanted_zone,
        hour=wanted_hour,
        weekday=wanted_weekday,
    )


def apply_fields(session: Session, subscriber: Subscriber, fields: Fields) -> None:
    """Store the preferences ``fields`` gives (already validated by ``parse_fields``); not the status."""
    if fields.topics is not None:
        subscriber.topics = fields.topics
    if fields.excluded is not None:
        subscriber.excluded = fields.excluded
    if fields.frequency is not None:
        subscriber.frequency = fields.frequency
    if fields.timezone is not None:
        subscriber.timezone = fields.timezone
    if fields.hour is not None:
        subscriber.send_hour = fields.hour
    if fields.weekday is not None:
        subscriber.weekday = fields.weekday
    session.flush()


# A local part that every validator accepts as it is (an RFC 5322 dot-atom of the plainest
# characters); anything else goes through the whole of ``normalise_address``.
PLAIN_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*\Z")
MAX_LOCAL_LENGTH = 64


@lru_cache(maxsize=65_536)
def _checked_domain(domain: str) -> str:
    return normalise_address(f"postmaster@{domain}").rpartition("@")[2]


def normalise(raw: str) -> str:
    """``normalise_address``, with a domain's checks (IDNA, reserved names) done once per domain.

    Those checks are most of email-validator's time, and a list of a million people holds a few
    thousand domains. A plain local part needs no check beyond its length; every other address,
    and every address whose domain fails, is left to ``normalise_address`` whole (and gets its
    message). ``tests/subscribers/test_importing.py`` holds both to the same answers.
    """
    candidate = raw.strip()
    local, at, domain = candidate.rpartition("@")
    if at and len(local) <= MAX_LOCAL_LENGTH and PLAIN_LOCAL.match(local):
        try:
            address = f"{local.lower()}@{_checked_domain(domain)}"
        except InvalidAddress:
            return normalise_address(raw)
        if len(address) <= MAX_ADDRESS_LENGTH and len(candidate) <= MAX_ADDRESS_LENGTH:
            return address
    return normalise_address(raw)


@dataclass(frozen=True)
class Refusal:
    line: int
    reason: str


@dataclass
class ImportResult:
    created: int = 0
    changed: int = 0
    unchanged: int = 0
    refused: list[Refusal] = field(default_factory=list)
    not_active: int = 0  # rows the file itself says are not active: left alone

    @property
    def imported(self) -> int:
        """Rows that are now active subscribers as the file says (new, changed or already so)."""
        return self.created + self.changed + self.unchanged


# --------------------------------------------------------------------------------- reading


def decoded_lines(source: BinaryIO, refusals: list[Refusal]) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line that is UTF-8; the others become refusals."""
    for number, raw in enumerate(source, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # the byte-order mark spreadsheet programs write
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            refusals.append(Refusal(number, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))


def csv_rows(lines: Iterable[tuple[int, str]], refusals: list[Refusal]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of each CSV record; blank records are skipped.

    A record is reported by the line it starts on. No column holds a line break, so a quoted
    cell that runs over lines is refused: it is a closing quote missing there, which read on
    would swallow the rows after it into one cell. A quote still open at the end of the file
    is reported the same way; the rows after it cannot be told apart, so none of them are
    imported and the message says which lines were not read.
    """
    consumed: list[int] = []

    def feed() -> Iterator[str]:
        for number, line in lines:
            consumed.append(number)
            yield line

    # strict: an open quote at the end of the file is an error, not a cell holding the rest.
    reader = csv.reader(feed(), strict=True)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            start = consumed[0] if consumed else 0
            if "unexpected end of data" in str(exc) and len(consumed) > 1:
                reason = (
                    f"a quote opened on this line is never closed: lines {start}-{consumed[-1]}"
                    " were not read (close the quote and import again)"
                )
            elif "unexpected end of data" in str(exc):
                reason = "a quote opened on this line is never closed"
            elif len(consumed) > 1:
                reason = (
                    f"not readable as CSV: {exc} (a quote opened on this line: lines {start}-{consumed[-1]} not read)"
                )
            else:
                reason = f"not readable as CSV: {exc}"
            refusals.append(Refusal(start, reason))
            consumed.clear()
            continue
        start, end = (consumed[0], consumed[-1]) if consumed else (0, 0)
        consumed.clear()
        if end > start:
            refusals.append(
                Refusal(start, f"a quoted cell runs over lines {start}-{end} (a closing quote missing?): not read")
            )
            continue
        if any(cell.strip() for cell in cells):
            yield start, cells


def header_of(cells: list[str]) -> tuple[tuple[str, ...], bool]:
    """(column names, whether ``cells`` was a header row); ``BadFile`` for a bad header."""
    if "@" in cells[0]:
        return LEGACY_COLUMNS, False
    names = tuple(cell.strip().lower() for cell in cells)
    unknown = [n for n in names if n and n not in KNOWN_COLUMNS]
    if unknown:
        raise BadFile(f"unknown column {unknown[0][:40]!r} in the header (known: {', '.join(KNOWN_COLUMNS)})")
    named = [n for n in names if n]  # a blank header cell (a trailing comma) names nothing
    if len(set(named)) != len(named):
        raise BadFile("a column is named twice in the header")
    if "email" not in names:
        raise BadFile("the header row must name an email column")
    return names, True


def staged_rows(
    source: BinaryIO, fingerprint: Callable[[str], str], refusals: list[Refusal], not_active: list[int] | None = None
) -> tuple[tuple[str, ...], Iterator[StagedRow]]:
    """The columns of the file and its valid rows, validated one by one (bad ones refused).

    The lines of rows whose ``status`` column says they are not active go to ``not_active``.
    """
    skipped = [] if not_active is None else not_active
    records = csv_rows(decoded_lines(source, refusals), refusals)
    first = next(records, None)
    if first is None:
        return COLUMNS[:1], iter(())
    columns, was_header = header_of(first[1])
    position = {name: columns.index(name) for name in columns if name}

    def rows() -> Iterator[StagedRow]:
        if not was_header:
            yield from _row(*first, columns, position, fingerprint, refusals, skipped)
        for line, cells in records:
            yield from _row(line, cells, columns, position, fingerprint, refusals, skipped)

    return tuple(name for name in columns if name and name not in READ_ONLY_COLUMNS), rows()


def _as_written(value: str) -> str:
    """A cell as the person meant it: the export's guard quote (``text.csv_cell``) taken off."""
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_START) else value


def _row(
    line: int,
    cells: list[str],
    columns: tuple[str, ...],
    position: dict[str, int],
    fingerprint: Callable[[str], str],
    refusals: list[Refusal],
    not_active: list[int],
) -> Iterator[StagedRow]:
    if len(cells) > len(columns):
        refusals.append(Refusal(line, f"{len(cells)} cells, but the header names {len(columns)} columns"))
        return
    for index, value in enumerate(cells):
        if has_unsafe(value):
            name = columns[index] or f"column {index + 1}"
            refusals.append(Refusal(line, f"the {name} cell holds a control character (such as NUL)"))
            return

    def cell(name: str) -> str | None:
        if name not in position:
            return None
        index = position[name]
        return _as_written(cells[index]) if index < len(cells) else ""

    status = (cell("status") or "").strip().lower()
    if status and status not in {s.value for s in SubscriberStatus}:
        refusals.append(Refusal(line, f"status must be one of {', '.join(s.value for s in SubscriberStatus)}"))
        return
    if status and status != SubscriberStatus.ACTIVE.value:
        not_active.append(line)
        return
    try:
        address = normalise(cell("email") or "")
        given = parse_fields(
            cell("topics"), cell("exclude"), cell("frequency"), cell("timezone"), cell("hour"), cell("weekday")
        )
    except DigestError as exc:
        refusals.append(Refusal(line, str(exc)))
        return
    frequency = given.frequency.value if given.frequency is not None else None
    yield (
        line,
        address,
        fingerprint(address),
        given.topics,
        given.excluded,
        frequency,
        given.timezone,
        given.hour,
        given.weekday,
    )


# --------------------------------------------------------------------------------- writing


def _create_staging(session: Session) -> None:
    session.execute(text(f"DROP TABLE IF EXISTS {STAGING}"))
    session.execute(
        text(
            f"CREATE TEMPORARY TABLE {STAGING} (line INTEGER NOT NULL, email VARCHAR(254) NOT NULL,"
            " fingerprint VARCHAR(64) NOT NULL, topics VARCHAR(500), excluded VARCHAR(500),"
            " frequency VARCHAR(16), timezone VARCHAR(64), send_hour INTEGER, weekday INTEGER)"
        )
    )


def _fill_staging(session: Session, rows: Iterable[StagedRow], progress: Callable[[int], None] | None) -> None:
    connection = session.connection()
    names = "line, email, fingerprint, topics, excluded, frequency, timezone, send_hour, weekday"
    if connection.dialect.name == "postgresql":
        driver: Any = connection.connection.driver_connection
        with driver.cursor() as cursor, cursor.copy(f"COPY {STAGING} ({names}) FROM STDIN") as copy:
            for count, row in enumerate(rows, start=1):
                copy.write_row(row)
                if progress is not None and count % BATCH_ROWS == 0:
                    progress(row[0])
        return
    insert = f"INSERT INTO {STAGING} ({names}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    batch: list[StagedRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH_ROWS:
            connection.exec_driver_sql(insert, batch)
            batch.clear()
            if progress is not None:
                progress(row[0])
    if batch:
        connection.exec_driver_sql(insert, batch)


REPEATS = f"""
SELECT s.line, f.first FROM {STAGING} s
JOIN (SELECT email, MIN(line) AS first FROM {STAGING} GROUP BY email HAVING COUNT(*) > 1) f ON f.email = s.email
WHERE s.line > f.first
"""  # noqa: S608

# The consent rules (digest.subscribers.consent) as one query: a stored opt-out, or a suppression hash on an
# address with no row or only a pending one (digest.subscribers.subscriptions.state_of), is never activated.
SUPPRESSED = f"""
SELECT s.line, COALESCE(CASE WHEN t.status IN ('unsubscribed', 'bounced', 'complained') THEN t.status END, 'erased')
FROM {STAGING} s
LEFT JOIN subscribers t ON t.email = s.email
LEFT JOIN suppressions x ON x.address_hash = s.fingerprint
WHERE t.status IN ('unsubscribed', 'bounced', 'complained')
   OR (x.address_hash IS NOT NULL AND (t.id IS NULL OR t.status = 'pending'))
"""  # noqa: S608


def _take_out(session: Session, query: str) -> list[tuple[int, str]]:
    """The staged rows ``query`` picks (line first), removed from the staging table."""
    rows = [(int(line), str(detail)) for line, detail in session.execute(text(query))]
    if rows:
        session.execute(text(f"DELETE FROM {STAGING} WHERE line IN (SELECT q.line FROM ({query}) q)"))  # noqa: S608
    return rows


def _refuse_repeats(session: Session) -> list[Refusal]:
    """A second row for an address is refused: the file says two things about one person."""
    return [Refusal(line, f"the same address as line {first}") for line, first in _take_out(session, REPEATS)]


def _refuse_suppressed(session: Session) -> list[Refusal]:
    return [
        Refusal(line, f"suppressed ({state}): only the person's own opt-in can bring it back")
        for line, state in _take_out(session, SUPPRESSED)
    ]


def _changes(present: set[str]) -> str:
    """SQL, per known subscriber, for "this row would change it" (so a re-import changes nothing)."""
    tests = ["subscribers.status <> 'active'"]
    for column in _assigned(present):
        tests.append(f"subscribers.{column} <> COALESCE(s.{column}, subscribers.{column})")
    return " OR ".join(tests)


def _assigned(present: set[str]) -> list[str]:
    by_field = {
        "topics": "topics",
        "exclude": "excluded",
        "frequency": "frequency",
        "timezone": "timezone",
        "hour": "send_hour",
        "weekday": "weekday",
    }
    return [column for name, column in by_field.items() if name in present]


def _count(session: Session, sql: str) -> int:
    return int(session.execute(text(sql)).scalar_one())


def _merge(session: Session, present: set[str], now: dt.datetime, *, dry_run: bool) -> tuple[int, int, int]:
    """(created, changed, unchanged) for the staged rows; written unless ``dry_run``."""
    known = f"FROM {STAGING} s JOIN subscribers ON subscribers.email = s.email"
    total = _count(session, f"SELECT COUNT(*) FROM {STAGING}")  # noqa: S608
    if dry_run:
        existing = _count(session, f"SELECT COUNT(*) {known}")
        changing = _count(session, f"SELECT COUNT(*) {known} WHERE {_changes(present)}")
        return total - existing, changing, existing - changing
    stamp = bindparam("now", now, type_=UTCDateTime())
    assignments = ", ".join(f"{c} = COALESCE(s.{c}, subscribers.{c})" for c in _assigned(present))
    update = (
        "UPDATE subscribers SET status = 'active', updated_at = :now, unsubscribed_at = NULL,"  # noqa: S608
        " soft_bounce_score = 0, confirmed_at = COALESCE(subscribers.confirmed_at, :now)"
        + (f", {assignments}" if assignments else "")
        + f" FROM {STAGING} s WHERE subscribers.email = s.email AND ({_changes(present)})"
    )
    changed = session.execute(text(update).bindparams(stamp)).rowcount  # type: ignore[attr-defined]
    insert = f"""
        INSERT INTO subscribers (email, status, topics, excluded, frequency, digest_size, send_hour, timezone,
            weekday, source, soft_bounce_score, created_at, updated_at, confirmed_at)
        SELECT s.email, 'active', COALESCE(s.topics, ''), COALESCE(s.excluded, ''), COALESCE(s.frequency, 'daily'),
            NULL, COALESCE(s.send_hour, {DEFAULT_HOUR}), COALESCE(s.timezone, '{DEFAULT_TIMEZONE}'),
            COALESCE(s.weekday, 0), 'import', 0,
            :now, :now, :now
        FROM {STAGING} s
        WHERE NOT EXISTS (SELECT 1 FROM subscribers t WHERE t.email = s.email)
        ORDER BY s.line
    """  # noqa: S608
    created = session.execute(text(insert).bindparams(stamp)).rowcount  # type: ignore[attr-defined]
    # No ON CONFLICT: its speculative insertion costs half the import's time. A signup racing
    # the import between the anti-join and the insert fails the whole import (the unique key);
    # nothing is written and running it again finishes it.
    return created, changed, total - created - changed


def import_csv(
    session: Session,
    source: BinaryIO,
    fingerprint: Callable[[str], str],
    *,
    now: dt.datetime,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import subscribers from CSV bytes; every refused row is in ``refused``, by line.

    ``fingerprint`` is ``Tokens.address_fingerprint`` (erased addresses are known only by it).
    ``progress`` is called now and then with the line number reached. Flushes, never commits.
    """
    refusals: list[Refusal] = []
    not_active: list[int] = []
    columns, rows = staged_rows(source, fingerprint, refusals, not_active)
    _create_staging(session)
    try:
        _fill_staging(session, rows, progress)
        # A temporary table has no statistics until analysed; without them the planner may join
        # a million staged rows by nested loops.
        session.execute(text(f"ANALYZE {STAGING}"))
        refusals.extend(_refuse_repeats(session))
        refusals.extend(_refuse_suppressed(session))
        created, changed, unchanged = _merge(session, set(columns), now, dry_run=dry_run)
        if created >= ANALYZE_AFTER_ROWS and not dry_run:
            # The first dispatch may start right after a big import, before autovacuum has
            # looked: without fresh statistics its keyset page over a million new rows was a
            # bitmap scan and a sort of every row (0.47 s a page instead of ~1 ms).
            session.execute(text("ANALYZE subscribers"))
    finally:
        session.execute(text(f"DROP TABLE IF EXISTS {STAGING}"))
    refusals.sort(key=lambda r: r.line)
    return ImportResult(
        created=created, changed=changed, unchanged=unchanged, refused=refusals, not_active=len(not_active)
    )
