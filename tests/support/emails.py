"""Digest emails built from the recorded API days, without a database (transient ``Paper`` rows)."""

from __future__ import annotations

import datetime as dt
import re
from email import message_from_bytes, policy
from email.message import EmailMessage

from digest.core.models import Paper
from digest.papers.source import SAMPLE_DATES, load_sample, parse_items
from digest.rendering.emails import DigestContext, EmailRenderer, Envelope, PaperView, date_label, message_bytes

DAY = dt.date(2026, 4, 16)
BASE = "https://papers.example.org"
POSTAL = "Daily Papers, 1 Example Street, 00000 Example City"


def sample_papers(count: int) -> list[Paper]:
    """Up to 51 papers: the modern recorded day first, then the older one."""
    papers: list[Paper] = []
    for day in sorted(SAMPLE_DATES, reverse=True):
        papers += [Paper(**r.__dict__) for r in parse_items(load_sample(day) or [], day)]
    assert len(papers) >= count
    return papers[:count]


def digest_context(papers: list[Paper], recipient: str = "ada@example.com", token: str = "tok-ada") -> DigestContext:
    return DigestContext(
        date_label=date_label(DAY),
        papers=[PaperView.from_paper(p, ("diffusion", "video") if i % 3 == 0 else ()) for i, p in enumerate(papers)],
        recipient=recipient,
        frequency="daily",
        unsubscribe_url=f"{BASE}/unsubscribe/{token}",
        preferences_url=f"{BASE}/preferences/{token}",
        view_url=f"{BASE}/digests/{DAY.isoformat()}",
        postal_address=POSTAL,
        # As long as the real signed links (digest.rendering.links.Links.feedback).
        feedback=[
            (
                f"{BASE}/feedback/1f.6620a1b0.{p.id}.0123456789abcdef0123/more",
                f"{BASE}/feedback/1f.6620a1b0.{p.id}.0123456789abcdef0123/less",
            )
            for p in papers
        ],
    )


def envelope(recipient: str = "ada@example.com", token: str = "tok-ada") -> Envelope:
    return Envelope(
        mail_from="Daily Papers <papers@example.org>",
        recipient=recipient,
        message_id=f"<{DAY.isoformat()}.daily.1.cafe@example.org>",
        date=dt.datetime(2026, 4, 16, 7, 30, tzinfo=dt.UTC),
        list_id="Daily Papers <daily-papers.example.org>",
        unsubscribe_url=f"{BASE}/unsubscribe/{token}",
        unsubscribe_mailto=f"papers+unsubscribe-{token}@example.org",
        extra_headers={"Feedback-ID": "1:daily:digest:example.org"},
    )


def digest_bytes(count: int, renderer: EmailRenderer | None = None) -> bytes:
    return message_bytes((renderer or EmailRenderer()).render(digest_context(sample_papers(count))), envelope())


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None and part.get_content_type() == "text/html"
    content: str = part.get_content()
    return content


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None and part.get_content_type() == "text/plain"
    content: str = part.get_content()
    return content


def strip_style_blocks(html: str) -> str:
    """What clients that drop ``<style>`` (and so every @media rule) are left with."""
    return re.sub(r"<style\b[^>]*>.*?</style>", "", html, flags=re.S | re.I)
