"""The public digest archive: ``/digests`` (past daily editions), ``/digests/{date}`` (one edition,
the target of every email's "View in browser" link) and ``/digests/feed.atom`` for feed readers.

Nothing here is personal: an edition shows the day's papers in trending order, the same list
every subscriber's picks come from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from feedgen.feed import FeedGenerator
from markupsafe import escape
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from digest.db import transaction
from digest.errors import NotFound
from digest.models import Digest, DigestItem, DigestKind
from digest.rendering import PaperView, date_label
from digest.web.deps import RuntimeDep
from digest.web.templating import templates

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 60  # editions per archive page: about two months of weekdays
FEED_ENTRIES = 30
FEED_PAPERS = 10  # papers listed in each feed entry; the link leads to the rest
CACHE = {"Cache-Control": "public, max-age=300"}


@dataclass(frozen=True)
class Edition:
    day: dt.date
    label: str
    created_at: dt.datetime
    papers: list[PaperView]


def _edition(digest: Digest) -> Edition:
    items = sorted(digest.items, key=lambda item: item.position)
    return Edition(
        day=digest.date,
        label=date_label(digest.date),
        created_at=digest.created_at,
        papers=[PaperView.from_paper(item.paper) for item in items],
    )


def editions(session: Session, *, before: dt.date | None = None, limit: int = PAGE_SIZE) -> list[Edition]:
    """Daily editions that have papers, newest first, strictly before ``before`` if given."""
    query = (
        select(Digest)
        .where(
            Digest.kind == DigestKind.DAILY,
            exists().where(DigestItem.digest_id == Digest.id),
        )
        .order_by(Digest.date.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(Digest.date < before)
    return [_edition(d) for d in session.scalars(query).unique()]


def edition(session: Session, day: dt.date) -> Edition:
    digest = session.scalar(select(Digest).where(Digest.kind == DigestKind.DAILY, Digest.date == day))
    if digest is None or not digest.items:
        raise NotFound(f"There is no digest for {day.isoformat()}.")
    return _edition(digest)


def atom_feed(entries: list[Edition], base_url: str) -> bytes:
    """An Atom feed with one entry per edition, linking to its archive page."""
    feed = FeedGenerator()
    feed.id(f"{base_url}/digests")
    feed.title("Daily Papers: trending AI research")
    feed.subtitle("The day's trending papers from Hugging Face Daily Papers.")
    feed.link(href=f"{base_url}/digests/feed.atom", rel="self", type="application/atom+xml")
    feed.link(href=f"{base_url}/digests", rel="alternate", type="text/html")
    feed.language("en")
    updated = max((e.created_at for e in entries), default=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    feed.updated(updated)
    for item in entries:
        url = f"{base_url}/digests/{item.day.isoformat()}"
        entry = feed.add_entry(order="append")
        entry.id(url)
        more = f" and {len(item.papers) - 1} more" if len(item.papers) > 1 else ""
        entry.title(f"{item.label}: {item.papers[0].title}{more}")
        entry.link(href=url, rel="alternate", type="text/html")
        entry.published(item.created_at)
        entry.updated(item.created_at)
        entry.content(_feed_html(item), type="html")
    atom: bytes = feed.atom_str(pretty=True)
    return atom


def _feed_html(item: Edition) -> str:
    rows = "".join(
        f'<li><a href="{escape(p.url)}">{escape(p.title)}</a> ({p.upvotes} upvotes)<br>{escape(p.summary)}</li>'
        for p in item.papers[:FEED_PAPERS]
    )
    more = len(item.papers) - FEED_PAPERS
    tail = f"<p>And {more} more in the full digest.</p>" if more > 0 else ""
    return f"<ol>{rows}</ol>{tail}"


@router.get("/digests/feed.atom")
def feed(runtime: RuntimeDep) -> Response:
    with transaction(runtime.session_factory) as session:
        entries = editions(session, limit=FEED_ENTRIES)
    body = atom_feed(entries, runtime.settings.base_url)
    return Response(body, media_type="application/atom+xml", headers=CACHE)


@router.get("/digests", response_class=HTMLResponse)
def archive(request: Request, runtime: RuntimeDep, before: Annotated[dt.date | None, Query()] = None) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        page = editions(session, before=before, limit=PAGE_SIZE + 1)
    older = page[PAGE_SIZE - 1].day if len(page) > PAGE_SIZE else None
    return templates.TemplateResponse(
        request, "archive.html", {"editions": page[:PAGE_SIZE], "older": older}, headers=CACHE
    )


@router.get("/digests/{day}", response_class=HTMLResponse)
def digest_page(request: Request, runtime: RuntimeDep, day: dt.date) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        shown = edition(session, day)
    return templates.TemplateResponse(request, "digest.html", {"edition": shown}, headers=CACHE)
