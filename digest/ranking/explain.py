"""The reasons a pick shows: "Matches: <topics>", "About: <topic>", "Like: <title>", "From: <name>".

Worked out only for the papers picked, and a paper with the same reasons is one object for
every profile of an edition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

LIKE_REASON = 0.45  # cosine with a liked paper from which "Like: <title>" is shown
TOPIC_REASON = 0.30  # cosine with a topic from which "About: <topic>" is shown
SHARED_PICKS = 200_000  # distinct (paper, reasons) picks kept for sharing per ranker


class Pick(NamedTuple):
    """A paper in a digest and why it is there. The same paper with the same reasons is one
    object for every profile of an edition (``Order.at``): a ranker keeps hundreds of
    thousands of picks otherwise, and the garbage collector's full passes over them cost more
    than the ranking (bench/ranking.py)."""

    paper_id: str
    reasons: tuple[str, ...] = ()  # the topics that match it (BM25): "Matches: ..."
    why: tuple[str, ...] = ()  # other reasons, as shown: "Like: <title>", "From: <organisation>"

    @property
    def lines(self) -> tuple[str, ...]:
        """Every reason as the email shows it."""
        matches = (f"Matches: {', '.join(self.reasons)}",) if self.reasons else ()
        return matches + self.why


# Picks shared by every profile of a ranker: (candidate index, reasons, why) -> the pick.
SharedPicks = dict[tuple[int, tuple[str, ...], tuple[str, ...]], Pick]


@dataclass(frozen=True)
class Likes:
    """Per candidate: which liked paper "Like: <title>" names (the nearest, when its cosine is
    LIKE_REASON or more; -1: none), and their titles (a Python list: a pick's reasons look up
    single elements, which numpy makes slow)."""

    shown: list[int]
    titles: tuple[str, ...]


@dataclass(frozen=True)
class Explain:
    """What a profile's picks say, worked out only for the papers picked: the topics (with
    the ranker's cached per-topic arrays) and, for a taught reader, likes and follows."""

    terms: tuple[tuple[str, frozenset[int]], ...] = ()  # topic, the candidates it matches word for word
    senses: tuple[tuple[str, list[float]], ...] = ()  # topic, cosine per candidate
    likes: Likes | None = None
    follows: dict[int, str] = field(default_factory=dict)

    def reasons(self, i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(topics that match paper ``i``; the other reasons, as shown)."""
        # Made for every pick of every profile: one topic (the common case) without a loop.
        terms = self.terms
        if len(terms) == 1:
            matches: tuple[str, ...] = (terms[0][0],) if i in terms[0][1] else ()
        else:
            matches = tuple([topic for topic, found in terms if i in found]) if terms else ()
        why: tuple[str, ...] = ()
        if self.likes is not None and (liked := self.likes.shown[i]) >= 0:
            why = (f"Like: {self.likes.titles[liked]}",)
        elif not matches and self.senses:
            topic, closest = "", -2.0  # the first of the closest topics, without a lambda per pick
            for sense, cosine in self.senses:
                if cosine[i] > closest:
                    topic, closest = sense, cosine[i]
            if closest >= TOPIC_REASON:
                why = (f"About: {topic}",)
        source = self.follows.get(i)
        return matches, why if source is None else (f"From: {source}", *why)


@dataclass
class Order:
    """One profile's ranking: candidate indices best first, and what each pick says."""

    indices: np.ndarray
    ids: list[str]  # paper id per candidate index (the ranker's, shared)
    explain: Explain
    shared: SharedPicks  # the ranker's picks
    order: list[int] = field(init=False)  # the indices as Python ints, for cheap lookups
    made: list[Pick | None] = field(init=False)  # the picks made so far, by position
    _all: list[Pick] | None = None

    def __post_init__(self) -> None:
        self.order = self.indices.tolist()
        self.made = [None] * len(self.order)

    def at(self, position: int) -> Pick:
        """The pick at ``position`` in this order, made once: subscribers share a profile."""
        made = self.made[position]
        if made is None:
            i = self.order[position]
            reasons, why = self.explain.reasons(i)
            key = (i, reasons, why)
            made = self.shared.get(key)
            if made is None:
                if len(self.shared) >= SHARED_PICKS:
                    self.shared.clear()  # only sharing is lost
                made = self.shared[key] = Pick(self.ids[i], reasons, why)
            self.made[position] = made
        return made

    def picks(self) -> list[Pick]:
        if self._all is None:
            self._all = [self.at(position) for position in range(len(self.order))]
        return self._all
