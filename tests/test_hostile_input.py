"""Untrusted text and structure at the door: a hostile upstream day, time zones, MIME bombs,
and tokens that say nothing about how many people or deliveries there are."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import struct
import time
import unicodedata

import feedparser
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi.testclient import TestClient
from itsdangerous import URLSafeSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.models import Delivery, Paper, PaperMark, utcnow
from digest.mailin.classify import Kind, classify, config_from
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.papers.source import load_sample, parse_items, store_papers
from digest.rendering.tokens import Purpose
from digest.subscribers import feedback, subscriptions
from digest.web.app import create_app
from tests.support.servers import PapersAPI, SMTPSink

DAY = dt.date(2024, 10, 25)


def is_clean(text: str) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def test_a_hostile_upstream_day_collects_its_good_items_and_the_feed_stays_valid(
    runtime: Runtime, papers_api: PapersAPI, smtp: SMTPSink, session: Session
) -> None:
    items = papers_api.behaviour.days["2024-10-25"]
    items[0]["paper"]["title"] = "Null\x00 and bell\x07 and escape\x1b[31m in a title\r\nBcc: x@example.org"
    items[1]["paper"]["title"] = "A lone surrogate \ud800 in the title"
    items[2]["paper"]["summary"] = "An abstract with a form feed\x0c and \udfff surrogate"
    items[3]["paper"]["authors"] = [{"name": "Mallory \x00\ud83d"}]
    items[4]["paper"] = {"id": "2410.00001", "title": {"not": "text"}}  # malformed: skipped alone
    items[5]["paper"]["ai_keywords"] = ["ok", "\x00\x01"]
    with transaction(runtime.session_factory) as s:
        subscriptions.add_confirmed(s, runtime.tokens, "reader@example.com", now=utcnow())

    summary = run_inprocess(runtime, DAY)

    assert session.scalar(select(func.count()).select_from(Paper)) == 28  # 29 less the malformed one
    texts = [
        t
        for p in session.scalars(select(Paper))
        for t in (p.title, p.abstract, *p.authors, *p.ai_keywords, p.ai_summary or "")
    ]
    assert all(is_clean(t) for t in texts)
    assert (
        session.scalars(select(Paper.title).where(Paper.id == items[0]["paper"]["id"]))
        .one()
        .startswith("Null and bell and escape[31m in a title Bcc:")
    )
    assert summary.counts.get("sent") == 1
    (mail,) = smtp.messages
    subject = str(mail.message["Subject"])
    assert "\n" not in subject and is_clean(subject)

    feed_body = TestClient(create_app(runtime)).get("/digests/feed.atom")
    assert feed_body.status_code == 200
    feed = feedparser.parse(feed_body.content)
    assert not feed.bozo, feed.get("bozo_exception")
    assert len(feed.entries) == 1


@pytest.mark.parametrize("zone", ["America", "Etc", "Europe", "A" * 300, "../../etc/passwd", "Europe/Berlin\x00"])
def test_a_time_zone_that_is_not_an_iana_zone_is_a_400_and_changes_nothing(runtime: Runtime, zone: str) -> None:
    with transaction(runtime.session_factory) as session:
        person = subscriptions.add_confirmed(session, runtime.tokens, "tz@example.org", now=utcnow())
        path = runtime.links.preferences(person).removeprefix(runtime.settings.base_url)
    client = TestClient(create_app(runtime))
    answer = client.post(path, data={"timezone": zone, "frequency": "daily", "send_hour": "8"})
    assert answer.status_code == 400
    assert "Unknown time zone" in answer.text
    assert answer.headers["x-content-type-options"] == "nosniff"
    with transaction(runtime.session_factory) as session:
        assert subscriptions.get_by_email(session, "tz@example.org").timezone == "UTC"


def test_a_message_of_a_quarter_million_mime_parts_is_refused_at_once(runtime: Runtime) -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(264_000))
    bomb = b'From: x@example.org\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    nested = b"From: x@example.org\r\n"
    for depth in range(40):
        nested += f'Content-Type: multipart/mixed; boundary="n{depth}"\r\n\r\n--n{depth}\r\n'.encode()
    config = config_from(runtime)
    for data in (bomb, nested + b"\r\nhi\r\n"):
        started = time.process_time()
        inbound = classify(config, data, envelope_sender="x@example.org", recipients=[runtime.settings.inbound_address])
        assert inbound.kind is Kind.MALFORMED, inbound
        assert time.process_time() - started < 5  # it was 82 s of CPU before the cap


def test_tokens_and_addresses_carry_no_sequential_ids(runtime: Runtime, session: Session) -> None:
    with transaction(runtime.session_factory) as s:
        people = [subscriptions.add_confirmed(s, runtime.tokens, f"n{i}@example.org", now=utcnow()) for i in range(3)]
        links = [(runtime.links.unsubscribe(p), runtime.links.unsubscribe_mailto(p)) for p in people]
        verp = [runtime.links.bounce_address(7 + i, p) for i, p in enumerate(people)]
    for url, mailto in links:
        token = url.rsplit("/", 1)[1]
        # Before: base64 of "[7, 1767323045]" and a signature. Now an encrypted block and a tag.
        assert len(token) == 42 and token.isalnum() and token.islower(), token
        assert "." not in mailto.partition("-")[2].partition("@")[0]
    first, second = (u for u, _ in links[:2])
    assert first.rsplit("/", 1)[1][:8] != second.rsplit("/", 1)[1][:8]
    assert all(".7." not in v and "-7." not in v and len(v.partition("@")[0]) <= 64 for v in verp)
    # Every digest's Message-ID is random too.
    run_inprocess(runtime, DAY)
    for message_id, subscriber_id in session.execute(select(Delivery.message_id, Delivery.subscriber_id)).all():
        assert f".{subscriber_id}." not in message_id


def old_feedback_token(secret: str, subscriber_id: int, stamp: int, paper_id: str) -> str:
    """A More/Less token as digests sent before the per-reader key carry it: an HMAC per paper."""
    block_key = hashlib.sha256(f"digest.id-block.{secret}".encode()).digest()[:16]
    encryptor = Cipher(algorithms.AES(block_key), modes.ECB()).encryptor()
    block = encryptor.update(struct.pack(">QQ", subscriber_id, stamp)) + encryptor.finalize()
    key = hashlib.sha256(f"digest.feedback.{secret}".encode()).digest()
    tag = hmac.digest(key, block + paper_id.encode(), "sha256")[:10]

    def b32(data: bytes) -> str:
        return base64.b32encode(data).decode().rstrip("=").lower()

    return f"{b32(block)}.{paper_id}.{b32(tag)}"


def test_more_like_this_links_of_digests_sent_before_still_mark_and_forged_ones_do_not(
    runtime: Runtime, session: Session
) -> None:
    """Feedback tags are now keyed per reader (one HMAC a digest, not one a paper); a link in
    an older digest must still teach, and no tag opens another reader's or paper's link."""
    with transaction(runtime.session_factory) as s:
        store_papers(s, parse_items(load_sample(DAY) or [], DAY))
        reader = subscriptions.add_confirmed(s, runtime.tokens, "teacher@example.org", now=utcnow())
        other = subscriptions.add_confirmed(s, runtime.tokens, "other@example.org", now=utcnow())
        stamp, other_stamp = int(reader.created_at.timestamp()), int(other.created_at.timestamp())
        first, second = s.scalars(select(Paper.id).order_by(Paper.id).limit(2)).all()
        now_link = runtime.links.feedback(reader, second)[0]
        reader_id, other_id = reader.id, other.id
    old = old_feedback_token(runtime.settings.secret_key, reader_id, stamp, first)
    assert old != now_link.rsplit("/", 2)[1]
    client = TestClient(create_app(runtime))
    assert client.post(f"/feedback/{old}/more").status_code == 200
    assert client.post("/" + now_link.split("/", 3)[3]).status_code == 200
    token = now_link.rsplit("/", 2)[1]
    block, tag = token.split(".")[0], token.split(".")[-1]  # around the paper id
    forged = [
        f"{block}.{first}.{tag}",  # this reader's tag for the second paper, on the first
        old_feedback_token("another-secret-key-0123456789abcdef01234", reader_id, stamp, first),
        f"{old_feedback_token(runtime.settings.secret_key, other_id, other_stamp, first).split('.')[0]}.{second}.{tag}",
    ]
    for link in forged:
        assert client.post(f"/feedback/{link}/less").status_code == 400, link
    marks = session.execute(select(PaperMark.subscriber_id, PaperMark.paper_id, PaperMark.signal)).all()
    assert sorted((sid, pid) for sid, pid, _ in marks) == [(reader_id, first), (reader_id, second)]
    assert {signal for *_, signal in marks} == {feedback.MORE}


def test_links_sent_before_the_ids_were_hidden_still_unsubscribe(runtime: Runtime) -> None:
    """Unsubscribe links never expire: every digest ever sent must still let its reader leave."""
    with transaction(runtime.session_factory) as session:
        person = subscriptions.add_confirmed(session, runtime.tokens, "old@example.org", now=utcnow())
        stamp = int(person.created_at.timestamp())
        legacy = URLSafeSerializer(runtime.settings.secret_key, salt="digest.unsubscribe").dumps([person.id, stamp])
    assert runtime.tokens.read(Purpose.UNSUBSCRIBE, legacy) == (person.id, stamp)
    client = TestClient(create_app(runtime))
    assert client.post(f"/unsubscribe/{legacy}", data={"List-Unsubscribe": "One-Click"}).status_code == 200
    with transaction(runtime.session_factory) as session:
        assert subscriptions.get_by_email(session, "old@example.org").status.value == "unsubscribed"
