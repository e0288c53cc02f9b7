"""The public archive: the list of past digests, one digest's page, and the Atom feed."""

from __future__ import annotations

import datetime as dt
import re
from xml.etree import ElementTree

import feedparser
from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import utcnow
from digest.delivery.composer import build_digest
from digest.orchestration.runtime import Runtime
from digest.papers.source import SAMPLE_DATES, load_sample, parse_items, store_papers
from digest.subscribers.subscriptions import add_confirmed
from tests.support.atom import assert_valid_atom, atom_problems

OLD, NEW = sorted(SAMPLE_DATES)


def publish_sample_days(runtime: Runtime) -> None:
    with transaction(runtime.session_factory) as session:
        for day in SAMPLE_DATES:
            store_papers(session, parse_items(load_sample(day) or [], day))
            build_digest(session, day, runtime.weights)
        add_confirmed(session, runtime.tokens, "ada@example.com", now=utcnow())


def test_archive_lists_each_daily_digest_newest_first(client: TestClient, runtime: Runtime) -> None:
    publish_sample_days(runtime)
    page = client.get("/digests")
    assert page.status_code == 200
    links = re.findall(r'href="(/digests/\d{4}-\d{2}-\d{2})"', page.text)
    assert links == [f"/digests/{NEW}", f"/digests/{OLD}"]
    assert "Thursday, 16 April 2026" in page.text and "Friday, 25 October 2024" in page.text
    assert 'href="/digests/feed.atom"' in page.text


def test_a_digest_page_shows_its_papers_without_personal_links(client: TestClient, runtime: Runtime) -> None:
    publish_sample_days(runtime)
    page = client.get(f"/digests/{NEW}")
    assert page.status_code == 200
    expected = parse_items(load_sample(NEW) or [], NEW)
    for record in expected:
        assert f"https://huggingface.co/papers/{record.id}" in page.text
        assert f"https://arxiv.org/pdf/{record.id}" in page.text
    assert "/unsubscribe/" not in page.text and "/preferences/" not in page.text
    assert "ada@example.com" not in page.text


def test_unknown_or_malformed_dates_are_not_found(client: TestClient, runtime: Runtime) -> None:
    publish_sample_days(runtime)
    assert client.get("/digests/2025-01-01").status_code == 404
    assert client.get("/digests/not-a-date").status_code in (400, 404, 422)


def test_empty_archive_and_feed_still_answer(client: TestClient) -> None:
    assert "No digests yet" in client.get("/digests").text
    body = client.get("/digests/feed.atom").content
    assert_valid_atom(body)
    assert feedparser.parse(body).entries == []


def test_feed_is_valid_atom_linking_each_digest(client: TestClient, runtime: Runtime) -> None:
    publish_sample_days(runtime)
    response = client.get("/digests/feed.atom")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/atom+xml")
    assert_valid_atom(response.content)  # RFC 4287's grammar and rules
    feed = feedparser.parse(response.content)
    assert not feed.bozo, feed.bozo_exception
    assert feed.version == "atom10"
    base = runtime.settings.base_url
    assert [e.link for e in feed.entries] == [f"{base}/digests/{NEW}", f"{base}/digests/{OLD}"]
    first = feed.entries[0]
    assert first.title.startswith("Thursday, 16 April 2026: Seedance 2.0")
    assert first.updated_parsed is not None
    assert "https://huggingface.co/papers/" in first.content[0].value
    assert any(link.rel == "self" and link.href == f"{base}/digests/feed.atom" for link in feed.feed.links)
    assert dt.date.fromisoformat(first.link.rsplit("/", 1)[1]) == NEW


def test_the_feed_names_its_author_and_dates_each_entry_by_its_editions_day(
    client: TestClient, runtime: Runtime
) -> None:
    publish_sample_days(runtime)  # collected today, for days long past
    body = client.get("/digests/feed.atom").content
    feed = feedparser.parse(body)
    assert feed.bozo == 0 and feed.version == "atom10"
    assert feed.feed.author_detail.name == "Daily Papers"  # RFC 4287 4.1.1: a feed has an author
    atom = "{http://www.w3.org/2005/Atom}"
    root = ElementTree.fromstring(body)
    assert root.find(f"{atom}author/{atom}name") is not None
    dates = {
        str(entry.findtext(f"{atom}id")).rsplit("/", 1)[1]: entry.findtext(f"{atom}updated")
        for entry in root.findall(f"{atom}entry")
    }
    assert {day: dt.datetime.fromisoformat(str(when)) for day, when in dates.items()} == {
        day.isoformat(): dt.datetime.combine(day, dt.time(), dt.UTC) for day in (NEW, OLD)
    }
    assert root.findtext(f"{atom}updated", "").startswith(NEW.isoformat())


def test_the_validator_refuses_what_rfc_4287_forbids(client: TestClient, runtime: Runtime) -> None:
    """The feed tests' validator fails on the faults a feed could have: no author anywhere
    (4.1.1), a date that is not RFC 3339 (3.3), an entry without its id (4.1.2), two alternate
    links of one type (4.1.1). Each is made from the real feed, which itself passes."""
    publish_sample_days(runtime)
    body = client.get("/digests/feed.atom").content.decode()
    assert atom_problems(body.encode()) == []
    no_author = re.sub(r"<author>.*?</author>", "", body, count=1, flags=re.S)
    assert "<author>" not in no_author
    assert any("no author" in p for p in atom_problems(no_author.encode()))
    bad_date = re.sub(r"<updated>[^<]*</updated>", "<updated>16 April 2026</updated>", body, count=1)
    assert any("RELAX NG" in p for p in atom_problems(bad_date.encode()))
    entry_start = body.index("<entry>")
    no_id = body[:entry_start] + re.sub(r"<id>[^<]*</id>", "", body[entry_start:], count=1)
    assert any("RELAX NG" in p for p in atom_problems(no_id.encode()))
    link = re.search(r'<link href="[^"]*/digests/\d{4}-\d\d-\d\d"[^>]*/>', body[entry_start:])
    assert link is not None
    two_links = body.replace(link[0], link[0] * 2, 1)
    assert any("two alternate links" in p for p in atom_problems(two_links.encode()))
