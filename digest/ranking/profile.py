"""A reader's profile: the topics and excluded words they wrote, and what they taught the digest.

Equal profiles share one ranking; a ``Reader`` (their marks' vectors, follows and how personal
they want it) gives a profile an order of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from digest.core.text import parse_terms


@dataclass(frozen=True, eq=False)
class Reader:
    """What one reader taught the digest (``digest.subscribers.feedback``): vectors of the papers they
    marked or gave as examples, whom they follow, how personal they want it. Compared by
    ``key`` (subscriber id and when the profile last changed), so a ranker caches it once."""

    key: tuple[int, float]
    liked: np.ndarray | None = None  # rows of unit vectors
    liked_titles: tuple[str, ...] = ()
    disliked: np.ndarray | None = None
    follows: tuple[str, ...] = ()  # lower-cased author or organisation names
    personal_weight: float | None = None  # None: the ranker's default relevance weight

    def __post_init__(self) -> None:
        # Liked rows then disliked ones in one matrix, so ranking takes one product of both.
        parts = [m for m in (self.liked, self.disliked) if m is not None and len(m)]
        rows = np.ascontiguousarray(np.vstack(parts), dtype=np.float32) if parts else None
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "liked_count", 0 if self.liked is None else len(self.liked))

    rows: np.ndarray | None = field(init=False, repr=False, compare=False)
    liked_count: int = field(init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reader) and other.key == self.key

    @property
    def teaches(self) -> bool:
        return self.liked is not None or self.disliked is not None or bool(self.follows)


@dataclass(frozen=True)
class Profile:
    """What personalises a digest; subscribers with equal profiles share one ranking."""

    topics: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    reader: Reader | None = None

    @classmethod
    def from_text(cls, topics: str, excluded: str = "", reader: Reader | None = None) -> Profile:
        # A reader who taught nothing (everything undone) shares the ranking of their topics.
        taught = reader if reader is not None and reader.teaches else None
        return cls(_terms(topics), _terms(excluded), taught)

    @property
    def teaches(self) -> bool:
        """Whether its reader taught anything, so that it has an order of its own."""
        return self.reader is not None and self.reader.teaches


@lru_cache(maxsize=20_000)
def _terms(text: str) -> tuple[str, ...]:
    """Topics or excluded words in one order, so equal profiles are equal. Cached: a list's
    subscribers share a few thousand such texts, and parsing each subscriber's anew took 0.3 s
    of the ~1.4 s that ranking an edition for 100 000 of them takes (bench/ranking.py)."""
    return tuple(sorted(parse_terms(text)))
