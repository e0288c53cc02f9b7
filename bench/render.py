"""Per-message cost of rendering and building a 15-paper digest, against the straightforward way.

The straightforward reference renders the templates with Jinja, inlines the stylesheet with
css-inline and serialises an ``EmailMessage`` for every message (what digest.rendering.emails did
before). Our path renders and inlines once per shared rendering and fills in personal links.

    .venv/bin/python bench/render.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from email.message import EmailMessage

from digest.core.models import Paper
from digest.papers.source import load_sample, parse_items
from digest.rendering.emails import (
    TEMPLATE_OF,
    DigestContext,
    EmailRenderer,
    Envelope,
    PaperView,
    RenderedEmail,
    date_label,
    message_bytes,
)

DAY = dt.date(2026, 4, 16)


def papers() -> list[PaperView]:
    records = parse_items(load_sample(DAY) or [], DAY)
    return [PaperView.from_paper(Paper(**r.__dict__), ("diffusion",)) for r in records]


def context(views: list[PaperView], i: int) -> DigestContext:
    return DigestContext(
        date_label=date_label(DAY),
        papers=views,
        recipient=f"reader{i}@example.com",
        frequency="daily",
        unsubscribe_url=f"https://papers.example.org/unsubscribe/token-{i:08d}",
        preferences_url=f"https://papers.example.org/preferences/token-{i:08d}",
        view_url=f"https://papers.example.org/digests/{DAY}",
        postal_address="Daily Papers, 1 Example Street, 00000 Example City",
    )


def envelope(i: int) -> Envelope:
    return Envelope(
        mail_from="Daily Papers <papers@example.org>",
        recipient=f"reader{i}@example.com",
        message_id=f"<{DAY}.daily.{i}.abcdef@example.org>",
        date=dt.datetime(2026, 4, 16, 8, tzinfo=dt.UTC),
        list_id="Daily Papers <daily-papers.example.org>",
        unsubscribe_url=f"https://papers.example.org/unsubscribe/token-{i:08d}",
        unsubscribe_mailto=f"papers+unsubscribe-token-{i:08d}@example.org",
        extra_headers={"Feedback-ID": "1:daily:digest:example.org"},
    )


def reference(renderer: EmailRenderer) -> Callable[[DigestContext, Envelope], bytes]:
    """Render, inline and serialise every message from scratch (the inliner is reused)."""
    env, inliner = renderer._env, renderer._inliner

    def one(ctx: DigestContext, envl: Envelope) -> bytes:
        name, values = TEMPLATE_OF[type(ctx)], asdict(ctx)
        rendered = RenderedEmail(
            subject=" ".join(env.get_template(f"{name}/subject.txt").render(values).split()),
            text=env.get_template(f"{name}/body.txt").render(values),
            html=inliner.inline(env.get_template(f"{name}/body.html").render(values)),
        )
        message = EmailMessage()
        message["From"], message["To"] = envl.mail_from, envl.recipient
        message["Subject"], message["Message-ID"] = rendered.subject, envl.message_id
        message["Date"] = envl.date
        message["List-Unsubscribe"] = f"<{envl.unsubscribe_url}>, <mailto:{envl.unsubscribe_mailto}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(rendered.text, subtype="plain", charset="utf-8")
        message.add_alternative(rendered.html, subtype="html", charset="utf-8")
        return message.as_bytes()

    return one


def measure(label: str, n: int, make: Callable[[int], bytes]) -> None:
    for i in range(min(50, n)):
        make(i)  # warm up: template compilation, caches
    times = []
    for i in range(n):
        start = time.perf_counter()
        make(i)
        times.append(time.perf_counter() - start)
    ms = [t * 1e3 for t in times]
    print(f"{label:<52} median {statistics.median(ms):6.3f} ms   p95 {sorted(ms)[int(0.95 * n)]:6.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--papers", type=int, default=15)
    args = parser.parse_args()
    views = papers()[: args.papers]
    n = args.messages
    print(f"{len(views)}-paper digest, {n} messages per row, per-message time (render + MIME bytes)")

    straightforward = reference(EmailRenderer())
    measure(
        "reference: Jinja + css-inline + as_bytes per message",
        n,
        lambda i: straightforward(context(views, i), envelope(i)),
    )

    shared = EmailRenderer()
    measure(
        "ours, subscribers sharing one list of picks",
        n,
        lambda i: message_bytes(shared.render(context(views, i)), envelope(i)),
    )

    # Worst case: every subscriber's picks differ, so each message misses the shared cache
    # (the cache is sized below n so nothing is reused).
    distinct = EmailRenderer(cache_size=8)

    def personalised(i: int) -> bytes:
        picks = [*views[1:], views[0]] if i % 2 else views
        picks = [PaperView(**{**asdict(v), "reasons": (f"topic {i}",)}) for v in picks]
        return message_bytes(distinct.render(context(picks, i)), envelope(i))

    measure("ours, every subscriber with different picks", n, personalised)

    size = len(message_bytes(shared.render(context(views, 0)), envelope(0)))
    print(f"message size: {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
