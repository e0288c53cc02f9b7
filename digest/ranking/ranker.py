"""Which papers a digest holds, in which order, and why.

How papers are ranked
=====================

**Trending score.** Every edition (a day, or the seven days of a weekly edition) orders its
candidate papers once, by a Hacker-News-style gravity score::

    points   = w_upvotes * upvotes + w_comments * comments + w_stars * ln(1 + github_stars) + 1
    age      = hours from when the paper reached Daily Papers (``submittedOnDailyAt``; midnight
               UTC of its day when missing) to the end of the edition's last day (UTC), at least 0
    trending = points / (age + age_offset_hours) ** gravity

Stars are log-scaled so a famous repository does not drown the community's votes; ``+ 1`` lets
a paper without votes still be ordered by age. Settings: ``DIGEST_WEIGHT_UPVOTES`` (1.0),
``DIGEST_WEIGHT_COMMENTS`` (2.0), ``DIGEST_WEIGHT_STARS`` (3.0), ``DIGEST_GRAVITY`` (1.5),
``DIGEST_AGE_OFFSET_HOURS`` (2.0). In a weekly edition older papers therefore need more votes
to stay on top. Ties are broken by arXiv id.

**Topics and relevance.** A subscriber's topics ("diffusion, reinforcement learning, LLM
agents") are split at commas. Title, abstract, AI summary and AI keywords of each candidate are
tokenised (lower case, words split at punctuation and hyphens, English stop words dropped,
Snowball English stemming, plural "s" of acronyms dropped: "LLMs" = "LLM"), and indexed once
per edition with BM25 (library ``bm25s``, Lucene variant, k1 = 1.5, b = 0.75).

A topic *matches* a paper when all its words occur in the paper close together (within the
number of the topic's words + 3 tokens of each other, stop words not counted), so "LLM agents"
matches "LLM-based agents" and "LLMs have empowered AI research agents", "reinforcement
learning" matches "reinforcement-learning", but a paper that says "learning" in one sentence
and "reinforcement" in another does not.
Common abbreviations of the field work both ways (``ABBREVIATIONS``): "RL" also matches
"reinforcement learning", "large language model agents" also matches "LLM agents"; a topic
matches when any of its spellings does, and scores as its best-matching spelling. Other
synonyms are not expanded.

**Meaning and what readers teach it.** Candidates carry sentence vectors (``digest.papers.embedding``,
stored at collection), topics too (stored once per topic), and a ``Reader`` brings the vectors of
the papers its reader marked "more" or "less" (``digest.subscribers.feedback``)::

    lexical(p) = sum over the topics that match p of BM25(topic, p) / its maximum
    scaled(c)  = clip((c - DENSE_FLOOR) / (DENSE_CEILING - DENSE_FLOOR), 0, 1)
    topic(p)   = scaled(max over topics t of cos(p, t))                       (0 without topics)
    like(p)    = scaled(max over liked papers l of cos(p, l) - LIKE_DISCOUNT)
    share      = liked / (liked + TOPIC_MARKS * topics)                      (1 without topics)
    dense(p)   = topic(p) + max(topic(p), share) * max(like(p) - topic(p), 0)
                 - DISLIKE_WEIGHT * clip((cos(p, nearest disliked) - DISLIKE_NEAR) / (1 - DISLIKE_NEAR), 0, 1)
                   (the last term only when no liked paper is at least as near)
    score(p)   = w * (lexical_share * lexical + (1 - lexical_share) * dense)
                 + (1 - w) * trending(p) / max trending
                 + match_bonus if a topic matches p word for word, + FOLLOW_BONUS if by a followed
                 author or organisation

(``w``: ``DIGEST_RELEVANCE_WEIGHT``, 0.7, or the reader's choice). Without vectors (no model) the
dense part is left out, which is the lexical ranking this module had before. Each pick carries
its reasons: the topics it matched ("Matches: ..."), and "About: <topic>", "Like: <title>",
"From: <organisation>". Subscribers without topics who taught nothing get the trending order.

Marks are examples, topics are statements: a reader without topics is ranked by their marks
alone, while for one with topics a liked paper's neighbours gain the marks' share of the
reader's evidence (a topic counting as ``TOPIC_MARKS`` liked papers), or more when they are
about the topics too, so marks reorder freely within the topics and reach outside them as far
as there are many; "less like this" only pushes down close neighbours of a disliked paper.

**Excluded words** remove a paper outright when one of them matches it the same way as a topic,
or occurs as a word (or the start of a word) in its title, abstract, AI summary or keywords.

**No repeats.** A subscriber never gets a paper they got (or are being sent) in the last 15
days, across daily and weekly editions; the digest takes the next papers instead.

Two stages keep a million-subscriber run cheap: the trending order is computed once per edition
(``digest_items``), and ``Ranker`` scores each distinct profile (topics + excluded words, or a
reader's own) once, caching per topic and per profile, so subscribers who share a profile only
pay for skipping the papers they already received. A reader who taught it reuses their topic
profile's part; the vectors of a whole page of such readers are compared with the edition's in
one matrix product (``Ranker.learn``), and every pick's reasons are only worked out for the
papers picked.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import NamedTuple

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN
from threadpoolctl import ThreadpoolController

from digest.core.models import Paper
from digest.core.text import parse_terms

# bm25s sets its own logger to DEBUG on import, which prints index building on every run.
logging.getLogger("bm25s").setLevel(logging.WARNING)


@dataclass(frozen=True)
class TrendingWeights:
    upvotes: float = 1.0
    comments: float = 2.0
    stars: float = 3.0
    gravity: float = 1.5
    age_offset_hours: float = 2.0


def trending_score(paper: Paper, as_of: dt.datetime, weights: TrendingWeights) -> float:
    """Hacker-News-style gravity: community points divided by a power of age (see module doc)."""
    points = (
        weights.upvotes * paper.upvotes
        + weights.comments * paper.num_comments
        + weights.stars * math.log1p(paper.github_stars or 0)
        + 1.0
    )
    reached = paper.submitted_at or dt.datetime.combine(paper.daily_date, dt.time(), dt.UTC)
    age_hours = max(0.0, (as_of - reached).total_seconds() / 3600.0)
    return float(points / (age_hours + weights.age_offset_hours) ** weights.gravity)


def trending_order(papers: Iterable[Paper], as_of: dt.datetime, weights: TrendingWeights) -> list[tuple[Paper, float]]:
    scored = [(p, trending_score(p, as_of, weights)) for p in papers]
    # Ties broken by id so the order is stable across runs and databases.
    scored.sort(key=lambda ps: (-ps[1], ps[0].id))
    return scored


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


def _teaches(profile: Profile) -> bool:
    return profile.reader is not None and profile.reader.teaches


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
        return cls(tuple(sorted(parse_terms(topics))), tuple(sorted(parse_terms(excluded))), taught)


@dataclass(frozen=True)
class Candidate:
    paper_id: str
    trending: float
    text: str  # title, abstract, AI summary and AI keywords, lower-cased
    # Author and organisation names, lower-cased, for followed authors and labs.
    names: tuple[str, ...] = ()
    organization: str | None = None


class Pick(NamedTuple):
    """A paper in a digest and why it is there. The same paper with the same reasons is one
    object for every profile of an edition (``Ranker._picks``): a ranker keeps hundreds of
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


def candidate_text(paper: Paper) -> str:
    """Everything of a paper a topic can match and an email can show (the summary shown is
    the AI summary when there is one, so excluded words are checked there too)."""
    parts = [paper.title, paper.abstract, paper.ai_summary or "", " ".join(paper.ai_keywords or [])]
    return " ".join(p for p in parts if p).lower()


def candidate_of(paper: Paper, trending: float) -> Candidate:
    return Candidate(
        paper.id,
        trending,
        candidate_text(paper),
        tuple(name.lower() for name in paper.authors or []),
        paper.organization,
    )


# ---------------------------------------------------------------------------------------------
# Text analysis shared by papers and topics, so both sides reduce words the same way

_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset(STOPWORDS_EN)
_STEMMER = Stemmer.Stemmer("english")


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    stem: str = _STEMMER.stemWord(word)
    # Snowball leaves acronym plurals alone ("llms"); fold them so "LLMs" matches "LLM".
    if stem == word and len(stem) >= 4 and stem.endswith("s") and not stem.endswith(("ss", "us", "is")):
        stem = stem[:-1]
    return stem


def analyse(text: str) -> list[str]:
    """Lower-case, split at non-word characters (hyphens too), drop stop words, stem."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


# Abbreviations common in AI papers, expanded in both directions when matching a topic or an
# excluded word. Only unambiguous ones in this field whose long form survives stop-word removal
# and unordered matching ("TTS" is also test-time scaling, and "text to speech" would match
# "speech-to-text"): a wrong expansion shows someone papers they did not ask for.
ABBREVIATIONS: dict[str, str] = {
    "3dgs": "3d gaussian splatting",
    "asr": "automatic speech recognition",
    "cot": "chain of thought",
    "dpo": "direct preference optimization",
    "gan": "generative adversarial network",
    "gnn": "graph neural network",
    "grpo": "group relative policy optimization",
    "kd": "knowledge distillation",
    "llm": "large language model",
    "lm": "language model",
    "lora": "low rank adaptation",
    "mllm": "multimodal large language model",
    "moe": "mixture of experts",
    "nerf": "neural radiance field",
    "nlp": "natural language processing",
    "ocr": "optical character recognition",
    "ppo": "proximal policy optimization",
    "rag": "retrieval augmented generation",
    "rl": "reinforcement learning",
    "rlhf": "reinforcement learning from human feedback",
    "sft": "supervised fine tuning",
    "ssm": "state space model",
    "vae": "variational autoencoder",
    "vit": "vision transformer",
    "vla": "vision language action",
    "vlm": "vision language model",
    "vqa": "visual question answering",
}


@lru_cache(maxsize=1)
def _abbreviations() -> tuple[dict[str, tuple[str, ...]], list[tuple[tuple[str, ...], str]]]:
    """Both directions in analysed form: short token -> long tokens, and (long tokens, short)
    pairs longest first, so "reinforcement learning from human feedback" becomes "rlhf", not
    "rl human feedback"."""
    expand: dict[str, tuple[str, ...]] = {}
    for short, long in ABBREVIATIONS.items():
        (token,) = analyse(short)
        expand[token] = tuple(analyse(long))
    contract = sorted(((long, short) for short, long in expand.items()), key=lambda pair: -len(pair[0]))
    return expand, contract


def spellings(words: Sequence[str]) -> list[tuple[str, ...]]:
    """An analysed topic as written, with its abbreviations spelled out, contracted, and each
    abbreviation contracted on its own ("MLLM" is also "multimodal LLM")."""
    expand, contract = _abbreviations()
    written = tuple(words)
    expanded = tuple(w for word in written for w in expand.get(word, (word,)))
    found: list[tuple[str, ...]] = []
    contracted: list[str] = []
    i = 0
    while i < len(expanded):
        for long, short in contract:
            if expanded[i : i + len(long)] == long:
                contracted.append(short)
                i += len(long)
                break
        else:
            contracted.append(expanded[i])
            i += 1
    for start in range(len(expanded)):
        for long, short in contract:
            if expanded[start : start + len(long)] == long:
                found.append((*expanded[:start], short, *expanded[start + len(long) :]))
    return list(dict.fromkeys([written, expanded, tuple(contracted), *found]))


@dataclass(frozen=True)
class _Term:
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


# Bound on cached profiles per ranker: a whole in-process run shares one ranker.
PROFILE_CACHE_SIZE = 20_000
LEARN_AT_ONCE = 1_000  # readers ranked together (bounds the arrays: readers x candidates)
SHARED_PICKS = 200_000  # distinct (paper, reasons) picks kept for sharing per ranker
BASE_CACHE_SIZE = 2_000  # topic profiles of readers who taught it


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


@dataclass(frozen=True)
class _Marks:
    """Readers' marked papers against the edition's candidates, one row per reader."""

    liked: np.ndarray  # cosine of each candidate with the reader's nearest liked paper
    nearest: np.ndarray  # which of the reader's liked papers that is
    disliked: np.ndarray  # cosine with the nearest disliked paper
    liking: np.ndarray  # per reader (a column): has liked papers to compare with
    disliking: np.ndarray  # per reader: has disliked papers

    @classmethod
    def of(cls, readers: Sequence[Reader], vectors: np.ndarray | None, candidates: int) -> _Marks:
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
        # Each reader's liked and disliked papers as the rows of one array per side, padded with
        # a cosine below any real one, so the nearest of each is one max (and argmax) for all.
        padded = np.full(
            (2, count, max(1, liked_counts.max(initial=0), disliked_counts.max(initial=0)), candidates),
            _BELOW,
            dtype=np.float32,
        )
        if vectors is not None and sizes.any():
            stacked = np.vstack([matrix for matrix in rows if len(matrix)])
            with _blas().limit(limits=1, user_api="blas"):
                sims = stacked @ vectors.T
            owner = np.repeat(np.arange(count), sizes)
            position = np.arange(len(stacked)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            first_disliked = np.repeat(liked_counts, sizes)
            side = position >= first_disliked
            padded[side.astype(np.intp), owner, np.where(side, position - first_disliked, position)] = sims
        nearest = padded[0].argmax(axis=1)
        closest = padded.max(axis=2)
        return cls(closest[0], nearest, closest[1], (liked_counts > 0)[:, None], (disliked_counts > 0)[:, None])


_BELOW = -2.0  # below every cosine: "no paper here"
_NO_ROWS = np.zeros((0, 0), dtype=np.float32)


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


def _mark_lead(readers: Sequence[Reader], bases: Sequence[_Base], marks: _Marks) -> np.ndarray:
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
    todo = [k for k, r in enumerate(readers) if r.liked_count and bases[k].senses]
    if not todo:
        return lead
    chosen = [readers[k] for k in todo]
    count = len(todo)
    parts = [r.rows for r in chosen if r.rows is not None]  # all of them: they liked papers
    sizes = np.array([len(rows) for rows in parts])
    liked_n = np.array([r.liked_count for r in chosen])
    senses = [bases[k].senses for k in todo]
    topic_n = np.array([len(some) for some in senses])
    most_topics, most_liked = topic_n.max(), liked_n.max()
    # Per reader, their topics' vectors, then their liked papers', then their disliked ones',
    # padded: one batched product gives every marked paper's cosine with each topic and each
    # liked paper of the same reader (a product with the page's distinct topics instead costs
    # more: most of those pairs are other readers').
    owner = np.repeat(np.arange(count), sizes)
    position = np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    is_liked = position < liked_n[owner]
    topic_owner = np.repeat(np.arange(count), topic_n)
    width = most_topics + sizes.max()
    padded = np.zeros((count, width, parts[0].shape[1]), dtype=np.float32)
    # Filled through a flat view: one index per row costs less than a pair.
    flat = padded.reshape(count * width, -1)
    topic_position = np.arange(len(topic_owner)) - np.repeat(np.cumsum(topic_n) - topic_n, topic_n)
    flat[topic_owner * width + topic_position] = [sense.vector for some in senses for sense in some]
    flat[owner * width + most_topics + position] = np.concatenate(parts)
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
    # Per reader, liked papers' scores in one array and disliked ones' in another.
    liked_real = liked_column < liked_n[:, None]
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
    # Topics' and marks' AUCs in one call per kind of comparison (what is compared is only
    # ever the sign of a difference, exact in any precision).
    by_topics, by_marks = np.empty(count), np.empty(count)
    if len(against := np.flatnonzero(disliked_n > 0)):
        both = _agreement(
            np.concatenate([liked_topics[against], liked_marks[against]]),
            np.concatenate([liked_real[against], trusted[against]]),
            np.concatenate([disliked_topics[against], disliked_marks[against]]),
            np.tile(disliked_real[against], (2, 1)),
        )
        by_topics[against], by_marks[against] = both[: len(against)], both[len(against) :]
    # Without "less" marks, the liked papers are compared with today's candidates instead.
    if len(alone := np.flatnonzero(disliked_n == 0)):
        candidates_topic = np.stack([bases[todo[j]].closeness for j in alone.tolist()])
        both = _agreement(
            np.concatenate([liked_topics[alone], liked_marks[alone]]),
            np.concatenate([liked_real[alone], trusted[alone]]),
            np.concatenate([candidates_topic, marks.liked[np.array(todo)[alone]]]),
            None,
        )
        by_topics[alone], by_marks[alone] = both[: len(alone)], both[len(alone) :]
    given = sizes.astype(np.float64)
    ranked = given / (given + MARK_PRIOR) * np.clip((by_marks - by_topics) / LEAD_MARGIN, 0.0, 1.0)
    # Liked papers the topics call unrelated (no nearer to them than DENSE_FLOOR) say so plainly,
    # however the "less" marks fall: their share, as far as there are liked papers to trust.
    outside = np.bincount(owner, weights=is_liked & (by_topic <= DENSE_FLOOR), minlength=count) / liked_n
    liked_given = liked_n.astype(np.float64)
    # "Less" papers the topics put above every liked one: the topics prefer what the reader
    # rejects, which a reader with one or two "More" marks shows no other way.
    best_liked = np.where(liked_real, liked_topics, _BELOW).max(axis=1)
    preferred = ((disliked_topics > best_liked[:, None]) & disliked_real).sum(axis=1) / np.maximum(disliked_n, 1)
    rejected = given / (given + MARK_PRIOR) * preferred
    lead[todo, 0] = np.maximum(np.maximum(ranked, liked_given / (liked_given + MARK_PRIOR) * outside), rejected)
    return lead


class _Sense(NamedTuple):
    """One topic against an edition's candidates."""

    named: tuple[str, list[float]]  # the topic and each candidate's cosine (a list, for reasons)
    scaled: np.ndarray  # the cosines scaled to 0..1
    cosine: np.ndarray
    vector: np.ndarray  # the topic's unit vector


@dataclass(frozen=True)
class _Likes:
    """Per candidate: its cosine with the nearest liked paper, which one, and their titles (as
    Python lists: a pick's reasons look up single elements, which numpy makes slow)."""

    cosine: list[float]
    nearest: list[int]
    titles: tuple[str, ...]


def _scaled(cosine: np.ndarray) -> np.ndarray:
    """Cosine to 0..1: unrelated at DENSE_FLOOR or below, fully about it at DENSE_CEILING."""
    return np.clip((cosine - DENSE_FLOOR) * _SCALE, 0.0, 1.0)


@dataclass(frozen=True)
class _Explain:
    """What a profile's picks say, worked out only for the papers picked: the topics (with
    the ranker's cached per-topic arrays) and, for a taught reader, likes and follows."""

    terms: tuple[tuple[str, frozenset[int]], ...] = ()  # topic, the candidates it matches word for word
    senses: tuple[tuple[str, list[float]], ...] = ()  # topic, cosine per candidate
    likes: _Likes | None = None
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
        if self.likes is not None and self.likes.cosine[i] >= LIKE_REASON:
            why = (f"Like: {self.likes.titles[self.likes.nearest[i]]}",)
        elif not matches and self.senses:
            topic, closest = "", -2.0  # the first of the closest topics, without a lambda per pick
            for sense, cosine in self.senses:
                if cosine[i] > closest:
                    topic, closest = sense, cosine[i]
            if closest >= TOPIC_REASON:
                why = (f"About: {topic}",)
        source = self.follows.get(i)
        return matches, why if source is None else (f"From: {source}", *why)


@dataclass(frozen=True)
class _Base:
    """A topic profile's part of a ranking: shared by everyone with those topics and excluded
    words, taught or not."""

    allowed: np.ndarray  # not excluded
    every: bool  # nothing is excluded
    lexical: np.ndarray  # BM25 over the matching topics, relative to the best allowed match
    trend: np.ndarray  # trending relative to the best allowed paper
    start: np.ndarray  # trend + match bonus: the score before relevance
    dense: np.ndarray | None  # the topics' similarity, scaled (None: no topic has a vector)
    explain: _Explain
    senses: tuple[_Sense, ...] = ()  # the topics that have a vector

    @cached_property
    def closeness(self) -> np.ndarray:
        """Each candidate's cosine with the nearest topic: only a taught reader's marks are
        weighed against it (``_mark_lead``), on a cached base, so it is made on first use."""
        return np.asarray(np.maximum.reduce([sense.cosine for sense in self.senses]))


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
    _cache: dict[Profile, _Order] = field(default_factory=dict)
    _base_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], _Base] = field(default_factory=dict, repr=False)
    _learnt: dict[Profile, _Order] = field(default_factory=dict, repr=False)  # the page's readers
    _picks: dict[tuple[int, tuple[str, ...], tuple[str, ...]], Pick] = field(default_factory=dict, repr=False)
    _trend_shares: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, repr=False)
    _dense: dict[str, _Sense | None] = field(default_factory=dict, repr=False)
    _by_name: dict[str, list[tuple[int, str]]] | None = field(default=None, repr=False)
    _terms: dict[str, _Term] = field(default_factory=dict, repr=False)
    _excluded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _index: bm25s.BM25 | None = field(default=None, repr=False)
    _positions: list[dict[str, list[int]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        ids = [c.paper_id for c in self.candidates]
        self._id_rank = np.argsort(np.argsort(np.array(ids)))  # ties are broken by arXiv id
        values = np.array([c.trending for c in self.candidates], dtype=np.float64)
        self._trend_values = values
        self._ids = [c.paper_id for c in self.candidates]
        self._arange = np.arange(len(self.candidates))
        self._everything = np.ones(len(self.candidates), dtype=bool)
        self._nothing = np.zeros(len(self.candidates), dtype=bool)
        self._zeros = np.zeros(len(self.candidates))
        if self.vectors is not None:
            self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)

    def _ordered(self, profile: Profile) -> _Order:
        if _teaches(profile):
            # A reader's own order is asked for once per edition: kept for the page only, so it
            # dies young (long-lived objects make the garbage collector's full passes longer).
            return self._learnt.get(profile) or self._rank(profile)
        cached = self._cache.get(profile)
        if cached is None:
            if len(self._cache) >= PROFILE_CACHE_SIZE:
                del self._cache[next(iter(self._cache))]  # oldest first; dicts keep insertion order
            cached = self._cache[profile] = self._rank(profile)
        return cached

    def learn(self, profiles: Iterable[Profile]) -> None:
        """Rank a page's readers who taught it all at once, before their picks: their orders
        are kept until the next page. Readers not learnt are ranked one by one, the same way."""
        self._learnt.clear()
        todo = [p for p in dict.fromkeys(profiles) if _teaches(p)]
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

    def _build_index(self) -> bm25s.BM25:
        if self._index is None:
            docs = [analyse(c.text) for c in self.candidates]
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

    def _term(self, term: str) -> _Term:
        known = self._terms.get(term)
        if known is not None:
            return known
        index = self._build_index()
        n = len(self.candidates)
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
        known = self._terms[term] = _Term(matches, best, (term, frozenset(np.flatnonzero(matches).tolist())))
        return known

    def _matching(self, words: list[str]) -> np.ndarray:
        """Candidates holding all ``words`` close together (see the module doc)."""
        matches = np.zeros(len(self.candidates), dtype=bool)
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
            raw = [word in c.text and pattern.search(c.text) is not None for c in self.candidates]
            known = self._excluded[word] = self._term(word).matches | np.array(raw, dtype=bool)
        return known

    def _excluded_mask(self, excluded: tuple[str, ...]) -> np.ndarray:
        mask = np.zeros(len(self.candidates), dtype=bool)
        for word in excluded:
            mask |= self._excluding(word)
        return mask

    def _topic_similarity(self, topic: str) -> _Sense | None:
        """The topic with each candidate's cosine with its vector (a list, for reasons), the
        same scaled to 0..1, and the topic's vector, once per topic and edition."""
        if topic in self._dense:
            return self._dense[topic]
        found = None
        if self.vectors is not None and self.topic_vector is not None:
            vector = self.topic_vector(topic)
            if vector is not None:
                cosine = self.vectors @ vector
                found = _Sense((topic, cosine.tolist()), _scaled(cosine), cosine, vector)
        self._dense[topic] = found
        return found

    def _base(self, topics: tuple[str, ...], excluded: tuple[str, ...]) -> _Base:
        """What a topic profile contributes, the same for everyone who has it."""
        allowed = ~self._excluded_mask(excluded) if excluded else self._everything
        trend = self._trend_share(excluded, allowed)
        terms = [(topic, self._term(topic)) for topic in topics]
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
        senses = [sense for topic, _ in terms if (sense := self._topic_similarity(topic)) is not None]
        dense = None
        if senses:
            dense = senses[0].scaled if len(senses) == 1 else np.maximum.reduce([f.scaled for f in senses])
        start = trend + matched * self.match_bonus
        explain = _Explain(tuple([term.named for _, term in terms]), tuple([f.named for f in senses]))
        return _Base(allowed, not excluded, lexical, trend, start, dense, explain, tuple(senses))

    def _bases(self, topics: tuple[str, ...], excluded: tuple[str, ...]) -> _Base:
        """``_base`` cached for readers who taught it: many of them share popular topics."""
        key = (topics, excluded)
        found = self._base_cache.get(key)
        if found is None:
            if len(self._base_cache) >= BASE_CACHE_SIZE:
                del self._base_cache[next(iter(self._base_cache))]
            found = self._base_cache[key] = self._base(topics, excluded)
        return found

    def _rank(self, profile: Profile) -> _Order:
        # Runs once per distinct profile (tens of thousands per edition): few numpy calls on
        # whole arrays, Python loops only over the candidates that carry a reason.
        if not _teaches(profile):
            base = self._base(profile.topics, profile.excluded)
            if not profile.topics:
                return _Order(np.flatnonzero(base.allowed), self._ids, base.explain, self._picks)
            if base.dense is None:
                relevance = base.lexical
            else:
                relevance = self.lexical_share * base.lexical + (1 - self.lexical_share) * base.dense
            # Papers that match a topic word for word come first (the reader asked for exactly that).
            score = base.start + self.relevance_weight * (relevance - base.trend)
            return self._finish(base, score, base.explain)
        return self._taught([profile])[0]

    def _taught(self, profiles: Sequence[Profile]) -> list[_Order]:
        """Readers' own rankings: their topics' part (shared) and what their marks add.

        One row per reader in each array, so a page of readers costs a few numpy calls in all:
        one product of their vectors with the edition's, then the blend; the "Like: <title>"
        reasons are only worked out for the papers picked (``_Order.at``).
        """
        readers = [p.reader for p in profiles if p.reader is not None]
        assert len(readers) == len(profiles), "only readers who taught it have orders of their own"
        bases = [self._bases(p.topics, p.excluded) for p in profiles]
        marks = _Marks.of(readers, self.vectors, len(self.candidates))
        topic = np.stack([self._zeros if b.dense is None else b.dense for b in bases])
        has_topic = np.array([b.dense is not None for b in bases])[:, None]
        liked_count = np.array([r.liked_count for r in readers])
        # Marks are examples, topics are statements. A paper nearer to a liked one than to the
        # topics gains part of that lead: all of it for a reader without topics, otherwise the
        # marks' share of the reader's evidence (a topic counts as TOPIC_MARKS marks) or, when
        # more, how closely the paper is about the topics. So marks reorder freely within the
        # reader's topics, and reach outside them only as far as there are many of them
        # (measured: bench/relevance.py).
        scaled = np.clip(marks.liked * _SCALE - (LIKE_DISCOUNT + DENSE_FLOOR) * _SCALE, 0.0, 1.0)
        senses = np.array([len(b.explain.senses) for b in bases])
        share = (liked_count / np.maximum(liked_count + TOPIC_MARKS * senses, 1))[:, None]
        dense = np.where(marks.liking, topic + np.maximum(topic, share) * np.maximum(scaled - topic, 0.0), topic)
        # "Less like this" pushes down close neighbours of the disliked papers only (a paper
        # merely nearer to them than to the topics may still be what was asked for), unless a
        # liked paper is at least as close.
        slope = DISLIKE_WEIGHT / (1 - DISLIKE_NEAR)
        penalty = np.clip(marks.disliked * slope - DISLIKE_NEAR * slope, 0.0, DISLIKE_WEIGHT)
        dense -= penalty * (~marks.liking | (marks.disliked > marks.liked))
        # Without anything to compare by meaning, relevance is BM25 alone.
        lexical_share = np.where(has_topic | marks.liking | marks.disliking, self.lexical_share, 1.0)
        weight = np.array(
            [[self.relevance_weight if r.personal_weight is None else r.personal_weight] for r in readers]
        )
        start, lexical, trend = (np.stack([getattr(b, part) for b in bases]) for part in ("start", "lexical", "trend"))
        score = start + weight * (lexical_share * lexical - trend + (1 - self.lexical_share) * dense)
        # Where the marks explain what the reader marked better than the topics do, the order
        # moves toward the one their marks alone give (a reader without topics), topics' word
        # matches included, as far as they lead (``_mark_lead``).
        lead = _mark_lead(readers, bases, marks)
        # Only the readers it moves (most taught readers' topics explain their marks).
        if len(moved := np.flatnonzero(lead[:, 0])):
            led = lead[moved]
            alone = np.where(marks.liking[moved], scaled[moved], 0.0) - penalty[moved]
            cold = trend[moved] + weight[moved] * ((1 - self.lexical_share) * alone - trend[moved])
            # The word-for-word bonus would keep the topics' papers on top of any blend: it fades
            # twice as fast, gone once the marks lead by half.
            bonus = start[moved] - trend[moved]
            score[moved] = (1 - led) * (score[moved] - bonus) + led * cold + np.clip(1 - 2 * led, 0.0, 1.0) * bonus
        follows = [self._followed(r.follows) if r.follows else {} for r in readers]
        for k, found in enumerate(follows):
            if found:
                score[k, list(found)] += FOLLOW_BONUS  # followed authors and organisations first
        # Best first, ties by arXiv id, the excluded at the end (cut off): one sort for all.
        allowed = np.stack([b.allowed for b in bases])
        ordered = np.lexsort((np.broadcast_to(self._id_rank, score.shape), np.where(allowed, -score, np.inf)))
        kept = allowed.sum(axis=1).tolist()
        liking = marks.liking[:, 0].tolist()
        cosines, nearest = marks.liked.tolist(), marks.nearest.tolist()
        orders = []
        for k, (base, reader) in enumerate(zip(bases, readers, strict=True)):
            likes = _Likes(cosines[k], nearest[k], reader.liked_titles) if liking[k] else None
            explain = _Explain(base.explain.terms, base.explain.senses, likes, follows[k])
            orders.append(_Order(ordered[k, : kept[k]], self._ids, explain, self._picks))
        return orders

    def _finish(self, base: _Base, score: np.ndarray, explain: _Explain) -> _Order:
        if base.every:
            ordered = np.lexsort((self._id_rank, -score))
        else:
            indices = np.flatnonzero(base.allowed)
            ordered = indices[np.lexsort((self._id_rank[indices], -score[indices]))]
        return _Order(ordered, self._ids, explain, self._picks)

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


# The blend's constants, tuned on bench/relevance.py (see the README's ranking section).
DENSE_FLOOR = 0.15  # cosine at or below which a paper is unrelated (MiniLM: ~0.0-0.15)
DENSE_CEILING = 0.45  # cosine that counts as fully about it
DISLIKE_WEIGHT = 0.5
DISLIKE_NEAR = 0.4  # cosine with a disliked paper from which a paper is pushed down
LIKE_DISCOUNT = 0.1
TOPIC_MARKS = 8  # a topic the reader wrote counts as much as this many liked papers
MARK_PRIOR = 1  # marks at which their lead is half what they show (three: three quarters)
LEAD_MARGIN = 0.3  # how much better (in AUC) the marks explain the marks to lead fully
FOLLOW_BONUS = 3.0  # followed authors and organisations are always included, first
LIKE_REASON = 0.45  # cosine with a liked paper from which "Like: <title>" is shown
TOPIC_REASON = 0.30  # cosine with a topic from which "About: <topic>" is shown
_SCALE = 1 / (DENSE_CEILING - DENSE_FLOOR)


@dataclass
class _Order:
    """One profile's ranking: candidate indices best first, and what each pick says."""

    indices: np.ndarray
    ids: list[str]  # paper id per candidate index (the ranker's, shared)
    explain: _Explain
    shared: dict[tuple[int, tuple[str, ...], tuple[str, ...]], Pick]  # the ranker's picks
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
