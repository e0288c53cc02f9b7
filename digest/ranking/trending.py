"""The trending score: an edition's papers ordered once by community points over a power of age.

The formula and its settings are specified in docs/ranking.md ("Trending score").
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TrendingWeights:
    upvotes: float = 1.0
    comments: float = 2.0
    stars: float = 3.0
    gravity: float = 1.5
    age_offset_hours: float = 2.0


@dataclass(frozen=True)
class Votes:
    """What the trending score reads of a paper: the community's votes and when it reached Daily Papers."""

    paper_id: str
    upvotes: int
    comments: int
    github_stars: int | None
    submitted_at: dt.datetime | None  # when it reached Daily Papers; None: midnight UTC of its day
    daily_date: dt.date


def trending_score(votes: Votes, as_of: dt.datetime, weights: TrendingWeights) -> float:
    """Hacker-News-style gravity: community points divided by a power of age."""
    points = (
        weights.upvotes * votes.upvotes
        + weights.comments * votes.comments
        + weights.stars * math.log1p(votes.github_stars or 0)
        + 1.0
    )
    reached = votes.submitted_at or dt.datetime.combine(votes.daily_date, dt.time(), dt.UTC)
    age_hours = max(0.0, (as_of - reached).total_seconds() / 3600.0)
    return float(points / (age_hours + weights.age_offset_hours) ** weights.gravity)


def trending_order(papers: Iterable[Votes], as_of: dt.datetime, weights: TrendingWeights) -> list[tuple[Votes, float]]:
    scored = [(p, trending_score(p, as_of, weights)) for p in papers]
    # Ties broken by id so the order is stable across runs and databases.
    scored.sort(key=lambda ps: (-ps[1], ps[0].paper_id))
    return scored
