"""The ``digest`` command: operators' entry point. Reads settings, commits, reports in one line.

Start-up is kept short (``bench/cli_startup.py``): this module imports only the standard
library and click at the top; each command imports what it needs (the database, the delivery
and rendering code, Redis) when it runs, so ``digest --help`` or ``digest status`` never load
the embedding model, Jinja or the SMTP client.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from digest import __version__
from digest.core.text import error_line, for_terminal

if TYPE_CHECKING:
    from digest.operations.status import Probe
    from digest.orchestration.runtime import Runtime

log = logging.getLogger("digest.cli")

UPGRADE_HINT = "the database has no schema or an older one: run `digest db upgrade`"
# SQLSTATEs of PostgreSQL for a missing table or column: the schema is behind the code.
UNMIGRATED_SQLSTATES = {"42P01", "42703"}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def say(line: str, *, err: bool = False) -> None:
    """Print a line that may hold stored or received text: controls shown, never obeyed."""
    click.echo(for_terminal(line), err=err)


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """An exception class of ``module`` if that module was imported (else nothing raised it).

    Looking in ``sys.modules`` keeps the failure report from importing SQLAlchemy, Redis or
    kombu into commands that never used them.
    """
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _is(exc: BaseException, module: str, name: str) -> bool:
    cls = _loaded(module, name)
    return cls is not None and isinstance(exc, cls)


def failure(exc: Exception) -> tuple[str, int]:
    """(the one line to print, the exit status) for a failure a command let through."""
    from digest.core.errors import DigestError

    if isinstance(exc, DigestError):
        return error_line(exc), 1
    if _is(exc, "digest.transport.mailer", "SendError"):
        return f"mail server: {error_line(exc)}", 1
    if _is(exc, "sqlalchemy.exc", "SQLAlchemyError"):
        reason = getattr(exc, "orig", None) or exc
        text = str(reason)
        if (
            getattr(reason, "sqlstate", None) in UNMIGRATED_SQLSTATES
            or "no such table" in text
            or "no such column" in text
        ):
            return UPGRADE_HINT, 1
        return f"database: {error_line(exc)}", 1
    if _is(exc, "kombu.exceptions", "OperationalError") or _is(exc, "redis.exceptions", "RedisError"):
        return f"Redis: {error_line(exc)}", 1
    if isinstance(exc, ValueError):  # settings validation and bad option values
        return error_line(exc), 2
    if isinstance(exc, OSError):  # SMTP, the papers API or the network
        return f"{type(exc).__name__}: {error_line(exc)}", 1
    return f"unexpected {type(exc).__name__}: {error_line(exc)} (`digest -v ...` logs the traceback)", 1


class DigestGroup(click.Group):
    """Every command's failure as one line on stderr; help that lists each command in full."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # every command, the ones added later too: no traceback
            line, code = failure(exc)
            log.info("the command failed", exc_info=True)  # shown with -v
            click.echo(f"error: {line}", err=True)
            ctx.exit(code)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click cuts each description to fit one line ("Fetch and store the..."); a command's
        # whole first paragraph is shown here instead, wrapped.
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            rows.append((name, (command.help or "").split("\n\n")[0].replace("\n", " ").strip()))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def runtime_from(ctx: click.Context) -> Runtime:
    obj = ctx.ensure_object(dict)
    if "runtime" not in obj:
        from digest.core.settings import get_settings
        from digest.orchestration.runtime import Runtime

        obj["runtime"] = Runtime(get_settings())
        ctx.call_on_close(obj["runtime"].dispose)
    runtime: Runtime = obj["runtime"]
    return runtime


def parse_day(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a date like 2024-10-25") from exc


def latest_weekday(today: dt.date) -> dt.date:
    day = today
    while day.weekday() >= 5:
        day -= dt.timedelta(days=1)
    return day


@click.group(cls=DigestGroup, context_settings={"max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="digest", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (and a failure's traceback).")
def main(verbose: bool) -> None:
    """digest: each day's trending AI research papers, by email."""
    from digest.core.logging_setup import configure_logging
    from digest.core.settings import get_settings

    try:
        log_format = get_settings().log_format
    except ValueError:  # the command itself reports broken settings in one line
        log_format = "text"
    configure_logging(log_format, logging.INFO if verbose else logging.WARNING)


@main.group("db", cls=DigestGroup)
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema."""
    from digest.core import db
    from digest.core.settings import get_settings

    db.upgrade(get_settings().database_url)
    click.echo("database is at the newest schema")


@main.command()
@click.option("--date", "date_", help="Day to collect (YYYY-MM-DD); default: the latest weekday.")
@click.pass_context
def collect(ctx: click.Context, date_: str | None) -> None:
    """Fetch and store the papers of a day."""
    from digest.core.db import transaction
    from digest.orchestration.pipeline import collect_day

    runtime = runtime_from(ctx)
    day = parse_day(date_) or latest_weekday(dt.date.today())
    with runtime.papers_client() as client, transaction(runtime.session_factory) as session:
        result = collect_day(session, client, day, runtime)
    click.echo(f"collected {result.stored} papers for {day}")


@main.command()
@click.option("--date", "date_", help="Day whose digest to send (YYYY-MM-DD); default: the latest weekday.")
@click.option(
    "--sample/--no-sample", default=False, help="Fall back to the recorded sample when the API is unreachable."
)
@click.pass_context
def run(ctx: click.Context, date_: str | None, sample: bool) -> None:
    """The whole daily job for a day: collect if needed, then deliver to everyone due."""
    runtime = runtime_from(ctx)
    day = parse_day(date_) or latest_weekday(dt.date.today())
    if runtime.settings.redis_url:
        from workers.dispatch import run_via_workers

        summary = run_via_workers(runtime, day, allow_sample=sample)
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from digest.orchestration.pipeline import run_inprocess

        with Progress(
            SpinnerColumn(), TextColumn("{task.completed} handled"), TimeElapsedColumn(), transient=True
        ) as bar:
            task = bar.add_task("sending", total=None)
            summary = run_inprocess(
                runtime,
                day,
                allow_sample=sample,
                progress=lambda done: bar.update(task, completed=done),
                notify=lambda message: bar.console.print(
                    for_terminal(message), markup=False, highlight=False, soft_wrap=True
                ),
            )
    for line in summary.lines():
        say(line)
    if summary.counts.get("failed"):
        sys.exit(3)


def preview_path(email: str, day: dt.date) -> Path:
    """``preview-DAY-ADDRESS.eml``: one file per person and day, so previews never overwrite each other."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "@._+-") else "_" for c in email)
    return Path(f"preview-{day}-{safe}.eml")


@main.command()
@click.argument("email")
@click.option("--date", "date_", required=True, help="Day of the digest (YYYY-MM-DD).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write (.eml, and .html beside it); default: preview-DATE-EMAIL.eml",
)
@click.pass_context
def preview(ctx: click.Context, email: str, date_: str, output: Path | None) -> None:
    """Write one subscriber's digest of a day to a file, without sending or recording anything.

    For a day they were already sent, it is the digest they got (its papers from the delivery
    record); otherwise the one they would get now.
    """
    from email import message_from_bytes, policy

    from digest.core.db import transaction
    from digest.orchestration.preview import render_preview

    runtime = runtime_from(ctx)
    day = parse_day(date_)
    assert day is not None  # required=True
    with transaction(runtime.session_factory) as session:
        shown = render_preview(session, runtime, email, day)
        session.rollback()
    target = output or preview_path(shown.email, day)
    target.write_bytes(shown.data)
    html = target.with_suffix(".html")
    body = message_from_bytes(shown.data, policy=policy.default).get_body(preferencelist=("html",))
    if body is not None:
        html.write_text(body.get_content(), encoding="utf-8")
    what = "as delivered" if shown.delivered else "as it would be sent now"
    say(f"wrote {target} and {html} ({what})")


@main.group(cls=DigestGroup)
def subscribers() -> None:
    """Manage subscribers."""


# The model's statuses, spelled out so that `--help` needs no database code (a test holds them
# to digest.core.models.SubscriberStatus).
STATUSES = ("pending", "active", "unsubscribed", "bounced", "complained")


@subscribers.command("add")
@click.argument("email")
@click.option("--confirmed", is_flag=True, help="Activate at once (consent already on record).")
@click.option("--topics", default="", help='Comma-separated topics, e.g. "diffusion, LLM agents".')
@click.option("--exclude", default=None, help="Comma-separated words whose papers are left out.")
@click.option("--frequency", default=None, metavar="daily|weekly|monthly", help="How often. Default: daily.")
@click.option(
    "--weekday",
    type=click.Choice(WEEKDAYS, case_sensitive=False),
    default=None,
    help="The day of a weekly digest. Default: mon.",
)
@click.option("--timezone", default=None, help="IANA time zone, e.g. Europe/Berlin. Default: UTC.")
@click.option("--hour", type=int, default=None, help="Local hour of delivery, 0-23. Default: 8.")
@click.pass_context
def subscribers_add(
    ctx: click.Context,
    email: str,
    confirmed: bool,
    topics: str,
    exclude: str | None,
    frequency: str | None,
    weekday: str | None,
    timezone: str | None,
    hour: int | None,
) -> None:
    """Add a subscriber; without --confirmed they get a confirmation email."""
    from digest.core.db import transaction
    from digest.core.errors import DigestError
    from digest.core.models import Subscriber, utcnow
    from digest.subscribers import importing, subscriptions
    from digest.subscribers.notifications import send_confirmation
    from digest.transport.mailer import SendError

    runtime = runtime_from(ctx)
    now = utcnow()
    fields = importing.parse_fields(topics, exclude, frequency, timezone, hour, weekday)  # refuse bad input first
    with transaction(runtime.session_factory) as session:
        if confirmed:
            sub = subscriptions.add_confirmed(session, runtime.tokens, email, now=now, topics=topics)
            importing.apply_fields(session, sub, fields)
            say(f"{sub.email}: active")
            return
        outcome = subscriptions.subscribe(session, runtime.tokens, email, now=now, topics=topics, source="cli")
        subscriber = session.get(Subscriber, outcome.subscriber_id)
        assert subscriber is not None
        if subscriber.created_at == now:  # only a row made just now: a request never changes a known one
            importing.apply_fields(session, subscriber, fields)
        if outcome.send_confirmation:
            # Sent before the commit: when the mail server refuses or is away, nothing is stored
            # (no pending person waiting for a mail that never left, and no resend pause), so
            # running the same command again is the whole retry.
            try:
                send_confirmation(runtime, subscriber, outcome.topics)
            except (SendError, OSError) as exc:
                raise DigestError(
                    f"{subscriber.email}: the confirmation could not be sent ({error_line(exc)}); nothing was"
                    " stored: run the same command again once the mail server answers"
                    " (DIGEST_SMTP_HOST, DIGEST_SMTP_PORT)"
                ) from exc
    if outcome.send_confirmation:
        say(f"{subscriber.email}: pending; confirmation sent")
    else:
        say(f"{subscriber.email}: {subscriber.status.value}")


def cells_line(cells: list[str]) -> str:
    """Tab-separated cells, each safe for the terminal (a tab inside a cell shows as \\t)."""
    return "\t".join(for_terminal(cell) for cell in cells)


LIST_COLUMNS = ["email", "status", "frequency", "weekday", "timezone", "hour", "topics"]


@subscribers.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.pass_context
def subscribers_list(ctx: click.Context, status: str | None) -> None:
    """List subscribers, tab-separated under a header: email, status, schedule, topics.

    The schedule is the frequency, the weekday of a weekly digest, the time zone and the
    local hour of delivery.
    """
    from sqlalchemy import select

    from digest.core.db import transaction
    from digest.core.models import Subscriber, SubscriberStatus

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        query = select(Subscriber).order_by(Subscriber.id)
        if status:
            query = query.where(Subscriber.status == SubscriberStatus(status))
        found = session.scalars(query.execution_options(yield_per=1000))  # fails before the header is out
        click.echo(cells_line(LIST_COLUMNS))
        for sub in found:
            schedule = [sub.frequency.value, WEEKDAYS[sub.weekday], sub.timezone, f"{sub.send_hour:02d}:00"]
            click.echo(cells_line([sub.email, sub.status.value, *schedule, sub.topics]))


@subscribers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and report; write nothing.")
@click.pass_context
def subscribers_import(ctx: click.Context, file: Path, dry_run: bool) -> None:
    """Import a CSV of subscribers whose consent is on record, as active subscribers.

    The header row names the columns: email (required), topics, exclude, frequency, weekday,
    timezone, hour; the other columns of `digest subscribers export` (status, created_at,
    confirmed_at) are read but set nothing, and a row whose status is not active is left
    alone. Every row is checked first; bad and suppressed rows are reported by line and
    skipped, the rest written at once (all or nothing). Exits 1 when any row was refused.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.subscribers import importing

    runtime = runtime_from(ctx)
    with file.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    bar = Progress(
        TextColumn("lines"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar, file.open("rb") as handle, transaction(runtime.session_factory) as session:
        task = bar.add_task("import", total=max(lines, 1))
        result = importing.import_csv(
            session,
            handle,
            runtime.tokens.address_fingerprint,
            now=utcnow(),
            dry_run=dry_run,
            progress=lambda line: bar.update(task, completed=line),
        )
        if dry_run:
            session.rollback()
        bar.update(task, completed=max(lines, 1))
    for refusal in result.refused:
        say(f"line {refusal.line}: {refusal.reason}", err=True)
    bad = len(result.refused)
    verb = "would import" if dry_run else "imported"
    click.echo(f"{verb} {result.imported} subscribers; {bad} rows refused")
    click.echo(f"  {result.created} new, {result.changed} changed, {result.unchanged} already so")
    if result.not_active:
        click.echo(f"  {result.not_active} rows whose status is not active: left as they are")
    if dry_run:
        click.echo("dry run: nothing was written")
    if bad:
        raise click.ClickException(f"{bad} rows were refused (see the lines above)")


@subscribers.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.pass_context
def subscribers_export(ctx: click.Context, file: Path | None) -> None:
    """Write every subscriber as CSV to FILE or standard output; `import` reads it back.

    Columns: email, status, topics, exclude, frequency, timezone, hour, weekday, created_at,
    confirmed_at.
    """
    import csv
    from typing import TextIO

    from sqlalchemy import select

    from digest.core.db import transaction
    from digest.core.models import Subscriber
    from digest.core.text import csv_cell
    from digest.subscribers.importing import EXPORT_COLUMNS

    runtime = runtime_from(ctx)

    def write(out: TextIO) -> None:
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        with transaction(runtime.session_factory) as session:
            query = select(Subscriber).order_by(Subscriber.id).execution_options(yield_per=1000)
            for sub in session.scalars(query):
                cells = [
                    sub.email,
                    sub.status.value,
                    sub.topics,
                    sub.excluded,
                    sub.frequency.value,
                    sub.timezone,
                    str(sub.send_hour),
                    WEEKDAYS[sub.weekday],
                    sub.created_at.isoformat(),
                    sub.confirmed_at.isoformat() if sub.confirmed_at else "",
                ]
                writer.writerow([csv_cell(c) for c in cells])

    if file is None:
        write(sys.stdout)
        return
    with file.open("w", newline="", encoding="utf-8") as handle:
        write(handle)
    click.echo(f"wrote {file}", err=True)


@subscribers.command("delete")
@click.argument("email")
@click.pass_context
def subscribers_delete(ctx: click.Context, email: str) -> None:
    """Erase a person: their subscriber row and the personal data in the delivery records."""
    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.subscribers import subscriptions
    from digest.subscribers.consent import Actor

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        subscriber = subscriptions.get_by_email(session, email)
        subscriptions.erase(session, runtime.tokens, subscriber, now=utcnow(), actor=Actor.OPERATOR)
    say(f"{email}: deleted (a keyed hash of the address is kept so it stays suppressed)")


@subscribers.command("unsuppress")
@click.argument("email")
@click.pass_context
def subscribers_unsuppress(ctx: click.Context, email: str) -> None:
    """Mail a hard-bounced address again (its mailbox works again). Opt-outs cannot be undone here."""
    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.subscribers import subscriptions

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        subscriber = subscriptions.unsuppress(session, email, now=utcnow())
        say(f"{subscriber.email}: {subscriber.status.value}")


@main.group(cls=DigestGroup)
def sending() -> None:
    """Pause or resume all sending."""


@sending.command("pause")
@click.argument("reason")
@click.pass_context
def sending_pause(ctx: click.Context, reason: str) -> None:
    """Stop all sending until `digest sending resume` (deliveries wait, pending)."""
    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.delivery import reputation

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        pause = reputation.pause(session, utcnow(), reason)
        say(f"sending paused since {pause.paused_at:%Y-%m-%d %H:%M} UTC: {pause.reason}")


@sending.command("resume")
@click.pass_context
def sending_resume(ctx: click.Context) -> None:
    """Lift a pause (automatic or not); complaints before now no longer count toward the next."""
    import getpass

    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.delivery import reputation

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        lifted = reputation.resume(session, utcnow(), f"cli:{getpass.getuser()}")
    click.echo("sending resumed" if lifted else "sending was not paused")


def web_app() -> Any:
    """The ASGI app of one web worker process, from the environment (uvicorn's factory with --workers)."""
    from digest.core.logging_setup import configure_logging
    from digest.core.settings import get_settings
    from digest.orchestration.runtime import Runtime
    from digest.web.app import create_app

    settings = get_settings()
    configure_logging(settings.log_format, logging.INFO)
    return create_app(Runtime(settings))


def schema_problem(runtime: Runtime) -> str | None:
    """Why the app cannot serve this database (no schema, an older one), as one line; else None.

    A missing SQLite file is reported without opening it: connecting would create it empty.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from digest.core.db import current_revisions, schema_heads

    url = make_url(runtime.settings.database_url)
    shown = url.render_as_string(hide_password=True)
    on_disk = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if on_disk and not Path(str(url.database)).exists():
        return f"{shown} does not exist: run `digest db upgrade` (or `digest demo`, then `digest serve --demo`)"
    try:
        current = current_revisions(runtime.engine)
    except DBAPIError:
        # Away, not unmigrated: a web process must still start (a PaaS restarts one that will
        # not), answer /healthz and say in /readyz when the database is back.
        say("warning: the database does not answer yet; serving anyway (see /readyz)", err=True)
        return None
    if current == schema_heads():
        return None
    state = "has no schema" if not current else "has an older schema"
    return f"{shown} {state}: run `digest db upgrade`"


def _demo_runtime(ctx: click.Context) -> Runtime:
    from digest.orchestration.demo import DEMO_DB, demo_settings
    from digest.orchestration.runtime import DEV_OUTBOX, Runtime

    if not DEMO_DB.exists():
        raise click.ClickException(f"no {DEMO_DB} in {Path.cwd()}: run `digest demo` here first")
    runtime = Runtime(demo_settings(), outbox=DEV_OUTBOX.resolve())
    ctx.call_on_close(runtime.dispose)
    return runtime


@main.command()
@click.option("--host", help="Interface to listen on; default: DIGEST_HOST (127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on; default: DIGEST_PORT (8000).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Web processes.")
@click.option(
    "--demo",
    is_flag=True,
    help="Serve `digest demo`'s database (./demo.db) at the address its emails link to "
    "(DIGEST_BASE_URL, http://127.0.0.1:8000 by default); mail goes to ./outbox/.",
)
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int, demo: bool) -> None:
    """The web app (subscribe, confirm, preferences, unsubscribe, JSON API) under uvicorn.

    Refuses to start on a database without the current schema (one line: run `digest db
    upgrade`) rather than answering every page with an error.
    """
    from urllib.parse import urlsplit

    import uvicorn

    from digest.web.app import create_app

    if demo and workers > 1:
        raise click.UsageError("--demo serves with one web process")
    runtime = _demo_runtime(ctx) if demo else runtime_from(ctx)
    settings = runtime.settings
    problem = schema_problem(runtime)
    if problem is not None:
        say(f"error: {problem}", err=True)
        ctx.exit(1)
    # Built here even with several workers: a broken setup (e.g. the DKIM key) ends the command
    # with a one-line reason instead of every worker failing on its own.
    app = create_app(runtime)
    if settings.log_format == "json":
        from digest.core.logging_setup import configure_logging

        configure_logging("json", logging.INFO)  # uvicorn's start-up and access lines too
    if demo:
        # Listen where the demo's links point, so every link in ./outbox/ opens on this server.
        base = urlsplit(settings.base_url)
        host = host or base.hostname
        port = port or base.port or (443 if base.scheme == "https" else 80)
        say(f"Serving the demo's {settings.database_url} at {settings.base_url}, the address its emails link to.")
    say(f"In {settings.environment}: {runtime.mail_destination}.")
    # Proxy headers are read by the app itself, from DIGEST_TRUSTED_PROXIES only: uvicorn's own
    # default would believe any X-Forwarded-For arriving from 127.0.0.1. With JSON logs uvicorn's
    # own loggers go through our root handler (log_config=None).
    options: dict[str, Any] = {
        "host": host or settings.host,
        "port": port or settings.port,
        "proxy_headers": False,
        **({"log_config": None} if settings.log_format == "json" else {}),
    }
    if workers == 1:
        uvicorn.run(app, **options)
    else:
        uvicorn.run("digest.cli:web_app", factory=True, workers=workers, **options)


PING_TIMEOUT = 1.5  # seconds to wait for any worker to answer `status --check`


def probe_workers(redis_url: str | None, stale_after: float) -> Probe:
    """Beat's heartbeat and a Celery ping, for `status --check` (nothing to probe without Redis)."""
    from digest.operations.status import Probe

    if not redis_url:
        return Probe()
    import redis

    from digest.operations import heartbeat

    client = heartbeat.client(redis_url)
    try:
        age = heartbeat.heartbeat_age(client)
    except redis.RedisError as exc:
        return Probe(redis_configured=True, redis_error=error_line(exc))
    finally:
        client.close()
    from workers.celery_app import app as celery_app

    answers = celery_app.control.ping(timeout=PING_TIMEOUT)
    return Probe(
        redis_configured=True,
        beat_age_seconds=age,
        beat_stale_after_seconds=stale_after,
        workers_answering=bool(answers),
    )


@main.command()
@click.option("--date", "date_", help="Day of the digest (YYYY-MM-DD); default: the newest.")
@click.option(
    "--check",
    is_flag=True,
    help="For cron or a monitoring probe: print ok and exit 0, or exit 1 with the reason "
    "(stale beat, no worker, sending paused, a late delivery).",
)
@click.pass_context
def status(ctx: click.Context, date_: str | None, check: bool) -> None:
    """Deliveries by status, send rate, the oldest open delivery and failures with reasons."""
    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.operations.status import check_problems, reputation_lines, status_for

    runtime = runtime_from(ctx)
    s = runtime.settings
    if check:
        probe = probe_workers(s.redis_url, s.beat_stale_after_seconds)
        late_after = dt.timedelta(minutes=s.delivery_late_after_minutes)
        with transaction(runtime.session_factory) as session:
            problems = check_problems(session, utcnow(), runtime.pause_rules, late_after, probe)
        if problems:
            say("; ".join(problems), err=True)
            sys.exit(1)
        click.echo("ok")
        return
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        editions = status_for(session, parse_day(date_))
        if not editions:
            click.echo("no digest yet")
        for edition in editions:
            for line in edition.lines(now):
                say(line)
        for line in reputation_lines(session, now, runtime.pause_rules):
            say(line)


@main.command()
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1), help="Rows per transaction.")
@click.option("--dry-run", is_flag=True, help="Report what would be reduced; write nothing.")
@click.pass_context
def compact(ctx: click.Context, batch_size: int, dry_run: bool) -> None:
    """Reduce delivery rows of editions older than DIGEST_LEDGER_RETENTION_DAYS to counts."""
    from digest.core.db import transaction
    from digest.core.models import utcnow
    from digest.delivery.compaction import compact as compact_ledger
    from digest.delivery.compaction import would_compact

    runtime = runtime_from(ctx)
    today, retention_days = utcnow().date(), runtime.settings.ledger_retention_days
    if dry_run:
        with transaction(runtime.session_factory) as session:
            planned = would_compact(session, today=today, retention_days=retention_days)
            session.rollback()
        click.echo(planned.line(dry_run=True))
        return
    result = compact_ledger(
        runtime.session_factory, today=today, retention_days=retention_days, batch_size=batch_size, vacuum=True
    )
    click.echo(result.line())


@main.command()
@click.pass_context
def mailin(ctx: click.Context) -> None:
    """Receive mail to the list's address over SMTP (subscribe, unsubscribe, bounces, complaints)."""
    from digest.mailin.listener import run as run_mailin

    # One log line per message received is this process's record of what it did.
    logging.getLogger("digest").setLevel(logging.INFO)
    run_mailin(runtime_from(ctx))


@main.command()
@click.option("--outbox", type=click.Path(file_okay=False, path_type=Path), default=Path("outbox"), show_default=True)
@click.option("--date", "date_", help="Day to collect; default: the latest weekday, else the newest sample.")
def demo(outbox: Path, date_: str | None) -> None:
    """The main job on embedded defaults: SQLite, in-process tasks, an embedded SMTP server."""
    from digest.orchestration.demo import run_demo

    run_demo(outbox, parse_day(date_), echo=click.echo)
