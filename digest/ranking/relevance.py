"""How relevant each candidate is to a reader's topics: BM25 with phrase-aware matching over the
candidates' text, and dense similarity of their vectors with the topics' (docs/ranking.md).

Each is worked out once per topic (and excluded word) and edition, then shared by every profile.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import bm25s
import numpy as np

from digest.ranking.explain import Explain
from digest.ranking.words import analyse, spellings

# bm25s sets its own logger to DEBUG on import, which prints index building on every run.
logging.getLogger("bm25s").setLevel(logging.WARNING)

# Dense similarity's scale, tuned on bench/relevance.py.
DENSE_FLOOR = 0.15  # cosine at or below which a paper is unrelated (MiniLM: ~0.0-0.15)
DENSE_CEILING = 0.45  # cosine that counts as fully about it
DENSE_SCALE = 1 / (DENSE_CEILING - DENSE_FLOOR)


def scaled(cosine: np.ndarray) -> np.ndarray:
    """Cosine to 0..1: unrelated at DENSE_FLOOR or below, fully about it at DENSE_CEILING."""
    return np.clip((cosine - DENSE_FLOOR) * DENSE_SCALE, 0.0, 1.0)


@dataclass(frozen=True)
class Term:
    """A topic or excluded word, analysed once per ranker: which candidates it matches, how well."""

    matches: np.ndarray  # bool per candidate
    bm25: np.ndarray  # BM25 score per candidate (0 where it does not match)
    # The term and the candidates it matches as Python objects, for a pick's reasons: indexing
    # numpy arrays one element at a time costs more than the whole ranking of a paper. One
    # pair per term, shared by every profile that has it (fewer objects for the collector).
    named: tuple[str, frozenset[int]] = ("", frozenset())


def _near(positions: Sequence[list[int]], span: int) -> bool:
    """True when some occurrence of the first word has every other word within ``span`` tokens."""
    first, *others = positions
    return any(all(any(abs(q - p) <= span for q in other) for other in others) for p in first)


class TextIndex:
    """The candidates' texts (lower-cased) for BM25 and word matching: the index is built on
    the first term asked for, each term and excluded word is worked out once."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = texts
        self._index: bm25s.BM25 | None = None
        self._positions: list[dict[str, list[int]]] = []
        self._terms: dict[str, Term] = {}
        self._excluded: dict[str, np.ndarray] = {}

    def _build(self) -> bm25s.BM25:
        if self._index is None:
            docs = [analyse(text) for text in self._texts]
            self._positions = []
            for tokens in docs:
                where: dict[str, list[int]] = {}
                for i, token in enumerate(tokens):
                    where.setdefault(token, []).append(i)
                self._positions.append(where)
            index = bm25s.BM25()
            # bm25s refuses an empty vocabulary; a placeholder token keeps empty editions working.
            index.index([d or ["\x00"] for d in docs], show_progress=False)
            self._index = index
        return self._index

    def term(self, term: str) -> Term:
        """Which candidates ``term`` matches, by any of its spellings, and its best BM25 there."""
        known = self._terms.get(term)
        if known is not None:
            return known
        index = self._build()
        n = len(self._texts)
        matches = np.zeros(n, dtype=bool)
        best = np.zeros(n, dtype=np.float64)
        words = list(dict.fromkeys(analyse(term)))
        for spelling in spellings(words) if words else []:
            unique = list(dict.fromkeys(spelling))
            found_in = self._matching(unique)
            if found_in.any():
                scores = np.asarray(index.get_scores(unique), dtype=np.float64)
                best = np.maximum(best, np.where(found_in, scores, 0.0))
                matches |= found_in
        known = self._terms[term] = Term(matches, best, (term, frozenset(np.flatnonzero(matches).tolist())))
        return known

    def _matching(self, words: list[str]) -> np.ndarray:
        """Candidates holding all ``words`` close together (see docs/ranking.md)."""
        matches = np.zeros(len(self._texts), dtype=bool)
        span = len(words) + 3
        for i, where in enumerate(self._positions):
            found = [where.get(w) for w in words]
            if all(found) and (len(words) == 1 or _near(found, span)):  # type: ignore[arg-type]
                matches[i] = True
        return matches

    def _excluding(self, word: str) -> np.ndarray:
        known = self._excluded.get(word)
        if known is None:
            # The raw word as well as its analysed form, so what the subscriber typed never
            # shows up in the email. The substring test first: the regex is only the boundary.
            pattern = re.compile(r"(?<!\w)" + re.escape(word))
            raw = [word in text and pattern.search(text) is not None for text in self._texts]
            known = self._excluded[word] = self.term(word).matches | np.array(raw, dtype=bool)
        return known

    def excluded_mask(self, excluded: tuple[str, ...]) -> np.ndarray:
        """Candidates any of the ``excluded`` words removes."""
        mask = np.zeros(len(self._texts), dtype=bool)
        for word in excluded:
            mask |= self._excluding(word)
        return mask


class Sense(NamedTuple):
    """One topic against an edition's candidates."""

    named: tuple[str, list[float]]  # the topic and each candidate's cosine (a list, for reasons)
    scaled: np.ndarray  # the cosines scaled to 0..1
    cosine: np.ndarray
    vector: np.ndarray  # the topic's unit vector


class Meaning:
    """The candidates' vectors against topics' vectors, once per topic and edition; without
    either (no model), no topic has a sense and ranking is lexical."""

    def __init__(self, vectors: np.ndarray | None, topic_vector: Callable[[str], np.ndarray | None] | None) -> None:
        self._vectors = vectors
        self._topic_vector = topic_vector
        self._senses: dict[str, Sense | None] = {}

    def sense(self, topic: str) -> Sense | None:
        """The topic with each candidate's cosine with its vector (a list, for reasons), the
        same scaled to 0..1, and the topic's vector."""
        if topic in self._senses:
            return self._senses[topic]
        found = None
        if self._vectors is not None and self._topic_vector is not None:
            vector = self._topic_vector(topic)
            if vector is not None:
                cosine = self._vectors @ vector
                found = Sense((topic, cosine.tolist()), scaled(cosine), cosine, vector)
        self._senses[topic] = found
        return found


@dataclass(frozen=True)
class TopicPart:
    """A topic profile's part of a ranking: shared by everyone with those topics and excluded
    words, taught or not."""

    allowed: np.ndarray  # not excluded
    every: bool  # nothing is excluded
    lexical: np.ndarray  # BM25 over the matching topics, relative to the best allowed match
    trend: np.ndarray  # trending relative to the best allowed paper
    start: np.ndarray  # trend + match bonus: the score before relevance
    dense: np.ndarray | None  # the topics' similarity, scaled (None: no topic has a vector)
    explain: Explain
    senses: tuple[Sense, ...] = ()  # the topics that have a vector

    @cached_property
    def closeness(self) -> np.ndarray:
        """Each candidate's cosine with the nearest topic: only a taught reader's marks are
        weighed against it (``digest.ranking.marks.mark_lead``), on a cached part, so it is
        made on first use."""
        return np.asarray(np.maximum.reduce([sense.cosine for sense in self.senses]))
