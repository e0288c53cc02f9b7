"""Every email template renders; digest messages are well-formed MIME; one digest is pinned byte for byte."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import os
import re
from pathlib import Path

import pytest
import time_machine
from hypothesis import given
from hypothesis import strategies as st

from digest.core.models import DigestKind, Frequency, SubscriberStatus
from digest.delivery.composer import DigestComposer
from digest.delivery.ledger import Entry
from digest.rendering import emails
from digest.rendering.emails import (
    ConfirmContext,
    EmailRenderer,
    PaperView,
    UnsubscribedContext,
    WelcomeContext,
    build_message,
    message_bytes,
)
from digest.rendering.links import Links
from digest.rendering.tokens import Tokens
from digest.subscribers.recipients import Recipient
from tests.support.emails import (
    BASE,
    DAY,
    POSTAL,
    digest_bytes,
    digest_context,
    envelope,
    html_of,
    parse,
    sample_papers,
    text_of,
)
from tests.support.settings import TEST_SECRET

GOLDEN = Path(__file__).parent / "golden" / "digest-2026-04-16.eml"
URL = re.compile(r"https?://\S+|mailto:\S+")


def every_kind() -> list[object]:
    return [
        digest_context(sample_papers(5)),
        ConfirmContext(
            recipient="ada@example.com",
            confirm_url=f"{BASE}/confirm/c-tok",
            valid_hours=48,
            postal_address=POSTAL,
        ),
        WelcomeContext(
            recipient="ada@example.com",
            frequency="weekly",
            send_hour=7,
            timezone="Europe/Berlin",
            preferences_url=f"{BASE}/preferences/p-tok",
            unsubscribe_url=f"{BASE}/unsubscribe/u-tok",
            postal_address=POSTAL,
        ),
        UnsubscribedContext(recipient="ada@example.com", home_url=f"{BASE}/", postal_address=POSTAL),
    ]


@pytest.mark.parametrize("context", every_kind(), ids=lambda c: type(c).__name__)
def test_every_template_renders_with_one_line_subject_and_both_parts(context: object) -> None:
    rendered = EmailRenderer().render(context)
    assert rendered.subject and "\n" not in rendered.subject and rendered.subject == rendered.subject.strip()
    message = parse(message_bytes(rendered, envelope()))
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in message.iter_parts())
    assert "ada@example.com" in text_of(message) and "ada@example.com" in html_of(message)
    assert POSTAL in text_of(message) and POSTAL in html_of(message)
    assert "__personal_" not in text_of(message) + html_of(message)


def test_digest_shows_each_paper_with_its_links_and_reason() -> None:
    papers = sample_papers(22)
    message = parse(digest_bytes(22))
    html, text = html_of(message), text_of(message)
    assert message["Subject"] == f"Thursday, 16 April 2026: {' '.join(papers[0].title.split())} and 21 more"
    for paper in papers:
        assert f'href="https://huggingface.co/papers/{paper.id}"' in html
        assert f"https://arxiv.org/pdf/{paper.id}" in text
        if paper.github_repo:
            assert paper.github_repo in html and paper.github_repo in text
        if paper.project_page:
            assert paper.project_page in html and paper.project_page in text
    starred = next(p for p in papers if p.github_stars)
    assert f"{starred.github_stars:,} GitHub stars" in text
    assert "Matches: diffusion, video" in html and "Matches: diffusion, video" in text
    assert "et al." in html
    assert f'href="{BASE}/digests/2026-04-16"' in html and f"View in browser: {BASE}/digests/2026-04-16" in text
    for link in ("unsubscribe", "preferences"):
        assert f'href="{BASE}/{link}/tok-ada"' in html and f"{BASE}/{link}/tok-ada" in text


def test_text_part_is_wrapped_near_78_characters_with_links_whole() -> None:
    text = text_of(parse(digest_bytes(30)))
    for line in text.splitlines():
        assert len(line) <= 78 or URL.search(line), line
    assert "https://huggingface.co/papers/2604." in text


def test_personal_parts_differ_while_the_shared_rendering_is_reused() -> None:
    renderer = EmailRenderer()
    papers = sample_papers(10)
    first = renderer.render(digest_context(papers, "ada@example.com", "tok-ada"))
    second = renderer.render(digest_context(papers, "bob@example.net", "a&b<c>"))
    assert "tok-ada" not in second.html + second.text and "ada@example.com" not in second.html + second.text
    assert "/unsubscribe/a&amp;b&lt;c&gt;" in second.html  # escaped like any autoescaped value
    assert "/unsubscribe/a&b<c>" in second.text
    unpersonal = (
        first.html.replace("tok-ada", "X").replace("ada@example.com", "Y"),
        second.html.replace("a&amp;b&lt;c&gt;", "X").replace("bob@example.net", "Y"),
    )
    assert unpersonal[0] == unpersonal[1]


def test_text_from_the_api_cannot_pose_as_a_personal_field() -> None:
    paper = sample_papers(1)[0]
    paper.title = "On __personal_recipient__ and {{ recipient }}"
    rendered = EmailRenderer().render(digest_context([paper]))
    assert "On __personal_recipient__ and {{ recipient }}" in rendered.text
    assert "ada@example.com" not in rendered.text.split("--\n")[0]  # only the footer names them


def test_non_ascii_names_and_titles_round_trip() -> None:
    paper = sample_papers(1)[0]
    paper.title = "Ünïcode — 多语言 models: “quotes” ✓"
    paper.authors = ["Zoë Ångström", "李明", "Łukasz Kaiser", "José Núñez", "Anaïs"]
    data = message_bytes(
        EmailRenderer().render(digest_context([paper])),
        dataclasses.replace(envelope(), mail_from="Ünïcode Papers <papers@example.org>"),
    )
    assert data.isascii()  # quoted-printable bodies and RFC 2047 headers: any hop can carry it
    message = parse(data)
    assert message["Subject"] == f"Thursday, 16 April 2026: {paper.title}"
    assert message["From"].addresses[0].display_name == "Ünïcode Papers"
    assert "Zoë Ångström, 李明, Łukasz Kaiser, José Núñez et al." in text_of(message)
    # The HTML part carries non-ASCII as character references (7bit); a reader sees the names.
    assert "Zoë Ångström, 李明, Łukasz Kaiser, José Núñez et al." in html.unescape(html_of(message))


def test_headers_and_lines_are_fit_for_smtp() -> None:
    token = "t" * 120  # real tokens are long; the header must stay raw, not RFC 2047-encoded
    data = message_bytes(EmailRenderer().render(digest_context(sample_papers(30))), envelope(token=token))
    assert max(len(line) for line in data.split(b"\n")) < 998
    message = parse(data)
    assert message["List-Unsubscribe"] == (
        f"<{BASE}/unsubscribe/{token}>, <mailto:papers+unsubscribe-{token}@example.org>"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Id"] == "Daily Papers <daily-papers.example.org>"
    assert message["Feedback-ID"] == "1:daily:digest:example.org"
    assert message["Message-ID"] == "<2026-04-16.daily.1.cafe@example.org>"
    assert message["MIME-Version"] == "1.0"
    with pytest.raises(ValueError):
        message_bytes(
            EmailRenderer().render(digest_context(sample_papers(1))),
            dataclasses.replace(envelope(), recipient="a@example.com\nBcc: x@example.com"),
        )


def test_build_message_serialises_back_to_the_same_bytes() -> None:
    rendered = EmailRenderer().render(every_kind()[2])
    long_token = envelope(token="t" * 120)
    message = build_message(rendered, long_token)
    assert message["Subject"] == "Welcome to Daily Papers"
    assert message.as_bytes() == message_bytes(rendered, long_token)


def compose_one() -> bytes:
    papers = sample_papers(12)
    links = Links(BASE, Tokens(TEST_SECRET), "papers@example.org")
    composer = DigestComposer(
        digest_id=1,
        kind=DigestKind.DAILY,
        day=DAY,
        papers={p.id: p for p in papers},
        renderer=EmailRenderer(),
        links=links,
        mail_from="Daily Papers <papers@example.org>",
        postal_address=POSTAL,
        default_size=10,
    )
    subscriber = Recipient(
        id=7,
        email="zoe.reader@example.org",
        status=SubscriberStatus.ACTIVE,
        frequency=Frequency.DAILY,
        topics="",
        excluded="",
        digest_size=None,
        only_for_you=False,
        created_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    )
    delivery = Entry(
        id=42,
        digest_id=1,
        subscriber_id=7,
        recipient="zoe.reader@example.org",
        message_id="<2026-04-16.daily.7.0123456789ab@example.org>",
        created_at=dt.datetime(2026, 4, 16, 6, 0, tzinfo=dt.UTC),
        paper_ids=[p.id for p in papers[:10]],
        reasons={papers[0].id: ["video generation"]},
    )
    return composer.compose(delivery, subscriber)


@time_machine.travel(dt.datetime(2026, 4, 16, 6, 0, 1, tzinfo=dt.UTC), tick=False)
def test_golden_digest_message() -> None:
    """The whole message of one digest, byte for byte. After a deliberate change to templates,
    headers or encoding, look at the diff and rerun with UPDATE_GOLDEN=1."""
    data = compose_one()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes()
    assert compose_one() == data  # retries after a crash send identical bytes


def test_an_internationalised_address_stays_an_address_in_to() -> None:
    from digest.rendering.emails import Envelope, RenderedEmail, message_bytes

    envelope = Envelope(
        mail_from="Daily Papers <papers@example.org>",
        recipient="jörg@example.org",
        message_id="<x@example.org>",
        date=dt.datetime(2026, 4, 16, 8, tzinfo=dt.UTC),
    )
    data = message_bytes(RenderedEmail("Subject", "text", "<p>html</p>"), envelope)
    assert "To: jörg@example.org\n".encode() in data
    assert b"=?utf-8?" not in data.split(b"\n\n", 1)[0]


def test_counts_agree_with_their_number_and_zero_counts_are_left_out() -> None:
    papers = sample_papers(51)
    message = parse(message_bytes(EmailRenderer().render(digest_context(papers)), envelope()))
    text, page = text_of(message), html_of(message)
    assert any(p.github_stars == 1 for p in papers) and any(p.num_comments == 0 for p in papers)
    for part in (text, page):
        assert "1 GitHub star" in part and "1 GitHub stars" not in part
        assert not re.search(r"(?<![\d,])0 (GitHub stars?|comments?|upvotes?)\b", part)
        assert not re.search(r"(?<![\d,])1 (comments|upvotes)\b", part)


def test_the_text_part_ends_each_paper_with_its_teaching_links() -> None:
    papers = sample_papers(10)
    text = text_of(parse(digest_bytes(10)))
    items = re.split(r"\n(?=\d+\. )", text.split("\n--\n")[0])[1:]
    assert len(items) == 10
    for item, paper in zip(items, papers, strict=True):
        authors = item.index(paper.authors[0])
        more, less = item.index("More like this: "), item.index("Less like this: ")
        summary = item.index(" ".join(PaperView.from_paper(paper).summary.split()[:3]))
        # The two long teaching URLs end the item, after every link of the paper itself.
        assert (
            authors < summary < item.index("Paper:   https://huggingface.co/papers/") < item.index("PDF:") < more < less
        )


# Lines of the shared rendering and the personal values filled into them, around the limit.
_LINE_LENGTHS = st.sampled_from([0, 1, 80, 400, 900, 995, 996, 997, 1200])
_FILL_LENGTHS = st.sampled_from([0, 1, 60, 120, 500, 996, 997])


@given(
    lines=st.lists(st.tuples(_LINE_LENGTHS, st.integers(0, 3)), min_size=1, max_size=6),
    fill_lengths=st.lists(_FILL_LENGTHS, min_size=1, max_size=4),
    newline_in_a_fill=st.booleans(),
)
def test_a_filled_text_said_to_fit_has_no_line_over_the_limit(
    lines: list[tuple[int, int]], fill_lengths: list[int], newline_in_a_fill: bool
) -> None:
    # Each line: some literal text and some markers; the markers' values cycle through fills.
    text: list[str] = []
    names: list[str] = []
    for length, markers in lines:
        parts = ["x" * (length // (markers + 1))] * (markers + 1)
        for i in range(markers):
            names.append(f"v{len(names) % len(fill_lengths)}")
            parts[i] += emails._MARKER.format(names[-1])
        text.append("".join(parts))
    values = {f"v{i}": "y" * n for i, n in enumerate(fill_lengths)}
    if newline_in_a_fill:
        values["v0"] = "\n" + "z" * 1200
    filled, fits = emails._Filled.of("\n".join(text)).filled(values, lambda v: v)
    longest = max(map(len, filled.split("\n")))
    if fits:
        assert longest <= emails.LINE_LIMIT
    if not newline_in_a_fill and all(m == 0 for _, m in lines):
        assert fits == (longest <= emails.LINE_LIMIT)  # no markers: the answer is exact


@pytest.mark.parametrize("context", every_kind(), ids=lambda c: type(c).__name__)
def test_every_kind_is_known_to_fit_and_encodes_as_if_checked(context: object) -> None:
    rendered = EmailRenderer().render(context)
    assert rendered.text_fits and rendered.html_fits  # the shared rendering spares the check
    checked = dataclasses.replace(rendered, text_fits=False, html_fits=False)
    assert message_bytes(rendered, envelope()) == message_bytes(checked, envelope())
