"""Which papers a digest holds, in which order, and why: the ``Ranker`` of one edition.

It combines the edition's trending order (``trending``), each profile's relevance
(``relevance``), what readers taught it (``marks``) and the reasons shown (``explain``), as
docs/ranking.md specifies. Each distinct profile is ranked once per edition and cached, so
subscribers who share one only pay for skipping what they already received; a page of taught
readers is ranked together (``Ranker.learn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from digest.ranking.explain import LIKE_REASON, Explain, Likes, Order, Pick, SharedPicks
from digest.ranking.marks import Marks, taught_scores
from digest.ranking.profile import Profile
from digest.ranking.relevance import Meaning, TextIndex, TopicPart

# Bound on cached profiles per ranker: a whole in-process run shares one ranker.
PROFILE_CACHE_SIZE = 20_000
LEARN_AT_ONCE = 1_000  # readers ranked together (bounds the arrays: readers x candidates)
PART_CACHE_SIZE = 2_000  # topic profiles of readers who taught it
FOLLOW_BONUS = 3.0  # followed authors and organisations are always included, first


@dataclass(frozen=True)
class Candidate:
    """A paper of the edition as ranking reads it."""

    paper_id: str
    trending: float
    text: str  # title, abstract, AI summary and AI keywords, lower-cased (``candidate_text``)
    # Author and organisation names, lower-cased, for followed authors and labs.
    names: tuple[str, ...] = ()
    organization: str | None = None


def candidate_text(title: str, abstract: str, summary: str | None, keywords: Sequence[str] | None) -> str:
    """Everything of a paper a topic can match and an email can show (the summary shown is
    the AI summary when there is one, so excluded words are checked there too)."""
    parts = [title, abstract, summary or "", " ".join(keywords or [])]
    return " ".join(p for p in parts if p).lower()


@dataclass
class Ranker:
    """Orders one digest's candidates per profile, caching each distinct profile's order.

    The BM25 index is built once, on the first profile with topics or excluded words.
    """

    candidates: Sequence[Candidate]
    relevance_weight: float = 0.7
    # Unit vectors of the candidates, one row each (zeros where a paper has none), and where
    # topic vectors come from; without them ranking is lexical only.
    vectors: np.ndarray | None = None
    topic_vector: Callable[[str], np.ndarray | None] | None = None
    lexical_share: float = 0.2  # of relevance: BM25 against meaning
    match_bonus: float = 1.0  # a word-for-word topic match ranks above every paper without one
    _cache: dict[Profile, Order] = field(default_factory=dict, init=False, repr=False)
    _learnt: dict[Profile, Order] = field(default_factory=dict, init=False, repr=False)  # the page's readers
    _parts: dict[tuple[tuple[str, ...], tuple[str, ...]], TopicPart] = field(
        default_factory=dict, init=False, repr=False
    )  # taught readers' topic profiles
    _picks: SharedPicks = field(default_factory=dict, init=False, repr=False)
    _trend_shares: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _by_name: dict[str, list[tuple[int, str]]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = [c.paper_id for c in self.candidates]
        # Ties are broken by arXiv id: candidates are sorted in id order first, then stably by
        # score (one sort instead of lexsort's two, the same order).
        self._by_id = np.argsort(np.array(self._ids), kind="stable")
        self._trend_values = np.array([c.trending for c in self.candidates], dtype=np.float64)
        self._everything = np.ones(len(self.candidates), dtype=bool)
        self._nothing = np.zeros(len(self.candidates), dtype=bool)
        self._zeros = np.zeros(len(self.candidates))
        if self.vectors is not None:
            self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self._text = TextIndex([c.text for c in self.candidates])
        self._meaning = Meaning(self.vectors, self.topic_vector)

    def learn(self, profiles: Iterable[Profile]) -> None:
        """Rank a page's readers who taught it all at once, before their picks: their orders
        are kept until the next page. Readers not learnt are ranked one by one, the same way."""
        self._learnt.clear()
        todo = [p for p in dict.fromkeys(profiles) if p.teaches]
        for start in range(0, len(todo), LEARN_AT_ONCE):
            some = todo[start : start + LEARN_AT_ONCE]
            self._learnt.update(zip(some, self._taught(some), strict=True))

    def order(self, profile: Profile) -> list[Pick]:
        """Every allowed candidate for ``profile``, best first."""
        return self._ordered(profile).picks()

    def pick(self, profile: Profile, size: int, already_sent: set[str] | frozenset[str]) -> list[Pick]:
        """The top ``size`` papers for ``profile`` that this subscriber has not received."""
        ordered = self._ordered(profile)
        chosen: list[Pick] = []
        ids, made = self._ids, ordered.made
        for position, i in enumerate(ordered.order):
            if ids[i] not in already_sent:
                # Runs for every subscriber: a pick made before is taken without a call.
                chosen.append(made[position] or ordered.at(position))
                if len(chosen) == size:
                    break
        return chosen

    # -- internals ---------------------------------------------------------------------------

    def _ordered(self, profile: Profile) -> Order:
        if profile.teaches:
            # A reader's own order is asked for once per edition: kept for the page only, so it
            # dies young (long-lived objects make the garbage collector's full passes longer).
            return self._learnt.get(profile) or self._taught([profile])[0]
        cached = self._cache.get(profile)
        if cached is None:
            if len(self._cache) >= PROFILE_CACHE_SIZE:
                del self._cache[next(iter(self._cache))]  # oldest first; dicts keep insertion order
            cached = self._cache[profile] = self._rank(profile)
        return cached

    def _rank(self, profile: Profile) -> Order:
        """A profile without a reader of its own: its topics' part alone."""
        # Runs once per distinct profile (tens of thousands per edition): few numpy calls on
        # whole arrays, Python loops only over the candidates that carry a reason.
        part = self._part(profile.topics, profile.excluded)
        if not profile.topics:
            return Order(np.flatnonzero(part.allowed), self._ids, part.explain, self._picks)
        if part.dense is None:
            relevance = part.lexical
        else:
            relevance = self.lexical_share * part.lexical + (1 - self.lexical_share) * part.dense
        # Papers that match a topic word for word come first (the reader asked for exactly that).
        score = part.start + self.relevance_weight * (relevance - part.trend)
        by_id = self._by_id
        if part.every:
            ordered = by_id[np.argsort(-score[by_id], kind="stable")]
        else:
            allowed = part.allowed[by_id]
            ordered = by_id[np.argsort(np.where(allowed, -score[by_id], np.inf), kind="stable")][: allowed.sum()]
        return Order(ordered, self._ids, part.explain, self._picks)

    def _taught(self, profiles: Sequence[Profile]) -> list[Order]:
        """Readers' own rankings: their topics' part (shared) and what their marks add.

        One row per reader in each array, so a page of readers costs a few numpy calls in all:
        one product of their vectors with the edition's, then the blend; the "Like: <title>"
        reasons are only worked out for the papers picked (``Order.at``).
        """
        readers = [p.reader for p in profiles if p.reader is not None]
        assert len(readers) == len(profiles), "only readers who taught it have orders of their own"
        parts = [self._taught_part(p.topics, p.excluded) for p in profiles]
        marks = Marks.of(readers, self.vectors, len(self.candidates))
        score = taught_scores(
            readers, parts, marks, relevance_weight=self.relevance_weight, lexical_share=self.lexical_share
        )
        follows = [self._followed(r.follows) if r.follows else {} for r in readers]
        for k, found in enumerate(follows):
            if found:
                score[k, list(found)] += FOLLOW_BONUS  # followed authors and organisations first
        # Best first, ties by arXiv id, the excluded at the end (cut off): one sort for all.
        allowed = np.stack([p.allowed for p in parts])
        by_id = self._by_id
        ordered = by_id[np.argsort(np.where(allowed[:, by_id], -score[:, by_id], np.inf), axis=1, kind="stable")]
        kept = allowed.sum(axis=1).tolist()
        liking = marks.liking[:, 0].tolist()
        # Which liked paper each candidate's "Like: <title>" names, for the whole page at once
        # (compared in float64, as the float32 cosines compare with LIKE_REASON in Python).
        shown = np.where(marks.liked.astype(np.float64) >= LIKE_REASON, marks.nearest, -1).tolist()
        orders = []
        for k, (part, reader) in enumerate(zip(parts, readers, strict=True)):
            likes = Likes(shown[k], reader.liked_titles) if liking[k] else None
            explain = Explain(part.explain.terms, part.explain.senses, likes, follows[k])
            orders.append(Order(ordered[k, : kept[k]], self._ids, explain, self._picks))
        return orders

    def _part(self, topics: tuple[str, ...], excluded: tuple[str, ...]) -> TopicPart:
        """What a topic profile contributes, the same for everyone who has it."""
        allowed = ~self._text.excluded_mask(excluded) if excluded else self._everything
        trend = self._trend_share(excluded, allowed)
        terms = [(topic, self._text.term(topic)) for topic in topics]
        if len(terms) == 1:
            lexical, matched = terms[0][1].bm25, terms[0][1].matches
            matched = matched & allowed if excluded else matched
        elif terms:
            lexical = np.add.reduce([term.bm25 for _, term in terms])
            matched = np.logical_or.reduce([term.matches for _, term in terms]) & allowed
        else:
            lexical, matched = self._zeros, self._nothing
        if terms and (top := lexical[matched].max(initial=0.0)) > 0:
            lexical = lexical * (1 / top)
        senses = [sense for topic, _ in terms if (sense := self._meaning.sense(topic)) is not None]
        dense = None
        if senses:
            dense = senses[0].scaled if len(senses) == 1 else np.maximum.reduce([f.scaled for f in senses])
        start = trend + matched * self.match_bonus
        explain = Explain(tuple([term.named for _, term in terms]), tuple([f.named for f in senses]))
        return TopicPart(allowed, not excluded, lexical, trend, start, dense, explain, tuple(senses))

    def _taught_part(self, topics: tuple[str, ...], excluded: tuple[str, ...]) -> TopicPart:
        """``_part`` cached for readers who taught it: many of them share popular topics."""
        key = (topics, excluded)
        found = self._parts.get(key)
        if found is None:
            if len(self._parts) >= PART_CACHE_SIZE:
                del self._parts[next(iter(self._parts))]
            found = self._parts[key] = self._part(topics, excluded)
        return found

    def _trend_share(self, excluded: tuple[str, ...], allowed: np.ndarray) -> np.ndarray:
        """Trending scores relative to the best allowed paper, once per set of excluded words."""
        found = self._trend_shares.get(excluded)
        if found is None:
            top = self._trend_values[allowed].max() if allowed.any() else 1.0
            found = self._trend_shares[excluded] = self._trend_values * (1.0 / (top or 1.0))
        return found

    def _followed(self, follows: tuple[str, ...]) -> dict[int, str]:
        """Candidates by a followed organisation or author, with the name as shown."""
        if self._by_name is None:
            self._by_name = {}
            for i, c in enumerate(self.candidates):
                if c.organization:
                    self._by_name.setdefault(c.organization.lower(), []).append((i, c.organization))
                for name in c.names:
                    self._by_name.setdefault(name, []).append((i, name.title() if name.islower() else name))
        found: dict[int, str] = {}
        for name in follows:
            for i, shown in self._by_name.get(name, ()):
                found.setdefault(i, shown)
        return found
