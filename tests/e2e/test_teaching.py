"""Teaching the digest as a reader does: a real day's digest over SMTP, its "More like this"
link followed over HTTP against uvicorn (GET, then the page's button), and the next day's
digest ranking papers like the marked one higher than for a twin reader who taught nothing."""

from __future__ import annotations

import datetime as dt
import re

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from digest.core.db import transaction
from digest.core.models import PaperEmbedding, PaperMark, Subscriber, utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.papers.embedding import from_blob
from digest.subscribers.subscriptions import add_confirmed
from tests.support.inbox import html_part, papers_of, text_part
from tests.support.servers import SMTPSink

pytestmark = pytest.mark.e2e

DAY1, DAY2 = dt.date(2024, 10, 25), dt.date(2026, 4, 16)
MARKED = "2410.18252"  # "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language Models"
TOPICS = "language models"


def marks(runtime: Runtime) -> int:
    with runtime.session_factory() as session:
        return session.scalar(select(func.count()).select_from(PaperMark)) or 0


def test_more_like_this_from_the_email_ranks_similar_papers_higher_the_next_day(
    site: tuple[Runtime, str], smtp: SMTPSink
) -> None:
    runtime, base = site
    with transaction(runtime.session_factory) as session:
        add_confirmed(session, runtime.tokens, "ada@example.org", now=utcnow(), topics=TOPICS)
        add_confirmed(session, runtime.tokens, "twin@example.org", now=utcnow(), topics=TOPICS)
    run_inprocess(runtime, DAY1)
    (mail,) = smtp.to("ada@example.org")
    listed = {pid: (more, less) for pid, more, less, _ in papers_of(mail)}
    assert MARKED in listed
    more, less = listed[MARKED]
    # Both parts carry the same links, right after the title.
    html = html_part(mail)
    assert f'href="{more}"' in html and f'href="{less}"' in html
    assert re.search(r'class="title"[^>]*>[^<]*</a></h2>\s*<p class="teach"[^>]*><a href="' + re.escape(more), html)

    with httpx.Client(timeout=30) as http:
        # A mail scanner (or the reader) opens the link: a page with one button, nothing stored.
        page = http.get(more)
        assert page.status_code == 200 and "Asynchronous RLHF" in page.text
        forms = re.findall(r'<form method="post" action="([^"]+)"', page.text)
        assert forms == [more.removeprefix(base)] and page.text.count("<button") == 1
        http.get(more)
        assert marks(runtime) == 0

        # Tampered links are refused, on GET and POST: another paper, another reader, a bad tag.
        token = more.split("/feedback/")[1].removesuffix("/more")
        block, *paper, tag = token.split(".")

        def flip(text: str) -> str:  # the first character: no base32 padding bits there
            return ("b" if text[0] != "b" else "c") + text[1:]

        for forged in (
            f"{block}.2410.18451.{tag}",
            f"{flip(block)}.{'.'.join(paper)}.{tag}",
            f"{block}.{'.'.join(paper)}.{flip(tag)}",
        ):
            assert http.get(f"{base}/feedback/{forged}/more").status_code == 400
            assert http.post(f"{base}/feedback/{forged}/more").status_code == 400
        assert http.get(f"{base}/feedback/{token}/sideways").status_code == 404
        assert marks(runtime) == 0

        # The button. Twice, as a double click would: one mark.
        for _ in range(2):
            done = http.post(base + forms[0])
            assert done.status_code == 200 and "Noted" in done.text
    with runtime.session_factory() as session:
        (mark,) = session.scalars(select(PaperMark)).all()
        ada = session.scalar(select(Subscriber).where(Subscriber.email == "ada@example.org"))
        assert ada is not None and (mark.subscriber_id, mark.paper_id, mark.signal) == (ada.id, MARKED, 1)

    smtp.clear()
    run_inprocess(runtime, DAY2)
    with runtime.session_factory() as session:
        # The next day's paper nearest in meaning to the marked one (vectors stored at collection).
        rows = {pid: blob for pid, blob in session.execute(select(PaperEmbedding.paper_id, PaperEmbedding.vector))}
    marked = from_blob(rows[MARKED])
    day2 = [pid for pid in rows if pid.startswith("26")]
    assert len(rows) == 29 + 22
    target = max(day2, key=lambda pid: float(np.dot(from_blob(rows[pid]), marked)))
    (ada_mail,) = smtp.to("ada@example.org")
    (twin_mail,) = smtp.to("twin@example.org")
    ada_order = [pid for pid, *_ in papers_of(ada_mail)]
    twin_order = [pid for pid, *_ in papers_of(twin_mail)]
    assert target in ada_order
    twin_rank = twin_order.index(target) if target in twin_order else len(twin_order)
    assert ada_order.index(target) < twin_rank, (target, ada_order, twin_order)
    # And it says why, in both parts.
    reasons = {pid: block for pid, _, _, block in papers_of(ada_mail)}
    assert "Like: Asynchronous RLHF" in reasons[target]
    assert "Like: Asynchronous RLHF" in " ".join(html_part(ada_mail).split())
    assert "Like:" not in text_part(twin_mail)
