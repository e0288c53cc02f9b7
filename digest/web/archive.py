"""The public digest archive: ``/digests`` (past daily editions), ``/digests/{date}`` (one edition,
the target of every email's "View in browser" link) and ``/digests/feed.atom`` for feed readers.

Nothing there is personal: an edition shows the day's papers in trending order, the same list
every subscriber's picks come from. The one personal page is each reader's own Atom feed,
``/feed/{token}``: the papers of their digests with their reasons, at an address only the
random token names (never the reader's email address), replaced on request.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from feedgen.feed import FeedGenerator
from markupsafe import escape
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.errors import NotFound
from digest.core.models import Digest, DigestItem, DigestKind, Subscriber, SubscriberStatus
from digest.delivery.composer import Delivered, delivered_papers
from digest.rendering.emails import PaperView, date_label
from digest.web.deps import RuntimeDep
from digest.web.templating import templates

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 60  # editions per archive page: about two months of weekdays
FEED_ENTRIES = 30
FEED_PAPERS = 10  # papers listed in each feed entry; the link leads to the rest
CACHE = {"Cache-Control": "public, max-age=300"}
PERSONAL_ENTRIES = 100  # papers in a reader's own feed: about two weeks of daily digests
FEED_TOKEN_BYTES = 32  # 256 random bits: the address cannot be guessed
AUTHOR = "Daily Papers"


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
    feed.author(name=AUTHOR, uri=f"{base_url}/")  # RFC 4287 4.1.1: a feed names its author
    updated = max((_day_start(e.day) for e in entries), default=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    feed.updated(updated)
    for item in entries:
        url = f"{base_url}/digests/{item.day.isoformat()}"
        entry = feed.add_entry(order="append")
        entry.id(url)
        more = f" and {len(item.papers) - 1} more" if len(item.papers) > 1 else ""
        entry.title(f"{item.label}: {item.papers[0].title}{more}")
        entry.link(href=url, rel="alternate", type="text/html")
        # The edition's day, not when it was collected: a late collection is not a newer edition.
        entry.published(_day_start(item.day))
        entry.updated(_day_start(item.day))
        entry.content(_feed_html(item), type="html")
    atom: bytes = feed.atom_str(pretty=True)
    return atom


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


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


def feed_token(subscriber: Subscriber) -> str:
    """The reader's feed token, made on first use (their preferences page)."""
    if subscriber.feed_token is None:
        subscriber.feed_token = secrets.token_urlsafe(FEED_TOKEN_BYTES)
    return subscriber.feed_token


def replace_feed_token(subscriber: Subscriber) -> str:
    """A new address for the reader's feed; the old one answers 404 from now on."""
    subscriber.feed_token = secrets.token_urlsafe(FEED_TOKEN_BYTES)
    return subscriber.feed_token


def personal_feed_url(base_url: str, subscriber: Subscriber) -> str:
    return f"{base_url}/feed/{feed_token(subscriber)}"


def personal_atom_feed(papers: list[Delivered], base_url: str, token: str) -> bytes:
    """One entry per paper the reader got, with the reasons their digest gave for it."""
    host = base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0] or "localhost"
    url = f"{base_url}/feed/{token}"
    feed = FeedGenerator()
    feed.id(url)  # a replaced address is a new feed: nothing ties the old one to the new
    feed.title("Daily Papers: your digest")
    feed.subtitle("The papers of your Daily Papers digests, with why each was chosen for you.")
    feed.author(name=AUTHOR, uri=f"{base_url}/")
    feed.link(href=url, rel="self", type="application/atom+xml")
    feed.link(href=f"{base_url}/digests", rel="alternate", type="text/html")
    feed.language("en")
    feed.updated(max((p.sent_at for p in papers), default=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)))
    for item in papers:
        view = PaperView.from_paper(item.paper, item.reasons)
        entry = feed.add_entry(order="append")
        # Permanent whatever the feed's address: the edition and the paper (RFC 4151 tag URI).
        entry.id(f"tag:{host},{item.day.isoformat()}:{item.kind.value}/{view.id}")
        entry.title(view.title)
        entry.link(href=view.url, rel="alternate", type="text/html")
        entry.author(name=view.authors_line)
        entry.published(item.sent_at)
        entry.updated(item.sent_at)
        entry.summary(view.summary)
        entry.content(_paper_html(view, item.day), type="html")
    atom: bytes = feed.atom_str(pretty=True)
    return atom


def _paper_html(view: PaperView, day: dt.date) -> str:
    reasons = "".join(f"<p><em>{escape(r)}</em></p>" for r in view.reasons)
    return (
        f"{reasons}<p>{escape(view.authors_line)}</p><p>{escape(view.summary)}</p>"
        f'<p><a href="{escape(view.arxiv_url)}">arXiv</a> · <a href="{escape(view.pdf_url)}">PDF</a></p>'
        f"<p>From your digest of {escape(date_label(day))}.</p>"
    )


@router.get("/feed/{token}")
def personal_feed(runtime: RuntimeDep, token: str) -> Response:
    with transaction(runtime.session_factory) as session:
        subscriber = session.scalar(select(Subscriber).where(Subscriber.feed_token == token)) if token else None
        if subscriber is None or subscriber.status is not SubscriberStatus.ACTIVE:
            raise NotFound("There is no feed at this address.")
        papers = delivered_papers(session, subscriber.id, PERSONAL_ENTRIES)
        body = personal_atom_feed(papers, runtime.settings.base_url, token)
    # Personal: no shared cache may keep it, and a replaced address stops answering at once.
    return Response(body, media_type="application/atom+xml", headers={"Cache-Control": "private, no-cache"})


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
