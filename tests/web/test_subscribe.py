"""Double opt-in through the web: subscribe, the confirmation mail, confirm, welcome, resend."""

from __future__ import annotations

import datetime as dt

import pytest
import time_machine
from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.inbox import link_in, only_mail_to, path_of
from tests.support.rows import snapshot, subscriber
from tests.support.servers import SMTPSink


def test_front_page_shows_form_and_latest_papers(client: TestClient, runtime: Runtime, papers_api: object) -> None:
    from digest.orchestration.pipeline import collect_if_needed

    collect_if_needed(runtime, dt.date(2024, 10, 25), allow_sample=False)
    page = client.get("/")
    assert page.status_code == 200
    assert '<form class="subscribe" method="post" action="/subscribe">' in page.text
    assert 'name="email"' in page.text
    assert "Daily Papers · Friday, October 25, 2024" in page.text
    assert page.text.count('class="paper"') >= 5
    assert "upvotes" in page.text
    latest = client.get("/api/digests/latest").json()
    assert latest["date"] == "2024-10-25"
    assert latest["papers"][0]["title"] in page.text
    assert latest["papers"][0]["authors"] in page.text


def test_front_page_without_any_digest(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "The first digest is being put together" in page.text


def test_form_subscribe_confirm_and_welcome(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    answer = client.post("/subscribe", data={"email": "Ada@Example.org", "topics": "diffusion, agents"})
    assert answer.status_code == 200
    assert "Check your inbox" in answer.text
    sub = subscriber(runtime, "ada@example.org")
    assert sub is not None and sub.status is SubscriberStatus.PENDING
    assert sub.topics == "diffusion, agents"

    [confirmation] = only_mail_to(smtp, "ada@example.org")
    url = link_in(confirmation, "confirm")
    assert url.startswith("http://digest.test/confirm/")

    # A mail scanner fetching the link must not confirm anything.
    page = client.get(path_of(url))
    assert page.status_code == 200
    assert "Confirm my subscription" in page.text
    assert subscriber(runtime, "ada@example.org").status is SubscriberStatus.PENDING  # type: ignore[union-attr]

    done = client.post(path_of(url))
    assert done.status_code == 200
    assert "You are subscribed" in done.text
    assert subscriber(runtime, "ada@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]
    confirmation, welcome = only_mail_to(smtp, "ada@example.org", 2)
    assert "/preferences/" in welcome.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]

    # Confirming twice succeeds quietly and sends nothing more.
    again = client.post(path_of(url))
    assert again.status_code == 200
    assert len(smtp.messages) == 2


def test_json_subscribe(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    for path in ("/subscribe", "/api/subscribe"):
        email = f"json{len(path)}@example.org"
        answer = client.post(path, json={"email": email, "topics": "robotics"})
        assert answer.status_code == 202
        assert answer.json()["status"] == "pending"
        assert subscriber(runtime, email).topics == "robotics"  # type: ignore[union-attr]
        assert "/confirm/" in only_mail_to(smtp, email)[0].get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def _make(runtime: Runtime, email: str, status: SubscriberStatus) -> None:
    now = utcnow() - dt.timedelta(hours=1)
    with transaction(runtime.session_factory) as session:
        subscriptions.subscribe(session, runtime.tokens, email, now=now)
        sub = subscriptions.get_by_email(session, email)
        if status is not SubscriberStatus.PENDING:
            subscriptions.confirm(session, runtime.tokens, sub, now=now, issued_at=now)
        if status is SubscriberStatus.UNSUBSCRIBED:
            subscriptions.unsubscribe(session, sub, now=now)


def test_no_enumeration_byte_identical_answers(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    _make(runtime, "pending@example.org", SubscriberStatus.PENDING)
    _make(runtime, "active@example.org", SubscriberStatus.ACTIVE)
    _make(runtime, "gone@example.org", SubscriberStatus.UNSUBSCRIBED)
    addresses = ["new@example.org", "pending@example.org", "active@example.org", "gone@example.org"]
    for kind in ("form", "json"):
        answers = []
        for address in addresses:
            if kind == "form":
                r = client.post("/subscribe", data={"email": address})
            else:
                r = client.post("/api/subscribe", json={"email": address})
            answers.append((r.status_code, r.headers["content-type"], r.content))
        assert all(a == answers[0] for a in answers), kind
    # The active address got nothing; the others got a confirmation.
    assert smtp.to("active@example.org") == []
    smtp.wait_for(3)
    for address in ("new@example.org", "pending@example.org", "gone@example.org"):
        assert smtp.to(address), address


def test_resubscribe_after_unsubscribe_needs_new_confirmation(
    client: TestClient, runtime: Runtime, smtp: SMTPSink
) -> None:
    _make(runtime, "back@example.org", SubscriberStatus.UNSUBSCRIBED)
    client.post("/subscribe", data={"email": "back@example.org", "topics": "robotics"})
    [mail] = only_mail_to(smtp, "back@example.org")
    # The request alone changes nothing: not the state, not the topics.
    back = subscriber(runtime, "back@example.org")
    assert back is not None and back.status is SubscriberStatus.UNSUBSCRIBED and back.topics == ""
    client.post(path_of(link_in(mail, "confirm")))
    back = subscriber(runtime, "back@example.org")
    assert back is not None and back.status is SubscriberStatus.ACTIVE and back.topics == "robotics"


def test_expired_link_offers_a_new_one(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    with time_machine.travel(utcnow() - dt.timedelta(days=3), tick=False):
        client.post("/subscribe", data={"email": "late@example.org"})
    [old] = only_mail_to(smtp, "late@example.org")
    before = snapshot(runtime)

    for method in (client.get, client.post):
        page = method(path_of(link_in(old, "confirm")))
        assert page.status_code == 410, page.text[-900:]
        assert "This link has expired" in page.text
        assert 'action="/confirm/resend"' in page.text
    assert snapshot(runtime) == before

    token = path_of(link_in(old, "confirm")).rsplit("/", 1)[1]
    sent = client.post("/confirm/resend", data={"token": token})
    assert sent.status_code == 200
    assert "Check your inbox" in sent.text
    old, new = only_mail_to(smtp, "late@example.org", 2)
    done = client.post(path_of(link_in(new, "confirm")))
    assert done.status_code == 200
    assert subscriber(runtime, "late@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]


@pytest.mark.settings(rate_limit_subscribe_per_ip="2/hour")
def test_resend_is_rate_limited(runtime: Runtime, smtp: SMTPSink) -> None:
    from digest.web.app import create_app

    client = TestClient(create_app(runtime))
    codes = [client.post("/confirm/resend", data={"token": "x.y.z"}).status_code for _ in range(3)]
    assert codes == [400, 400, 429]
    third = client.post("/confirm/resend", data={"token": "x.y.z"})
    assert int(third.headers["Retry-After"]) > 0
    assert smtp.messages == []


def test_a_relay_that_is_down_gives_the_same_answer_and_the_next_try_sends(
    client: TestClient, runtime: Runtime, smtp: SMTPSink
) -> None:
    _make(runtime, "active@example.org", SubscriberStatus.ACTIVE)
    expected = client.post("/subscribe", data={"email": "active@example.org"})
    smtp.behaviour.mail_reply = "421 4.3.2 Service shutting down"
    down = client.post("/subscribe", data={"email": "new@example.org"})
    assert (down.status_code, down.content) == (expected.status_code, expected.content)
    assert smtp.messages == []
    smtp.behaviour.mail_reply = None
    again = client.post("/subscribe", data={"email": "new@example.org"})
    assert again.content == expected.content
    smtp.wait_for(1)
    assert len(smtp.to("new@example.org")) == 1, "the second try sends at once, not after the resend window"


def test_the_answer_does_not_wait_for_the_confirmation_mail(runtime: Runtime, smtp: SMTPSink) -> None:
    """How long the answer takes must not tell whether a mail was due (new or pending address)."""
    import threading

    import httpx

    from digest.web.app import create_app
    from tests.support.servers import free_port
    from tests.web.live import server_thread

    smtp.behaviour.hold = threading.Event()  # the relay sits on DATA until released
    with server_thread(create_app(runtime), free_port()) as base:
        # Were the confirmation sent before answering, this would time out.
        answer = httpx.post(f"{base}/subscribe", data={"email": "new@example.org"}, timeout=5)
        assert answer.status_code == 200
        assert "Check your inbox" in answer.text
        assert smtp.messages == []
        smtp.behaviour.hold.set()
        smtp.wait_for(1)
    [confirmation] = smtp.to("new@example.org")
    body = confirmation.get_body(preferencelist=("plain",))
    assert body is not None and "/confirm/" in body.get_content()


def test_an_error_keeps_what_was_typed(client: TestClient, runtime: Runtime) -> None:
    answer = client.post("/subscribe", data={"email": "not an address", "topics": "diffusion, <agents>"})
    assert answer.status_code == 400
    assert 'role="alert"' in answer.text
    # Both fields come back filled (escaped), so the person corrects the address instead of
    # typing everything again.
    assert 'value="not an address"' in answer.text
    assert 'value="diffusion, &lt;agents&gt;"' in answer.text
    assert subscriber(runtime, "not an address") is None


def test_favicon_is_linked_and_served(client: TestClient) -> None:
    page = client.get("/")
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in page.text
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.lstrip().startswith(b"<svg")
    assert client.get("/static/favicon.svg").content == icon.content


def test_development_without_a_mail_server_writes_to_the_outbox(runtime: Runtime) -> None:
    from pathlib import Path

    from digest.core.settings import Settings
    from digest.orchestration.runtime import development_outbox

    assert runtime.outbox is None  # an SMTP host is set: SMTP
    development = Settings(_env_file=None, environment="development")
    assert development_outbox(development) == Path("outbox").resolve()
    assert Runtime(development).mail_destination.startswith(f"mail is written to {Path('outbox').resolve()}/")
    relay = Settings(_env_file=None, environment="development", smtp_host="mail.example.org")
    assert development_outbox(relay) is None
    assert Runtime(relay).mail_destination == "mail goes to the SMTP server at mail.example.org:1025"
