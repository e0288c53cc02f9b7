"""Emails from Jinja2 templates in ``email_templates/``: subject, text and HTML from one object.

Every email kind has one typed context class; the HTML part gets the shared stylesheet inlined
(mail clients drop ``<style>`` blocks) and the text part is rendered from the same data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from digest.models import Paper

LIST_POLICY = email.policy.default.clone(max_line_length=998)
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "email_templates"
SUMMARY_CHARS = 420
AUTHORS_SHOWN = 4


def shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    """Cut at a word boundary with an ellipsis, so abstracts read as a teaser."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:.")
    return cut + "…"


def authors_line(authors: list[str], shown: int = AUTHORS_SHOWN) -> str:
    if not authors:
        return "Unknown authors"
    if len(authors) <= shown:
        return ", ".join(authors)
    return ", ".join(authors[:shown]) + " et al."


@dataclass(frozen=True)
class PaperView:
    id: str
    title: str
    url: str
    arxiv_url: str
    pdf_url: str
    authors_line: str
    upvotes: int
    comments: int
    stars: int | None
    summary: str
    code_url: str | None
    project_url: str | None
    reasons: tuple[str, ...] = ()

    @classmethod
    def from_paper(cls, paper: Paper, reasons: tuple[str, ...] = ()) -> PaperView:
        return cls(
            id=paper.id,
            title=paper.title,
            url=f"https://huggingface.co/papers/{paper.id}",
            arxiv_url=f"https://arxiv.org/abs/{paper.id}",
            pdf_url=f"https://arxiv.org/pdf/{paper.id}",
            authors_line=authors_line(paper.authors or []),
            upvotes=paper.upvotes,
            comments=paper.num_comments,
            stars=paper.github_stars,
            summary=paper.ai_summary or shorten(paper.abstract),
            code_url=paper.github_repo,
            project_url=paper.project_page,
            reasons=reasons,
        )


@dataclass(frozen=True)
class DigestContext:
    date_label: str
    papers: list[PaperView]
    recipient: str
    frequency: str
    unsubscribe_url: str
    preferences_url: str
    view_url: str
    postal_address: str


@dataclass(frozen=True)
class ConfirmContext:
    recipient: str
    confirm_url: str
    valid_hours: int
    postal_address: str


@dataclass(frozen=True)
class WelcomeContext:
    recipient: str
    frequency: str
    send_hour: int
    timezone: str
    preferences_url: str
    unsubscribe_url: str
    postal_address: str


@dataclass(frozen=True)
class UnsubscribedContext:
    recipient: str
    home_url: str
    postal_address: str


TEMPLATE_OF: dict[type, str] = {
    DigestContext: "digest",
    ConfirmContext: "confirm",
    WelcomeContext: "welcome",
    UnsubscribedContext: "unsubscribed",
}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def date_label(day: dt.date) -> str:
    return f"{day.strftime('%A')}, {day.day} {day.strftime('%B %Y')}"


class EmailRenderer:
    """Renders any email kind; the environment and stylesheet are loaded once per process."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR):
        self._env = Environment(
            loader=FileSystemLoader(templates_dir),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            trim_blocks=False,
            keep_trailing_newline=True,
        )
        css = (templates_dir / "_base" / "style.css").read_text(encoding="utf-8")
        self._inliner = css_inline.CSSInliner(extra_css=css, load_remote_stylesheets=False)

    def render(self, context: Any) -> RenderedEmail:
        name = TEMPLATE_OF[type(context)]
        values = asdict(context)
        # asdict turns nested dataclasses into dicts, which templates read the same way.
        subject = self._env.get_template(f"{name}/subject.txt").render(values)
        text = self._env.get_template(f"{name}/body.txt").render(values)
        html = self._env.get_template(f"{name}/body.html").render(values)
        return RenderedEmail(
            subject=" ".join(subject.split()),
            text=text,
            html=self._inliner.inline(html),
        )


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and to, and the headers that make it a list message."""

    mail_from: str
    recipient: str
    message_id: str
    date: dt.datetime
    list_id: str | None = None
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


def build_message(rendered: RenderedEmail, envelope: Envelope) -> EmailMessage:
    """A ``multipart/alternative`` message (text first, HTML preferred) with list headers."""
    # Long unbreakable values (List-Unsubscribe URLs) must stay raw, not RFC 2047-encoded.
    message = EmailMessage(policy=LIST_POLICY)
    name, address = parseaddr(envelope.mail_from)
    message["From"] = Address(display_name=name, addr_spec=address) if name else address
    message["To"] = envelope.recipient
    message["Subject"] = rendered.subject
    message["Date"] = format_datetime(envelope.date)
    message["Message-ID"] = envelope.message_id
    if envelope.list_id:
        message["List-Id"] = envelope.list_id
    if envelope.unsubscribe_url:
        targets = [f"<{envelope.unsubscribe_url}>"]
        if envelope.unsubscribe_mailto:
            targets.append(f"<mailto:{envelope.unsubscribe_mailto}>")
        message["List-Unsubscribe"] = ", ".join(targets)
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for key, value in envelope.extra_headers.items():
        message[key] = value
    message.set_content(rendered.text, subtype="plain", charset="utf-8")
    message.add_alternative(rendered.html, subtype="html", charset="utf-8")
    return message
