"""Debian's Chromium for browser tests: where it is, how to launch it here, where shots go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling out, which this closed
# network refuses; a Playwright-downloaded browser cannot be fetched here at all.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def require_chromium() -> Path:
    """Chromium's path; skips without it, unless DIGEST_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("DIGEST_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (DIGEST_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    SHOTS.mkdir(parents=True, exist_ok=True)
    return CHROMIUM
