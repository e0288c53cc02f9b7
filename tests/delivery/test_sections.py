"""A digest that says what is for the reader: "For you" and "Also trending" in both parts of the
message a real SMTP server received, one trending list for a reader with nothing to go on, and
"only on days with a paper for me" (issue 21)."""

from __future__ import annotations

import datetime as dt
import re
from email.message import EmailMessage

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import Delivery, DeliveryStatus, Digest, DigestItem, Subscriber, utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import add_confirmed
from tests.support.servers import SMTPSink

DAY = dt.date(2024, 10, 25)
NEXT = dt.date(2026, 4, 16)  # the next recorded day the local papers API serves
PAPER = re.compile(r"https://huggingface\.co/papers/([\w.]+)")


def add(runtime: Runtime, email: str, topics: str = "", only_for_you: bool = False) -> None:
    with transaction(runtime.session_factory) as session:
        subscriber = add_confirmed(session, runtime.tokens, email, now=utcnow(), topics=topics)
        subscriber.only_for_you = only_for_you


def text_sections(message: EmailMessage) -> dict[str, list[str]]:
    """Paper ids per section heading of the text part, in order ("" before any heading)."""
    part = message.get_body(("plain",))
    assert part is not None
    body = str(part.get_content()).split("\n--\n")[0]
    found: dict[str, list[str]] = {}
    heading = ""
    for line in body.splitlines():
        if line in ("FOR YOU", "ALSO TRENDING"):
            heading = line
            found[heading] = []
        elif match := re.match(r"   Paper:   " + PAPER.pattern, line):
            found.setdefault(heading, []).append(match.group(1))
    return found


def html_sections(message: EmailMessage) -> dict[str, list[str]]:
    part = message.get_body(("html",))
    assert part is not None
    html = str(part.get_content())
    pieces = re.split(r'<p class="section-title"[^>]*>([^<]+)</p>', html)
    found = {"": pieces[0]} | dict(zip(pieces[1::2], pieces[2::2], strict=True))
    # Each paper's title links to its page once, in its heading.
    return {
        heading: re.findall(r'<a class="title"[^>]*href="' + PAPER.pattern + '"', chunk)
        for heading, chunk in found.items()
    }


def delivery_of(session: Session, email: str, day: dt.date) -> Delivery:
    session.expire_all()
    delivery = session.scalar(
        select(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .join(Digest, Digest.id == Delivery.digest_id)
        .where(Subscriber.email == email, Digest.date == day)
    )
    assert delivery is not None
    return delivery


def test_both_parts_put_the_readers_papers_under_for_you_and_the_rest_under_also_trending(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    add(runtime, "ada@example.org", topics="hallucination")
    add(runtime, "plain@example.org")
    run_inprocess(runtime, DAY)

    (mail,) = smtp.to("ada@example.org")
    delivery = delivery_of(session, "ada@example.org", DAY)
    picked = delivery.paper_ids or []
    with_reason = [pid for pid in picked if (delivery.reasons or {}).get(pid)]
    # Both papers about hallucinations that day pass the bar, each shown with its reason.
    assert {"2410.16251", "2410.18860"} <= set(with_reason)
    edition = session.scalar(select(Digest).where(Digest.date == DAY))
    assert edition is not None
    trending = list(
        session.scalars(
            select(DigestItem.paper_id).where(DigestItem.digest_id == edition.id).order_by(DigestItem.position)
        )
    )
    rest = [pid for pid in trending if pid in picked and pid not in with_reason]
    assert rest  # trending filler fills the digest up to its size
    expected = {"FOR YOU": with_reason, "ALSO TRENDING": rest}
    assert text_sections(mail) == expected
    assert html_sections(mail) == {"": [], "For you": with_reason, "Also trending": rest}
    assert mail["Subject"].startswith(f"{len(with_reason)} for you · Friday, 25 October 2024: ")

    text = mail.get_body(("plain",))
    assert text is not None
    for_you = str(text.get_content()).split("FOR YOU", 1)[1].split("ALSO TRENDING", 1)[0]
    assert for_you.count("Matches: hallucination") + for_you.count("About: hallucination") >= len(with_reason)

    # A reader with neither topics nor marks gets one trending list, and no count of theirs.
    (plain,) = smtp.to("plain@example.org")
    assert text_sections(plain) == {"": delivery_of(session, "plain@example.org", DAY).paper_ids}
    assert list(html_sections(plain)) == [""]
    assert not re.search(r"for you", str(plain["Subject"]), flags=re.I)


def test_only_on_days_with_a_paper_for_me_skips_a_day_with_none_and_sends_the_next(
    runtime: Runtime, smtp: SMTPSink, session: Session
) -> None:
    add(runtime, "gui@example.org", topics="GUI agents", only_for_you=True)
    add(runtime, "every-day@example.org", topics="GUI agents")

    run_inprocess(runtime, DAY)  # October 2024: nothing about GUI agents
    assert smtp.to("gui@example.org") == []
    assert len(smtp.to("every-day@example.org")) == 1
    skipped = delivery_of(session, "gui@example.org", DAY)
    assert skipped.status is DeliveryStatus.SKIPPED and not skipped.paper_ids

    # The same reader's next edition is planned and sent as usual: the skipped day stands in
    # nobody's way, and counts no paper as received.
    with transaction(runtime.session_factory) as s:
        s.execute(update(Delivery).values(created_at=utcnow() - dt.timedelta(days=1)))
    run_inprocess(runtime, NEXT)
    (mail,) = smtp.to("gui@example.org")
    sections = text_sections(mail)
    assert {"2604.13822", "2507.04227"} <= set(sections["FOR YOU"])  # the GUI agents
    assert delivery_of(session, "gui@example.org", NEXT).status is DeliveryStatus.SENT
    assert mail["Subject"].startswith(f"{len(sections['FOR YOU'])} for you · ")
