"""The composer: an edition's candidates, each subscriber's picks, and the message they get.

An edition (``Digest``) is built from the day's papers in trending order; a ``DigestComposer``
chooses each subscriber's papers from it (never those they got within the no-repeat reach) and
renders, signs and addresses their message. ``message_id`` is fixed when a delivery is planned,
so every attempt of it is the same message to receivers.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from functools import cached_property

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from digest.core.models import Digest, DigestItem, DigestKind, Paper, utcnow
from digest.core.text import parse_terms
from digest.delivery.ledger import Entry, received
from digest.delivery.policy import DeliveryPolicy
from digest.papers.embedding import Embedder, paper_vectors, topic_vectors
from digest.ranking.profile import Profile, Reader
from digest.ranking.ranker import Candidate, Ranker, candidate_text
from digest.ranking.trending import TrendingWeights, Votes, trending_order, trending_score
from digest.rendering.emails import DigestContext, EmailRenderer, Envelope, PaperView, date_label, message_bytes
from digest.rendering.links import Links
from digest.subscribers import feedback
from digest.subscribers.recipients import Recipient
from digest.transport.dkim import DkimSigner


def votes_of(paper: Paper) -> Votes:
    """What the trending score reads of a paper, as values (ranking knows no ORM)."""
    return Votes(paper.id, paper.upvotes, paper.num_comments, paper.github_stars, paper.submitted_at, paper.daily_date)


def candidate_of(paper: Paper, trending: float) -> Candidate:
    """What the ranker reads of an edition's paper, as values (ranking knows no ORM)."""
    return Candidate(
        paper.id,
        trending,
        candidate_text(paper.title, paper.abstract, paper.ai_summary, paper.ai_keywords),
        tuple(name.lower() for name in paper.authors or []),
        paper.organization,
    )


def build_digest(
    session: Session,
    day: dt.date,
    weights: TrendingWeights,
    kind: DigestKind = DigestKind.DAILY,
    max_items: int = 100,
) -> Digest | None:
    """The edition of ``day`` with its candidates in trending order; None when there are no papers.

    Every collection refreshes the candidates and their order (votes keep coming in, late papers
    join); each delivery keeps the papers it chose, so nobody's message changes under them.
    """
    first = edition_start(day, kind)
    papers = list(session.scalars(select(Paper).where(Paper.daily_date.between(first, day))))
    digest = session.scalar(select(Digest).where(Digest.kind == kind, Digest.date == day))
    if not papers:
        return digest
    if digest is None:
        digest = Digest(kind=kind, date=day, created_at=utcnow())
        session.add(digest)
        session.flush()
    as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    digest.items.clear()
    session.flush()
    if kind is DigestKind.MONTHLY:
        # The best of the month: each paper as it trended on its own day, so one from the 1st
        # is not buried under the age penalty that a single as-of date at the month's end gives.
        order = sorted(
            ((v, trending_score(v, _day_after(v.daily_date), weights)) for v in map(votes_of, papers)),
            key=lambda vs: (-vs[1], vs[0].paper_id),
        )
    else:
        order = trending_order(map(votes_of, papers), as_of, weights)
    for position, (votes, score) in enumerate(order[:max_items]):
        digest.items.append(DigestItem(paper_id=votes.paper_id, position=position, score=score))
    session.flush()
    return digest


def edition_start(day: dt.date, kind: DigestKind) -> dt.date:
    """The first day an edition of ``kind`` ending on ``day`` draws its papers from."""
    if kind is DigestKind.WEEKLY:
        return day - dt.timedelta(days=6)
    if kind is DigestKind.MONTHLY:
        return day.replace(day=1)
    return day


def edition_label(kind: DigestKind, day: dt.date) -> str:
    """How the email names the edition: its day, its week or its month."""
    if kind is DigestKind.WEEKLY:
        return f"Week to {date_label(day)}"
    if kind is DigestKind.MONTHLY:
        return f"Best of {day:%B %Y}"
    return date_label(day)


def _day_after(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)


def latest_digest(session: Session, kind: DigestKind = DigestKind.DAILY) -> Digest | None:
    return session.scalar(select(Digest).where(Digest.kind == kind).order_by(Digest.date.desc()).limit(1))


def message_id(digest: Digest, subscriber_id: int, domain: str) -> str:
    """Fixed at planning, so every attempt of a delivery is the same message to receivers."""
    # Random, not the subscriber id: a Message-ID travels in forwards and reports, and must name
    # nobody (complaints are matched to deliveries by it only together with a token of ours).
    return f"<{digest.date.isoformat()}.{digest.kind.value}.{secrets.token_hex(12)}@{domain}>"


@dataclass
class DigestComposer:
    """Builds each subscriber's message for one edition; ranking is cached per profile."""

    digest_id: int
    kind: DigestKind
    day: dt.date
    papers: dict[str, Paper]
    renderer: EmailRenderer
    links: Links
    mail_from: str
    postal_address: str
    default_size: int
    extra_headers: dict[str, str] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.monotonic)
    _views: dict[tuple[str, tuple[str, ...]], PaperView] = field(default_factory=dict)
    dkim: DkimSigner | None = None  # set by the runtime when DIGEST_DKIM_* are configured
    embedding_model: str | None = None  # the name of the vectors this composer compares
    embedder: Callable[[], Embedder] | None = None  # loads the model, only for missing vectors
    dimensions: int = 0
    _topic_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    trending_rank: dict[str, int] = field(default_factory=dict)  # paper id: place in the edition
    candidates: list[Candidate] = field(default_factory=list)  # the edition, as the ranker reads it
    relevance_weight: float = 0.0
    ranker: Ranker | None = None  # built for the first page planned (``ranked``)

    @classmethod
    def load(
        cls,
        session: Session,
        digest_id: int,
        *,
        renderer: EmailRenderer,
        links: Links,
        mail_from: str,
        postal_address: str,
        policy: DeliveryPolicy,
        embedding_model: str | None = None,
        embedder: Callable[[], Embedder] | None = None,
    ) -> DigestComposer:
        digest = session.get(Digest, digest_id)
        if digest is None:
            raise LookupError(f"digest {digest_id} does not exist")
        papers = {item.paper_id: item.paper for item in digest.items}
        candidates = [candidate_of(i.paper, i.score) for i in digest.items]
        for paper in papers.values():
            session.expunge(paper)
        return cls(
            digest_id=digest.id,
            kind=digest.kind,
            day=digest.date,
            papers=papers,
            renderer=renderer,
            links=links,
            mail_from=mail_from,
            postal_address=postal_address,
            default_size=policy.digest_size,
            embedding_model=embedding_model,
            embedder=embedder,
            trending_rank={item.paper_id: item.position for item in digest.items},
            candidates=candidates,
            relevance_weight=policy.relevance_weight,
        )

    def ranked(self, session: Session) -> Ranker:
        """The edition's ranker, built for the first page planned. Only planning chooses papers:
        a process that only sends never reads the papers' vectors, loads the model or ranks."""
        if self.ranker is not None:
            return self.ranker
        model = self.embedding_model
        papers = [self.papers[c.paper_id] for c in self.candidates]
        vectors = paper_vectors(session, papers, model, self.embedder) if model else {}
        matrix = None
        if vectors:
            self.dimensions = len(next(iter(vectors.values())))
            zero = np.zeros(self.dimensions, dtype=np.float32)  # a paper without a vector is about nothing
            matrix = np.vstack([vectors.get(c.paper_id, zero) for c in self.candidates])
        else:
            self.embedding_model = None  # no vectors to compare: relevance by text alone
        self.ranker = Ranker(
            self.candidates,
            relevance_weight=self.relevance_weight,
            vectors=matrix,
            topic_vector=self._topic_vectors.get,
        )
        return self.ranker

    @cached_property
    def label(self) -> str:
        return edition_label(self.kind, self.day)  # strftime is slow enough to do once

    @cached_property
    def sender_domain(self) -> str:
        return parseaddr(self.mail_from)[1].partition("@")[2]

    def prepare(self, session: Session, subscribers: Sequence[Recipient]) -> dict[int, Reader]:
        """Before choosing for a page: the vectors of its topics (computed once per topic, ever)
        and what its readers taught (one row each), compared with the edition all at once."""
        ranker = self.ranked(session)
        if self.embedding_model is None:
            return {}
        topics = {t for s in subscribers for t in parse_terms(s.topics)} - self._topic_vectors.keys()
        if topics:
            self._topic_vectors.update(topic_vectors(session, sorted(topics), self.embedding_model, self.embedder))
        readers = feedback.readers(session, [s.id for s in subscribers], self.embedding_model, self.dimensions)
        ranker.learn(
            Profile.from_text(s.topics, s.excluded, reader) for s in subscribers if (reader := readers.get(s.id))
        )
        return readers

    def choose(
        self, subscriber: Recipient, already_sent: set[str], reader: Reader | None = None
    ) -> tuple[list[str], dict[str, list[str]]]:
        """Papers and, per paper, the reasons shown ("Matches: ...", "Like: ...", "From: ...")."""
        assert self.ranker is not None, "prepare() builds the ranker: a page is prepared before choosing"
        profile = Profile.from_text(subscriber.topics, subscriber.excluded, reader)
        picks = self.ranker.pick(profile, subscriber.digest_size or self.default_size, already_sent)
        reasons = {p.paper_id: list(p.lines) for p in picks if p.reasons or p.why}
        if subscriber.only_for_you and not reasons:
            # Nothing passed the reader's bar and they asked for no digest then: no papers means
            # a skipped row (nothing new for them), which neither counts as received nor stands
            # in the way of the next edition's row.
            return [], {}
        return [p.paper_id for p in picks], reasons

    def load_papers(self, session: Session, paper_ids: set[str]) -> None:
        """Make sure these papers can be shown. Deliveries keep the papers chosen at planning,
        and a collection since may have rebuilt the edition without some of them."""
        missing = paper_ids - self.papers.keys()
        if missing:
            for paper in session.scalars(select(Paper).where(Paper.id.in_(missing))):
                session.expunge(paper)
                self.papers[paper.id] = paper

    def _view(self, paper_id: str, reasons: tuple[str, ...]) -> PaperView:
        # Shared by every subscriber with the same pick: built once per edition and reason.
        key = (paper_id, reasons)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = PaperView.from_paper(self.papers[paper_id], reasons)
        return view

    def sections(self, delivery: Entry, subscriber: Recipient) -> tuple[list[str], list[str]] | None:
        """(For you, Also trending) paper ids of a delivery, or None for one trending list.

        The bar is the ranker's own: a pick it can give a reason for ("Matches: ...", "About:
        ...", "Like: ...", "From: ...") was chosen by the reader's topics, marks or follows;
        a pick without one is trending filler. Sections are shown to a reader with topics or
        with a pick that passed (marks, follows); "Also trending" keeps the edition's order.
        """
        reasons = delivery.reasons or {}
        shown = [pid for pid in delivery.paper_ids or [] if pid in self.papers]
        for_you = [pid for pid in shown if reasons.get(pid)]
        if not for_you and not parse_terms(subscriber.topics):
            return None
        unranked = len(self.trending_rank)  # papers kept from an earlier build of the edition
        rest = sorted((pid for pid in shown if not reasons.get(pid)), key=lambda p: self.trending_rank.get(p, unranked))
        return for_you, rest

    def compose(self, delivery: Entry, subscriber: Recipient) -> bytes:
        reasons = delivery.reasons or {}
        sections = self.sections(delivery, subscriber)
        shown = (
            sections[0] + sections[1] if sections else [pid for pid in delivery.paper_ids or [] if pid in self.papers]
        )
        views = [self._view(pid, tuple(reasons.get(pid, ()))) for pid in shown]
        unsubscribe_url = self.links.unsubscribe(subscriber)
        context = DigestContext(
            date_label=self.label,
            papers=views,
            recipient=subscriber.email,
            frequency=subscriber.frequency.value,
            unsubscribe_url=unsubscribe_url,
            preferences_url=self.links.preferences(subscriber),
            view_url=self.links.digest_view(self.day),
            postal_address=self.postal_address,
            feedback=self.links.feedback_for(subscriber, [view.id for view in views]),
            sectioned=sections is not None,
            for_you=len(sections[0]) if sections else 0,
        )
        rendered = self.renderer.render(context)
        envelope = Envelope(
            mail_from=self.mail_from,
            recipient=subscriber.email,
            message_id=delivery.message_id,
            date=delivery.created_at,
            list_id=self.links.list_id(),
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.links.unsubscribe_mailto(subscriber),
            extra_headers={
                "Feedback-ID": f"{self.digest_id}:{self.kind.value}:digest:{self.sender_domain}",
                **self.extra_headers,
            },
        )
        data = message_bytes(rendered, envelope)
        return self.dkim.sign(data) if self.dkim else data


@dataclass(frozen=True)
class Delivered:
    """One paper as a reader got it: which edition, when, and the reasons it carried."""

    paper: Paper
    day: dt.date
    kind: DigestKind
    sent_at: dt.datetime
    reasons: tuple[str, ...]


def delivered_papers(session: Session, subscriber_id: int, limit: int) -> list[Delivered]:
    """The papers of a subscriber's sent digests, newest digest first and in each digest's order.

    Read from their ledger rows (on the (subscriber, created) index), so their feed shows what
    their digests showed, reasons included; papers no longer stored are left out.
    """
    rows = received(session, subscriber_id, limit)
    wanted = {pid for row in rows for pid in row.paper_ids}
    papers = {p.id: p for p in session.scalars(select(Paper).where(Paper.id.in_(wanted)))} if wanted else {}
    found: list[Delivered] = []
    for row in rows:
        for pid in row.paper_ids:
            if pid in papers and len(found) < limit:
                when = row.sent_at or dt.datetime.combine(
                    row.day, dt.time(), dt.UTC
                )  # rows sent before sent_at existed
                found.append(Delivered(papers[pid], row.day, row.kind, when, tuple(row.reasons.get(pid, ()))))
    return found
