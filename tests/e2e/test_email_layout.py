"""The digest email and the archive pages in a real browser (Debian's headless Chromium) at a
phone width (375 px) and a desktop width (800 px): no sideways scrolling, every paper visible.

Screenshots land in test-artifacts/screenshots/ for a human to look at. Without
/usr/bin/chromium the tests skip, unless DIGEST_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from digest.orchestration.runtime import Runtime
from digest.papers.source import load_sample
from digest.web.app import create_app
from tests.support.browser import CHROMIUM_ARGS, SHOTS, require_chromium
from tests.support.emails import digest_bytes, html_of, parse, strip_style_blocks
from tests.support.servers import free_port
from tests.web.live import server_thread
from tests.web.test_archive import NEW, publish_sample_days

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

WIDTHS = (375, 800)
PAPERS = 30


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_chromium()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser: Browser, width: int, dark: bool = False) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme="dark" if dark else "light")
    return context.new_page()


def check_fits(page: Page, width: int) -> None:
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width, f"{scroll_width}px wide content in a {width}px viewport"


def render_email(page: Page, html: str) -> list[str]:
    """Show the email as a mail client would, recording any resource it tries to load."""
    requested: list[str] = []

    def refuse(route: Route) -> None:
        requested.append(route.request.url)
        route.abort()

    page.route("**/*", refuse)
    page.set_content(html, wait_until="load")
    return requested


@pytest.mark.parametrize("variant", ["styled", "style-stripped", "dark"])
@pytest.mark.parametrize("width", WIDTHS)
def test_digest_email_fits_and_shows_every_paper(browser: Browser, width: int, variant: str) -> None:
    html = html_of(parse(digest_bytes(PAPERS)))
    if variant == "style-stripped":
        html = strip_style_blocks(html)
    page = open_page(browser, width, dark=variant == "dark")
    requested = render_email(page, html)
    # Nothing loads but the papers' thumbnails, and they are refused here: the email reads the
    # same with images off.
    thumbnails = set(re.findall(r'<img class="thumb"[^>]* src="([^"]+)"', html))
    assert thumbnails and set(requested) <= thumbnails
    check_fits(page, width)
    titles = page.locator("a.title")
    assert titles.count() == PAPERS
    for i in range(PAPERS):
        title = titles.nth(i)
        assert title.is_visible()
        box = title.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5
    assert page.get_by_text("Unsubscribe", exact=True).is_visible()
    assert not page.locator(".preheader").is_visible()
    page.screenshot(path=str(SHOTS / f"digest-email-{variant}-{width}.png"), full_page=True)
    page.context.close()


@pytest.fixture
def site(runtime: Runtime) -> Iterator[str]:
    publish_sample_days(runtime)
    with server_thread(create_app(runtime), free_port()) as base:
        yield base


@pytest.mark.parametrize("width", WIDTHS)
def test_archive_pages_fit_and_show_every_paper(browser: Browser, site: str, width: int) -> None:
    page = open_page(browser, width)
    page.goto(f"{site}/digests")
    check_fits(page, width)
    assert page.locator('a[href^="/digests/20"]').count() == 2
    page.screenshot(path=str(SHOTS / f"archive-{width}.png"), full_page=True)

    page.goto(f"{site}/digests/{NEW}")
    check_fits(page, width)
    links = page.locator('a[href^="https://huggingface.co/papers/"]')
    assert links.count() == len(load_sample(NEW) or [])
    for i in range(links.count()):
        assert links.nth(i).is_visible()
    page.screenshot(path=str(SHOTS / f"digest-page-{width}.png"), full_page=True)
    page.context.close()
