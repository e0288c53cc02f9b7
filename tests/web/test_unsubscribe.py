"""Unsubscribe links: GET shows one button and changes nothing; POST (button or RFC 8058) unsubscribes."""

from __future__ import annotations

from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.rows import snapshot, subscriber


def active(runtime: Runtime, email: str) -> str:
    """An active subscriber; returns the unsubscribe URL's path, as put in every digest."""
    with transaction(runtime.session_factory) as session:
        sub = subscriptions.add_confirmed(session, runtime.tokens, email, now=utcnow())
        url = runtime.links.unsubscribe(sub)
    return url.removeprefix(runtime.settings.base_url)


def test_get_shows_button_and_changes_nothing(client: TestClient, runtime: Runtime) -> None:
    path = active(runtime, "reader@example.org")
    before = snapshot(runtime)
    page = client.get(path)
    assert page.status_code == 200
    assert f'<form method="post" action="{path}">' in page.text
    assert ">Unsubscribe</button>" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert snapshot(runtime) == before


def test_one_click_as_gmail_sends_it(runtime: Runtime) -> None:
    from digest.web.app import create_app

    path = active(runtime, "reader@example.org")
    # A fresh client per request: no cookies, no session, nothing but the POST.
    for _ in range(2):
        with TestClient(create_app(runtime), follow_redirects=False) as gmail:
            answer = gmail.post(
                path,
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        assert 200 <= answer.status_code < 300
        assert "location" not in answer.headers
        assert "set-cookie" not in answer.headers
        assert subscriber(runtime, "reader@example.org").status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]


def test_one_click_multipart(client: TestClient, runtime: Runtime) -> None:
    path = active(runtime, "reader@example.org")
    answer = client.post(path, files={"List-Unsubscribe": (None, "One-Click")})
    assert answer.status_code == 200
    assert subscriber(runtime, "reader@example.org").status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]


def test_button_post_then_page_says_so(client: TestClient, runtime: Runtime) -> None:
    path = active(runtime, "reader@example.org")
    done = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200
    assert "You are unsubscribed" in done.text
    assert "You are unsubscribed" in client.get(path).text


def test_bad_tokens_change_nothing(client: TestClient, runtime: Runtime, smtp: object) -> None:
    path = active(runtime, "reader@example.org")
    with runtime.session_factory() as session:
        sub = subscriptions.get_by_email(session, "reader@example.org")
        preferences_token = runtime.links.preferences(sub).rsplit("/", 1)[1]
        confirm_token = runtime.links.confirm(sub).rsplit("/", 1)[1]
    token = path.rsplit("/", 1)[1]
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    before = snapshot(runtime)
    cases = {
        f"/unsubscribe/{tampered}": 400,
        f"/unsubscribe/{preferences_token}": 400,  # right signature, wrong purpose
        f"/unsubscribe/{confirm_token}": 400,
        "/unsubscribe/not-a-token": 400,
        f"/preferences/{token}": 400,
        f"/confirm/{token}": 400,
    }
    for bad, status in cases.items():
        for method in ("GET", "POST"):
            body = {"List-Unsubscribe": "One-Click"} if method == "POST" else None
            answer = client.request(method, bad, data=body)
            assert answer.status_code == status, (method, bad)
            assert "This link is not valid" in answer.text
    assert snapshot(runtime) == before
    assert smtp.messages == []  # type: ignore[attr-defined]


def test_link_of_an_erased_subscriber_is_404(client: TestClient, runtime: Runtime) -> None:
    path = active(runtime, "reader@example.org")
    with transaction(runtime.session_factory) as session:
        subscriptions.erase(
            session, runtime.tokens, subscriptions.get_by_email(session, "reader@example.org"), now=utcnow()
        )
    assert client.get(path).status_code == 404
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 404
    assert snapshot(runtime) == []
