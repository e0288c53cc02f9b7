"""The ``digest`` command: operators' entry point. Reads settings, commits, reports in one line."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from digest import db
from digest.db import transaction
from digest.errors import DigestError
from digest.models import Subscriber, SubscriberStatus, utcnow
from digest.runtime import Runtime
from digest.settings import get_settings

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
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
                runtime, day, allow_sample=sample, progress=lambda done: bar.update(task, completed=done)
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
@click.pass_context
@reports_errors
def subscribers_add(ctx: click.Context, email: str, confirmed: bool, topics: str) -> None:
    """Add a subscriber; without --confirmed they get a confirmation email."""
    from digest import subscriptions

    runtime = runtime_from(ctx)
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        if confirmed:
            sub = subscriptions.add_confirmed(session, email, now=now, topics=topics)
            click.echo(f"{sub.email}: active")
            return
        outcome = subscriptions.subscribe(session, email, now=now, topics=topics, source="cli")
        subscriber = session.get(Subscriber, outcome.subscriber_id)
        assert subscriber is not None
    if outcome.send_confirmation:
        from digest.notifications import send_confirmation

        send_confirmation(runtime, subscriber)
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
@click.pass_context
@reports_errors
def subscribers_import(ctx: click.Context, file: Path) -> None:
    """Import a CSV (columns: email[,topics]) as active subscribers whose consent is on record.

    Bad rows are reported by line number and skipped; the rest are imported.
    """
    import csv

    from digest import subscriptions

    runtime = runtime_from(ctx)
    imported = bad = 0
    with file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        session = runtime.session_factory()
        try:
            for row in reader:
                if not row or not "".join(row).strip():
                    continue
                if reader.line_num == 1 and row[0].strip().lower() == "email":
                    continue  # header
                try:
                    topics = row[1] if len(row) > 1 else ""
                    # A savepoint per row: a row refused half way leaves nothing behind.
                    with session.begin_nested():
                        subscriptions.add_confirmed(session, row[0], now=utcnow(), topics=topics, source="import")
                except DigestError as exc:
                    bad += 1
                    click.echo(f"line {reader.line_num}: {exc}", err=True)
                    continue
                imported += 1
                if imported % 1000 == 0:  # keep transactions short on big files
                    session.commit()
            session.commit()
        finally:
            session.close()
    click.echo(f"imported {imported} subscribers; {bad} bad rows skipped")


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
                writer.writerow([sub.email, sub.topics, sub.status.value, sub.frequency.value, created, confirmed])

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
        subscriptions.erase(session, subscriptions.get_by_email(session, email))
    click.echo(f"{email}: deleted")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.pass_context
@reports_errors
def serve(ctx: click.Context, host: str, port: int) -> None:
    """The web app (subscribe, confirm, preferences, unsubscribe, JSON API) under uvicorn."""
    import uvicorn

    from digest.web.app import create_app

    # uvicorn honours X-Forwarded-For only from FORWARDED_ALLOW_IPS (default: 127.0.0.1).
    uvicorn.run(create_app(runtime_from(ctx)), host=host, port=port, proxy_headers=True)


@main.command()
@click.option("--date", "date_", help="Day of the digest (YYYY-MM-DD); default: the newest.")
@click.pass_context
@reports_errors
def status(ctx: click.Context, date_: str | None) -> None:
    """Deliveries by status, send rate, the oldest open delivery and failures with reasons."""
    from digest.status import reputation_lines, status_for

    runtime = runtime_from(ctx)
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        editions = status_for(session, parse_day(date_))
        if not editions:
            click.echo("no digest yet")
        for edition in editions:
            for line in edition.lines(now):
                click.echo(line)
        s = runtime.settings
        for line in reputation_lines(
            session, now, s.complaint_window_days, s.complaint_pause_threshold, s.complaint_min_sent
        ):
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
