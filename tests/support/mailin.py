"""Mail-in test helpers: the listener and a private Dovecot, the rows mail-in changes, digests to reply to."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from digest.core.db import transaction
from digest.core.models import Subscriber
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.processes import Process
from tests.support.servers import Received, SMTPSink, free_port, port_open

DAY = dt.date(2024, 10, 25)


NEXT_DAY = dt.date(2026, 4, 16)


INBOUND = "papers@digest.example.org"


TABLES = ("subscribers", "deliveries", "subscriber_events", "processed_messages")


# Copied into the listener's environment: what it needs to reach our database and mail server.
@dataclass
class Listener:
    process: Process
    port: int

    @property
    def running(self) -> bool:
        return self.process.running

    def log(self) -> str:
        return self.process.output()


def add_active(runtime: Runtime, email: str) -> int:
    with transaction(runtime.session_factory) as session:
        return subscriptions.add_confirmed(session, runtime.tokens, email, now=dt.datetime.now(dt.UTC)).id


def subscriber(runtime: Runtime, email: str) -> Subscriber:
    with transaction(runtime.session_factory) as session:
        found = subscriptions.find_by_email(session, email)
        assert found is not None, email
        return found


def events(runtime: Runtime, email: str) -> list[str]:
    with runtime.engine.connect() as conn:
        return list(
            conn.scalars(
                sa.text(
                    "SELECT e.kind FROM subscriber_events e JOIN subscribers s ON s.id = e.subscriber_id"
                    " WHERE s.email = :email ORDER BY e.id"
                ),
                {"email": email},
            )
        )


def snapshot(runtime: Runtime) -> dict[str, list[Any]]:
    """Every row of the tables mail-in may touch, to show that something changed nothing."""
    with runtime.engine.connect() as conn:
        return {t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES}


def digests_to(smtp: SMTPSink, email: str) -> list[Received]:
    return [m for m in smtp.messages if email in m.rcpt_tos and m.message["List-Id"]]


def send_digest(runtime: Runtime, smtp: SMTPSink, *emails: str, day: dt.date = DAY) -> dict[str, Received]:
    """Make real digests (real deliveries, real VERP envelopes) for active subscribers."""
    for email in emails:
        add_active(runtime, email)
    run_inprocess(runtime, day)
    received = {}
    for email in emails:
        (got,) = digests_to(smtp, email)
        received[email] = got
    return received


DOVECOT = "/usr/sbin/dovecot"


DOVECOT_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{dir}/mail/%u
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 100
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
}}
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={dir}/mail/%u
}}
"""


@dataclass
class Dovecot:
    port: int
    dir: Path


@contextmanager
def running_dovecot(extra_conf: str = "") -> Iterator[Dovecot]:
    """A throwaway Dovecot from Debian's package; any user name logs in with ``secret``."""
    if not Path(DOVECOT).exists():
        if os.environ.get("DIGEST_REQUIRE_DOVECOT") == "1":
            pytest.fail(f"{DOVECOT} is missing (apt-get install dovecot-imapd) and DIGEST_REQUIRE_DOVECOT=1")
        pytest.skip(f"{DOVECOT} is missing: apt-get install -y dovecot-imapd to run the IMAP tests")
    # Under /tmp itself: the dovecot user must be able to reach it (pytest's tmp dirs are 0700).
    root = Path(tempfile.mkdtemp(prefix="digest-dovecot-"))
    root.chmod(0o755)
    (root / "mail").mkdir()
    (root / "state").mkdir()
    shutil.chown(root / "mail", "dovecot", "dovecot")
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(dir=root, port=port) + extra_conf, encoding="utf-8")
    subprocess.run([DOVECOT, "-c", str(conf)], check=True)
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            log = (root / "dovecot.log").read_text(errors="replace") if (root / "dovecot.log").exists() else ""
            pytest.fail(f"dovecot did not start:\n{log}")
        time.sleep(0.05)
    try:
        yield Dovecot(port, root)
    finally:
        pid = int((root / "run" / "master.pid").read_text().strip())
        os.kill(pid, 15)
        deadline = time.monotonic() + 10
        while (root / "run" / "master.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)
