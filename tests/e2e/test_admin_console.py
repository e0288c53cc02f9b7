"""The operator console in a real browser: sign in from the mailed link, read the dashboard
against the ledger of a real run, look people up and act, resume a paused send; refused without
a session, for a stranger's address (no mail), for a used link and for a form without its token.

Debian's Chromium through Playwright against uvicorn on a free port, real PostgreSQL and a real
SMTP server; screenshots at 375 and 1280 px go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from digest.core.db import transaction
from digest.core.models import Delivery, DeliveryStatus, Subscriber, SubscriberStatus, utcnow
from digest.delivery import reputation
from digest.orchestration.pipeline import collect_if_needed, run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from digest.web.app import create_app
from tests.support.browser import CHROMIUM_ARGS, SHOTS, require_chromium
from tests.support.inbox import link_in
from tests.support.rows import subscriber
from tests.support.servers import PapersAPI, SMTPSink, free_port
from tests.support.settings import make_settings
from tests.web.live import server_thread

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

DAY = dt.date(2024, 10, 25)
OPERATOR = "ops@example.org"
STRANGER = "stranger@example.org"
READERS = ["ada@example.com", "grace@example.org", "alan@example.net"]
BOUNCED = "gone@example.com"
REFUSED = "nobody@example.net"  # the SMTP server refuses it: one failure with its reason


@pytest.fixture
def live(database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Iterator[tuple[Runtime, str]]:
    port = free_port()
    settings = make_settings(
        database, smtp, papers_api, base_url=f"http://127.0.0.1:{port}", admin_emails=f"Someone@example.net, {OPERATOR}"
    )
    runtime = Runtime(settings)
    try:
        with server_thread(create_app(runtime), port) as base:
            yield runtime, base
    finally:
        runtime.dispose()


def a_small_run(runtime: Runtime, smtp: SMTPSink) -> None:
    collect_if_needed(runtime, DAY, allow_sample=False)
    smtp.behaviour.refuse[REFUSED] = "550 5.1.1 no such mailbox here"
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        for email in [*READERS, REFUSED]:
            subscriptions.add_confirmed(session, runtime.tokens, email, now=now)
        subscriptions.subscribe(session, runtime.tokens, "pending@example.com", now=now)
        gone = subscriptions.add_confirmed(session, runtime.tokens, BOUNCED, now=now)
        subscriptions.record_bounce(
            session, gone.id, None, hard=True, detail="550 5.1.1", now=now, policy=runtime.policy
        )
    summary = run_inprocess(runtime, DAY)
    assert (summary.counts.get("sent"), summary.counts.get("failed")) == (len(READERS), 1), summary.lines()


def ledger(runtime: Runtime) -> tuple[int, int, int]:
    with runtime.session_factory() as session:
        sent = session.scalar(select(func.count()).where(Delivery.status == DeliveryStatus.SENT))
        failed = session.scalar(select(func.count()).where(Delivery.status == DeliveryStatus.FAILED))
        active = session.scalar(select(func.count()).where(Subscriber.status == SubscriberStatus.ACTIVE))
    return int(sent or 0), int(failed or 0), int(active or 0)


def paused(runtime: Runtime) -> bool:
    with runtime.session_factory() as session:
        return reputation.active_pause(session) is not None


def retry_time_masked(answer: str) -> str:
    """A sign-in answer with its "ask again after HH:MM UTC" (read from the clock) masked."""
    return re.sub(r"\b\d\d:\d\d UTC\b", "HH:MM UTC", answer)


def test_operator_console(live: tuple[Runtime, str], smtp: SMTPSink) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = require_chromium()
    runtime, base = live
    a_small_run(runtime, smtp)
    mails_before = len(smtp.messages)
    sent, failed, active = ledger(runtime)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            # Without a session: pages send you to sign in, actions are refused outright.
            stranger = browser.new_context(viewport={"width": 375, "height": 800})
            page = stranger.new_page()
            page.goto(base + "/admin")
            assert page.url == base + "/admin/sign-in"
            page.screenshot(path=SHOTS / "admin-sign-in-375.png", full_page=True)
            refused = stranger.request.post(base + "/admin/sending/resume", form={"csrf": "guess"})
            assert refused.status == 403
            assert (
                stranger.request.get(base + "/admin/subscribers?email=ada@example.com", max_redirects=0).status == 303
            )

            # A stranger's address gets the same answer as the operator's, and no mail.
            page.get_by_label("Email address").fill(STRANGER)
            page.get_by_role("button", name="Email me a sign-in link").click()
            answer_to_stranger = retry_time_masked(page.locator("main").inner_text())
            operator = browser.new_context(viewport={"width": 1280, "height": 900})
            page = operator.new_page()
            page.goto(base + "/admin/sign-in")
            page.get_by_label("Email address").fill(OPERATOR.upper())
            page.get_by_role("button", name="Email me a sign-in link").click()
            # The same words; only the retry time may have moved on a minute between the two.
            assert retry_time_masked(page.locator("main").inner_text()) == answer_to_stranger
            assert "ask again after" in answer_to_stranger
            smtp.wait_for(mails_before + 1)
            time.sleep(0.5)  # anything else that was going out has gone out
            assert smtp.to(STRANGER) == []
            [mail] = smtp.to(OPERATOR)
            assert len(smtp.messages) == mails_before + 1
            link = link_in(mail, "sign-in")

            # The link opens a page with one button (a scanner's GET uses nothing up).
            page.goto(link)
            page.goto(link)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
            [cookie] = operator.cookies()
            assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

            # The dashboard's numbers are the ledger's.
            edition = page.locator(f'tr[data-edition="daily-{DAY}"]')
            expect(edition.locator('[data-count="sent"]')).to_have_text(str(sent))
            expect(edition.locator('[data-count="failed"]')).to_have_text(str(failed))
            expect(page.locator('[data-status="active"]')).to_have_text(str(active))
            expect(page.locator('[data-status="bounced"]')).to_have_text("2")  # hard bounce, 550 refusal
            expect(page.locator(".failures li", has_text=REFUSED)).to_contain_text("550 5.1.1")
            expect(page.locator('[data-figure="sent-window"]')).to_have_text(str(sent))
            expect(page.locator('[data-status="pending"]')).to_have_text("1")
            assert page.locator("svg rect.bar").count() == 60
            page.screenshot(path=SHOTS / "admin-dashboard-1280.png", full_page=True)
            page.set_viewport_size({"width": 375, "height": 800})
            page.screenshot(path=SHOTS / "admin-dashboard-375.png", full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})

            # A used link never signs anyone in again.
            again = browser.new_context()
            assert again.request.post(link, max_redirects=0).status == 400
            assert again.cookies() == []
            page.goto(link)
            expect(page.get_by_text("already used")).to_be_visible()

            # Look people up: only the moves the consent rules allow are offered.
            page.goto(base + "/admin/subscribers")
            page.get_by_label("Email address").fill(BOUNCED)
            page.get_by_role("button", name="Look up").click()
            expect(page.locator('[data-state="bounced"]')).to_be_visible()
            expect(page.get_by_role("button", name="Unsuppress (mail again)")).to_be_visible()
            expect(page.get_by_role("button", name="Unsubscribe")).to_have_count(0)

            page.get_by_label("Email address").fill(READERS[0])
            page.get_by_role("button", name="Look up").click()
            expect(page.locator('[data-state="active"]')).to_be_visible()
            expect(page.locator("#deliveries + .table-wrap td", has_text="sent")).to_be_visible()
            expect(page.get_by_role("button", name="Unsuppress (mail again)")).to_have_count(0)
            page.screenshot(path=SHOTS / "admin-subscriber-1280.png", full_page=True)
            page.set_viewport_size({"width": 375, "height": 800})
            page.screenshot(path=SHOTS / "admin-subscriber-375.png", full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})
            page.get_by_role("button", name="Unsubscribe").click()
            expect(page.locator('[data-state="unsubscribed"]')).to_be_visible()
            assert subscriber(runtime, READERS[0]).status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]
            expect(page.get_by_role("button", name="Unsubscribe")).to_have_count(0)
            expect(page.get_by_role("button", name="Erase their data")).to_be_visible()

            # Erasure cannot be undone, so one click does not do it: the box must be ticked
            # (the browser holds the form back), and a post without it is refused.
            page.get_by_role("button", name="Erase their data").click()
            expect(page.locator('[data-state="unsubscribed"]')).to_be_visible()
            csrf = page.locator('form:has(input[value="erase"]) input[name="csrf"]').input_value()
            unticked = page.request.post(
                base + "/admin/subscribers", form={"csrf": csrf, "email": READERS[0], "action": "erase"}
            )
            assert unticked.status == 400 and "cannot be undone" in unticked.text()
            assert subscriber(runtime, READERS[0]) is not None
            page.get_by_label(f"Yes, erase {READERS[0]} for good").check()
            page.get_by_role("button", name="Erase their data").click()
            expect(page.locator('[data-state="erased"]')).to_be_visible()
            assert subscriber(runtime, READERS[0]) is None

            # A paused send: a form without the session's token is refused, the real one resumes.
            with transaction(runtime.session_factory) as session:
                reputation.pause(session, utcnow(), "looking into complaints")
            page.goto(base + "/admin")
            expect(page.get_by_text("Sending is paused")).to_be_visible()
            page.screenshot(path=SHOTS / "admin-paused-1280.png", full_page=True)
            form = page.locator('form[action="/admin/sending/resume"]')
            form.locator('input[name="csrf"]').evaluate("input => { input.value = 'forged'; }")
            form.get_by_role("button", name="Resume sending").click()
            expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
            assert paused(runtime)
            page.goto(base + "/admin")
            page.get_by_role("button", name="Resume sending").click()
            expect(page.get_by_text("Sending resumed.")).to_be_visible()
            expect(page.get_by_text("Sending is on.")).to_be_visible()
            assert not paused(runtime)

            # Signing out ends the session on the server, whatever the cookie says.
            replay = browser.new_context(extra_http_headers={"Cookie": f"{cookie['name']}={cookie['value']}"})
            assert replay.request.get(base + "/admin", max_redirects=0).status == 200
            page.get_by_role("button", name="Sign out").click()
            assert page.url == base + "/admin/sign-in"
            assert replay.request.get(base + "/admin", max_redirects=0).status == 303
        finally:
            browser.close()
    assert smtp.to(STRANGER) == []


def test_in_development_on_sqlite(sqlite_url: str, smtp: SMTPSink, papers_api: PapersAPI) -> None:
    """The embedded default (the demo's SQLite) serves the console too; the cookie is not
    Secure there, so it works over plain http://localhost."""
    from fastapi.testclient import TestClient

    from digest.core.models import AdminSignIn
    from digest.rendering.tokens import Purpose

    settings = make_settings(sqlite_url, smtp, papers_api, environment="development", admin_emails=OPERATOR)
    runtime = Runtime(settings)
    try:
        a_small_run(runtime, smtp)
        with transaction(runtime.session_factory) as session:
            row = AdminSignIn(email=OPERATOR, created_at=utcnow())
            session.add(row)
            session.flush()
            token = runtime.tokens.make(Purpose.ADMIN_SIGN_IN, row.id, int(row.created_at.timestamp()))
        with TestClient(create_app(runtime), follow_redirects=False) as client:
            answer = client.post(f"/admin/sign-in/{token}")
            assert answer.status_code == 303
            header = answer.headers["set-cookie"].lower()
            assert "httponly" in header and "samesite=strict" in header and "secure" not in header
            dashboard = client.get("/admin")
            assert dashboard.status_code == 200 and dashboard.headers["cache-control"] == "no-store"
            assert f'data-edition="daily-{DAY}"' in dashboard.text
            assert "Digests sent per day: <strong>3</strong>" in dashboard.text
            assert f"<strong>{REFUSED}</strong> ({DAY}): 550 5.1.1 no such mailbox here" in dashboard.text
            person = client.get("/admin/subscribers", params={"email": READERS[1]})
            assert person.status_code == 200 and 'data-state="active"' in person.text
            assert f"<tr><td>{DAY}</td><td>daily</td><td>sent</td><td>1</td>" in person.text
    finally:
        runtime.dispose()
