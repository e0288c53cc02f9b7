"""The collector against a local HTTP server serving the recorded Daily Papers responses."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.errors import UpstreamError
from digest.core.models import Digest, Paper
from digest.orchestration.pipeline import collect_day, run_inprocess
from digest.orchestration.runtime import Runtime
from digest.papers.source import PapersClient, parse_items
from tests.support.servers import PapersAPI, SMTPSink, load_recorded

OLD_DAY = dt.date(2024, 10, 25)
NEW_DAY = dt.date(2026, 4, 16)


def collect(runtime: Runtime, day: dt.date) -> int | None:
    with runtime.papers_client() as client, transaction(runtime.session_factory) as session:
        return collect_day(session, client, day, runtime).digest_id


def paper_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Paper)) or 0


def test_both_recorded_shapes_are_stored_with_clean_text(runtime: Runtime, session: Session) -> None:
    collect(runtime, OLD_DAY)
    collect(runtime, NEW_DAY)
    assert paper_count(session) == 29 + 22

    old = session.get(Paper, "2410.17243")
    assert old is not None
    assert old.title == "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss"
    assert "\n" not in old.abstract and "  " not in old.abstract
    assert old.upvotes == 64 and old.num_comments == 3
    assert old.ai_summary is None and old.github_stars is None
    assert old.daily_date == OLD_DAY
    assert old.published_at == dt.datetime(2024, 10, 22, 17, 59, 30, tzinfo=dt.UTC)

    new = session.get(Paper, "2604.14148")
    assert new is not None
    assert new.authors[0] == "Team Seedance"
    assert new.ai_summary and new.ai_summary.startswith("Seedance 2.0 is a multi-modal")
    assert "unified architecture" in new.ai_keywords
    assert new.organization == "ByteDance Seed"
    with_stars = session.scalars(select(Paper).where(Paper.github_stars.is_not(None))).all()
    assert len(with_stars) == 16


def test_non_ascii_author_names_survive(runtime: Runtime, session: Session, papers_api: PapersAPI) -> None:
    items = copy.deepcopy(papers_api.behaviour.days["2026-04-16"])
    items[1]["paper"]["authors"][0]["name"] = "Zoë  Łukasiewicz-Müller\n李 明"
    papers_api.behaviour.days["2026-04-16"] = items
    collect(runtime, NEW_DAY)
    stored = session.get(Paper, items[1]["paper"]["id"])
    assert stored is not None and stored.authors[0] == "Zoë Łukasiewicz-Müller 李 明"


def test_collecting_a_day_twice_updates_counts_and_duplicates_nothing(
    runtime: Runtime, session: Session, papers_api: PapersAPI
) -> None:
    collect(runtime, OLD_DAY)
    changed = copy.deepcopy(papers_api.behaviour.days["2024-10-25"])
    changed[0]["paper"]["upvotes"] = 500
    changed[0]["numComments"] = 42
    papers_api.behaviour.days["2024-10-25"] = changed
    collect(runtime, OLD_DAY)
    session.expire_all()
    assert paper_count(session) == 29
    paper = session.get(Paper, changed[0]["paper"]["id"])
    assert paper is not None and (paper.upvotes, paper.num_comments) == (500, 42)
    assert session.scalar(select(func.count()).select_from(Digest)) == 1


def test_429_then_success_honours_retry_after(runtime: Runtime, session: Session, papers_api: PapersAPI) -> None:
    papers_api.behaviour.faults = [429, 429]
    papers_api.behaviour.retry_after = "1"
    slept: list[float] = []
    with PapersClient(papers_api.url, retries=4, backoff=0.01, sleep=slept.append) as client:
        items = client.fetch_day(OLD_DAY)
    assert len(items) == 29
    assert slept == [1.0, 1.0]


def test_5xx_on_every_try_is_a_clear_error_and_stores_nothing(
    runtime: Runtime, session: Session, papers_api: PapersAPI
) -> None:
    papers_api.behaviour.faults = [503] * 10
    with pytest.raises(UpstreamError, match=r"unavailable for 2024-10-25 .* after 4 attempts \(last: HTTP 503\)"):
        collect(runtime, OLD_DAY)
    assert paper_count(session) == 0


def test_failure_on_a_later_page_stores_nothing_half_way(
    runtime: Runtime, session: Session, papers_api: PapersAPI
) -> None:
    # 150 items: page 0 is full, page 1 fails every time.
    many = []
    for n in range(150):
        item = copy.deepcopy(papers_api.behaviour.days["2024-10-25"][n % 29])
        item["paper"]["id"] = f"2410.{10000 + n}"
        many.append(item)
    papers_api.behaviour.days["2024-10-25"] = many
    original = papers_api.server.RequestHandlerClass.do_GET  # type: ignore[attr-defined]

    def fail_page_one(handler: object) -> None:
        if "p=1" in handler.path:  # type: ignore[attr-defined]
            handler._send(502, b"{}")  # type: ignore[attr-defined]
            return
        original(handler)

    papers_api.server.RequestHandlerClass.do_GET = fail_page_one  # type: ignore[attr-defined]
    try:
        with pytest.raises(UpstreamError, match="page 1"):
            collect(runtime, OLD_DAY)
    finally:
        papers_api.server.RequestHandlerClass.do_GET = original  # type: ignore[attr-defined]
    assert paper_count(session) == 0


def test_pages_until_a_short_page(runtime: Runtime, papers_api: PapersAPI) -> None:
    many = []
    for n in range(230):
        item = copy.deepcopy(papers_api.behaviour.days["2024-10-25"][n % 29])
        item["paper"]["id"] = f"2410.{20000 + n}"
        many.append(item)
    papers_api.behaviour.days["2024-10-25"] = many
    with runtime.papers_client() as client:
        assert len(client.fetch_day(OLD_DAY)) == 230
    pages = [r for r in papers_api.behaviour.requests if "daily_papers" in r]
    assert len(pages) == 3 and all("limit=100" in r for r in pages)


def test_a_malformed_item_is_skipped_and_logged(
    runtime: Runtime, session: Session, papers_api: PapersAPI, caplog: pytest.LogCaptureFixture
) -> None:
    items = copy.deepcopy(papers_api.behaviour.days["2024-10-25"])
    items[3]["paper"] = "not an object"
    items[5]["paper"]["upvotes"] = {"evil": True}
    items.append({"paper": {"id": "../../etc/passwd", "title": "x"}})
    papers_api.behaviour.days["2024-10-25"] = items
    collect(runtime, OLD_DAY)
    assert paper_count(session) == 27
    assert sum("skipping malformed item" in r.message for r in caplog.records) == 3


def test_oversized_fields_are_cut(session: Session) -> None:
    item = copy.deepcopy(load_recorded("2024-10-25")[0])
    item["paper"]["title"] = "A " * 10_000
    item["paper"]["summary"] = "word " * 100_000
    (record,) = parse_items([item], OLD_DAY)
    assert len(record.title) <= 500 and len(record.abstract) <= 10_000


def test_links_with_control_characters_or_other_schemes_are_dropped() -> None:
    item = copy.deepcopy(load_recorded("2024-10-25")[0])
    item["paper"]["githubRepo"] = "https://github.com/a/b\r\nBcc: victim@example.org"
    item["paper"]["projectPage"] = "javascript:alert(1)"
    (record,) = parse_items([item], OLD_DAY)
    assert record.github_repo is None and record.project_page is None
    item["paper"]["githubRepo"] = " https://github.com/a/b "
    (record,) = parse_items([item], OLD_DAY)
    assert record.github_repo == "https://github.com/a/b"


def test_an_empty_day_sends_no_digest_and_says_so(runtime: Runtime, smtp: SMTPSink, session: Session) -> None:
    from digest.core.models import utcnow
    from digest.subscribers.subscriptions import add_confirmed

    with transaction(runtime.session_factory) as s:
        add_confirmed(s, runtime.tokens, "reader@example.com", now=utcnow())
    summary = run_inprocess(runtime, dt.date(2024, 10, 26))
    assert summary.digest_id is None
    assert "No papers for 2024-10-26: no digest sent." in summary.lines()
    assert smtp.messages == []
