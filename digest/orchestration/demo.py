"""``digest demo``: the whole daily job on embedded defaults, leaving real emails to open.

SQLite, in-process tasks, and an embedded SMTP server (aiosmtpd) that writes every message it
receives to ``./outbox/`` as ``.eml`` and ``.html``: the digests travel over real SMTP exactly
as in production, only the receiving end is a folder.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from digest.core import db
from digest.core.db import transaction
from digest.core.errors import UpstreamError
from digest.core.models import utcnow
from digest.core.settings import Settings
from digest.orchestration.pipeline import collect_day, run_inprocess, store_day
from digest.orchestration.runtime import Runtime
from digest.papers.source import SAMPLE_DATES, load_sample
from digest.subscribers.subscriptions import add_confirmed, subscribe
from digest.transport.mailer import OutboxMailer

DEMO_DB = Path("demo.db")
SAMPLE_SUBSCRIBERS = (
    ("ada@example.com", "", ""),
    ("grace@example.com", "video generation, diffusion", ""),
    ("alan@example.com", "reinforcement learning, agents, reasoning", "robot"),
)
PENDING_SUBSCRIBER = "pending@example.com"  # never confirmed: must get no digest
SERVE_COMMAND = "digest serve --demo"


def demo_settings(**overrides: Any) -> Settings:
    """The settings the demo runs with, and ``digest serve --demo`` serves with: the same
    database and the same ``DIGEST_BASE_URL`` (so the demo's email links reach that server),
    no Redis (limits are counted in memory)."""
    return Settings(database_url=f"sqlite:///{DEMO_DB}", redis_url=None, **overrides)


class _OutboxHandler:
    def __init__(self, outbox: OutboxMailer):
        self.outbox = outbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for recipient in envelope.rcpt_tos:
            self.outbox.write(recipient, bytes(envelope.content))
        return "250 OK: written to the outbox"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(outbox: Path, day: dt.date | None, *, echo: Callable[[str], None]) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DB}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(outbox, ignore_errors=True)
    port = _free_port()
    settings = demo_settings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_security="none",
        papers_api_retries=2,
        papers_api_timeout=10,
    )
    db.upgrade(settings.database_url)
    runtime = Runtime(settings)
    server = Controller(_OutboxHandler(OutboxMailer(outbox)), hostname="127.0.0.1", port=port)
    server.start()
    try:
        target = _collect(runtime, day, echo)
        now = utcnow()
        with transaction(runtime.session_factory) as session:
            for email, topics, excluded in SAMPLE_SUBSCRIBERS:
                added = add_confirmed(session, runtime.tokens, email, now=now, topics=topics, source="demo")
                added.excluded = excluded
            subscribe(session, runtime.tokens, PENDING_SUBSCRIBER, now=now, source="demo")
        echo(f"Subscribers: {', '.join(e for e, _, _ in SAMPLE_SUBSCRIBERS)} (active), {PENDING_SUBSCRIBER} (pending)")
        summary = run_inprocess(runtime, target)
        for line in summary.lines():
            echo(line)
    finally:
        server.stop()
        runtime.dispose()
    files = sorted(outbox.glob("*.html"))
    echo(f"\n{len(files)} digests delivered over SMTP to the embedded server and written to {outbox.resolve()}/:")
    for path in files:
        echo(f"  {path.resolve().as_uri()}")
    echo("Open an .html file in a browser, or an .eml file in a mail program.")
    echo(
        f"\nTheir links (preferences, More like this, unsubscribe) point at {settings.base_url}; to serve them:"
        f"\n  {SERVE_COMMAND}"
    )


def _collect(runtime: Runtime, day: dt.date | None, echo: Callable[[str], None]) -> dt.date:
    """Live papers when the API answers (latest day with papers), else the newest recorded day."""
    candidates = [day] if day else [utcnow().date() - dt.timedelta(days=n) for n in range(7)]
    try:
        with runtime.papers_client() as client:
            for candidate in candidates:
                with transaction(runtime.session_factory) as session:
                    result = collect_day(session, client, candidate, runtime)
                if result.digest_id is not None:
                    echo(f"Collected {result.stored} papers for {candidate} from {runtime.settings.papers_api_url}.")
                    return candidate
        echo("The papers API answered but had no papers for those days.")
    except UpstreamError as exc:
        echo(f"The papers API is not reachable ({exc}).")
    sample_day = day if day in SAMPLE_DATES else SAMPLE_DATES[-1]
    echo(f"Using the recorded sample data for {sample_day} shipped with digest instead.")
    items = load_sample(sample_day) or []
    with transaction(runtime.session_factory) as session:
        store_day(session, runtime, sample_day, items, "sample")
    return sample_day
