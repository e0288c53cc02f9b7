"""Two worker hosts over a real network, one of them cut off mid-run.

Each "host" is a Linux network namespace whose only way out is a veth pair into a bridge on
this machine; PostgreSQL, Redis and the SMTP sink are private servers listening on the
bridge's address only, so the hosts reach them over their links and nothing else. A real
Celery worker (the Procfile's command) runs in each namespace. Mid-run, host A's link is cut
(`ip link set ... down`: its worker keeps running, its packets go nowhere). Then: every
subscriber gets the digest, a second copy only for messages in flight at the cut and with the
same Message-ID, and the rows host A had leased are sent by host B once their lease ran out.

Skips with a reason where namespaces cannot be made (not root, no CAP_NET_ADMIN, no `ip`).
Everything it made (namespaces, veths, the bridge) goes, even when the test fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from digest.core import db
from digest.core.models import Delivery, DeliveryStatus, Subscriber
from digest.orchestration.runtime import Runtime
from tests.conftest import make_settings
from tests.e2e.infra_servers import PrivatePostgres, PrivateRedis, free_port_on
from tests.e2e.test_infra_restarts import DAY, add_subscribers
from tests.support.processes import BIN, ROOT, Process, procfile_command, settings_env
from tests.support.servers import SMTPSink, _Handler, wait_until

pytestmark = pytest.mark.e2e

# Link-local addresses, on links that exist only inside this test (a subnet per test process,
# so two runs at once do not share an address).
NET = f"169.254.{20 + os.getpid() % 200}"
SERVER = f"{NET}.1"
HOSTS = {"a": f"{NET}.11", "b": f"{NET}.12"}
SUBSCRIBERS = 300
LEASE = 8


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass
class Network:
    bridge: str
    namespaces: dict[str, str]  # host -> namespace name
    links: dict[str, str]  # host -> its veth end on this machine


@pytest.fixture
def network() -> Iterator[Network]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to build network namespaces")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN)")
    tag = f"{os.getpid() % 100000}"
    net = Network(f"dgbr{tag}", {h: f"dg{h}{tag}" for h in HOSTS}, {h: f"dg{h}{tag}h" for h in HOSTS})
    made_bridge = False
    try:
        try:
            ip("link", "add", net.bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot make network devices here: {exc.stderr.decode().strip()}")
        made_bridge = True
        ip("addr", "add", f"{SERVER}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for host, address in HOSTS.items():
            ns, outside, inside = net.namespaces[host], net.links[host], f"dg{host}{tag}n"
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", net.bridge)
            ip("link", "set", outside, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
            ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield net
    finally:
        for ns in net.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)
        for link in net.links.values():
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20, check=False)
        if made_bridge:
            subprocess.run(["ip", "link", "del", net.bridge], capture_output=True, timeout=20, check=False)


class PeerSink(_Handler):
    """The tests' sink handler, also noting which host each accepted message came from."""

    def __init__(self, sink: SMTPSink) -> None:
        super().__init__(sink)
        self.peers: list[tuple[str, str, float]] = []  # (recipient, peer address, when)
        self.in_flight: Counter[str] = Counter()  # peer address -> messages being received now
        self.frozen: set[str] = set()  # peers whose replies are held back
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert session.peer is not None
        peer = str(session.peer[0])
        with self.lock:
            self.in_flight[peer] += 1
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            with self.lock:
                self.peers.append((envelope.rcpt_tos[0].lower(), peer, time.monotonic()))
        while True:  # bounded: the test unfreezes right after the cut
            with self.lock:
                if peer not in self.frozen:
                    self.in_flight[peer] -= 1
                    return reply
            await asyncio.sleep(0.01)

    def freeze_if_sending(self, peer: str) -> bool:
        """Hold the replies to ``peer`` if one of its messages is being received now."""
        with self.lock:
            if self.in_flight[peer] > 0:
                self.frozen.add(peer)
                return True
            return False


def test_a_host_cut_off_mid_run_loses_nobody(network: Network, tmp_path: Path) -> None:
    postgres = PrivatePostgres(SERVER, allow=f"{NET}.0/24").start()
    redis = PrivateRedis(SERVER).start()
    sink = SMTPSink(port=free_port_on(SERVER))
    handler = PeerSink(sink)
    sink.controller = Controller(handler, hostname=SERVER, port=sink.port)
    sink.controller.start()
    workers: dict[str, Process] = {}
    runtime: Runtime | None = None
    run: subprocess.Popen[bytes] | None = None
    try:
        db.upgrade(postgres.url)
        settings = make_settings(
            postgres.url,
            sink,
            redis_url=redis.url,
            smtp_host=SERVER,
            # Refused at once (this machine has the address, nothing listens): the run falls
            # back to the recorded sample, which no namespace could fetch otherwise.
            papers_api_url=f"http://{SERVER}:9",
            lease_seconds=LEASE,
            batch_size=20,
            smtp_pool_size=2,
            smtp_timeout=5,
            send_retry_base_seconds=0.5,
            send_retry_max_seconds=2.0,
            send_max_attempts=30,
        )
        runtime = Runtime(settings)
        emails = add_subscribers(runtime, SUBSCRIBERS)
        sink.behaviour.delay = 0.02  # a run of several seconds, so the cut lands mid-batch
        env = settings_env(settings)
        for host, ns in network.namespaces.items():
            argv = ["ip", "netns", "exec", ns, *procfile_command("worker"), "-n", f"{host}@%h"]
            workers[host] = Process(argv, env, tmp_path / f"worker-{host}.log").start()
        for worker in workers.values():
            worker.wait_for_output("ready.", timeout=90)
        run_log = tmp_path / "run.log"
        with run_log.open("wb") as out:
            run = subprocess.Popen(
                [str(BIN / "digest"), "run", "--date", DAY.isoformat(), "--sample"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )

        def sent_by(address: str) -> int:
            with handler.lock:
                return sum(1 for _, peer, _ in handler.peers if peer == address)

        def a_is_sending() -> bool:
            # Cut while a message of host A is in the sink's hands, its reply held until the link
            # is down: the row it belongs to was claimed (leased) before sending and its result
            # can no longer reach the database, so A certainly holds a leased row. Cutting between
            # two of A's batches would leave nothing to take over and prove nothing.
            return sent_by(HOSTS["a"]) >= 40 and sent_by(HOSTS["b"]) >= 40 and handler.freeze_if_sending(HOSTS["a"])

        assert wait_until(a_is_sending, timeout=120, interval=0.005)
        ip("link", "set", network.links["a"], "down")  # host A is cut off; its worker runs on
        with handler.lock:
            handler.frozen.clear()  # the held replies now go into a link that carries nothing
        cut = time.monotonic()
        leased_at_cut = leases(runtime)
        # Host B renews its own leases every third of a lease; rows whose lease has not moved
        # half a lease later belong to the host that can no longer reach the database.
        time.sleep(LEASE / 2)
        stuck = {d: until for d, until in leases(runtime).items() if leased_at_cut.get(d) == until}
        assert stuck, "host A held leased rows when it was cut off"
        try:
            run.wait(timeout=150)
        except subprocess.TimeoutExpired:
            run.kill()
            raise AssertionError(f"digest run did not finish:\n{run_log.read_text()[-3000:]}") from None
        output = run_log.read_text()
        assert run.returncode == 0, output

        with runtime.session_factory() as session:
            rows = {
                email: (status, message_id, sent_at, delivery_id)
                for email, status, message_id, sent_at, delivery_id in session.execute(
                    select(Subscriber.email, Delivery.status, Delivery.message_id, Delivery.sent_at, Delivery.id).join(
                        Delivery, Delivery.subscriber_id == Subscriber.id
                    )
                )
            }
        assert Counter(status for status, _, _, _ in rows.values()) == {DeliveryStatus.SENT: SUBSCRIBERS}
        received = Counter(m.rcpt_tos[0] for m in sink.messages)
        assert set(received) == set(emails), "every subscriber got the digest"
        for message in sink.messages:
            assert message.message["Message-ID"] == rows[message.rcpt_tos[0]][1], "a copy is the same message"
        # Only messages in flight on host A at the cut can arrive twice: one per SMTP connection
        # of each pool process plus each process's group of accepted messages not yet recorded.
        duplicates = {e: n for e, n in received.items() if n > 1}
        assert len(duplicates) <= 2 * (2 + 16), duplicates
        by_id = {delivery_id: email for email, (_, _, _, delivery_id) in rows.items()}
        for delivery_id, lease_until in stuck.items():
            email = by_id[delivery_id]
            sent_at = rows[email][2]
            assert sent_at is not None and sent_at >= lease_until, "taken over only after the lease ran out"
            from_b = [when for r, peer, when in handler.peers if r == email and peer == HOSTS["b"]]
            assert from_b and min(from_b) > cut, f"{email}: host B sent A's leased row after the cut"
    finally:
        if run is not None and run.poll() is None:
            run.kill()  # a failed assertion left it running; reap it here, not in a later test
            run.wait(timeout=30)
        for worker in workers.values():
            worker.kill()
        if runtime is not None:
            runtime.dispose()
        sink.stop()
        redis.close()
        postgres.close()


def leases(runtime: Runtime) -> dict[int, dt.datetime]:
    with runtime.session_factory() as session:
        return {
            delivery_id: until
            for delivery_id, until in session.execute(
                select(Delivery.id, Delivery.lease_until).where(Delivery.status == DeliveryStatus.SENDING)
            )
            if until is not None
        }
