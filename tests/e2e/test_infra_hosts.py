"""Two worker hosts over a real network, one of them cut off mid-run or mid-plan.

Each "host" is a Linux network namespace whose only way out is a veth pair into a bridge on
this machine; PostgreSQL, Redis and the SMTP sink are private servers listening on the
bridge's address only, so the hosts reach them over their links and nothing else. A real
Celery worker (the Procfile's command) runs in each namespace. Host A's link is cut
(`ip link set ... down`: its worker keeps running, its packets go nowhere):

* mid-run, while it sends: every subscriber gets the digest, a second copy only for messages
  in flight at the cut and with the same Message-ID, and the rows host A had leased are sent
  by host B once their lease ran out;
* mid-plan, while both hosts plan the edition's pages (issue 22): PostgreSQL drops host A's
  open transaction once it finds the host gone, host B plans the pages A had taken, and every
  due subscriber has exactly one ledger row and one message: nobody planned twice or left out.

Skips with a reason where namespaces cannot be made (not root, no CAP_NET_ADMIN, no `ip`).
Everything it made (namespaces, veths, the bridge) goes, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import insert, select, text

from digest.core import db
from digest.core.models import Delivery, DeliveryStatus, Subscriber, utcnow
from digest.core.settings import Settings
from digest.orchestration.pipeline import collect_if_needed
from digest.orchestration.runtime import Runtime
from tests.e2e.infra_servers import PrivatePostgres, PrivateRedis, free_port_on
from tests.e2e.test_infra_restarts import DAY
from tests.support.factories import add_subscribers
from tests.support.processes import BIN, ROOT, Process, procfile_command, settings_env
from tests.support.servers import SinkController, SMTPSink, _Handler, wait_until
from tests.support.settings import make_settings

pytestmark = pytest.mark.e2e

# Link-local addresses, on links that exist only inside this test (a subnet per test process,
# so two runs at once do not share an address).
NET = f"169.254.{20 + os.getpid() % 200}"
SERVER = f"{NET}.1"
HOSTS = {"a": f"{NET}.11", "b": f"{NET}.12"}
SUBSCRIBERS = 300
LEASE = 8
PAGE = 20
# PostgreSQL finds a cut-off client within seconds instead of TCP's default quarter of an hour
# (unacknowledged data) or two hours (keepalives), and so rolls back what that host left open.
DEAD_PEER_OPTIONS = {
    "tcp_user_timeout": "3000",
    "tcp_keepalives_idle": "1",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
}
PLANNED = re.compile(r"Task digest\.plan_page\[[0-9a-f-]+\] succeeded")


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


@dataclass
class Site:
    """The private servers on the bridge, seen from this machine, and what the test started."""

    settings: Settings
    runtime: Runtime
    sink: SMTPSink
    handler: PeerSink
    tmp: Path
    workers: dict[str, Process] = field(default_factory=dict)
    run: subprocess.Popen[bytes] | None = None

    @property
    def run_log(self) -> Path:
        return self.tmp / "run.log"

    def start_workers(self, network: Network) -> None:
        """A real worker (the Procfile's command) in each host's namespace, ready to work."""
        env = settings_env(self.settings)
        for host, ns in network.namespaces.items():
            argv = ["ip", "netns", "exec", ns, *procfile_command("worker"), "-n", f"{host}@%h"]
            self.workers[host] = Process(argv, env, self.tmp / f"worker-{host}.log").start()
        for worker in self.workers.values():
            worker.wait_for_output("ready.", timeout=90)

    def start_run(self) -> None:
        """`digest run` on this machine; the recorded sample, which no namespace could fetch."""
        with self.run_log.open("wb") as out:
            self.run = subprocess.Popen(
                [str(BIN / "digest"), "run", "--date", DAY.isoformat(), "--sample"],
                env=settings_env(self.settings),
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )

    def finish_run(self) -> str:
        """The run's output once it ended well (a failed or hung run fails the test)."""
        assert self.run is not None
        try:
            self.run.wait(timeout=150)
        except subprocess.TimeoutExpired:
            self.run.kill()
            raise AssertionError(f"digest run did not finish:\n{self.run_log.read_text()[-3000:]}") from None
        output = self.run_log.read_text()
        assert self.run.returncode == 0, output
        return output

    def sent_by(self, address: str) -> int:
        with self.handler.lock:
            return sum(1 for _, peer, _ in self.handler.peers if peer == address)

    def rows(self) -> dict[str, tuple[DeliveryStatus, str, dt.datetime | None, int]]:
        """email -> (status, Message-ID, sent at, delivery id) of every ledger row."""
        with self.runtime.session_factory() as session:
            found = session.execute(
                select(Subscriber.email, Delivery.status, Delivery.message_id, Delivery.sent_at, Delivery.id).join(
                    Delivery, Delivery.subscriber_id == Subscriber.id
                )
            )
            return {
                email: (status, message_id, sent_at, delivery_id)
                for email, status, message_id, sent_at, delivery_id in found
            }


@contextlib.contextmanager
def site_on(network: Network, tmp_path: Path, **overrides: object) -> Iterator[Site]:
    """PostgreSQL, Redis and the SMTP sink on the bridge's address, migrated, with settings for
    the hosts (``overrides`` on top); everything started here is stopped on the way out."""
    postgres = PrivatePostgres(SERVER, allow=f"{NET}.0/24", options=DEAD_PEER_OPTIONS).start()
    redis = PrivateRedis(SERVER).start()
    sink = SMTPSink(port=free_port_on(SERVER))
    handler = PeerSink(sink)
    sink.controller = SinkController(handler, hostname=SERVER, port=sink.port)
    sink.controller.start()
    site: Site | None = None
    try:
        db.upgrade(postgres.url)
        values: dict[str, object] = {
            "redis_url": redis.url,
            "smtp_host": SERVER,
            # Refused at once (this machine has the address, nothing listens): the run falls
            # back to the recorded sample, which no namespace could fetch otherwise.
            "papers_api_url": f"http://{SERVER}:9",
            "lease_seconds": LEASE,
            "batch_size": PAGE,
            "smtp_pool_size": 2,
            "smtp_timeout": 5,
            "send_retry_base_seconds": 0.5,
            "send_retry_max_seconds": 2.0,
            "send_max_attempts": 30,
            **overrides,
        }
        settings = make_settings(postgres.url, sink, None, **values)
        site = Site(settings, Runtime(settings), sink, handler, tmp_path)
        yield site
    finally:
        if site is not None:
            if site.run is not None and site.run.poll() is None:
                site.run.kill()  # a failed assertion left it running; reap it here, not in a later test
                site.run.wait(timeout=30)
            for worker in site.workers.values():
                worker.kill()
            site.runtime.dispose()
        sink.stop()
        redis.close()
        postgres.close()


def test_a_host_cut_off_mid_run_loses_nobody(network: Network, tmp_path: Path) -> None:
    with site_on(network, tmp_path) as site:
        runtime, handler = site.runtime, site.handler
        emails = add_subscribers(runtime, SUBSCRIBERS)
        site.sink.behaviour.delay = 0.02  # a run of several seconds, so the cut lands mid-batch
        site.start_workers(network)
        site.start_run()

        def a_is_sending() -> bool:
            # Cut while a message of host A is in the sink's hands, its reply held until the link
            # is down: the row it belongs to was claimed (leased) before sending and its result
            # can no longer reach the database, so A certainly holds a leased row. Cutting between
            # two of A's batches would leave nothing to take over and prove nothing.
            return (
                site.sent_by(HOSTS["a"]) >= 40
                and site.sent_by(HOSTS["b"]) >= 40
                and handler.freeze_if_sending(HOSTS["a"])
            )

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
        site.finish_run()

        rows = site.rows()
        assert Counter(status for status, _, _, _ in rows.values()) == {DeliveryStatus.SENT: SUBSCRIBERS}
        received = Counter(m.rcpt_tos[0] for m in site.sink.messages)
        assert set(received) == set(emails), "every subscriber got the digest"
        for message in site.sink.messages:
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


def test_two_hosts_plan_one_edition_and_one_cut_mid_plan_leaves_nobody_out(network: Network, tmp_path: Path) -> None:
    # A page not acknowledged comes back after 5 s (a host cut off never acknowledges it).
    with site_on(network, tmp_path, task_visibility_timeout=5) as site:
        runtime = site.runtime
        digest_id, _ = collect_if_needed(runtime, DAY, allow_sample=True)
        assert digest_id is not None
        emails = add_subscribers(runtime, SUBSCRIBERS)
        with runtime.session_factory() as session:
            ids = list(session.scalars(select(Subscriber.id).order_by(Subscriber.id)))
        # One subscriber's ledger key in the middle of every page, held in an open transaction:
        # each planner stops on it inside its own transaction (half its page inserted, nothing
        # committed), so both hosts are certainly mid-plan when A is cut, and nothing is sent yet.
        held = range(PAGE // 2, SUBSCRIBERS, PAGE)
        engine = runtime.session_factory.kw["bind"]
        blocker = engine.connect()
        trap = blocker.begin()
        now = utcnow()
        blocker.execute(
            insert(Delivery),
            [
                {
                    "digest_id": digest_id,
                    "subscriber_id": ids[n],
                    "recipient": emails[n],
                    "status": DeliveryStatus.PENDING,
                    "attempts": 0,
                    "message_id": f"<held{n}@test>",
                    "not_after": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for n in held
            ],
        )

        def planners() -> dict[str, int]:
            """Each host address with a database session open -> how many of them wait on a held key."""
            with engine.connect() as probe:
                found = probe.execute(
                    text(
                        "SELECT host(client_addr), count(*) FILTER (WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'INSERT INTO deliveries%') FROM pg_stat_activity"
                        " WHERE client_addr IS NOT NULL GROUP BY 1"
                    )
                )
                return {address: waiting for address, waiting in found}

        try:
            site.start_workers(network)
            site.start_run()
            assert wait_until(lambda: all(planners().get(address, 0) > 0 for address in HOSTS.values()), timeout=120), (
                f"{planners()}\n{site.workers['a'].output()[-2000:]}"
            )
            ip("link", "set", network.links["a"], "down")  # host A is cut off mid-plan; its worker runs on
        finally:
            trap.rollback()
            blocker.close()
        # Its sessions end when PostgreSQL finds the host gone (``DEAD_PEER_OPTIONS``): the page
        # A was planning is rolled back, not left half planned or holding its subscribers' keys.
        assert wait_until(lambda: HOSTS["a"] not in planners(), timeout=60), planners()
        output = site.finish_run()
        assert f"sent {SUBSCRIBERS}," in output, output

        with runtime.session_factory() as session:
            planned = Counter(
                session.scalars(select(Subscriber.email).join(Delivery, Delivery.subscriber_id == Subscriber.id))
            )
        assert planned == Counter(emails), "one ledger row per due subscriber: nobody twice or left out"
        rows = site.rows()
        assert Counter(status for status, _, _, _ in rows.values()) == {DeliveryStatus.SENT: SUBSCRIBERS}
        received = Counter(m.rcpt_tos[0] for m in site.sink.messages)
        # Nothing was sent before the cut (every page was held), so not even a copy in flight.
        assert received == Counter(emails), "one message per due subscriber"
        for message in site.sink.messages:
            assert message.message["Message-ID"] == rows[message.rcpt_tos[0]][1]
        assert site.sent_by(HOSTS["a"]) == 0 and site.sent_by(HOSTS["b"]) == SUBSCRIBERS
        # Host B planned the pages it held at the cut, the ones still queued, and those A held.
        planned_by_b = len(PLANNED.findall(site.workers["b"].output()))
        assert planned_by_b >= SUBSCRIBERS // PAGE, planned_by_b


def leases(runtime: Runtime) -> dict[int, dt.datetime]:
    with runtime.session_factory() as session:
        return {
            delivery_id: until
            for delivery_id, until in session.execute(
                select(Delivery.id, Delivery.lease_until).where(Delivery.status == DeliveryStatus.SENDING)
            )
            if until is not None
        }
