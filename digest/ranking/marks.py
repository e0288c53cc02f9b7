"""What readers' marks do to their order: their liked and disliked papers against the edition's
candidates, how far the marks lead the topics, and the blend of both (docs/ranking.md).

A page of taught readers at a time: one matrix product of all their vectors with the edition's,
then numpy calls on arrays with one row per reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from threadpoolctl import ThreadpoolController

from digest.ranking.profile import Reader
from digest.ranking.relevance import DENSE_FLOOR, DENSE_SCALE, Sense, TopicPart

# The blend's constants, tuned on bench/relevance.py (see docs/ranking.md).
DISLIKE_WEIGHT = 0.5
DISLIKE_NEAR = 0.4  # cosine with a disliked paper from which a paper is pushed down
LIKE_DISCOUNT = 0.1
TOPIC_MARKS = 8  # a topic the reader wrote counts as much as this many liked papers
MARK_PRIOR = 1  # marks at which their lead is half what they show (three: three quarters)
LEAD_MARGIN = 0.3  # how much better (in AUC) the marks explain the marks to lead fully

_BELOW = -2.0  # below every cosine: "no paper here"
_NO_ROWS = np.zeros((0, 0), dtype=np.float32)


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


@dataclass(frozen=True)
class Marks:
    """Readers' marked papers against the edition's candidates, one row per reader."""

    liked: np.ndarray  # cosine of each candidate with the reader's nearest liked paper
    nearest: np.ndarray  # which of the reader's liked papers that is
    disliked: np.ndarray  # cosine with the nearest disliked paper
    liking: np.ndarray  # per reader (a column): has liked papers to compare with
    disliking: np.ndarray  # per reader: has disliked papers

    @classmethod
    def of(cls, readers: Sequence[Reader], vectors: np.ndarray | None, candidates: int) -> Marks:
        """All ``readers`` compared in one matrix product.

        One product of a page's readers (a few hundred rows) costs about a third of the CPU
        time of the same rows taken reader by reader (0.5 against 1.6-2 µs a row with 100
        candidates), and it runs on one BLAS thread: OpenBLAS hands a product this size to all
        its threads, whose waiting measured 3-10x the CPU time on a busy 2-core machine, where
        the other cores run other workers.
        """
        count = len(readers)
        # The readers' vectors one after the other (none without a model to compare them by).
        rows = [r.rows if vectors is not None and r.rows is not None else _NO_ROWS for r in readers]
        sizes = np.array([len(matrix) for matrix in rows])
        liked_counts = np.array([r.liked_count for r in readers]) * (sizes > 0)
        disliked_counts = sizes - liked_counts
        # The nearest liked and disliked paper of each reader: one max per run of rows (a
        # reader's liked ones, then their disliked ones: contiguous in the product), "no paper"
        # where a reader has none. Taken on the product itself: copying it into arrays padded
        # to the most marks given cost more than the product (and max is exact either way).
        closest = np.full((2, count, candidates), _BELOW, dtype=np.float32)
        nearest = np.zeros((count, candidates), dtype=np.intp)
        if vectors is not None and sizes.any():
            stacked = np.vstack([matrix for matrix in rows if len(matrix)])
            with _blas().limit(limits=1, user_api="blas"):
                sims = stacked @ vectors.T
            starts = np.cumsum(sizes) - sizes
            runs = np.stack([starts, starts + liked_counts])  # side x reader: where each run starts
            lengths = np.stack([liked_counts, disliked_counts])
            side, reader = np.nonzero(lengths)
            begin = runs[side, reader]
            by_start = np.argsort(begin, kind="stable")
            closest[side[by_start], reader[by_start]] = np.maximum.reduceat(sims, begin[by_start], axis=0)
            # Which liked paper is the nearest: the first one that reaches it (argmax's choice).
            owner = np.repeat(np.arange(count), sizes)
            position = np.arange(len(stacked)) - np.repeat(starts, sizes)
            liked_row = position < liked_counts[owner]
            reached = (sims == closest[0, owner]) & liked_row[:, None]
            first = np.where(reached, position[:, None], np.iinfo(np.intp).max)
            liking = np.flatnonzero(liked_counts)
            nearest[liking] = np.minimum.reduceat(first, starts[liking], axis=0)
        return cls(closest[0], nearest, closest[1], (liked_counts > 0)[:, None], (disliked_counts > 0)[:, None])


def taught_scores(
    readers: Sequence[Reader],
    parts: Sequence[TopicPart],
    marks: Marks,
    *,
    relevance_weight: float,
    lexical_share: float,
) -> np.ndarray:
    """Each reader's score of every candidate (one row each): their topics' part and what their
    marks add, moved toward the order of their marks alone as far as the marks lead."""
    like, penalty, dense = _marked_dense(readers, parts, marks)
    has_topic = np.array([p.dense is not None for p in parts])[:, None]
    # Without anything to compare by meaning, relevance is BM25 alone.
    lexical_shares = np.where(has_topic | marks.liking | marks.disliking, lexical_share, 1.0)
    weight = np.array([[relevance_weight if r.personal_weight is None else r.personal_weight] for r in readers])
    start, lexical, trend = (np.stack([getattr(p, part) for p in parts]) for part in ("start", "lexical", "trend"))
    score: np.ndarray = start + weight * (lexical_shares * lexical - trend + (1 - lexical_share) * dense)
    # Where the marks explain what the reader marked better than the topics do, the order
    # moves toward the one their marks alone give (a reader without topics), topics' word
    # matches included, as far as they lead (``mark_lead``).
    lead = mark_lead(readers, parts, marks)
    # Only the readers it moves (most taught readers' topics explain their marks).
    if len(moved := np.flatnonzero(lead[:, 0])):
        led = lead[moved]
        alone = np.where(marks.liking[moved], like[moved], 0.0) - penalty[moved]
        cold = trend[moved] + weight[moved] * ((1 - lexical_share) * alone - trend[moved])
        # The word-for-word bonus would keep the topics' papers on top of any blend: it fades
        # twice as fast, gone once the marks lead by half.
        bonus = start[moved] - trend[moved]
        score[moved] = (1 - led) * (score[moved] - bonus) + led * cold + np.clip(1 - 2 * led, 0.0, 1.0) * bonus
    return score


def _marked_dense(
    readers: Sequence[Reader], parts: Sequence[TopicPart], marks: Marks
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(like(p), the "less like this" penalty, dense(p)) per reader and candidate."""
    zeros = np.zeros(marks.liked.shape[1])
    topic = np.stack([zeros if p.dense is None else p.dense for p in parts])
    liked_count = np.array([r.liked_count for r in readers])
    # Marks are examples, topics are statements. A paper nearer to a liked one than to the
    # topics gains part of that lead: all of it for a reader without topics, otherwise the
    # marks' share of the reader's evidence (a topic counts as TOPIC_MARKS marks) or, when
    # more, how closely the paper is about the topics. So marks reorder freely within the
    # reader's topics, and reach outside them only as far as there are many of them
    # (measured: bench/relevance.py).
    like = np.clip(marks.liked * DENSE_SCALE - (LIKE_DISCOUNT + DENSE_FLOOR) * DENSE_SCALE, 0.0, 1.0)
    senses = np.array([len(p.senses) for p in parts])
    share = (liked_count / np.maximum(liked_count + TOPIC_MARKS * senses, 1))[:, None]
    dense = np.where(marks.liking, topic + np.maximum(topic, share) * np.maximum(like - topic, 0.0), topic)
    # "Less like this" pushes down close neighbours of the disliked papers only (a paper
    # merely nearer to them than to the topics may still be what was asked for), unless a
    # liked paper is at least as close.
    slope = DISLIKE_WEIGHT / (1 - DISLIKE_NEAR)
    penalty = np.clip(marks.disliked * slope - DISLIKE_NEAR * slope, 0.0, DISLIKE_WEIGHT)
    dense -= penalty * (~marks.liking | (marks.disliked > marks.liked))
    return like, penalty, dense


def mark_lead(readers: Sequence[Reader], parts: Sequence[TopicPart], marks: Marks) -> np.ndarray:
    """How far each reader's marks lead their topics, 0..1 (a column): the evidence they gave
    (MARK_PRIOR marks make half of it) times how much better the marks than the topics tell the
    reader's own "more" papers from their "less" ones (from today's candidates when they marked
    nothing "less"). Topics that rank the liked papers low and the disliked ones high hand the
    lead to the marks; topics that agree with the marks keep it.

    A page's readers at once, without a loop over readers but to gather their arrays: one
    batched product, then the AUCs on arrays padded to the most marks given.
    """
    lead = np.zeros((len(readers), 1))
    # Only readers with topics and liked papers: the others are ranked by what they have.
    todo = [k for k, r in enumerate(readers) if r.liked_count and parts[k].senses]
    if not todo:
        return lead
    scored = _Scored.of([readers[k] for k in todo], [parts[k].senses for k in todo])
    by_topics, by_marks = scored.agreements([parts[k] for k in todo], marks.liked, np.array(todo))
    lead[todo, 0] = scored.lead(by_topics, by_marks)
    return lead


def _agreement(pos: np.ndarray, pos_real: np.ndarray, neg: np.ndarray, neg_real: np.ndarray | None) -> np.ndarray:
    """Per reader (row): how often a score puts a liked paper above an unwanted one, ties half
    (an AUC); 0.5, "no better than chance", without pairs to compare. ``neg_real`` None: every
    unwanted score is real (today's candidates)."""
    pairs = pos_real[:, :, None] if neg_real is None else pos_real[:, :, None] & neg_real[:, None, :]
    # Counted on booleans (cheaper than a float per pair, and the same sums exactly).
    above = (pos[:, :, None] > neg[:, None, :]) & pairs
    tied = (pos[:, :, None] == neg[:, None, :]) & pairs
    wins = above.sum(axis=(1, 2)) + 0.5 * tied.sum(axis=(1, 2))
    count = pairs.sum(axis=(1, 2)) * (neg.shape[1] if neg_real is None else 1)
    return np.where(count > 0, wins / np.maximum(count, 1), 0.5)


def _similarities(
    rows: Sequence[np.ndarray], sizes: np.ndarray, liked_n: np.ndarray, senses: Sequence[tuple[Sense, ...]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every marked paper of each reader (``rows``: liked then disliked), scored as a candidate
    would be: (its reader, its place among their rows, cosine with the nearest of the reader's
    topics, cosine with the nearest *other* liked paper of the reader)."""
    count = len(rows)
    topic_n = np.array([len(some) for some in senses])
    most_topics, most_liked = topic_n.max(), liked_n.max()
    # Per reader, their topics' vectors, then their liked papers', then their disliked ones',
    # padded: one batched product gives every marked paper's cosine with each topic and each
    # liked paper of the same reader (a product with the page's distinct topics instead costs
    # more: most of those pairs are other readers').
    owner = np.repeat(np.arange(count), sizes)
    position = np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    topic_owner = np.repeat(np.arange(count), topic_n)
    width = most_topics + sizes.max()
    padded = np.zeros((count, width, rows[0].shape[1]), dtype=np.float32)
    # Filled through a flat view: one index per row costs less than a pair.
    flat = padded.reshape(count * width, -1)
    topic_position = np.arange(len(topic_owner)) - np.repeat(np.cumsum(topic_n) - topic_n, topic_n)
    flat[topic_owner * width + topic_position] = [sense.vector for some in senses for sense in some]
    flat[owner * width + most_topics + position] = np.concatenate(rows)
    with _blas().limit(limits=1, user_api="blas"):
        products = padded[:, most_topics:] @ padded[:, : most_topics + most_liked].transpose(0, 2, 1)
    found = products[owner, position]
    # Topic score of a marked paper: cosine with the nearest of its reader's topics, as for a
    # candidate.
    by_topic = np.where(np.arange(most_topics) < topic_n[owner][:, None], found[:, :most_topics], _BELOW).max(axis=1)
    # Mark score of a liked paper: cosine with the nearest *other* liked paper; of a disliked
    # one, with the nearest liked paper (as a candidate's).
    liked_column = np.arange(most_liked)
    near = (liked_column < liked_n[owner][:, None]) & (liked_column != position[:, None])
    by_mark = np.where(near, found[:, most_topics:], _BELOW).max(axis=1)
    return owner, position, by_topic, by_mark


@dataclass(frozen=True)
class _Scored:
    """Taught readers' own marked papers scored by their topics and by their marks: per marked
    paper, and per reader in arrays of their liked and of their disliked papers' scores, padded
    to the most marks given (``real``: which entries are papers)."""

    owner: np.ndarray  # per marked paper: its reader
    is_liked: np.ndarray
    by_topic: np.ndarray
    sizes: np.ndarray  # per reader: marked papers
    liked_n: np.ndarray
    disliked_n: np.ndarray
    liked_topics: np.ndarray
    liked_marks: np.ndarray
    liked_real: np.ndarray
    trusted: np.ndarray  # liked papers whose mark score tells something
    disliked_topics: np.ndarray
    disliked_marks: np.ndarray
    disliked_real: np.ndarray

    @classmethod
    def of(cls, readers: Sequence[Reader], senses: Sequence[tuple[Sense, ...]]) -> _Scored:
        rows = [r.rows for r in readers if r.rows is not None]  # all of them: they liked papers
        sizes = np.array([len(some) for some in rows])
        liked_n = np.array([r.liked_count for r in readers])
        owner, position, by_topic, by_mark = _similarities(rows, sizes, liked_n, senses)
        is_liked = position < liked_n[owner]
        count, most_liked = len(readers), liked_n.max()
        # Per reader, liked papers' scores in one array and disliked ones' in another.
        liked_real = np.arange(most_liked) < liked_n[:, None]
        disliked_n = sizes - liked_n
        most_disliked = max(1, disliked_n.max())
        disliked_real = np.arange(most_disliked) < disliked_n[:, None]
        liked_at = (owner[is_liked], position[is_liked])
        disliked_at = (owner[~is_liked], position[~is_liked] - liked_n[owner[~is_liked]])
        liked_topics, liked_marks = (np.zeros((count, most_liked), dtype=np.float32) for _ in range(2))
        disliked_topics, disliked_marks = (np.zeros((count, most_disliked), dtype=np.float32) for _ in range(2))
        liked_topics[liked_at], liked_marks[liked_at] = by_topic[is_liked], by_mark[is_liked]
        disliked_topics[disliked_at], disliked_marks[disliked_at] = by_topic[~is_liked], by_mark[~is_liked]
        # A single liked paper has no other one to be near: its marks tell nothing yet.
        trusted = liked_real & (liked_n > 1)[:, None]
        return cls(
            owner, is_liked, by_topic, sizes, liked_n, disliked_n,
            liked_topics, liked_marks, liked_real, trusted, disliked_topics, disliked_marks, disliked_real,
        )  # fmt: skip

    def agreements(
        self, parts: Sequence[TopicPart], liked_today: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per reader, how well the topics and how well the marks tell their "more" papers from
        their "less" ones (AUCs); without "less" marks, from today's candidates (``parts``' and
        ``liked_today``'s ``rows``: each reader's closeness to the topics and to the liked)."""
        # Topics' and marks' AUCs in one call per kind of comparison (what is compared is only
        # ever the sign of a difference, exact in any precision).
        count = len(self.sizes)
        by_topics, by_marks = np.empty(count), np.empty(count)
        if len(against := np.flatnonzero(self.disliked_n > 0)):
            both = _agreement(
                np.concatenate([self.liked_topics[against], self.liked_marks[against]]),
                np.concatenate([self.liked_real[against], self.trusted[against]]),
                np.concatenate([self.disliked_topics[against], self.disliked_marks[against]]),
                np.tile(self.disliked_real[against], (2, 1)),
            )
            by_topics[against], by_marks[against] = both[: len(against)], both[len(against) :]
        # Without "less" marks, the liked papers are compared with today's candidates instead.
        if len(alone := np.flatnonzero(self.disliked_n == 0)):
            candidates_topic = np.stack([parts[j].closeness for j in alone.tolist()])
            both = _agreement(
                np.concatenate([self.liked_topics[alone], self.liked_marks[alone]]),
                np.concatenate([self.liked_real[alone], self.trusted[alone]]),
                np.concatenate([candidates_topic, liked_today[rows[alone]]]),
                None,
            )
            by_topics[alone], by_marks[alone] = both[: len(alone)], both[len(alone) :]
        return by_topics, by_marks

    def lead(self, by_topics: np.ndarray, by_marks: np.ndarray) -> np.ndarray:
        """The largest of the three measures of docs/ranking.md, per reader."""
        given = self.sizes.astype(np.float64)
        ranked = given / (given + MARK_PRIOR) * np.clip((by_marks - by_topics) / LEAD_MARGIN, 0.0, 1.0)
        # Liked papers the topics call unrelated (no nearer to them than DENSE_FLOOR) say so
        # plainly, however the "less" marks fall: their share, as far as there are liked papers.
        unrelated = self.is_liked & (self.by_topic <= DENSE_FLOOR)
        outside = np.bincount(self.owner, weights=unrelated, minlength=len(given)) / self.liked_n
        liked_given = self.liked_n.astype(np.float64)
        # "Less" papers the topics put above every liked one: the topics prefer what the reader
        # rejects, which a reader with one or two "More" marks shows no other way.
        best_liked = np.where(self.liked_real, self.liked_topics, _BELOW).max(axis=1)
        above = (self.disliked_topics > best_liked[:, None]) & self.disliked_real
        preferred = above.sum(axis=1) / np.maximum(self.disliked_n, 1)
        rejected = given / (given + MARK_PRIOR) * preferred
        lead: np.ndarray = np.maximum(np.maximum(ranked, liked_given / (liked_given + MARK_PRIOR) * outside), rejected)
        return lead
