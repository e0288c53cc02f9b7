"""A person in a real browser: subscribe, confirm from the email, get a digest, unsubscribe.

Chromium (Debian's) driven by Playwright against uvicorn serving the app on a free port, with
real PostgreSQL and a real SMTP server; screenshots of every page go to
test-artifacts/screenshots/.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from digest.core.models import SubscriberStatus
from digest.orchestration.pipeline import collect_if_needed, run_inprocess
from digest.orchestration.runtime import Runtime
from digest.web.app import create_app
from tests.support.browser import CHROMIUM_ARGS, SHOTS, require_chromium
from tests.support.inbox import link_in
from tests.support.rows import subscriber
from tests.support.servers import PapersAPI, SMTPSink, free_port
from tests.support.settings import make_settings
from tests.web.live import server_thread

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

EMAIL = "reader@example.org"
T = TypeVar("T")


def off_the_browser_loop(func: Callable[..., T], *args: object) -> T:
    """Playwright's sync API keeps an event loop running in this thread; the run needs its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(func, *args).result()


@pytest.fixture
def chromium_path() -> Path:
    return require_chromium()


@pytest.fixture
def live(database: str, smtp: SMTPSink, papers_api: PapersAPI) -> Iterator[tuple[Runtime, str]]:
    port = free_port()
    runtime = Runtime(make_settings(database, smtp, papers_api, base_url=f"http://127.0.0.1:{port}"))
    try:
        with server_thread(create_app(runtime), port) as base:
            yield runtime, base
    finally:
        runtime.dispose()


def test_subscribe_confirm_receive_unsubscribe(chromium_path: Path, live: tuple[Runtime, str], smtp: SMTPSink) -> None:
    from playwright.sync_api import expect, sync_playwright

    runtime, base = live
    collect_if_needed(runtime, dt.date(2024, 10, 25), allow_sample=False)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})

            page.goto(base + "/")
            headline = page.get_by_role("heading", name="The day's trending AI papers, in your inbox")
            expect(headline).to_be_visible()
            expect(page.locator("li.paper").first).to_be_visible()
            page.screenshot(path=SHOTS / "1-front.png", full_page=True)

            page.get_by_label("Email address").fill(EMAIL)
            page.get_by_role("button", name="Subscribe").click()
            expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
            page.screenshot(path=SHOTS / "2-check-inbox.png")

            smtp.wait_for(1)
            [confirmation] = smtp.to(EMAIL)
            page.goto(link_in(confirmation, "confirm"))
            expect(page.get_by_role("button", name="Confirm my subscription")).to_be_visible()
            page.screenshot(path=SHOTS / "3-confirm.png")
            assert subscriber(runtime, EMAIL).status is SubscriberStatus.PENDING  # type: ignore[union-attr]
            page.get_by_role("button", name="Confirm my subscription").click()
            expect(page.get_by_role("heading", name="You are subscribed")).to_be_visible()
            page.screenshot(path=SHOTS / "4-subscribed.png")
            smtp.wait_for(2)  # the welcome

            summary = off_the_browser_loop(run_inprocess, runtime, dt.date(2024, 10, 25))
            assert summary.counts.get("sent") == 1, summary.lines()
            digests = [m for m in smtp.to(EMAIL) if m["List-Unsubscribe"]]
            digest = digests[-1]
            assert "List-Unsubscribe=One-Click" in str(digest["List-Unsubscribe-Post"])
            unsubscribe_url = link_in(digest, "unsubscribe")
            assert unsubscribe_url in str(digest["List-Unsubscribe"])

            page.goto(unsubscribe_url)
            expect(page.get_by_role("button", name="Unsubscribe")).to_be_visible()
            page.screenshot(path=SHOTS / "5-unsubscribe.png")
            assert subscriber(runtime, EMAIL).status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]
            page.get_by_role("button", name="Unsubscribe").click()
            expect(page.get_by_role("heading", name="You are unsubscribed")).to_be_visible()
            page.screenshot(path=SHOTS / "6-unsubscribed.png")
        finally:
            browser.close()

    received = len(smtp.to(EMAIL))
    run_inprocess(runtime, dt.date(2026, 4, 16))
    assert len(smtp.to(EMAIL)) == received
    assert subscriber(runtime, EMAIL).status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]
