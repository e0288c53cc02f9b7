"""Which papers a digest holds, in which order, and why.

Two stages, so a million-subscriber run stays cheap:

1. ``trending_scores`` scores the day's (or week's) candidates once per digest from community
   signals; the digest stores that order (``digest_items``).
2. ``Ranker.pick`` orders those candidates for one subscriber profile (topics, excluded words).
   Many subscribers share a profile, so a ranker computes each distinct profile once and then
   only filters out the papers that subscriber already received.

The formula is documented in the README ("How papers are ranked").
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from digest.models import Paper


@dataclass(frozen=True)
class TrendingWeights:
    upvotes: float = 1.0
    comments: float = 2.0
    stars: float = 3.0
    gravity: float = 1.5
    age_offset_hours: float = 2.0


def trending_score(paper: Paper, as_of: dt.datetime, weights: TrendingWeights) -> float:
    """Hacker-News-style gravity: community points divided by a power of age.

    points = w_u * upvotes + w_c * comments + w_s * ln(1 + stars) + 1
    score  = points / (age_hours + offset) ** gravity
    where age is measured from when the paper reached Daily Papers to ``as_of``.
    """
    points = (
        weights.upvotes * paper.upvotes
        + weights.comments * paper.num_comments
        + weights.stars * math.log1p(paper.github_stars or 0)
        + 1.0
    )
    reached = paper.submitted_at or dt.datetime.combine(paper.daily_date, dt.time(), dt.UTC)
    age_hours = max(0.0, (as_of - reached).total_seconds() / 3600.0)
    return points / (age_hours + weights.age_offset_hours) ** weights.gravity


def trending_order(
    papers: Iterable[Paper], as_of: dt.datetime, weights: TrendingWeights
) -> list[tuple[Paper, float]]:
    scored = [(p, trending_score(p, as_of, weights)) for p in papers]
    # Ties broken by id so the order is stable across runs and databases.
    scored.sort(key=lambda ps: (-ps[1], ps[0].id))
    return scored


_SPLIT = re.compile(r"[,;\n]+")


def parse_terms(text: str) -> tuple[str, ...]:
    """Free text "diffusion, reinforcement learning" to normalised, de-duplicated terms."""
    seen: dict[str, None] = {}
    for part in _SPLIT.split(text or ""):
        term = " ".join(part.lower().split())[:80]
        if term:
            seen.setdefault(term, None)
    return tuple(seen)[:20]


@dataclass(frozen=True)
class Profile:
    """What personalises a digest; subscribers with equal profiles share one ranking."""

    topics: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    @classmethod
    def from_text(cls, topics: str, excluded: str = "") -> Profile:
        return cls(tuple(sorted(parse_terms(topics))), tuple(sorted(parse_terms(excluded))))


@dataclass(frozen=True)
class Candidate:
    paper_id: str
    trending: float
    text: str  # title, abstract and AI keywords, lower-cased


@dataclass(frozen=True)
class Pick:
    paper_id: str
    score: float
    reasons: tuple[str, ...] = ()


def candidate_text(paper: Paper) -> str:
    return " ".join([paper.title, paper.abstract, " ".join(paper.ai_keywords or [])]).lower()


@dataclass
class Ranker:
    """Orders one digest's candidates per profile, caching each distinct profile's order."""

    candidates: Sequence[Candidate]
    relevance_weight: float = 0.7
    _cache: dict[Profile, list[Pick]] = field(default_factory=dict)

    def order(self, profile: Profile) -> list[Pick]:
        cached = self._cache.get(profile)
        if cached is None:
            cached = self._cache[profile] = self._rank(profile)
        return cached

    def pick(self, profile: Profile, size: int, already_sent: set[str] | frozenset[str]) -> list[Pick]:
        """The top ``size`` papers for ``profile`` that this subscriber has not received."""
        chosen: list[Pick] = []
        for pick in self.order(profile):
            if pick.paper_id not in already_sent:
                chosen.append(pick)
                if len(chosen) == size:
                    break
        return chosen

    def _rank(self, profile: Profile) -> list[Pick]:
        allowed = [c for c in self.candidates if not _mentions_any(c.text, profile.excluded)]
        if not profile.topics:
            return [Pick(c.paper_id, c.trending) for c in allowed]
        top = max((c.trending for c in allowed), default=1.0) or 1.0
        picks = []
        for c in allowed:
            matches = tuple(t for t in profile.topics if _mentions(c.text, t))
            relevance = len(matches) / len(profile.topics)
            score = self.relevance_weight * relevance + (1 - self.relevance_weight) * c.trending / top
            picks.append(Pick(c.paper_id, score, matches))
        picks.sort(key=lambda p: (-p.score, p.paper_id))
        return picks


def _mentions(text: str, term: str) -> bool:
    return re.search(r"\b" + re.escape(term), text) is not None


def _mentions_any(text: str, terms: Iterable[str]) -> bool:
    return any(_mentions(text, t) for t in terms)
