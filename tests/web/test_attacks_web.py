"""Issue 11 at the web door, tried as a stranger would: real `digest serve` processes, real HTTP.

Confirmations go out after the answer, so "it was sent" waits (bounded) for the SMTP sink and
"nothing more was sent" waits a short bounded time before looking.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.inbox import link_in, path_of
from tests.support.processes import BIN, Process, settings_env
from tests.support.rows import subscriber
from tests.support.servers import SMTPSink, free_port, port_open, wait_until
from tests.web.live import serve_process

pytestmark = pytest.mark.e2e

QUIET = 1.5  # seconds to wait before asserting that nothing (more) was sent
FLOOD = 40


def settle(smtp: SMTPSink, expected: int, timeout: float = 20.0) -> int:
    smtp.wait_for(expected, timeout=timeout)
    time.sleep(QUIET)
    return len(smtp.messages)


def flood(base: str, *, spoof: bool = True) -> list[int]:
    """40 sign-ups for 40 third parties, each claiming another client address (other /24s too)."""
    codes = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(FLOOD):
            headers = {"X-Forwarded-For": f"198.51.{i}.{i + 7}"} if spoof else {}
            answer = client.post("/subscribe", data={"email": f"third{i}@party{i}.example.com"}, headers=headers)
            codes.append(answer.status_code)
    return codes


# --------------------------------------------------------------------------- 6. X-Forwarded-For


def test_rotating_forwarded_for_does_not_dodge_the_per_source_confirmation_limit(
    settings: Settings, redis_url: str, smtp: SMTPSink, tmp_path: Path
) -> None:
    """The request limit raised out of the way: what holds is the confirmation limit per source,
    keyed on the real peer (127.0.0.1), not on the 40 networks the client claims."""
    untrusting = settings.model_copy(
        update={
            "redis_url": redis_url,
            "trusted_proxies": "",
            "rate_limit_subscribe_per_ip": "1000/hour",
            "confirmation_limit_per_source": "5/hour",
        }
    )
    with serve_process(untrusting, tmp_path) as base:
        codes = flood(base)
        # The network's budget is the requester's own, so its end is said: no mail, and when.
        assert codes == [200] * 5 + [429] * (FLOOD - 5)
        assert settle(smtp, 5) == 5
        answer = httpx.post(f"{base}/subscribe", data={"email": "one.more@party.example.com"})
        assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 3000
        assert re.search(
            r"Not sent: too many emails were asked for from your network\. Ask again after \d\d:\d\d UTC", answer.text
        )


def test_rotating_forwarded_for_does_not_dodge_the_request_limit(
    settings: Settings, redis_url: str, smtp: SMTPSink, tmp_path: Path
) -> None:
    """Default limits (DIGEST_RATE_LIMIT_SUBSCRIBE_PER_IP=10/hour, per source 10/hour)."""
    defaults = settings.model_copy(update={"redis_url": redis_url})
    assert defaults.trusted_proxies == "" and defaults.rate_limit_subscribe_per_ip == "10/hour"
    with serve_process(defaults, tmp_path) as base:
        codes = flood(base)
        assert codes == [200] * 10 + [429] * (FLOOD - 10)
        assert settle(smtp, 10) == 10


def test_a_trusted_proxy_is_believed(settings: Settings, redis_url: str, smtp: SMTPSink, tmp_path: Path) -> None:
    """Behind a proxy on 127.0.0.1 the forwarded client is the source: 40 networks, 40 mails."""
    behind_proxy = settings.model_copy(
        update={
            "redis_url": redis_url,
            "trusted_proxies": "127.0.0.1",
            "rate_limit_subscribe_per_ip": "2/hour",
            "confirmation_limit_per_source": "5/hour",
        }
    )
    with serve_process(behind_proxy, tmp_path) as base:
        assert flood(base) == [200] * FLOOD  # 2 per client allowed: each claims its own
        assert settle(smtp, FLOOD) == FLOOD
        # ...and the proxy's own address (no header) is one client like any other.
        smtp.clear()
        assert flood(base, spoof=False)[:3] == [200, 200, 429]


# --------------------------------------------------------------------------- 7. strangers re-subscribing

VICTIM = "victim@example.net"
OWN_TOPICS = "graph neural networks"
STRANGER_TOPICS = "casino, crypto giveaway"


def snapshot_of(runtime: Runtime, email: str) -> tuple[object, ...]:
    with runtime.engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT status, topics, excluded, frequency, send_hour, timezone, confirmed_at, unsubscribed_at,"
                " bounced_at FROM subscribers WHERE email = :e"
            ),
            {"e": email},
        ).one()
        return tuple(row)


def opt_out(runtime: Runtime, how: str) -> None:
    """The victim subscribed last month and left (or their mailbox bounced) yesterday."""
    month_ago = utcnow() - dt.timedelta(days=30)
    yesterday = utcnow() - dt.timedelta(days=1)
    with transaction(runtime.session_factory) as session:
        person = subscriptions.add_confirmed(session, runtime.tokens, VICTIM, now=month_ago, topics=OWN_TOPICS)
        if how == "unsubscribed":
            subscriptions.unsubscribe(session, person, now=yesterday)
        else:
            subscriptions.record_bounce(
                session,
                person.id,
                None,
                hard=True,
                detail="550 5.1.1 user unknown",
                now=yesterday,
                policy=runtime.policy,
            )


@pytest.mark.parametrize("how", ["unsubscribed", "bounced"])
def test_a_stranger_cannot_bring_back_an_opted_out_address(
    settings: Settings, runtime: Runtime, smtp: SMTPSink, tmp_path: Path, how: str
) -> None:
    opt_out(runtime, how)
    before = snapshot_of(runtime, VICTIM)
    assert before[0] == how

    with serve_process(settings, tmp_path) as base:
        answer = httpx.post(f"{base}/subscribe", data={"email": VICTIM, "topics": STRANGER_TOPICS})
        assert answer.status_code == 200
        assert wait_until(lambda: len(smtp.to(VICTIM)) == 1, timeout=20)
        for _ in range(3):  # and again, and again
            assert httpx.post(f"{base}/subscribe", data={"email": VICTIM, "topics": "more spam"}).status_code == 200
        time.sleep(QUIET)
        assert snapshot_of(runtime, VICTIM) == before  # state, topics, everything: as they were
        assert len(smtp.to(VICTIM)) <= 2

        # Only the person, clicking the link mailed to their own address, changes anything.
        (first, *_) = smtp.to(VICTIM)
        confirm = path_of(link_in(first, "confirm"))
        assert httpx.post(f"{base}{confirm}").status_code == 200
    person = subscriber(runtime, VICTIM)
    assert person is not None and person.status is SubscriberStatus.ACTIVE
    assert person.topics == subscriptions.clean_topics(STRANGER_TOPICS)  # what the clicked link asked for


def test_stranger_requests_do_not_lock_a_person_out(
    settings: Settings, runtime: Runtime, smtp: SMTPSink, tmp_path: Path
) -> None:
    with serve_process(settings, tmp_path) as base:
        # The person signs up; then a stranger asks for the same mailbox over and over.
        assert httpx.post(f"{base}/subscribe", data={"email": VICTIM}).status_code == 200
        assert wait_until(lambda: len(smtp.to(VICTIM)) == 1, timeout=20)
        first_link = path_of(link_in(smtp.to(VICTIM)[0], "confirm"))
        for variant in (VICTIM, VICTIM.upper(), "Victim@Example.NET", VICTIM, VICTIM):
            assert httpx.post(f"{base}/subscribe", data={"email": variant}).status_code == 200
        time.sleep(QUIET)
        pending = subscriber(runtime, VICTIM)
        assert pending is not None and pending.status is SubscriberStatus.PENDING

        # The link the person got first still works.
        page = httpx.post(f"{base}{first_link}")
        assert page.status_code == 200 and "You are subscribed" in page.text
    person = subscriber(runtime, VICTIM)
    assert person is not None and person.status is SubscriberStatus.ACTIVE


# --------------------------------------------------------------------------- 8. error answers

SECURITY_HEADERS = {
    "content-security-policy": re.compile(r"default-src 'none'.*frame-ancestors 'none'"),
    "x-frame-options": re.compile(r"^DENY$"),
    "x-content-type-options": re.compile(r"^nosniff$"),
    "referrer-policy": re.compile(r"^no-referrer$"),
}


def assert_security_headers(answer: httpx.Response) -> None:
    for name, pattern in SECURITY_HEADERS.items():
        assert pattern.search(answer.headers.get(name, "")), (answer.status_code, name, dict(answer.headers))


def test_error_answers_carry_the_security_headers(settings: Settings, tmp_path: Path) -> None:
    with serve_process(settings, tmp_path) as base:
        answers = {
            404: httpx.get(f"{base}/no-such-page"),
            405: httpx.put(f"{base}/subscribe"),
            400: httpx.post(f"{base}/subscribe", data={"email": "not an address"}),
            422: httpx.post(f"{base}/api/subscribe", json={"topics": "no email"}),
        }
    for status, answer in answers.items():
        assert answer.status_code == status, (status, answer.text[:300])
        assert_security_headers(answer)


@contextmanager
def serve_without_database(settings: Settings, cwd: Path) -> Iterator[str]:
    """`digest serve` whose database is a closed port: up (it listens), but every query fails."""
    closed = free_port()
    url = sa.make_url(settings.database_url).set(host="127.0.0.1", port=closed)
    env = settings_env(settings, DIGEST_DATABASE_URL=url.render_as_string(hide_password=False))
    port = free_port()
    argv = [str(BIN / "digest"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = Process(argv, env, cwd / f"serve-{port}.log", cwd=cwd).start()
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port) or not server.running, timeout=30)
        assert server.running, server.output()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_a_real_500_carries_the_security_headers(settings: Settings, tmp_path: Path) -> None:
    with serve_without_database(settings, tmp_path) as base:
        answer = httpx.get(f"{base}/", timeout=30)
    assert answer.status_code == 500, answer.text[:300]
    assert_security_headers(answer)
