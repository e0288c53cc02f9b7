"""A deferred digest is retried when its backoff says, not when the stall sweep comes round.

The SMTP server answers every recipient's first DATA with 451 and accepts the second. With
DIGEST_SEND_RETRY_* at 0.5-1 s each retry must reach the server within a few seconds of its
deferral, even though the lease (and so `digest run`'s stall sweep) is 30 s away: rows whose
jittered backoff ends after their batch came back must bring the batch back again.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from digest.orchestration.runtime import Runtime
from tests.e2e.test_infra_restarts import DAY, assert_served_exactly_once
from tests.support.factories import add_subscribers
from tests.support.processes import BIN, ROOT, Process, settings_env, start_worker
from tests.support.servers import SinkController, SMTPSink, _Handler

pytestmark = pytest.mark.e2e


class DeferOnce(_Handler):
    """451 for each recipient's first message, then the usual acceptance."""

    def __init__(self, sink: SMTPSink) -> None:
        super().__init__(sink)
        self.deferred_at: dict[str, float] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipient = envelope.rcpt_tos[0].lower()
        with self.lock:
            first = recipient not in self.deferred_at
            if first:
                self.deferred_at[recipient] = time.monotonic()
        if first:
            return "451 4.3.0 Try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def deferring(smtp: SMTPSink) -> Iterator[DeferOnce]:
    smtp.stop()
    handler = DeferOnce(smtp)
    smtp.controller = SinkController(handler, hostname="127.0.0.1", port=smtp.port)
    smtp.controller.start()
    yield handler


def test_a_451_is_retried_after_its_backoff(
    runtime: Runtime, smtp: SMTPSink, deferring: DeferOnce, redis_url: str, tmp_path: Path
) -> None:
    emails = add_subscribers(runtime, 60)
    settings = runtime.settings.model_copy(
        update={
            "redis_url": redis_url,
            "lease_seconds": 30,
            "batch_size": 20,
            "smtp_pool_size": 2,
            "send_retry_base_seconds": 0.5,
            "send_retry_max_seconds": 1.0,
        }
    )
    env = settings_env(settings)
    worker: Process = start_worker(env, tmp_path / "worker.log")
    try:
        started = time.monotonic()
        run = subprocess.run(
            [str(BIN / "digest"), "run", "--date", DAY.isoformat()],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        took = time.monotonic() - started
    finally:
        worker.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    assert_served_exactly_once(runtime, smtp, emails)
    accepted = {m.rcpt_tos[0].lower(): m.at for m in smtp.messages}
    waits = sorted(accepted[e] - deferring.deferred_at[e] for e in emails)
    assert len(deferring.deferred_at) == len(emails), "every recipient was deferred once"
    # Backoff 0.25-1 s, plus the batch's own sending: seconds, not the 32 s of the stall sweep.
    assert waits[-1] < 6.0, f"slowest retry {waits[-1]:.1f} s after its 451 (median {waits[len(waits) // 2]:.1f} s)"
    assert took < 25.0, f"the run took {took:.1f} s"
