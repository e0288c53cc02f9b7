"""The paper source: a client for Hugging Face Daily Papers, tolerant parsing, and storage."""

from __future__ import annotations

import ast
import datetime as dt
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.errors import UpstreamError
from digest.core.models import Paper
from digest.core.text import without_unsafe

log = logging.getLogger(__name__)

PAGE_SIZE = 100  # the API's maximum
MAX_PAGES = 20  # a day has ~20-60 papers; anything more is a misbehaving server
MAX_TITLE = 500
MAX_ABSTRACT = 10_000
MAX_AUTHORS = 200
SAMPLE_DATES = (dt.date(2024, 10, 25), dt.date(2026, 4, 16))

_WS = re.compile(r"\s+")
_ARXIV_ID = re.compile(r"^[0-9]{4}\.[0-9]{4,5}(v[0-9]+)?$|^[a-z\-]+(\.[A-Z]{2})?/[0-9]{7}$")


@dataclass(frozen=True)
class PaperRecord:
    """One paper as parsed from the API, before it is stored."""

    id: str
    title: str
    abstract: str
    authors: list[str]
    upvotes: int
    num_comments: int
    daily_date: dt.date
    published_at: dt.datetime | None = None
    submitted_at: dt.datetime | None = None
    github_repo: str | None = None
    github_stars: int | None = None
    project_page: str | None = None
    ai_summary: str | None = None
    ai_keywords: list[str] = field(default_factory=list)
    thumbnail: str | None = None
    organization: str | None = None


class MalformedItem(ValueError):
    pass


def clean_text(value: object, limit: int) -> str:
    """Collapse the hard line breaks and runs of spaces real titles and abstracts carry, and drop
    what no text should hold (``digest.core.text.UNSAFE``)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedItem(f"expected text, got {type(value).__name__}")
    # Control characters and lone surrogates would break the feed, a Subject or the database.
    return _WS.sub(" ", without_unsafe(value)).strip()[:limit]


def _int(value: object, default: int | None = 0) -> int | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise MalformedItem("expected a number, got a boolean")
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError) as exc:
        raise MalformedItem(f"expected a number, got {value!r:.40}") from exc
    return max(0, number)


def _timestamp(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _maybe_literal(value: object) -> object:
    # Some saved responses hold nested objects as Python reprs; read them without eval.
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def _url(value: object) -> str | None:
    """An http(s) link as the API gives it, or None; never one with control characters (a CR or
    LF in a link would break the email's lines)."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    if url.startswith(("https://", "http://")) and len(url) <= 500 and url.isprintable() and " " not in url:
        return url
    return None


def parse_item(item: object, daily_date: dt.date) -> PaperRecord:
    """One API item to a ``PaperRecord``; ``MalformedItem`` says why an item is unusable."""
    if not isinstance(item, dict):
        raise MalformedItem("item is not an object")
    paper = item.get("paper")
    if not isinstance(paper, dict):
        raise MalformedItem("item has no 'paper' object")
    paper_id = paper.get("id")
    if not isinstance(paper_id, str) or not _ARXIV_ID.match(paper_id.strip()):
        raise MalformedItem(f"bad paper id {paper_id!r:.40}")
    title = clean_text(paper.get("title") or item.get("title"), MAX_TITLE)
    if not title:
        raise MalformedItem(f"paper {paper_id} has no title")

    authors: list[str] = []
    raw_authors = _maybe_literal(paper.get("authors"))
    if isinstance(raw_authors, list):
        for author in raw_authors[:MAX_AUTHORS]:
            name = author.get("name") if isinstance(author, dict) else None
            if isinstance(name, str) and name.strip():
                authors.append(clean_text(name, 200))

    keywords_raw = _maybe_literal(paper.get("ai_keywords"))
    keywords = (
        [clean_text(k, 100) for k in keywords_raw if isinstance(k, str)][:50] if isinstance(keywords_raw, list) else []
    )
    organization = _maybe_literal(item.get("organization") or paper.get("organization"))
    org_name = None
    if isinstance(organization, dict):
        org_name = organization.get("fullname") or organization.get("name")

    github_repo = _url(paper.get("githubRepo"))
    return PaperRecord(
        id=paper_id.strip(),
        title=title,
        abstract=clean_text(paper.get("summary") or item.get("summary"), MAX_ABSTRACT),
        authors=authors,
        upvotes=_int(paper.get("upvotes")) or 0,
        num_comments=_int(item.get("numComments")) or 0,
        daily_date=daily_date,
        published_at=_timestamp(paper.get("publishedAt")),
        submitted_at=_timestamp(paper.get("submittedOnDailyAt") or item.get("publishedAt")),
        github_repo=github_repo,
        github_stars=_int(paper.get("githubStars"), None),
        project_page=_url(paper.get("projectPage")),
        ai_summary=clean_text(paper.get("ai_summary"), 2000) or None,
        ai_keywords=keywords,
        thumbnail=_url(item.get("thumbnail")),
        organization=clean_text(org_name, 200) or None if isinstance(org_name, str) else None,
    )


def parse_items(items: Iterable[object], daily_date: dt.date) -> list[PaperRecord]:
    """Parse what can be parsed; log and skip the rest; later duplicates of an id win."""
    records: dict[str, PaperRecord] = {}
    for index, item in enumerate(items):
        try:
            record = parse_item(item, daily_date)
        except MalformedItem as exc:
            log.warning("skipping malformed item %d of %s: %s", index, daily_date, exc)
            continue
        except Exception as exc:  # hostile input we did not foresee: one bad item never costs the day
            log.warning("skipping unreadable item %d of %s: %r", index, daily_date, exc)
            continue
        records[record.id] = record
    return list(records.values())


class PapersClient:
    """HTTP client for ``/api/daily_papers`` with paging, timeouts and retries with backoff.

    Retries connection errors, timeouts, 429 (honouring ``Retry-After``) and 5xx; anything
    still failing after ``retries`` attempts raises ``UpstreamError`` with what happened.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 20.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_retry_after: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self._client = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": "digest/0.1 (+daily papers email digest)"},
            transport=transport,
            follow_redirects=True,
        )
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PapersClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch_day(self, day: dt.date) -> list[Any]:
        """All raw items of ``day``, page by page until a short page."""
        items: list[Any] = []
        for page in range(MAX_PAGES):
            batch = self._get_page(day, page)
            items.extend(batch)
            if len(batch) < PAGE_SIZE:
                return items
        raise UpstreamError(f"papers API returned more than {MAX_PAGES} full pages for {day}")

    def _get_page(self, day: dt.date, page: int) -> list[Any]:
        params: dict[str, str | int] = {"date": day.isoformat(), "limit": PAGE_SIZE, "p": page}
        last_problem = ""
        for attempt in range(1, self.retries + 1):
            delay = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
            try:
                response = self._client.get("/api/daily_papers", params=params)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._json_array(response, day, page)
                last_problem = f"HTTP {response.status_code}"
                if response.status_code == 429:
                    delay = self._retry_after(response, delay)
                elif response.status_code < 500:
                    raise UpstreamError(f"papers API refused {day} page {page}: HTTP {response.status_code}")
            if attempt < self.retries:
                log.info("papers API %s for %s p=%d; retrying in %.1fs", last_problem, day, page, delay)
                self._sleep(delay)
        raise UpstreamError(
            f"papers API unavailable for {day} page {page} after {self.retries} attempts (last: {last_problem})"
        )

    def _retry_after(self, response: httpx.Response, fallback: float) -> float:
        value = response.headers.get("Retry-After", "")
        try:
            seconds = float(value)
        except ValueError:
            return fallback
        return min(max(seconds, 0.0), self.max_retry_after)

    @staticmethod
    def _json_array(response: httpx.Response, day: dt.date, page: int) -> list[Any]:
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(f"papers API sent invalid JSON for {day} page {page}") from exc
        if not isinstance(data, list):
            raise UpstreamError(f"papers API sent {type(data).__name__}, not a list, for {day}")
        return data


def load_sample(day: dt.date) -> list[Any] | None:
    """The recorded response for ``day`` shipped with the package, if there is one."""
    resource = resources.files("digest.papers") / "sample_data" / f"{day.isoformat()}.json"
    if not resource.is_file():
        return None
    data = json.loads(resource.read_text(encoding="utf-8"))
    return data if isinstance(data, list) else None


def store_papers(
    session: Session, records: list[PaperRecord], *, embed: Callable[[Session, list[Paper]], object] | None = None
) -> int:
    """Upsert by arXiv id: a second collection of a day updates counts and adds nothing twice.

    ``embed`` (``digest.papers.embedding.paper_vectors``) then gives the papers their vectors, once.
    """
    if not records:
        return 0
    existing = {p.id: p for p in session.scalars(select(Paper).where(Paper.id.in_([r.id for r in records])))}
    stored: list[Paper] = []
    for record in records:
        values = record.__dict__.copy()
        paper = existing.get(record.id)
        if paper is None:
            paper = Paper(**values)
            session.add(paper)
            stored.append(paper)
            continue
        stored.append(paper)
        # A paper keeps the day it first reached Daily Papers.
        values.pop("daily_date")
        for key, value in values.items():
            if value is None and key in ("github_stars", "ai_summary", "project_page"):
                continue  # an older, thinner response never erases what we know
            if key == "ai_keywords" and not value:
                continue
            setattr(paper, key, value)
    session.flush()
    if embed is not None:
        embed(session, stored)
    return len(records)


def papers_of_day(session: Session, day: dt.date) -> list[Paper]:
    return list(session.scalars(select(Paper).where(Paper.daily_date == day).order_by(Paper.id)))
