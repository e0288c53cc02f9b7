"""What the front page and ``/api/digests/latest`` show: the latest daily digest's papers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from digest.core.db import transaction
from digest.delivery.composer import latest_digest
from digest.orchestration.runtime import Runtime

SUMMARY_CHARS = 420


@dataclass(frozen=True)
class PaperView:
    id: str
    title: str
    authors: str
    upvotes: int
    comments: int
    summary: str
    url: str
    github_repo: str | None


@dataclass(frozen=True)
class FrontPage:
    day: dt.date | None
    papers: list[PaperView]


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def _authors(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 5 else ", ".join(names[:4]) + f" and {len(names) - 4} more"


def front_page(runtime: Runtime) -> FrontPage:
    with transaction(runtime.session_factory) as session:
        digest = latest_digest(session)
        if digest is None:
            return FrontPage(None, [])
        papers = [
            PaperView(
                id=item.paper.id,
                title=" ".join(item.paper.title.split()),
                authors=_authors(item.paper.authors or []),
                upvotes=item.paper.upvotes,
                comments=item.paper.num_comments,
                summary=_shorten(item.paper.ai_summary or item.paper.abstract, SUMMARY_CHARS),
                url=f"https://huggingface.co/papers/{item.paper.id}",
                github_repo=item.paper.github_repo,
            )
            for item in sorted(digest.items, key=lambda i: i.position)
        ]
        return FrontPage(digest.date, papers)
