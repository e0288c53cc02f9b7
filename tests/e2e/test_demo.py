"""`digest demo` (the README's first command): real digests a person can open, from nothing."""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

import pytest

from tests.support.processes import BIN, digest_env

pytestmark = pytest.mark.e2e


def test_demo_leaves_readable_digests_in_the_outbox(tmp_path: Path) -> None:
    import subprocess

    # The live API is not reachable here; the demo must say so and use the shipped sample.
    env = digest_env(papers_api_url="http://127.0.0.1:9")
    result = subprocess.run(
        [str(BIN / "digest"), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "The papers API is not reachable" in result.stdout
    assert "Using the recorded sample data for 2026-04-16" in result.stdout
    emls = sorted((tmp_path / "outbox").glob("*.eml"))
    htmls = sorted((tmp_path / "outbox").glob("*.html"))
    assert len(emls) == len(htmls) == 3
    recipients = set()
    for eml, html in zip(emls, htmls, strict=True):
        message = message_from_bytes(eml.read_bytes(), policy=policy.default)
        recipients.add(str(message["To"]))
        assert message.get_content_type() == "multipart/alternative"
        assert "16 April 2026" in str(message["Subject"])
        page = html.read_text(encoding="utf-8")
        assert page.lstrip().lower().startswith("<!doctype html")
        assert "Seedance 2.0" in page or "huggingface.co/papers/" in page
        assert str(html.resolve().as_uri()) in result.stdout
    assert recipients == {"ada@example.com", "grace@example.com", "alan@example.com"}
    assert "pending@example.com" not in recipients
