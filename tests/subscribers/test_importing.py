"""Imports: every column carried over, bad rows by line, all or nothing, consent rules kept.

Against real PostgreSQL (COPY path) and SQLite (executemany path); the command itself runs as
a real process for the dry run and the exit status.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.db import make_engine, make_session_factory, transaction
from digest.core.models import Frequency, Subscriber, SubscriberStatus, utcnow
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Tokens
from digest.subscribers import importing, subscriptions
from tests.support.rows import snapshot, subscriber
from tests.support.settings import TEST_SECRET
from tests.web.test_cli_subscribers import digest

FULL = (
    "Email,Topics,Exclude,Frequency,Timezone,Hour\n"
    'ada@example.org,"diffusion, robotics",crypto,weekly,Europe/Berlin,7\n'
    "bob@example.org,,,,,\n"
)


def run_import(session: Session, data: bytes, *, dry_run: bool = False) -> importing.ImportResult:
    tokens = Tokens(TEST_SECRET)
    result = importing.import_csv(session, io.BytesIO(data), tokens.address_fingerprint, now=utcnow(), dry_run=dry_run)
    session.commit()
    return result


def rows(session: Session) -> list[tuple[object, ...]]:
    subs = session.scalars(select(Subscriber).order_by(Subscriber.email)).all()
    return [(s.email, s.status, s.topics, s.excluded, s.frequency, s.timezone, s.send_hour) for s in subs]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_session(request: pytest.FixtureRequest, tmp_path: Path) -> Session:
    if request.param == "postgresql":
        session: Session = request.getfixturevalue("session")
        return session
    engine = make_engine(request.getfixturevalue("sqlite_url"))
    request.addfinalizer(engine.dispose)
    factory = make_session_factory(engine)
    sqlite_session = factory()
    request.addfinalizer(sqlite_session.close)
    return sqlite_session


def test_every_column_is_carried_over(any_session: Session) -> None:
    result = run_import(any_session, FULL.encode())
    assert (result.created, result.refused) == (2, [])
    assert rows(any_session) == [
        (
            "ada@example.org",
            SubscriberStatus.ACTIVE,
            "diffusion, robotics",
            "crypto",
            Frequency.WEEKLY,
            "Europe/Berlin",
            7,
        ),
        ("bob@example.org", SubscriberStatus.ACTIVE, "", "", Frequency.DAILY, "UTC", 8),
    ]
    ada = any_session.scalar(select(Subscriber).where(Subscriber.email == "ada@example.org"))
    assert ada is not None and ada.confirmed_at is not None and ada.source == "import"


def test_bad_rows_by_line_and_a_non_utf8_line(any_session: Session) -> None:
    data = (
        b"email,frequency,timezone,hour,topics\n"
        b"ok@example.org,daily,UTC,9,\n"  # 2
        b"not-an-address,daily,UTC,9,\n"  # 3
        b"caf\xe9@example.org,daily,UTC,9,\n"  # 4: Latin-1, not UTF-8
        b"f@example.org,hourly,UTC,9,\n"  # 5
        b"z@example.org,daily,Mars/Olympus,9,\n"  # 6
        b"h@example.org,daily,UTC,24,\n"  # 7
        b"\n"
        b"OK@Example.org,weekly,UTC,9,\n"  # 9: the same address as line 2
        b"long@example.org,daily,UTC,9," + b"x" * 600 + b"\n"  # 10
        b"x@example.org,daily,UTC,9,a,extra\n"  # 11
        b"last@example.org,,,,\n"  # 12
    )
    result = run_import(any_session, data)
    by_line = {r.line: r.reason for r in result.refused}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 9, 10, 11], by_line
    assert "not UTF-8" in by_line[4] and "0xe9" in by_line[4]
    assert "hourly" in by_line[5] and "Mars/Olympus" in by_line[6] and "hour" in by_line[7]
    assert "line 2" in by_line[9]
    assert [r[0] for r in rows(any_session)] == ["last@example.org", "ok@example.org"]
    assert result.imported == 2


def test_a_header_is_required_to_make_sense(any_session: Session) -> None:
    # A spreadsheet's trailing comma names nothing; a misspelt column stops the whole file.
    assert run_import(any_session, b"EMAIL,Topics,\nada@example.org,llm,\n").created == 1
    with pytest.raises(importing.BadFile, match="emial"):
        run_import(any_session, b"emial,topics\nbob@example.org,llm\n")
    any_session.rollback()
    assert [r[0] for r in rows(any_session)] == ["ada@example.org"]


def test_a_dry_run_writes_nothing_and_a_reimport_changes_nothing(any_session: Session) -> None:
    dry = run_import(any_session, FULL.encode(), dry_run=True)
    any_session.rollback()
    assert dry.created == 2 and rows(any_session) == []

    run_import(any_session, FULL.encode())
    before = [(s.email, s.updated_at, s.confirmed_at) for s in any_session.scalars(select(Subscriber))]
    again = run_import(any_session, FULL.encode())
    assert (again.created, again.changed, again.unchanged) == (0, 0, 2)
    any_session.expire_all()
    assert [(s.email, s.updated_at, s.confirmed_at) for s in any_session.scalars(select(Subscriber))] == before

    # Only the columns a file names change a known subscriber; the rest stay as they are.
    changed = run_import(any_session, b"email,hour\nada@example.org,21\n")
    assert (changed.changed, changed.unchanged) == (1, 0)
    any_session.expire_all()
    assert rows(any_session)[0][2:] == ("diffusion, robotics", "crypto", Frequency.WEEKLY, "Europe/Berlin", 21)


def test_pending_become_active_and_opted_out_or_erased_are_skipped(runtime: Runtime, session: Session) -> None:
    now = utcnow()
    with transaction(runtime.session_factory) as s:
        subscriptions.subscribe(s, runtime.tokens, "waiting@example.org", now=now)
        for address in ("left@example.org", "erased@example.org", "bounced@example.org"):
            subscriptions.add_confirmed(s, runtime.tokens, address, now=now)
        subscriptions.unsubscribe(s, subscriptions.get_by_email(s, "left@example.org"), now=now)
        subscriptions.erase(s, runtime.tokens, subscriptions.get_by_email(s, "erased@example.org"), now=now)
        bounced = subscriptions.get_by_email(s, "bounced@example.org")
        subscriptions.record_bounce(s, bounced.id, None, hard=True, detail="550", now=now, policy=runtime.policy)
        # Erased, then a stranger's request: a pending row, still suppressed until confirmed.
        subscriptions.subscribe(s, runtime.tokens, "erased@example.org", now=now)
    data = b"email,topics\nwaiting@example.org,a\nleft@example.org,b\nErased@example.org,c\nbounced@example.org,d\n"
    result = run_import(session, data)
    assert [(r.line, r.reason.split(":")[0]) for r in result.refused] == [
        (3, "suppressed (unsubscribed)"),
        (4, "suppressed (erased)"),
        (5, "suppressed (bounced)"),
    ]
    assert subscriber(runtime, "waiting@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]
    assert subscriber(runtime, "left@example.org").status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]
    assert subscriber(runtime, "bounced@example.org").status is SubscriberStatus.BOUNCED  # type: ignore[union-attr]
    assert subscriber(runtime, "erased@example.org").status is SubscriberStatus.PENDING  # type: ignore[union-attr]


def test_the_command_dry_run_and_exit_status(settings: Settings, runtime: Runtime, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_bytes(FULL.encode() + b"caf\xe9@example.org,,,,,\n")
    dry = digest(settings, tmp_path, "subscribers", "import", "--dry-run", str(source))
    assert dry.returncode == 1, dry.stderr
    assert "line 4: not UTF-8" in dry.stderr and "would import 2 subscribers; 1 rows refused" in dry.stdout
    assert snapshot(runtime) == []

    source.write_bytes(FULL.encode())
    done = digest(settings, tmp_path, "subscribers", "import", str(source))
    assert done.returncode == 0, done.stderr
    assert "imported 2 subscribers; 0 rows refused" in done.stdout
    assert subscriber(runtime, "ada@example.org").timezone == "Europe/Berlin"  # type: ignore[union-attr]


def test_add_takes_the_same_fields(settings: Settings, runtime: Runtime, tmp_path: Path) -> None:
    args = ["--exclude", "crypto", "--frequency", "weekly", "--timezone", "Asia/Tokyo", "--hour", "6"]
    done = digest(settings, tmp_path, "subscribers", "add", "ada@example.org", "--confirmed", "--topics", "llm", *args)
    assert done.returncode == 0, done.stderr
    ada = subscriber(runtime, "ada@example.org")
    assert ada is not None
    assert (ada.status, ada.topics, ada.excluded, ada.frequency, ada.timezone, ada.send_hour) == (
        SubscriberStatus.ACTIVE,
        "llm",
        "crypto",
        Frequency.WEEKLY,
        "Asia/Tokyo",
        6,
    )
    bad = digest(settings, tmp_path, "subscribers", "add", "bob@example.org", "--confirmed", "--timezone", "Nowhere")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and subscriber(runtime, "bob@example.org") is None


ADDRESSES = [
    "Ada.Lovelace+news@Example.ORG",
    " padded@example.org ",
    "x@xn--bcher-kva.de",
    "x@Bücher.de",
    "üser@example.org",
    '"quoted local"@example.org',
    "a..b@example.org",
    "x@localhost",
    "x@foo.test",
    "x@123.456",
    "x@-a.com",
    "x@a b.com",
    "two@@example.org",
    "@example.org",
    "nobody@",
    "l" * 64 + "@example.org",
    "l" * 65 + "@example.org",
    "x@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 57 + ".org",
]


@pytest.mark.parametrize("raw", ADDRESSES)
def test_the_import_normalises_addresses_exactly_as_the_web_does(raw: str) -> None:
    from digest.core.addresses import normalise_address
    from digest.core.errors import InvalidAddress

    try:
        expected: str | type[Exception] = normalise_address(raw)
    except InvalidAddress:
        expected = InvalidAddress
    try:
        got: str | type[Exception] = importing.normalise(raw)
    except InvalidAddress:
        got = InvalidAddress
    assert got == expected


def test_a_big_import_leaves_planner_statistics_for_the_first_dispatch(session: Session) -> None:
    """Right after a big import the dispatcher's keyset page must not be planned blind: without
    statistics PostgreSQL sorted every new row for each page (0.47 s a page at a million)."""
    from sqlalchemy import text

    before = session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'subscribers'"))
    assert before is not None and before <= 0, "a fresh table has no statistics yet"
    n = importing.ANALYZE_AFTER_ROWS
    data = ("email\n" + "".join(f"reader{i}@example{i % 7}.org\n" for i in range(n))).encode()
    assert run_import(session, data).created == n
    after = session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'subscribers'"))
    assert after is not None and after >= 0.9 * n


def test_a_cell_with_a_control_character_is_a_reported_line(any_session: Session) -> None:
    # On PostgreSQL one NUL cell used to abort the whole COPY, and with it the import.
    data = (
        "email,topics\n"
        "ada@example.org,diffusion\n"
        "nul@example.org,diff\x00usion\n"
        "esc\x1b[2J@example.org,robotics\n"
        "bob@example.org,agents\n"
    )
    result = run_import(any_session, data.encode())
    assert [(r.line, r.reason) for r in result.refused] == [
        (3, "the topics cell holds a control character (such as NUL)"),
        (4, "the email cell holds a control character (such as NUL)"),
    ]
    assert [r[0] for r in rows(any_session)] == ["ada@example.org", "bob@example.org"]


def test_an_unclosed_quote_is_reported_with_its_line_not_swallowing_rows(any_session: Session) -> None:
    at_the_end = 'email,topics\nada@example.org,diffusion\nbob@example.org,"agents\ncy@example.org,robotics\n'
    result = run_import(any_session, at_the_end.encode())
    assert [(r.line, r.reason) for r in result.refused] == [
        (3, "a quote opened on this line is never closed: lines 3-4 were not read (close the quote and import again)")
    ]
    assert [r[0] for r in rows(any_session)] == ["ada@example.org"]
    # Closed by a later line's quote: the rows in between would become one cell.
    midway = 'email,topics\ndan@example.org,"vision\neve@example.org,speech"\nfay@example.org,audio\n'
    result = run_import(any_session, midway.encode())
    assert [(r.line, r.reason) for r in result.refused] == [
        (2, "a quoted cell runs over lines 2-3 (a closing quote missing?): not read")
    ]
    assert [r[0] for r in rows(any_session)] == ["ada@example.org", "fay@example.org"]
    broken = 'email,topics\ngus@example.org,"vision\nhal@example.org,"speech"\nivy@example.org,audio\n'
    result = run_import(any_session, broken.encode())
    assert [
        (r.line, r.reason.endswith("(a quote opened on this line: lines 2-3 not read)")) for r in result.refused
    ] == [(2, True)]
    assert [r[0] for r in rows(any_session)] == ["ada@example.org", "fay@example.org", "ivy@example.org"]


def test_an_export_reads_back_and_its_status_never_activates(any_session: Session) -> None:
    data = (
        "email,status,topics,exclude,frequency,timezone,hour,weekday,created_at,confirmed_at\n"
        "ada@example.org,active,'=sum,,weekly,Asia/Kolkata,6,fri,2026-01-01T00:00:00+00:00,\n"
        "pat@example.org,pending,,,daily,UTC,8,mon,2026-01-01T00:00:00+00:00,\n"
        "uma@example.org,unsubscribed,,,daily,UTC,8,mon,2026-01-01T00:00:00+00:00,\n"
        "vic@example.org,asleep,,,daily,UTC,8,mon,,\n"
    )
    result = run_import(any_session, data.encode())
    assert (result.created, result.not_active) == (1, 2)
    assert [(r.line, r.reason[:17]) for r in result.refused] == [(5, "status must be on")]
    ada = any_session.scalars(select(Subscriber)).one()
    assert (ada.email, ada.topics, ada.frequency, ada.timezone, ada.send_hour, ada.weekday) == (
        "ada@example.org",
        "=sum",  # the export's guard quote is taken off again
        Frequency.WEEKLY,
        "Asia/Kolkata",
        6,
        4,
    )
