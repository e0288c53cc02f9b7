"""Bad input and abuse: invalid addresses, honeypot, oversized bodies, rate limits, headers."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.web.app import create_app
from tests.support.rows import snapshot
from tests.support.servers import SMTPSink


@pytest.mark.parametrize(
    ("email", "message"),
    [
        ("", "Please enter an email address."),
        ("not-an-address", "does not look like an email address"),
        ("two@@example.org", "does not look like an email address"),
        ("a@b\r\nBcc: x@example.org", "does not look like an email address"),
        ("x" * 300 + "@example.org", "does not look like an email address"),
    ],
)
def test_invalid_address_is_explained_and_nothing_happens(
    client: TestClient, runtime: Runtime, smtp: SMTPSink, email: str, message: str
) -> None:
    page = client.post("/subscribe", data={"email": email})
    assert page.status_code == 400
    assert 'class="error"' in page.text and message in page.text
    assert '<form class="subscribe"' in page.text  # the form is there to try again
    api = client.post("/api/subscribe", json={"email": email})
    assert api.status_code in (400, 422)
    assert snapshot(runtime) == []
    assert smtp.messages == []


def test_overlong_topics_are_refused(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    page = client.post("/subscribe", data={"email": "ok@example.org", "topics": "t" * 600})
    assert page.status_code == 400
    assert "Topics are limited to 500 characters." in page.text
    assert snapshot(runtime) == [] and smtp.messages == []


def test_honeypot_pretends_success(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    human = client.post("/subscribe", data={"email": "human@example.org"})
    bot = client.post("/subscribe", data={"email": "bot@example.org", "website": "http://spam.example"})
    assert bot.status_code == human.status_code == 200
    assert bot.content == human.content
    smtp.wait_for(1)
    assert [r for m in smtp.messages for r in m.rcpt_tos] == ["human@example.org"]
    assert [row[1] for row in snapshot(runtime)] == ["human@example.org"]


def test_oversized_body_by_content_length(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    big = "x" * (runtime.settings.max_request_bytes + 1)
    for path in ("/subscribe", "/api/subscribe", "/unsubscribe/abc", "/preferences/abc"):
        answer = client.post(path, data={"email": "big@example.org", "topics": big})
        assert answer.status_code == 413, path
        assert answer.headers["x-frame-options"] == "DENY"
    assert snapshot(runtime) == [] and smtp.messages == []


def test_oversized_body_streamed_without_length(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    chunk = b"email=big%40example.org&topics=" + b"x" * 4096

    def body() -> Iterator[bytes]:
        yield chunk
        for _ in range(runtime.settings.max_request_bytes // 4096 + 1):
            yield b"y" * 4096

    for path in ("/subscribe", "/preferences/abc"):
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = client.post(path, content=body(), headers=form)
        assert answer.status_code == 413, path
    json_body = (b'{"email": "big@example.org", "topics": "' + b"z" * 40_000 + b'"}' for _ in range(1))
    answer = client.post("/api/subscribe", content=json_body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert snapshot(runtime) == [] and smtp.messages == []


@pytest.mark.settings(rate_limit_subscribe_per_ip="3/hour")
def test_subscribe_rate_limit_per_ip(runtime: Runtime, smtp: SMTPSink) -> None:
    client = TestClient(create_app(runtime))
    codes = [client.post("/subscribe", data={"email": f"p{i}@example.org"}).status_code for i in range(3)]
    assert codes == [200, 200, 200]
    before = snapshot(runtime)
    smtp.wait_for(3)
    refused = client.post("/subscribe", data={"email": "p9@example.org"})
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert "Slow down" in refused.text
    as_json = client.post("/api/subscribe", json={"email": "p9@example.org"})
    assert as_json.status_code == 429 and "Retry-After" in as_json.headers
    assert snapshot(runtime) == before
    assert len(smtp.messages) == 3


@pytest.mark.settings(rate_limit_subscribe_per_ip="1000/hour", confirmation_limit_per_source="1000/hour")
def test_plus_address_variants_put_at_most_two_confirmations_in_one_mailbox(runtime: Runtime, smtp: SMTPSink) -> None:
    """50 sub-address variants of one mailbox, each new to us: the same answer every time, and
    the mailbox gets what the per-mailbox limit allows (2 an hour), not 50."""
    client = TestClient(create_app(runtime))
    answers = {client.post("/subscribe", data={"email": f"Inbox+{n}@Victim.example"}).text for n in range(50)}
    assert len(answers) == 1 and "Check your inbox" in answers.pop()
    smtp.wait_for(3, timeout=3)
    assert len(smtp.messages) == 2
    assert {r.split("+")[0] for m in smtp.messages for r in m.rcpt_tos} == {"inbox"}
    # Another mailbox from the same client is still served.
    client.post("/subscribe", data={"email": "other@example.org"})
    smtp.wait_for(3)
    assert len(smtp.to("other@example.org")) == 1


def test_security_headers_on_every_response(client: TestClient) -> None:
    responses = [
        client.get("/"),
        client.get("/healthz"),
        client.get("/openapi.json"),
        client.get("/static/style.css"),
        client.get("/no/such/page"),
        client.get("/unsubscribe/bad"),
        client.post("/subscribe", data={"email": "bad"}),
        client.put("/subscribe"),
    ]
    for r in responses:
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert "script-src 'self'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    assert "<script" not in page and "style=" not in page and "<style" not in page


def test_ipv6_clients_are_limited_by_their_64_prefix() -> None:
    from starlette.requests import Request

    from digest.web.deps import client_ip

    def key(host: str) -> str:
        app = SimpleNamespace(state=SimpleNamespace(runtime=SimpleNamespace(settings=Settings())))
        return client_ip(Request({"type": "http", "client": (host, 1234), "headers": [], "app": app}))

    # Every address in one /64 is one client for the limits; other clients are not.
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:192.0.2.7") == key("192.0.2.7") == "192.0.2.7"
