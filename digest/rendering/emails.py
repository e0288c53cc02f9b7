"""Emails from Jinja2 templates in ``email_templates/``: subject, text and HTML from one object.

Every email kind has one typed context class. Its fields split in two: the *personal* ones
(recipient, signed links) and everything else. The template is rendered, its stylesheet
inlined and its text wrapped once per distinct set of shared values (for a digest: once per
edition and list of picks), with markers where the personal values go; each message then only
fills in those markers. The MIME bytes are built directly (7bit where a part is ASCII in short
enough lines, else quoted-printable in C through ``binascii``) instead of through
``EmailMessage.as_bytes()``, which is several times slower.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import re
import secrets
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import escape

from digest.core.models import Paper
from digest.core.text import one_line

# Installed, the templates ship inside the package; in a checkout they are email_templates/ at its top.
TEMPLATES_DIR = next(
    path
    for path in (
        Path(__file__).resolve().parents[1] / "email_templates",
        Path(__file__).resolve().parents[2] / "email_templates",
    )
    if (path / "_base").is_dir()
)
SUMMARY_CHARS = 420
AUTHORS_SHOWN = 4
TEXT_WIDTH = 78
QP = b"Content-Transfer-Encoding: quoted-printable\n\n"
SEVEN_BIT = b"Content-Transfer-Encoding: 7bit\n\n"
HTML_LINE = 800  # break rendered HTML lines past this, so the part can travel as 7bit
MAX_LINE = 998  # RFC 5322: longer lines are cut or refused by SMTP servers
LINE_LIMIT = MAX_LINE - 2  # the longest body line sent as it is (dot-stuffing can add one)
SHARED_RENDERINGS = 256  # distinct (edition, picks) renderings kept per process


REASON_PREFIXES = ("Matches: ", "Like: ", "From: ", "About: ")


def reason_lines(entries: Sequence[str]) -> tuple[str, ...]:
    """Reasons as shown. Deliveries planned by older releases stored bare topic names."""
    lines = tuple(e for e in entries if e.startswith(REASON_PREFIXES))
    topics = [e for e in entries if not e.startswith(REASON_PREFIXES)]
    return ((f"Matches: {', '.join(topics)}",) if topics else ()) + lines


def shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    """Cut at a word boundary with an ellipsis, so abstracts read as a teaser."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:.")
    return cut + "…"


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """ "1 GitHub star", "2,048 GitHub stars": the number with the word that agrees with it."""
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"


def authors_line(authors: list[str], shown: int = AUTHORS_SHOWN) -> str:
    if not authors:
        return "Unknown authors"
    if len(authors) <= shown:
        return ", ".join(authors)
    return ", ".join(authors[:shown]) + " et al."


@lru_cache(maxsize=4096)
def wrap(text: str, width: int = TEXT_WIDTH, indent: str = "   ", first: str | None = None) -> str:
    """Wrap for the text part; cached because the same abstract is wrapped for many messages.

    Long words (URLs) are never broken, so every link stays clickable.
    """
    return textwrap.fill(
        " ".join(text.split()),
        width=width,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


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
    reasons: tuple[str, ...] = ()  # lines: "Matches: ...", "Like: ...", "From: ..."
    thumbnail: str | None = None

    @property
    def stats(self) -> tuple[tuple[str, str], ...]:
        """(symbol for the HTML part, count) of the non-zero counts: "0 comments" says nothing worth a line."""
        shown = (
            ("\u25b2", self.upvotes, counted(self.upvotes, "upvote")),
            ("", self.comments, counted(self.comments, "comment")),
            ("\u2605", self.stars or 0, counted(self.stars or 0, "GitHub star")),
        )
        return tuple((symbol, label) for symbol, count, label in shown if count > 0)

    @classmethod
    def from_paper(cls, paper: Paper, reasons: Sequence[str] = ()) -> PaperView:
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
            reasons=reason_lines(reasons),
            thumbnail=paper.thumbnail,
        )


@dataclass(frozen=True)
class DigestContext:
    PERSONAL: ClassVar[tuple[str, ...]] = ("recipient", "unsubscribe_url", "preferences_url", "feedback")

    date_label: str
    papers: Sequence[PaperView]
    recipient: str
    frequency: str
    unsubscribe_url: str
    preferences_url: str
    view_url: str
    postal_address: str
    # Per paper, in order: its signed (More like this, Less like this) links for this reader.
    feedback: Sequence[tuple[str, str]] = ()
    # Sections (a reader with topics or marks): the first ``for_you`` papers are under "For
    # you", the rest under "Also trending". Unsectioned, ``papers`` is one trending list.
    sectioned: bool = False
    for_you: int = 0


@dataclass(frozen=True)
class ConfirmContext:
    PERSONAL: ClassVar[tuple[str, ...]] = ("recipient", "confirm_url")

    recipient: str
    confirm_url: str
    valid_hours: int
    postal_address: str


@dataclass(frozen=True)
class WelcomeContext:
    PERSONAL: ClassVar[tuple[str, ...]] = ("recipient", "preferences_url", "unsubscribe_url")

    recipient: str
    frequency: str
    send_hour: int
    timezone: str
    preferences_url: str
    unsubscribe_url: str
    postal_address: str


@dataclass(frozen=True)
class UnsubscribedContext:
    PERSONAL: ClassVar[tuple[str, ...]] = ("recipient",)

    recipient: str
    home_url: str
    postal_address: str


@dataclass(frozen=True)
class LinkContext:
    """A link someone asked us to mail (an unsubscribe link, a data-access link): it acts only
    when the mailbox's owner opens it, which is what makes an unauthenticated request safe."""

    PERSONAL: ClassVar[tuple[str, ...]] = ("recipient", "url")

    recipient: str
    heading: str
    explanation: str
    action: str
    url: str
    validity: str
    postal_address: str


TEMPLATE_OF: dict[type, str] = {
    LinkContext: "link",
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
    # Known to have no line over LINE_LIMIT (from the shared rendering); False: to be checked.
    text_fits: bool = False
    html_fits: bool = False


def date_label(day: dt.date) -> str:
    return f"{day.strftime('%A')}, {day.day} {day.strftime('%B %Y')}"


# Plain ASCII word characters: autoescaping, the CSS inliner and URL attributes leave them as is.
# The random part keeps text from the papers API from ever looking like a marker.
_NONCE = secrets.token_hex(8)
_MARKER = f"__personal_{_NONCE}_{{}}__"
_MARKER_RE = re.compile(rf"__personal_{_NONCE}_(\w+?)__")


@dataclass(frozen=True)
class _Filled:
    """A rendered text cut at its personal markers: literal, name, literal, name, ..., literal.

    Also what its lines leave room for, so that a filled copy is known to have no line over
    SMTP's limit without splitting it into lines (~30 us a digest, see ``_body``): the lines
    without a marker fit (``fixed_fits``), and each marked line fits its markers' values as
    long as no value is longer than ``room``.
    """

    pieces: tuple[str, ...]
    fixed_fits: bool = False
    room: int = -1

    @classmethod
    def of(cls, text: str) -> _Filled:
        pieces = tuple(_MARKER_RE.split(text))
        literals = pieces[0::2]
        if any("\0" in literal for literal in literals):
            return cls(pieces)  # the stand-in below would be ambiguous: always check
        fixed_fits, room = True, LINE_LIMIT
        for line in "\0".join(literals).split("\n"):
            markers = line.count("\0")
            if markers:
                room = min(room, (LINE_LIMIT - (len(line) - markers)) // markers)
            elif len(line) > LINE_LIMIT:
                fixed_fits = False
        return cls(pieces, fixed_fits, room)

    def fill(self, values: dict[str, str], quote: Callable[[str], str]) -> str:
        return self.filled(values, quote)[0]

    def filled(self, values: dict[str, str], quote: Callable[[str], str]) -> tuple[str, bool]:
        """The text, and whether every line of it is known to fit ``LINE_LIMIT`` (False: unknown)."""
        pieces = self.pieces
        if len(pieces) == 1:
            return pieces[0], self.fixed_fits
        fills = [quote(values[name]) for name in pieces[1::2]]
        out = list(pieces)
        out[1::2] = fills
        fits = self.fixed_fits and max(map(len, fills)) <= self.room and "\n" not in "".join(fills)
        return "".join(out), fits


@dataclass(frozen=True)
class _Shared:
    subject: _Filled
    text: _Filled
    html: _Filled


def _plain(value: str) -> str:
    return value


def _html(value: str) -> str:
    return str(escape(value))


def _one_line(value: str) -> str:
    return one_line(value)


class EmailRenderer:
    """Renders any email kind; templates, stylesheet and shared renderings live per process."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR, cache_size: int = SHARED_RENDERINGS):
        self._env = Environment(
            loader=FileSystemLoader(templates_dir),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            trim_blocks=False,
            keep_trailing_newline=True,
        )
        self._env.filters["wrap"] = wrap
        self._env.filters["shorten"] = shorten
        css = (templates_dir / "_base" / "style.css").read_text(encoding="utf-8")
        # keep_at_rules: @media rules (dark mode, small screens) cannot be inlined, so they stay
        # in a <style> block; everything the layout needs is inlined.
        self._inliner = css_inline.CSSInliner(
            extra_css=css, load_remote_stylesheets=False, keep_at_rules=True, minify_css=True
        )
        self._shared = lru_cache(maxsize=cache_size)(self._render_shared)

    def preload(self) -> None:
        """Compile every kind's templates now rather than on its first message."""
        for name in TEMPLATE_OF.values():
            for part in ("subject.txt", "body.txt", "body.html"):
                self._env.get_template(f"{name}/{part}")

    def render(self, context: Any) -> RenderedEmail:
        personal_names: tuple[str, ...] = context.PERSONAL
        shared_values = tuple(
            (f.name, _frozen(getattr(context, f.name))) for f in fields(context) if f.name not in personal_names
        )
        # A personal value is a string, or rows of strings (a paper's links): each cell gets
        # its own marker, and only the rows' shape is part of the shared rendering.
        personal: dict[str, str] = {}
        shapes: list[tuple[str, tuple[int, ...] | None]] = []
        for name in personal_names:
            value = getattr(context, name)
            if isinstance(value, str):
                personal[name] = value
                shapes.append((name, None))
                continue
            shapes.append((name, tuple(len(row) for row in value)))
            for i, row in enumerate(value):
                for j, cell in enumerate(row):
                    personal[f"{name}_{i}_{j}"] = cell
        shared = self._shared(TEMPLATE_OF[type(context)], tuple(shapes), shared_values)
        text, text_fits = shared.text.filled(personal, _plain)
        html, html_fits = shared.html.filled(personal, _html)
        return RenderedEmail(shared.subject.fill(personal, _one_line), text, html, text_fits, html_fits)

    def _render_shared(
        self,
        name: str,
        personal_shapes: tuple[tuple[str, tuple[int, ...] | None], ...],
        shared_values: tuple[tuple[str, Any], ...],
    ) -> _Shared:
        values = dict(shared_values)
        for field_name, shape in personal_shapes:
            values[field_name] = (
                _MARKER.format(field_name)
                if shape is None
                else [[_MARKER.format(f"{field_name}_{i}_{j}") for j in range(n)] for i, n in enumerate(shape)]
            )
        subject = self._env.get_template(f"{name}/subject.txt").render(values)
        text = self._env.get_template(f"{name}/body.txt").render(values)
        html = self._env.get_template(f"{name}/body.html").render(values)
        return _Shared(
            subject=_Filled.of(one_line(subject)),
            text=_Filled.of(text),
            html=_Filled.of(_seven_bit_html(self._inliner.inline(html))),
        )


_BLOCK_END = re.compile(r"(</(?:td|tr|table|div|p|h[1-6]|li|ul|ol)>)")


def _seven_bit_html(html: str) -> str:
    """ASCII HTML (character references for the rest) in short lines, once per shared rendering.

    Such a part needs no transfer encoding: sending it as 7bit saves quoted-printable encoding
    every message's ~30 KB of HTML. Lines are broken only after block-level closing tags,
    where a line break changes nothing on screen.
    """
    html = html.encode("ascii", "xmlcharrefreplace").decode("ascii")
    lines = []
    for line in html.split("\n"):
        if len(line) > HTML_LINE:
            line = _BLOCK_END.sub("\\1\n", line)
        lines.append(line)
    return "\n".join(lines)


def _frozen(value: Any) -> Any:
    """Hashable form of a context value (lists of papers become tuples) for the cache key."""
    return tuple(value) if isinstance(value, list) else value


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


_FOLD_POLICY = policy.default.clone(max_line_length=TEXT_WIDTH)
_KEEP_POLICY = policy.default.clone(max_line_length=MAX_LINE)


@lru_cache(maxsize=1024)
def _folded(name: str, value: str) -> bytes:
    """One header as wire bytes, folded at spaces to about 78 characters.

    ASCII values are folded here: the email package would turn an unbreakable long value
    (a ``List-Unsubscribe`` URL) into RFC 2047 encoded words, which receivers do not decode
    in that header. Non-ASCII values (subjects, names) get RFC 2047 from the email package.
    Cached because From, Subject and List-Id repeat across messages.
    """
    if "\r" in value or "\n" in value:
        raise ValueError(f"header {name} may not contain line breaks")
    if not value.isascii():
        folded: str = _FOLD_POLICY.header_factory(name, value).fold(policy=_FOLD_POLICY)
        return folded.encode("ascii")
    lines = [f"{name}:"]
    for word in value.split(" "):
        if len(lines[-1]) + 1 + len(word) > TEXT_WIDTH and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    if any(len(line) > MAX_LINE for line in lines):
        raise ValueError(f"header {name} has a word too long for one line")
    return ("\n".join(lines) + "\n").encode("ascii")


def _qp(text: str) -> bytes:
    """Quoted-printable in C: lines of at most 76 characters, safe for any SMTP hop."""
    data = text.encode("utf-8")
    if not data.endswith(b"\n"):
        data += b"\n"
    return binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)


def _body(text: str, fits: bool = False) -> tuple[bytes, bytes]:
    """Transfer encoding and body: 7bit when the text already fits (see ``_seven_bit_html``).

    Also the text part's: an all-ASCII digest (most days) has lines near 78 characters but for
    its URLs, kept whole on one line (up to ~120), well within SMTP's 998. Quoted-printable
    only wrapped those, at ~60 us a message (a tenth of composing one). ``fits``: the lines are
    known to fit (``_Filled``), which spares splitting the text to measure them."""
    if text.isascii() and (fits or max(map(len, text.split("\n"))) <= LINE_LIMIT):
        data = text.encode("ascii")
        return SEVEN_BIT, data if data.endswith(b"\n") else data + b"\n"
    return QP, _qp(text)


def _to_header(address: str) -> bytes:
    """An internationalised address (non-ASCII local part) goes raw in UTF-8 (RFC 6532): an
    RFC 2047 encoded word is not allowed inside an address. Sending it needs SMTPUTF8, which
    the mailer asks for exactly then."""
    if address.isascii():
        return _folded("To", address)
    if "\r" in address or "\n" in address:
        raise ValueError("header To may not contain line breaks")
    return f"To: {address}\n".encode()


@lru_cache(maxsize=8)
def _from_header(mail_from: str) -> str:
    return formataddr(parseaddr(mail_from))


def message_bytes(rendered: RenderedEmail, envelope: Envelope) -> bytes:
    """The wire form of a ``multipart/alternative`` message (text first, HTML preferred).

    The boundary derives from the Message-ID, so the same message is the same bytes (and a
    retry after a crash sends exactly what was sent before). It starts with ``=_``, which
    quoted-printable never produces, and its hash of the random Message-ID cannot be guessed
    by the papers' text in a 7bit part.
    """
    boundary = "=_" + hashlib.sha256(envelope.message_id.encode("utf-8")).hexdigest()[:32]
    headers = [
        _folded("From", _from_header(envelope.mail_from)),
        _to_header(envelope.recipient),
        _folded("Subject", rendered.subject),
        _folded("Date", format_datetime(envelope.date)),
        _folded("Message-ID", envelope.message_id),
    ]
    if envelope.list_id:
        headers.append(_folded("List-Id", envelope.list_id))
    if envelope.unsubscribe_url:
        targets = [f"<{envelope.unsubscribe_url}>"]
        if envelope.unsubscribe_mailto:
            targets.append(f"<mailto:{envelope.unsubscribe_mailto}>")
        headers.append(_folded("List-Unsubscribe", ", ".join(targets)))
        headers.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n")
    headers.extend(_folded(key, value) for key, value in envelope.extra_headers.items())
    part_head = b'--%s\nContent-Type: text/%s; charset="utf-8"\n'

    marker = boundary.encode("ascii")
    return b"".join(
        [
            *headers,
            b'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="%s"\n\n' % marker,
            part_head % (marker, b"plain"),
            *_body(rendered.text, rendered.text_fits),
            part_head % (marker, b"html"),
            *_body(rendered.html, rendered.html_fits),
            b"--%s--\n" % marker,
        ]
    )


def build_message(rendered: RenderedEmail, envelope: Envelope) -> EmailMessage:
    """``message_bytes`` as an ``EmailMessage``, for callers that inspect or adjust a message."""
    # Lines up to 998 long: serialising again must keep our folding, not refold long
    # List-Unsubscribe URLs into RFC 2047 encoded words.
    message = message_from_bytes(message_bytes(rendered, envelope), policy=_KEEP_POLICY)
    assert isinstance(message, EmailMessage)  # an EmailPolicy parses into EmailMessage
    return message
