"""The ``digest`` command: operators' entry point. Reads settings, commits, reports in one line."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from digest import db
from digest.consent import Actor
from digest.db import transaction
from digest.errors import DigestError
from digest.models import Subscriber, SubscriberStatus, utcnow
from digest.runtime import Runtime
from digest.settings import get_settings
from digest.text import csv_cell

if TYPE_CHECKING:
    from digest.status import Probe

F = TypeVar("F", bound=Callable[..., Any])


def one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:500]


def reports_errors(func: F) -> F:
    """Domain errors end the command with a one-line reason on stderr and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DigestError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ValueError as exc:  # settings validation and bad option values
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(2)
        except SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            click.echo(f"error: database: {one_line(reason)}", err=True)
            sys.exit(1)
        except (ConnectionError, OSError, BrokerError, RedisError) as exc:  # Redis, SMTP or the network
            click.echo(f"error: {type(exc).__name__}: {one_line(exc)}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def runtime_from(ctx: click.Context) -> Runtime:
    obj = ctx.ensure_object(dict)
    if "runtime" not in obj:
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


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
def main(verbose: bool) -> None:
    """digest: each day's trending AI research papers, by email."""
    from digest.logging_setup import configure_logging

    try:
        log_format = get_settings().log_format
    except ValueError:  # the command itself reports broken settings in one line
        log_format = "text"
    configure_logging(log_format, logging.INFO if verbose else logging.WARNING)


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_context
@reports_errors
def db_upgrade(ctx: click.Context) -> None:
    """Migrate the database to the newest schema."""
    settings = get_settings()
    db.upgrade(settings.database_url)
    click.echo("database is at the newest schema")


@main.command()
@click.option("--date", "date_", help="Day to collect (YYYY-MM-DD); default: the latest weekday.")
@click.pass_context
@reports_errors
def collect(ctx: click.Context, date_: str | None) -> None:
    """Fetch and store the papers of a day."""
    from digest.pipeline import collect_day

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
@reports_errors
def run(ctx: click.Context, date_: str | None, sample: bool) -> None:
    """The whole daily job for a day: collect if needed, then deliver to everyone due."""
    runtime = runtime_from(ctx)
    day = parse_day(date_) or latest_weekday(dt.date.today())
    if runtime.settings.redis_url:
        from digest.celery_run import run_via_workers

        summary = run_via_workers(runtime, day, allow_sample=sample)
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from digest.pipeline import run_inprocess

        with Progress(
            SpinnerColumn(), TextColumn("{task.completed} handled"), TimeElapsedColumn(), transient=True
        ) as bar:
            task = bar.add_task("sending", total=None)
            summary = run_inprocess(
                runtime,
                day,
                allow_sample=sample,
                progress=lambda done: bar.update(task, completed=done),
                notify=lambda message: bar.console.print(message, markup=False, highlight=False, soft_wrap=True),
            )
    for line in summary.lines():
        click.echo(line)
    if summary.counts.get("failed"):
        sys.exit(3)


@main.command()
@click.argument("email")
@click.option("--date", "date_", required=True, help="Day of the digest (YYYY-MM-DD).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write (.eml); default: preview-DATE.eml",
)
@click.pass_context
@reports_errors
def preview(ctx: click.Context, email: str, date_: str, output: Path | None) -> None:
    """Write one subscriber's rendered digest to a file, without sending or recording anything."""
    from digest.preview import render_preview

    runtime = runtime_from(ctx)
    day = parse_day(date_)
    assert day is not None
    with transaction(runtime.session_factory) as session:
        data = render_preview(session, runtime, email, day)
        session.rollback()
    target = output or Path(f"preview-{day}.eml")
    target.write_bytes(data)
    html = target.with_suffix(".html")
    from email import message_from_bytes, policy

    msg = message_from_bytes(data, policy=policy.default)
    body = msg.get_body(preferencelist=("html",))
    if body is not None:
        html.write_text(body.get_content(), encoding="utf-8")
    click.echo(f"wrote {target} and {html}")


@main.group()
def subscribers() -> None:
    """Manage subscribers."""


@subscribers.command("add")
@click.argument("email")
@click.option("--confirmed", is_flag=True, help="Activate at once (consent already on record).")
@click.option("--topics", default="", help='Comma-separated topics, e.g. "diffusion, LLM agents".')
@click.option("--exclude", default=None, help="Comma-separated words whose papers are left out.")
@click.option("--frequency", type=click.Choice(["daily", "weekly"]), default=None, help="Default: daily.")
@click.option("--timezone", default=None, help="IANA time zone, e.g. Europe/Berlin. Default: UTC.")
@click.option("--hour", type=int, default=None, help="Local hour of delivery, 0-23. Default: 8.")
@click.pass_context
@reports_errors
def subscribers_add(
    ctx: click.Context,
    email: str,
    confirmed: bool,
    topics: str,
    exclude: str | None,
    frequency: str | None,
    timezone: str | None,
    hour: int | None,
) -> None:
    """Add a subscriber; without --confirmed they get a confirmation email."""
    from digest import importing, subscriptions

    runtime = runtime_from(ctx)
    now = utcnow()
    fields = importing.parse_fields(topics, exclude, frequency, timezone, hour)  # refuse bad input first
    with transaction(runtime.session_factory) as session:
        if confirmed:
            sub = subscriptions.add_confirmed(session, runtime.tokens, email, now=now, topics=topics)
            importing.apply_fields(session, sub, fields)
            click.echo(f"{sub.email}: active")
            return
        outcome = subscriptions.subscribe(session, runtime.tokens, email, now=now, topics=topics, source="cli")
        subscriber = session.get(Subscriber, outcome.subscriber_id)
        assert subscriber is not None
        if subscriber.created_at == now:  # only a row made just now: a request never changes a known one
            importing.apply_fields(session, subscriber, fields)
    if outcome.send_confirmation:
        from digest.notifications import send_confirmation

        send_confirmation(runtime, subscriber, outcome.topics)
        click.echo(f"{subscriber.email}: pending; confirmation sent")
    else:
        click.echo(f"{subscriber.email}: {subscriber.status.value}")


@subscribers.command("list")
@click.option("--status", type=click.Choice([s.value for s in SubscriberStatus]), help="Only this status.")
@click.pass_context
@reports_errors
def subscribers_list(ctx: click.Context, status: str | None) -> None:
    """List subscribers: email, status, frequency, topics."""
    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        query = select(Subscriber).order_by(Subscriber.id)
        if status:
            query = query.where(Subscriber.status == SubscriberStatus(status))
        for sub in session.scalars(query.execution_options(yield_per=1000)):
            click.echo(f"{sub.email}\t{sub.status.value}\t{sub.frequency.value}\t{sub.topics}")


@subscribers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and report; write nothing.")
@click.pass_context
@reports_errors
def subscribers_import(ctx: click.Context, file: Path, dry_run: bool) -> None:
    """Import a CSV of subscribers whose consent is on record, as active subscribers.

    The header row names the columns: email (required), topics, exclude, frequency, timezone,
    hour. Every row is checked first; bad and suppressed rows are reported by line and skipped,
    the rest written at once (all or nothing). Exits 1 when any row was refused.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from digest import importing

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
        click.echo(f"line {refusal.line}: {refusal.reason}", err=True)
    bad = len(result.refused)
    verb = "would import" if dry_run else "imported"
    click.echo(f"{verb} {result.imported} subscribers; {bad} rows refused")
    click.echo(f"  {result.created} new, {result.changed} changed, {result.unchanged} already so")
    if dry_run:
        click.echo("dry run: nothing was written")
    if bad:
        raise click.ClickException(f"{bad} rows were refused (see the lines above)")


@subscribers.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.pass_context
@reports_errors
def subscribers_export(ctx: click.Context, file: Path | None) -> None:
    """Write every subscriber as CSV (email, topics, status, ...) to FILE or standard output."""
    import csv
    from typing import TextIO

    runtime = runtime_from(ctx)

    def write(out: TextIO) -> None:
        writer = csv.writer(out)
        writer.writerow(["email", "topics", "status", "frequency", "created_at", "confirmed_at"])
        with transaction(runtime.session_factory) as session:
            query = select(Subscriber).order_by(Subscriber.id).execution_options(yield_per=1000)
            for sub in session.scalars(query):
                confirmed = sub.confirmed_at.isoformat() if sub.confirmed_at else ""
                created = sub.created_at.isoformat()
                cells = [sub.email, sub.topics, sub.status.value, sub.frequency.value, created, confirmed]
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
@reports_errors
def subscribers_delete(ctx: click.Context, email: str) -> None:
    """Erase a person: their subscriber row and the personal data in the delivery records."""
    from digest import subscriptions

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        subscriber = subscriptions.get_by_email(session, email)
        subscriptions.erase(session, runtime.tokens, subscriber, now=utcnow(), actor=Actor.OPERATOR)
    click.echo(f"{email}: deleted (a keyed hash of the address is kept so it stays suppressed)")


@subscribers.command("unsuppress")
@click.argument("email")
@click.pass_context
@reports_errors
def subscribers_unsuppress(ctx: click.Context, email: str) -> None:
    """Mail a hard-bounced address again (its mailbox works again). Opt-outs cannot be undone here."""
    from digest import subscriptions

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        subscriber = subscriptions.unsuppress(session, email, now=utcnow())
        click.echo(f"{subscriber.email}: {subscriber.status.value}")


@main.group()
def sending() -> None:
    """Pause or resume all sending."""


@sending.command("pause")
@click.argument("reason")
@click.pass_context
@reports_errors
def sending_pause(ctx: click.Context, reason: str) -> None:
    """Stop all sending until `digest sending resume` (deliveries wait, pending)."""
    from digest import reputation

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        pause = reputation.pause(session, utcnow(), reason)
        click.echo(f"sending paused since {pause.paused_at:%Y-%m-%d %H:%M} UTC: {pause.reason}")


@sending.command("resume")
@click.pass_context
@reports_errors
def sending_resume(ctx: click.Context) -> None:
    """Lift a pause (automatic or not); complaints before now no longer count toward the next."""
    import getpass

    from digest import reputation

    runtime = runtime_from(ctx)
    with transaction(runtime.session_factory) as session:
        lifted = reputation.resume(session, utcnow(), f"cli:{getpass.getuser()}")
    click.echo("sending resumed" if lifted else "sending was not paused")


def web_app() -> Any:
    """The ASGI app of one web worker process, from the environment (uvicorn's factory with --workers)."""
    from digest.logging_setup import configure_logging
    from digest.web.app import create_app

    settings = get_settings()
    configure_logging(settings.log_format, logging.INFO)
    return create_app(Runtime(settings))


@main.command()
@click.option("--host", help="Interface to listen on; default: DIGEST_HOST (127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on; default: DIGEST_PORT (8000).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Web processes.")
@click.pass_context
@reports_errors
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int) -> None:
    """The web app (subscribe, confirm, preferences, unsubscribe, JSON API) under uvicorn."""
    import uvicorn

    from digest.web.app import create_app

    settings = get_settings()
    # Built here even with several workers: a broken setup (e.g. the DKIM key) ends the command
    # with a one-line reason instead of every worker failing on its own.
    app = create_app(runtime_from(ctx))
    if settings.log_format == "json":
        from digest.logging_setup import configure_logging

        configure_logging("json", logging.INFO)  # uvicorn's start-up and access lines too
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
    import redis

    from digest import heartbeat
    from digest.status import Probe

    if not redis_url:
        return Probe()
    client = heartbeat.client(redis_url)
    try:
        age = heartbeat.heartbeat_age(client)
    except redis.RedisError as exc:
        return Probe(redis_configured=True, redis_error=one_line(exc))
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
@reports_errors
def status(ctx: click.Context, date_: str | None, check: bool) -> None:
    """Deliveries by status, send rate, the oldest open delivery and failures with reasons."""
    from digest.status import check_problems, reputation_lines, status_for

    runtime = runtime_from(ctx)
    s = runtime.settings
    if check:
        probe = probe_workers(s.redis_url, s.beat_stale_after_seconds)
        late_after = dt.timedelta(minutes=s.delivery_late_after_minutes)
        with transaction(runtime.session_factory) as session:
            problems = check_problems(session, utcnow(), runtime.pause_rules, late_after, probe)
        if problems:
            click.echo("; ".join(problems), err=True)
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
                click.echo(line)
        for line in reputation_lines(session, now, runtime.pause_rules):
            click.echo(line)


@main.command()
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1), help="Rows per transaction.")
@click.pass_context
@reports_errors
def compact(ctx: click.Context, batch_size: int) -> None:
    """Reduce delivery rows of editions older than DIGEST_LEDGER_RETENTION_DAYS to counts."""
    from digest.compaction import compact as compact_ledger

    runtime = runtime_from(ctx)
    result = compact_ledger(
        runtime.session_factory,
        today=utcnow().date(),
        retention_days=runtime.settings.ledger_retention_days,
        batch_size=batch_size,
        vacuum=True,
    )
    click.echo(result.line())


@main.command()
@click.pass_context
@reports_errors
def mailin(ctx: click.Context) -> None:
    """Receive mail to the list's address over SMTP (subscribe, unsubscribe, bounces, complaints)."""
    from digest.mailin_server import run as run_mailin

    # One log line per message received is this process's record of what it did.
    logging.getLogger("digest").setLevel(logging.INFO)
    run_mailin(runtime_from(ctx))


@main.command()
@click.option("--outbox", type=click.Path(file_okay=False, path_type=Path), default=Path("outbox"), show_default=True)
@click.option("--date", "date_", help="Day to collect; default: the latest weekday, else the newest sample.")
@reports_errors
def demo(outbox: Path, date_: str | None) -> None:
    """The main job on embedded defaults: SQLite, in-process tasks, an embedded SMTP server."""
    from digest.demo import run_demo

    run_demo(outbox, parse_day(date_), echo=click.echo)
