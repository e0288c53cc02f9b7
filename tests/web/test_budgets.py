"""Budgets that protect the person, and secure defaults in production (issue 18), tried as a
stranger would: through the real web app, the real ``digest mailin`` process, a real SMTP sink,
PostgreSQL and Redis (the budgets every process shares).

* one mailbox gets at most its per-mailbox number of stranger-triggered mails, whatever mix of
  web confirmations, data links, mail-in unsubscribe links and console sign-ins is asked for;
* an operator gets a sign-in link after strangers' requests for their address, within the hour;
* the answer to a sign-in request is the same for an operator's address and anyone else's;
* ``/metrics`` is refused in production without a token; ``/readyz`` names what failed, not where.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import time_machine
from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import utcnow
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from digest.web.app import create_app
from tests.mailin import messages
from tests.support.inbox import link_in, path_of
from tests.support.mailin import INBOUND
from tests.support.processes import BIN, Process, settings_env
from tests.support.servers import PapersAPI, SMTPSink, free_port, port_open, wait_until
from tests.support.settings import make_settings
from tests.web.test_health import TOKEN, live_app

OPERATOR = "ops@example.org"
PER_MAILBOX_AN_HOUR = 2  # the documented default: DIGEST_CONFIRMATION_LIMIT_PER_MAILBOX = 2/hour;5/day
START = dt.datetime(2026, 5, 4, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def settings(database: str, smtp: SMTPSink, papers_api: PapersAPI, redis_url: str) -> Settings:
    # Redis: the web app and the mail-in process count against the same budgets, as deployed.
    # Per-client limits out of the way, so that only the per-mailbox budget decides.
    return make_settings(
        database,
        smtp,
        papers_api,
        redis_url=redis_url,
        admin_emails=OPERATOR,
        rate_limit_subscribe_per_ip="1000/hour",
        confirmation_limit_per_source="1000/hour",
    )


@dataclass
class MailIn:
    process: Process
    port: int


@pytest.fixture
def mailin(settings: Settings, tmp_path: Path) -> Iterator[MailIn]:
    """``digest mailin`` as the Procfile runs it."""
    port = free_port()
    env = settings_env(settings, DIGEST_MAILIN_HOST="127.0.0.1", DIGEST_MAILIN_PORT=str(port))
    process = Process([str(BIN / "digest"), "mailin"], env, tmp_path / "mailin.log", cwd=tmp_path).start()
    try:
        up = wait_until(lambda: port_open("127.0.0.1", port) or not process.running, timeout=30)
        if not up or not process.running:
            pytest.fail(f"digest mailin did not start:\n{process.output()}")
        yield MailIn(process, port)
    finally:
        process.stop()


def client_at(runtime: Runtime, address: str) -> TestClient:
    """A browser at ``address`` (the TCP peer the limits see)."""
    return TestClient(create_app(runtime), client=(address, 50000), follow_redirects=False)


def to_mailbox(smtp: SMTPSink, mailbox: str) -> list[str]:
    """Recipients of every message received for ``mailbox`` (``local+tag@domain`` included)."""
    local, _, domain = mailbox.partition("@")
    return [
        r
        for m in smtp.messages
        for r in m.rcpt_tos
        if r.lower().endswith(f"@{domain}") and r.lower().split("@")[0].split("+")[0] == local
    ]


def unsubscribe_links_answered(mailin: MailIn, smtp: SMTPSink, address: str) -> int:
    """The mail-in requests for ``address``'s unsubscribe link that were answered: sent, or
    withheld (which only the listener's log says; such a message changes nothing stored)."""
    withheld = mailin.process.output().count("withheld a unsubscribe-link email")
    return withheld + sum(1 for m in smtp.to(address) if str(m["Subject"]).startswith("Unsubscribe from"))


def test_one_mailbox_gets_its_budget_across_every_kind_of_requested_mail(
    runtime: Runtime, smtp: SMTPSink, mailin: MailIn
) -> None:
    """Two rounds of every stranger-triggerable mail to one mailbox: a web confirmation, a data
    link, an unsubscribe link asked for by mail, a console sign-in. Each kind kept its own count
    before, so the mailbox got one of each per round; now it gets two in all."""
    with transaction(runtime.session_factory) as session:
        victim = subscriptions.add_confirmed(session, runtime.tokens, "victim+news@example.net", now=utcnow())
        preferences = path_of(runtime.links.preferences(victim))
    web = client_at(runtime, "192.0.2.10")
    subscribe_pages, data_pages = [], []
    for n in range(2):
        answer = web.post("/subscribe", data={"email": f"Victim+round{n}@Example.net"})
        assert answer.status_code == 200
        subscribe_pages.append(answer.text)
        data_page = web.post(f"{preferences}/data-link")
        assert data_page.status_code == 200
        data_pages.append(data_page.text)
        with smtplib.SMTP("127.0.0.1", mailin.port, timeout=30) as client:
            request = messages.plain("victim+news@example.net", INBOUND, "unsubscribe")
            client.sendmail("mallory@example.com", [INBOUND], request)
        assert web.post("/admin/sign-in", data={"email": "victim+news@example.net"}).status_code == 200
    # Mail-in answers after its 250: wait until both requests were answered, sent or withheld
    # (6 messages arrived here when each kind had its own count).
    assert wait_until(lambda: unsubscribe_links_answered(mailin, smtp, "victim+news@example.net") == 2, timeout=30)
    smtp.wait_for(PER_MAILBOX_AN_HOUR + 1, timeout=1)
    got = to_mailbox(smtp, "victim@example.net")
    assert len(got) == PER_MAILBOX_AN_HOUR, got
    assert len(smtp.messages) == PER_MAILBOX_AN_HOUR  # nothing went anywhere else either
    # A stranger's page is the same whether its mail went out or the mailbox's budget held it
    # back, and states that budget; the subscriber's own data page says its link was not sent.
    assert subscribe_pages[0] == subscribe_pages[1]
    assert "We send at most 2 an hour, 5 a day of these emails to one address" in subscribe_pages[0]
    assert "We sent a link to victim+news@example.net" in data_pages[0]
    assert "Not sent: this address has had the most emails of this kind we send (2 an hour, 5 a day)" in data_pages[1]
    assert "We sent a link" not in data_pages[1]
    # The budget is the person's, not the network's: another mailbox is still served.
    web.post("/subscribe", data={"email": "someone.else@example.org"})
    smtp.wait_for(PER_MAILBOX_AN_HOUR + 1)
    assert len(smtp.to("someone.else@example.org")) == 1


def ask_for_link(runtime: Runtime, client_address: str, email: str, status: int = 200) -> str:
    """One sign-in request from ``client_address``, answered with ``status``; the page's text."""
    with client_at(runtime, client_address) as client:
        answer = client.post("/admin/sign-in", data={"email": email})
    assert answer.status_code == status, answer.text
    return answer.text


def links_to_operator(smtp: SMTPSink) -> int:
    time.sleep(0.3)  # sent after the answer, from the request's background task
    return len(smtp.to(OPERATOR))


def sign_in_with_the_newest_link(runtime: Runtime, smtp: SMTPSink) -> None:
    link = link_in(smtp.to(OPERATOR)[-1], "admin/sign-in")
    with client_at(runtime, "198.51.100.8") as client:
        answer = client.post(path_of(link))
    assert answer.status_code == 303 and answer.headers["location"] == "/admin"


def test_an_operator_gets_a_link_after_strangers_asked_for_theirs(runtime: Runtime, smtp: SMTPSink) -> None:
    """The finding: five stranger requests through the day used up the operator's per-mailbox
    day budget, so the operator's own request sent nothing for up to 24 h."""
    for n in range(5):
        # Strangers elsewhere ask for the operator's link, each a little over an hour apart.
        with time_machine.travel(START + dt.timedelta(minutes=61 * n), tick=False):
            ask_for_link(runtime, f"203.0.113.{n + 1}", OPERATOR)
    sent = links_to_operator(smtp)
    with time_machine.travel(START + dt.timedelta(minutes=61 * 4 + 1), tick=False):
        ask_for_link(runtime, "198.51.100.8", OPERATOR)  # the operator, from their own network
        assert links_to_operator(smtp) == sent + 1, "the operator's own request sends a link at once"
        sign_in_with_the_newest_link(runtime, smtp)

    # A stranger on the operator's own network spends that network's share: the operator is
    # told no link was sent and when to ask again, and then gets a link.
    later = START + dt.timedelta(hours=6)
    with time_machine.travel(later, tick=False):
        for n in range(5):
            ask_for_link(runtime, "198.51.100.66", OPERATOR, status=200 if n < 3 else 429)
        sent = links_to_operator(smtp)
        answer = ask_for_link(runtime, "198.51.100.8", OPERATOR, status=429)
        assert links_to_operator(smtp) == sent, "this network's share is spent"
        assert "Not sent" in answer
    found = re.search(r"Ask again after (\d\d):(\d\d) UTC", answer)
    assert found, answer
    retry = later.replace(hour=int(found[1]), minute=int(found[2]))
    assert later < retry <= later + dt.timedelta(hours=1, minutes=1)
    with time_machine.travel(retry, tick=False):
        ask_for_link(runtime, "198.51.100.8", OPERATOR)
        assert links_to_operator(smtp) == sent + 1
        sign_in_with_the_newest_link(runtime, smtp)


def test_a_withheld_sign_in_answers_as_any_other_and_says_when_to_retry(runtime: Runtime, smtp: SMTPSink) -> None:
    """One network's share of sign-in links to an address is counted for every address, so the
    fourth request answers 429 for an operator's address and for anyone else's alike: neither
    page says who is an operator."""
    with time_machine.travel(START, tick=False):
        answers = {
            email: [ask_for_link(runtime, "198.51.100.66", email, status=200 if n < 3 else 429) for n in range(4)]
            for email in (OPERATOR, "nobody@example.org")
        }
        # The operator's mailbox with a tag is that mailbox: its share from here is spent too.
        tagged = ask_for_link(runtime, "198.51.100.66", "Ops+other@Example.org", status=429)
    operator, stranger = answers[OPERATOR], answers["nobody@example.org"]
    assert operator == stranger
    assert operator[0] == operator[1] == operator[2]
    assert "at most 3 an hour asked from one network, 10 an hour in all" in operator[0]
    assert "ask again after 10:01 UTC" in operator[0]  # just over an hour on, from the clock alone
    assert operator[3] == tagged
    assert "Not sent: too many emails were asked for from your network. Ask again after 10:01 UTC." in operator[3]
    assert smtp.to("nobody@example.org") == []
    assert links_to_operator(smtp) == 3


@contextmanager
def app_client(settings: Settings) -> Iterator[TestClient]:
    """The app with its start-up run (the lifespan), as ``digest serve`` starts it."""
    runtime = Runtime(settings)
    try:
        with TestClient(create_app(runtime)) as client:
            yield client
    finally:
        runtime.dispose()


def test_metrics_are_refused_in_production_without_a_token(
    database: str, smtp: SMTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    production = make_settings(database, smtp, environment="production")
    with app_client(production) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403 and "digest_subscribers" not in refused.text
    with app_client(production.model_copy(update={"metrics_token": TOKEN})) as client:
        assert client.get("/metrics").status_code == 401
        served = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert served.status_code == 200 and "digest_subscribers" in served.text
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="digest.web.health"),
        app_client(production.model_copy(update={"metrics_public": True})) as client,
    ):
        assert any("/metrics is open to anyone" in r.getMessage() for r in caplog.records)  # at start-up
        assert client.get("/metrics").status_code == 200
    # Development keeps its open metrics page.
    with app_client(make_settings(database, smtp, environment="development")) as client:
        assert client.get("/metrics").status_code == 200


def test_readyz_says_what_failed_and_never_where_it_lives(smtp: SMTPSink) -> None:
    db_port, redis_port = free_port(), free_port()
    away = make_settings(
        f"postgresql://dbrole:secret@127.0.0.1:{db_port}/digestdb",
        smtp,
        redis_url=f"redis://127.0.0.1:{redis_port}/3",
        environment="production",
    )
    with live_app(away) as base:
        answer = httpx.get(f"{base}/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["checks"] == {"database": "unavailable", "schema": "unknown", "redis": "unavailable"}
    assert body["problems"] == ["database unavailable", "redis unavailable"]
    for secret in ("127.0.0.1", str(db_port), str(redis_port), "dbrole", "secret", "digestdb", "refused"):
        assert secret not in answer.text.lower(), secret
