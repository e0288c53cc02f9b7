"""The reader's own Atom feed: linked from their preferences page, valid Atom with the papers and
reasons of the digests they got over real SMTP, never naming their address, and replaceable (the
old address then answers 404) (issue 21)."""

from __future__ import annotations

import datetime as dt
import re
from xml.etree import ElementTree as etree

import feedparser
from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.atom import assert_valid_atom
from tests.support.servers import SMTPSink

DAY = dt.date(2024, 10, 25)
ATOM = "{http://www.w3.org/2005/Atom}"


def prefs_path(runtime: Runtime, email: str, topics: str = "") -> str:
    with transaction(runtime.session_factory) as session:
        sub = subscriptions.add_confirmed(session, runtime.tokens, email, now=utcnow(), topics=topics)
        return runtime.links.preferences(sub).removeprefix(runtime.settings.base_url)


def feed_link(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200
    found = re.search(r'<a href="([^"]+)"[^>]*>Your feed</a>', page.text)
    assert found, page.text
    return found.group(1)


def assert_atom(body: bytes) -> etree.Element:
    """Valid under RFC 4287's grammar and rules, read without error by feedparser, as a feed
    reader would, with a self link and an entry id per digest paper."""
    assert_valid_atom(body)
    parsed = feedparser.parse(body)
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    assert parsed.version == "atom10"
    root = etree.fromstring(body)
    assert root.tag == f"{ATOM}feed"
    for name in ("id", "title", "updated"):
        assert len(root.findall(f"{ATOM}{name}")) == 1, name
    feed_author = root.find(f"{ATOM}author/{ATOM}name")
    assert feed_author is not None and feed_author.text  # 4.1.1: author of the feed (so of each entry)
    assert root.find(f"{ATOM}link[@rel='self']") is not None
    ids = []
    for entry in root.findall(f"{ATOM}entry"):
        for name in ("id", "title", "updated"):
            assert len(entry.findall(f"{ATOM}{name}")) == 1, name
        ids.append(entry.findtext(f"{ATOM}id"))
        updated = entry.findtext(f"{ATOM}updated") or ""
        assert dt.datetime.fromisoformat(updated).tzinfo is not None  # RFC 3339 date-time
        assert entry.find(f"{ATOM}link[@rel='alternate']") is not None or entry.find(f"{ATOM}content") is not None
    assert len(ids) == len(set(ids))
    return root


def test_the_feed_carries_the_readers_papers_and_reasons_and_a_new_address_retires_the_old(
    client: TestClient, runtime: Runtime, smtp: SMTPSink
) -> None:
    path = prefs_path(runtime, "ada@example.org", topics="hallucination")
    url = feed_link(client, path)
    base = runtime.settings.base_url
    assert url.startswith(f"{base}/feed/") and "ada" not in url and "example.org" not in url.removeprefix(base)
    token = url.rsplit("/", 1)[1]
    assert len(token) >= 40  # 256 random bits
    assert feed_link(client, path) == url  # the same address until the reader replaces it

    empty = client.get(url.removeprefix(base))
    assert empty.status_code == 200 and empty.headers["content-type"].startswith("application/atom+xml")
    assert_atom(empty.content)

    run_inprocess(runtime, DAY)
    (mail,) = smtp.to("ada@example.org")
    text = mail.get_body(("plain",))
    assert text is not None
    got = re.findall(r"Paper:\s+https://huggingface\.co/papers/(\S+)", str(text.get_content()))
    assert got

    response = client.get(url.removeprefix(base))
    assert response.status_code == 200 and "private" in response.headers["cache-control"]
    root = assert_atom(response.content)
    parsed = feedparser.parse(response.content)
    links = [e.link for e in parsed.entries]
    assert sorted(links) == sorted(f"https://huggingface.co/papers/{pid}" for pid in got)
    hallucinations = next(e for e in parsed.entries if e.link.endswith("2410.16251"))
    assert "hallucination" in hallucinations.content[0].value  # the reason the digest gave
    assert "Knowledge Editing" in hallucinations.title
    assert b"ada@example.org" not in response.content and b"ada" not in response.content.lower().split(b"<entry")[0]
    assert root.findtext(f"{ATOM}id") == url

    replaced = client.post(f"{path}/feed")
    assert replaced.status_code == 200 and "new address" in replaced.text
    new_url = feed_link(client, path)
    assert new_url != url
    assert client.get(url.removeprefix(base)).status_code == 404
    again = client.get(new_url.removeprefix(base))
    assert again.status_code == 200
    assert sorted(e.link for e in feedparser.parse(again.content).entries) == sorted(links)


def test_an_unknown_address_answers_404(client: TestClient, runtime: Runtime) -> None:
    prefs_path(runtime, "ada@example.org")
    assert client.get("/feed/not-a-feed-token-at-all-not-a-feed-token-at").status_code == 404
