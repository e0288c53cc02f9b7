"""The newcomer's first hour, through real processes: `digest demo`, then the command it prints
(`digest serve --demo`), then Chromium on the demo's own email links, a sign-up and a console
sign-in whose mail is read where development mail lands (./outbox/), with nothing set up.

Screenshots of the archive and the console at 375 and 1280 px go to
test-artifacts/screenshots/; the header must stay one line and wide tables must scroll inside
their wrapper instead of being cut.
"""

from __future__ import annotations

import re
import subprocess
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHROMIUM_ARGS, SHOTS, require_chromium
from tests.support.processes import BIN, Process, digest_env
from tests.support.servers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

READER = "newcomer@example.org"
OPERATOR = "operator@example.org"


def _link(html: str, pattern: str) -> str:
    found = re.search(rf'href="([^"]*{pattern}[^"]*)"', html)
    assert found, f"no link matching {pattern!r}"
    return found.group(1).replace("&amp;", "&")


def _mail_to(outbox: Path, address: str, timeout: float = 30.0) -> EmailMessage:
    """The newest message for ``address`` the served app wrote to the outbox."""
    stem = address.replace("@", "_")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(outbox.glob(f"*-{stem}.eml"))
        if found:
            message = message_from_bytes(found[-1].read_bytes(), policy=policy.default)
            assert isinstance(message, EmailMessage)
            return message
        time.sleep(0.2)
    raise AssertionError(f"no mail to {address} in {outbox}: {sorted(p.name for p in outbox.glob('*'))}")


def _text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def _fits_375(page: Any, name: str) -> None:
    """Screenshots at 375 and 1280 px; the header one line, tables scrolling in a wrapper."""
    for width in (375, 1280):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=SHOTS / f"first-hour-{name}-{width}.png", full_page=True)
        header = page.evaluate(
            """() => {
                const wrap = document.querySelector('.site-header .wrap');
                const boxes = [...wrap.querySelectorAll('.brand, nav a')].map(e => e.getBoundingClientRect());
                const middles = boxes.map(r => r.top + r.height / 2);
                const nav = wrap.querySelector('nav');
                return {height: wrap.getBoundingClientRect().height,
                        spread: Math.max(...middles) - Math.min(...middles),
                        navCut: nav.scrollWidth > nav.clientWidth,
                        brandHeight: wrap.querySelector('.brand').getBoundingClientRect().height,
                        scrollWidth: document.documentElement.scrollWidth};
            }"""
        )
        assert header["height"] <= 60, (name, width, header)
        assert header["spread"] < 8, (name, width, header)  # brand and links on one line
        assert not header["navCut"], (name, width, header)  # every link shown whole
        assert header["brandHeight"] < 40, (name, width, header)
        assert header["scrollWidth"] <= width, (name, width, header)  # nothing pushes the page wider
        tables = page.evaluate(
            """() => [...document.querySelectorAll('table')].map(t => {
                const wrap = t.parentElement;
                return {overflow: getComputedStyle(wrap).overflowX, right: wrap.getBoundingClientRect().right,
                        wrapWidth: wrap.clientWidth, tableWidth: t.scrollWidth};
            })"""
        )
        for table in tables:
            assert table["overflow"] == "auto", (name, width, table)
            assert table["right"] <= width, (name, width, table)  # the wrapper fits; the table scrolls in it
        figures = page.evaluate(
            """() => [...document.querySelectorAll('.figures dd:not(.fine)')].map(d => {
                const style = getComputedStyle(d);
                return {text: d.textContent, height: d.getBoundingClientRect().height,
                        line: parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.6};
            })"""
        )
        for figure in figures:
            assert figure["height"] < figure["line"] * 1.5, (name, width, figure)  # one line: no mid-word break


def test_demo_then_serve_demo_then_the_browser(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = require_chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The newcomer's environment: nothing set but where the demo's links point (a free port
    # here, 127.0.0.1:8000 by default) and, for the console, an operator. No SMTP server.
    env = digest_env(papers_api_url="http://127.0.0.1:9", base_url=base, admin_emails=OPERATOR)
    demo = subprocess.run(
        [str(BIN / "digest"), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "digest serve --demo" in demo.stdout.splitlines()[-1]
    assert base in demo.stdout
    outbox = tmp_path / "outbox"
    # Numbered in the order the messages were sent, which concurrent sends do not fix.
    (grace_file,) = outbox.glob("*-grace_example.com.html")
    grace = grace_file.read_text(encoding="utf-8")

    server = Process([str(BIN / "digest"), "serve", "--demo"], env, tmp_path / "serve.log", cwd=tmp_path).start()
    try:
        server.wait_for_output("Uvicorn running", timeout=60)
        assert f"at {base}" in server.output()
        assert f"mail is written to {outbox}/" in server.output()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})

                # The demo's own digest links work against the served demo database.
                page.goto(_link(grace, f"{re.escape(base)}/preferences/"))
                expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()
                expect(page.get_by_text("grace@example.com").first).to_be_visible()
                page.goto(_link(grace, f'{re.escape(base)}/feedback/[^"]*/more'))
                expect(page.get_by_role("heading", name="More like this?")).to_be_visible()
                page.get_by_role("button", name="More like this").click()
                expect(page.get_by_role("heading", name="Noted: more like this")).to_be_visible()

                # Sign up on the front page; the confirmation lands in the outbox.
                page.goto(base + "/")
                expect(page.locator("[data-outbox]")).to_contain_text(str(outbox))
                page.get_by_label("Email address").fill(READER)
                page.get_by_role("button", name="Subscribe").click()
                expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
                confirm = re.search(rf"{re.escape(base)}/confirm/\S+", _text(_mail_to(outbox, READER)))
                assert confirm, "no confirmation link"
                page.goto(confirm.group(0))
                page.get_by_role("button", name="Confirm my subscription").click()
                expect(page.get_by_role("heading", name="You are subscribed")).to_be_visible()

                page.goto(base + "/digests")
                expect(page.get_by_role("heading", name="Past digests")).to_be_visible()
                _fits_375(page, "archive")

                # The console's sign-in link, read the same way.
                page.set_viewport_size({"width": 1280, "height": 900})
                page.goto(base + "/admin/sign-in")
                page.get_by_label("Email address").fill(OPERATOR)
                page.get_by_role("button", name="Email me a sign-in link").click()
                sign_in = re.search(rf"{re.escape(base)}/admin/sign-in/\S+", _text(_mail_to(outbox, OPERATOR)))
                assert sign_in, "no sign-in link"
                page.goto(sign_in.group(0))
                page.get_by_role("button", name="Sign in").click()
                expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
                expect(page.locator("table.ledger")).to_be_visible()  # the demo's edition
                _fits_375(page, "console")
            finally:
                browser.close()
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def test_serve_on_an_unmigrated_database_refuses_in_one_line(tmp_path: Path) -> None:
    for args in (["serve"], ["serve", "--demo"]):
        result = subprocess.run(
            [str(BIN / "digest"), *args],
            cwd=tmp_path,
            env=digest_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "digest db upgrade" in lines[0] or "digest demo" in lines[0]
    assert not (tmp_path / "digest.db").exists()  # refused without creating an empty database
    (tmp_path / "empty.db").touch()
    result = subprocess.run(
        [str(BIN / "digest"), "serve"],
        cwd=tmp_path,
        env=digest_env(database_url="sqlite:///empty.db"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: sqlite:///empty.db has no schema: run `digest db upgrade`"
