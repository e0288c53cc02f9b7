"""Reading what arrived: a message's text part, the links in it, and the mail one address got."""

from __future__ import annotations

import re
from email.message import EmailMessage

from tests.support.servers import SMTPSink


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def link_in(message: EmailMessage, kind: str) -> str:
    """The first http(s) link to /{kind}/... in a message's text part."""
    found = re.search(rf"https?://\S+?/{kind}/[A-Za-z0-9_.\-]+", text_of(message))
    assert found, f"no /{kind}/ link in:\n{text_of(message)}"
    return found.group(0)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def only_mail_to(smtp: SMTPSink, address: str, count: int = 1) -> list[EmailMessage]:
    smtp.wait_for(count, timeout=10)
    received = smtp.to(address)
    assert len(received) == count, [m["Subject"] for m in received]
    return received


def text_part(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def html_part(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def papers_in_text(message: EmailMessage) -> list[tuple[str, str]]:
    """(paper id, "Matches: ..." line or "") in the order of the text part."""
    pieces = re.split(r"Paper:\s+https://huggingface\.co/papers/(\S+)", text_part(message))
    found = []
    for block, paper_id in zip(pieces[0::2], pieces[1::2], strict=False):
        match = re.search(r"Matches: ([^\n]+)", block)
        found.append((paper_id, match.group(1).strip() if match else ""))
    return found


def papers_in_html(message: EmailMessage) -> list[tuple[str, str]]:
    """(paper id, "Matches: ..." text or "") in the order of the HTML part."""
    pieces = re.split(r'href="https://huggingface\.co/papers/([^"]+)"', html_part(message))
    found = []
    for paper_id, block in zip(pieces[1::2], pieces[2::2], strict=True):
        match = re.search(r"Matches: ([^<]+)<", block)
        found.append((paper_id, match.group(1).strip() if match else ""))
    return found


def papers_of(message: EmailMessage) -> list[tuple[str, str, str, str]]:
    """(paper id, More link, Less link, the item's text) per paper, in the text part's order."""
    body = text_part(message).split("\n--\n")[0]
    items = re.split(r"\n(?=\d+\. )", body)[1:]  # each item starts with its number and title
    found = []
    for item in items:
        paper = re.search(r"Paper:\s+https://huggingface\.co/papers/(\S+)", item)
        more = re.search(r"More like this: (\S+)", item)
        less = re.search(r"Less like this: (\S+)", item)
        assert paper and more and less, item
        found.append((paper.group(1), more.group(1), less.group(1), " ".join(item.split())))
    return found
