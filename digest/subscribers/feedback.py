"""What readers teach their digest: More like this / Less like this, example papers, follows.

A mark is one row per (reader, paper): +1 "more like this", -1 "less like this"; the last mark
on a paper wins and marks never expire. Example papers from the preferences page are marks
too (+1, source ``example``). Whenever a reader changes any of it, their ``ReaderProfile`` is
rebuilt: the vectors of the papers they liked and disliked (the most recent ``MAX_ROWS`` of
each, plus the mean of all of them, so every mark keeps counting however old), the titles shown
as "Like: <title>", the authors and organisations they follow and how personal they want the
digest. The dispatcher only reads that one row per reader (``readers``), never the marks.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from digest.core.db import among
from digest.core.errors import DigestError
from digest.core.models import MarkSource, Paper, PaperMark, ReaderProfile
from digest.core.text import has_unsafe
from digest.papers.embedding import Embedder, from_blob, normalise, paper_vectors, to_blob
from digest.ranking.profile import Reader

MORE, LESS = 1, -1
MAX_ROWS = 16  # individual liked (and disliked) vectors kept per reader (each costs ranking time)
MAX_FOLLOWS = 30
MAX_EXAMPLES = 20  # example papers per form
# How personal against how trending: the relevance weight of the blend (None = the default).
PERSONAL_CHOICES: dict[str, float | None] = {"personal": 0.9, "balanced": None, "trending": 0.35}

# Work per form is linear and bounded (issue 18: one crafted paste once froze the app for
# seconds): the text is length-checked, split on a linear pattern at most MAX_PIECES times, and a
# piece longer than any paper reference is reported without matching. The patterns themselves
# have bounded repetitions only: an old-style archive name ("cond-mat", "solv-int") is under 16
# letters, so a search costs at most that much per position of a short piece.
MAX_EXAMPLES_CHARS = 4000  # 20 paper URLs of up to 200 characters
MAX_PIECES = 100  # whitespace- or comma-separated pieces per form
MAX_PIECE_CHARS = 200  # a paper URL with its query string fits; a longer piece names no paper
MAX_FOLLOWS_CHARS = 8000  # 30 names of up to 200 characters and their separators
_NEW_ID = re.compile(r"(?<![\d.])(\d{4}\.\d{4,5})(?:v\d{1,3})?(?!\d)")
_OLD_ID = re.compile(r"(?<!\w)([a-z][a-z\-]{0,15}(?:\.[A-Z]{2})?/\d{7})(?:v\d{1,3})?")
_SPLIT = re.compile(r"[\s,;]+")
_FOLLOWS_SPLIT = re.compile(r"[,;\n]+")


def _refuse_unsafe(text: str, what: str) -> None:
    if has_unsafe(text):
        raise DigestError(f"{what} cannot contain control characters; please remove them.")


def parse_paper_refs(text: str) -> tuple[list[str], list[str]]:
    """arXiv ids in anything a reader pastes: ``2604.12345``, ``arXiv:2604.12345v2``,
    ``https://huggingface.co/papers/2604.12345``, ``https://arxiv.org/pdf/2604.12345.pdf``.
    Returns (ids, pieces that name no paper); ``DigestError`` for text too long or with more
    than ``MAX_EXAMPLES`` papers (refused whole, so nothing is dropped unsaid) or control
    characters."""
    text = text or ""
    if len(text) > MAX_EXAMPLES_CHARS:
        raise DigestError(f"Example papers are limited to {MAX_EXAMPLES_CHARS} characters.")
    _refuse_unsafe(text, "Example papers")
    # One split more than allowed: a leading separator's empty piece must not hide one too many.
    pieces = [piece for piece in _SPLIT.split(text, maxsplit=MAX_PIECES + 1) if piece]
    if len(pieces) > MAX_PIECES:
        raise DigestError(f"Give at most {MAX_EXAMPLES} example papers at a time.")
    ids: dict[str, None] = {}
    bad: list[str] = []
    for piece in pieces:
        found = None
        if len(piece) <= MAX_PIECE_CHARS:
            found = _NEW_ID.search(piece) or _OLD_ID.search(piece)
        if found:
            ids.setdefault(found.group(1), None)
        else:
            bad.append(piece[:80])
    if len(ids) > MAX_EXAMPLES:
        raise DigestError(f"Give at most {MAX_EXAMPLES} example papers at a time.")
    return list(ids), bad


def parse_follows(text: str) -> list[str]:
    """Authors and organisations, one per comma, semicolon or line; ``DigestError`` for text too
    long or with control characters."""
    text = text or ""
    if len(text) > MAX_FOLLOWS_CHARS:
        raise DigestError(f"Authors and organisations to follow are limited to {MAX_FOLLOWS_CHARS} characters.")
    _refuse_unsafe(text, "Authors and organisations to follow")
    names: dict[str, None] = {}
    for part in _FOLLOWS_SPLIT.split(text):
        name = " ".join(part.split())[:200]
        if name:
            names.setdefault(name, None)
    return list(names)[:MAX_FOLLOWS]


def _profile(session: Session, subscriber_id: int) -> ReaderProfile:
    profile = session.get(ReaderProfile, subscriber_id)
    if profile is None:
        profile = ReaderProfile(subscriber_id=subscriber_id, follows=[], liked_titles=[])
        session.add(profile)
    return profile


def record_mark(
    session: Session,
    subscriber_id: int,
    paper_id: str,
    signal: int,
    *,
    now: dt.datetime,
    embedder: Embedder,
    source: MarkSource = MarkSource.EMAIL,
) -> None:
    """The reader's mark on a paper; marking it again replaces the earlier one (idempotent)."""
    if signal not in (MORE, LESS):
        raise DigestError("A mark is more or less like this.")
    if session.get(Paper, paper_id) is None:
        raise DigestError("We do not know that paper.")
    mark = session.get(PaperMark, (subscriber_id, paper_id))
    if mark is not None and mark.signal == signal and mark.source == source:
        return  # the same mark again (a second click, a retried POST): nothing changes
    _upsert_marks(session, subscriber_id, [paper_id], signal, source, now)
    session.flush()
    refresh_profile(session, subscriber_id, now=now, embedder=embedder)


def _upsert_marks(
    session: Session, subscriber_id: int, paper_ids: Sequence[str], signal: int, source: MarkSource, now: dt.datetime
) -> None:
    """Insert or replace in one statement, so two clicks at once both succeed, the later winning."""
    if not paper_ids:
        return
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    common = {"subscriber_id": subscriber_id, "signal": signal, "source": source.value, "created_at": now}
    rows = [common | {"paper_id": pid, "updated_at": now} for pid in paper_ids]
    statement = insert(PaperMark).values(rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["subscriber_id", "paper_id"],
            set_={"signal": statement.excluded.signal, "source": statement.excluded.source, "updated_at": now},
        )
    )
    session.expire_all()


def remove_mark(session: Session, subscriber_id: int, paper_id: str, *, now: dt.datetime, embedder: Embedder) -> None:
    """Undo the reader's mark on ``paper_id`` (nothing to undo is not an error)."""
    _refuse_unsafe(paper_id, "A paper id")
    session.execute(delete(PaperMark).where(PaperMark.subscriber_id == subscriber_id, PaperMark.paper_id == paper_id))
    refresh_profile(session, subscriber_id, now=now, embedder=embedder)


def reset(session: Session, subscriber_id: int, *, now: dt.datetime) -> None:
    """Forget everything the reader taught: marks, examples, follows and the personal choice."""
    session.execute(delete(PaperMark).where(PaperMark.subscriber_id == subscriber_id))
    session.execute(delete(ReaderProfile).where(ReaderProfile.subscriber_id == subscriber_id))
    session.flush()


def add_examples(
    session: Session, subscriber_id: int, text: str, *, now: dt.datetime, embedder: Embedder
) -> tuple[list[str], list[str]]:
    """Example papers as "more like this" marks; returns (added ids, what was not understood
    or is not a paper we have collected)."""
    ids, bad = parse_paper_refs(text)
    known = set(session.scalars(select(Paper.id).where(Paper.id.in_(ids)))) if ids else set()
    added = [pid for pid in ids if pid in known]
    _upsert_marks(session, subscriber_id, added, MORE, MarkSource.EXAMPLE, now)
    session.flush()
    if added:
        refresh_profile(session, subscriber_id, now=now, embedder=embedder)
    return added, bad + [pid for pid in ids if pid not in known]


def set_choices(
    session: Session, subscriber_id: int, *, follows: str | None, personal: str | None, now: dt.datetime
) -> None:
    """Followed authors/organisations and how personal the digest is, from the preferences form."""
    profile = _profile(session, subscriber_id)
    if follows is not None:
        profile.follows = parse_follows(follows)
    if personal is not None:
        if personal not in PERSONAL_CHOICES:
            raise DigestError("Choose personal, balanced or trending.")
        profile.personal_weight = PERSONAL_CHOICES[personal]
    profile.updated_at = now
    session.flush()


def personal_choice(weight: float | None) -> str:
    for name, value in PERSONAL_CHOICES.items():
        if value == weight:
            return name
    return "balanced"


def refresh_profile(session: Session, subscriber_id: int, *, now: dt.datetime, embedder: Embedder) -> ReaderProfile:
    """Rebuild the vectors the dispatcher reads from the reader's marks."""
    rows = session.execute(
        select(PaperMark.signal, Paper)
        .join(Paper, Paper.id == PaperMark.paper_id)
        .where(PaperMark.subscriber_id == subscriber_id)
        .order_by(PaperMark.updated_at.desc(), PaperMark.paper_id)
    ).all()
    vectors = paper_vectors(session, [paper for _, paper in rows], embedder.name, lambda: embedder)
    profile = _profile(session, subscriber_id)
    liked = [(paper.title, vectors[paper.id]) for signal, paper in rows if signal > 0 and paper.id in vectors]
    disliked = [(paper.title, vectors[paper.id]) for signal, paper in rows if signal < 0 and paper.id in vectors]
    profile.model = embedder.name
    liked_rows, profile.liked_titles = _rows(liked)
    profile.liked = to_blob(liked_rows) if liked_rows is not None else None
    disliked_rows, _ = _rows(disliked)
    profile.disliked = to_blob(disliked_rows) if disliked_rows is not None else None
    profile.updated_at = now
    session.flush()
    return profile


def _rows(marked: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray | None, list[str]]:
    """The most recent ``MAX_ROWS`` vectors, plus, when there are more, the normalised mean of
    all (labelled with the marked paper nearest to it)."""
    if not marked:
        return None, []
    recent = marked[:MAX_ROWS]
    matrix = np.vstack([v for _, v in recent])
    titles = [t for t, _ in recent]
    if len(marked) > MAX_ROWS:
        every = np.vstack([v for _, v in marked])
        mean = normalise(every.mean(axis=0, keepdims=True))
        matrix = np.vstack([matrix, mean])
        titles.append(marked[int(np.argmax(every @ mean[0]))][0])
    return matrix.astype(np.float32), titles


def readers(session: Session, subscriber_ids: Sequence[int], model: str | None, dimensions: int) -> dict[int, Reader]:
    """What the ranker needs of each reader who taught anything, one query per page. Vectors
    made by another model than ``model`` are left out until the reader's next change."""
    found: dict[int, Reader] = {}
    if not subscriber_ids:
        return found
    for profile in session.scalars(
        select(ReaderProfile).where(among(session, ReaderProfile.subscriber_id, subscriber_ids))
    ):
        same_model = model is not None and profile.model == model
        found[profile.subscriber_id] = Reader(
            key=(profile.subscriber_id, profile.updated_at.timestamp()),
            liked=from_blob(profile.liked, dimensions) if same_model and profile.liked else None,
            liked_titles=tuple(profile.liked_titles),
            disliked=from_blob(profile.disliked, dimensions) if same_model and profile.disliked else None,
            follows=tuple(name.lower() for name in profile.follows or []),
            personal_weight=profile.personal_weight,
        )
    return found


@dataclass(frozen=True)
class Taught:
    """One marked paper, as the preferences page lists it."""

    paper_id: str
    title: str
    signal: int
    source: str
    when: dt.datetime


def taught(session: Session, subscriber_id: int) -> list[Taught]:
    rows = session.execute(
        select(PaperMark, Paper.title)
        .join(Paper, Paper.id == PaperMark.paper_id)
        .where(PaperMark.subscriber_id == subscriber_id)
        .order_by(PaperMark.updated_at.desc(), PaperMark.paper_id)
    ).all()
    return [Taught(m.paper_id, title, m.signal, m.source.value, m.updated_at) for m, title in rows]
