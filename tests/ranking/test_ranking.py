"""Ranking on the recorded data: the trending formula, topics first with their reasons, exclusions."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from sqlalchemy import select

from digest.core.db import transaction
from digest.core.models import Digest, DigestKind
from digest.orchestration.runtime import Runtime
from digest.ranking.profile import Profile
from digest.ranking.ranker import Candidate, Ranker
from digest.ranking.trending import TrendingWeights, Votes, trending_order, trending_score
from digest.ranking.words import analyse
from tests.support.factories import THURSDAY, add_subscriber, collect
from tests.support.inbox import html_part, papers_in_html, papers_in_text, text_part
from tests.support.runs import deliver_due
from tests.support.servers import SMTPSink

SAMPLES = Path(__file__).resolve().parents[2] / "digest" / "papers" / "sample_data"
OLD_DAY = dt.date(2024, 10, 25)


# ---------------------------------------------------------------------------------------------
# Helpers shared with tests/orchestration/test_schedule.py


def recorded(day: dt.date) -> list[dict[str, object]]:
    data: list[dict[str, object]] = json.loads((SAMPLES / f"{day.isoformat()}.json").read_text())
    return data


# ---------------------------------------------------------------------------------------------
# Trending order


def test_trending_order_follows_the_documented_formula(runtime: Runtime) -> None:
    s = runtime.settings
    for day in (OLD_DAY, THURSDAY):
        digest_id = collect(runtime, day)
        as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
        expected = []
        for item in recorded(day):
            paper = item["paper"]
            assert isinstance(paper, dict)
            reached_text = paper.get("submittedOnDailyAt") or item["publishedAt"]
            reached = dt.datetime.fromisoformat(str(reached_text).replace("Z", "+00:00"))
            points = (
                s.weight_upvotes * int(paper.get("upvotes") or 0)
                + s.weight_comments * int(item.get("numComments") or 0)  # type: ignore[call-overload]
                + s.weight_stars * math.log(1 + int(paper.get("githubStars") or 0))
                + 1
            )
            age = max(0.0, (as_of - reached).total_seconds() / 3600)
            expected.append((points / (age + s.age_offset_hours) ** s.gravity, str(paper["id"])))
        expected.sort(key=lambda e: (-e[0], e[1]))
        with runtime.session_factory() as session:
            digest = session.get(Digest, digest_id)
            assert digest is not None
            stored = [(item.score, item.paper_id) for item in digest.items]
        assert [pid for _, pid in stored] == [pid for _, pid in expected]
        for (got, _), (want, _) in zip(stored, expected, strict=True):
            assert math.isclose(got, want, rel_tol=1e-9)


def test_trending_reads_plain_values_reached_at_midnight_when_unknown_ties_by_id() -> None:
    day, weights = THURSDAY, TrendingWeights()
    as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    unknown = Votes("2604.00002", upvotes=3, comments=1, github_stars=None, submitted_at=None, daily_date=day)
    midnight = dt.datetime.combine(day, dt.time(), dt.UTC)
    known = Votes("2604.00001", upvotes=3, comments=1, github_stars=0, submitted_at=midnight, daily_date=day)
    late = dt.datetime.combine(day, dt.time(22), dt.UTC)
    fresh = Votes("2604.00003", upvotes=0, comments=0, github_stars=None, submitted_at=late, daily_date=day)
    # (3 upvotes + 2 x 1 comment + 1) over (24 h + 2) ^ 1.5; the fresh one: 1 over (2 h + 2) ^ 1.5.
    assert math.isclose(trending_score(unknown, as_of, weights), 6 / 26**1.5, rel_tol=1e-12)
    order = trending_order([unknown, fresh, known], as_of, weights)
    assert [(votes.paper_id, round(score, 6)) for votes, score in order] == [
        ("2604.00003", 0.125),
        ("2604.00001", round(6 / 26**1.5, 6)),
        ("2604.00002", round(6 / 26**1.5, 6)),
    ]


# ---------------------------------------------------------------------------------------------
# Topics and exclusions, as the subscriber receives them


def test_topics_come_first_with_their_reason_in_both_parts(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    with transaction(runtime.session_factory) as session:
        add_subscriber(session, "ada@example.org", topics="GUI agents, Reinforcement learning")
        add_subscriber(session, "plain@example.org")
    deliver_due(runtime, dt.datetime(2026, 4, 17, 8, 3, tzinfo=dt.UTC))

    (mail,) = smtp.to("ada@example.org")
    for listed in (papers_in_text(mail), papers_in_html(mail)):
        # Hand-checked on the recorded day: two GUI-agent papers, three RL papers.
        assert {"2604.13822", "2507.04227"} <= {pid for pid, r in listed if "gui agents" in r}
        assert {"2604.11626", "2604.14142", "2604.06159"} <= {pid for pid, r in listed if "reinforcement learning" in r}
        matching = [pid for pid, r in listed if r]
        assert [pid for pid, _ in listed[: len(matching)]] == matching  # matches first
        assert len(listed) == runtime.settings.digest_size
        # The rest is filled by meaning and trend (no longer plain trending order), without "Matches".
        assert all(not r for _, r in listed[len(matching) :]) and len(matching) < len(listed)

    (plain,) = smtp.to("plain@example.org")
    with runtime.session_factory() as session:
        digest = session.scalar(select(Digest).where(Digest.kind == DigestKind.DAILY))
        assert digest is not None
        trending = [item.paper_id for item in digest.items][: runtime.settings.digest_size]
    assert papers_in_text(plain) == [(pid, "") for pid in trending]
    assert "Matches:" not in html_part(plain)


def test_excluded_words_never_appear(runtime: Runtime, smtp: SMTPSink) -> None:
    collect(runtime, THURSDAY)
    with transaction(runtime.session_factory) as session:
        add_subscriber(session, "reader@example.org", excluded="agent, video", digest_size=30)
        add_subscriber(session, "rl@example.org", topics="reinforcement learning", excluded="reward")
    deliver_due(runtime, dt.datetime(2026, 4, 17, 8, 0, tzinfo=dt.UTC))

    (mail,) = smtp.to("reader@example.org")
    received = [pid for pid, _ in papers_in_text(mail)]
    assert received  # the day still has papers about other things
    for item in recorded(THURSDAY):
        paper = item["paper"]
        assert isinstance(paper, dict)
        words = " ".join(str(paper.get(k) or "") for k in ("title", "summary", "ai_summary", "ai_keywords"))
        if re.search(r"(?<!\w)(agent|video)", words, re.IGNORECASE):
            assert paper["id"] not in received
    for body in (text_part(mail), html_part(mail)):
        found = re.search(r"agent|video", body, re.IGNORECASE)
        assert not found, body[found.start() - 300 : found.end() + 50]

    (mail,) = smtp.to("rl@example.org")
    listed = papers_in_text(mail)
    # Every RL paper of the day talks about rewards: the subscriber gets the rest, by trend.
    assert {"2604.11626", "2604.14142", "2604.06159"}.isdisjoint(pid for pid, _ in listed)
    assert len(listed) == runtime.settings.digest_size
    assert not re.search(r"reward", text_part(mail), re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# The ranker itself, on small hand-made candidate lists


def _ranker(*texts: str) -> Ranker:
    # Trending falls with position, so the unpersonalised order is p0, p1, ...
    return Ranker([Candidate(f"p{i}", 10.0 - i, text.lower()) for i, text in enumerate(texts)])


def test_topic_matching_is_stemmed_and_phrase_aware() -> None:
    ranker = _ranker(
        "Scaling LLM-based agents for the web",
        "Agents built with large language models",
        "We study LLMs. Later, in another section far away from here, we evaluate agents too.",
        "Diffusion models for video; denoising diffusion",
        "Reinforcement-learning from human feedback",
        "Learning to rank. Unrelated text here about many other things entirely, then reinforcement.",
    )
    picks = ranker.pick(Profile.from_text("LLM agents, diffusion, reinforcement learning"), 10, set())
    reasons = {p.paper_id: p.reasons for p in picks}
    assert reasons["p0"] == ("llm agents",)
    assert reasons["p1"] == ("llm agents",)  # "LLM" spelled out
    assert reasons["p2"] == ()  # both words, but far apart
    assert reasons["p3"] == ("diffusion",)
    assert reasons["p4"] == ("reinforcement learning",)
    assert reasons["p5"] == ()
    assert {p.paper_id for p in picks[:4]} == {"p0", "p1", "p3", "p4"}
    assert analyse("LLMs Agents") == analyse("llm agent")


def test_abbreviations_match_both_ways_and_only_as_phrases() -> None:
    ranker = _ranker(
        "Scaling RL for reasoning models",
        "Reinforcement learning from human feedback, revisited",
        "A new RLHF recipe",
        "Retrieval-augmented generation for long documents",
        "Learning to retrieve. Much later, far away, reinforcement of generation.",
        "Vision-language models see better",
    )
    reasons = {p.paper_id: p.reasons for p in ranker.pick(Profile.from_text("RL, RAG, VLMs"), 10, set())}
    assert reasons == {"p0": ("rl",), "p1": ("rl",), "p2": (), "p3": ("rag",), "p4": (), "p5": ("vlms",)}
    spelled_out = Profile.from_text("reinforcement learning from human feedback, retrieval augmented generation")
    reasons = {p.paper_id: p.reasons for p in ranker.pick(spelled_out, 10, set())}
    assert reasons["p1"] == reasons["p2"] == ("reinforcement learning from human feedback",)
    assert reasons["p3"] == ("retrieval augmented generation",)
    assert reasons["p0"] == reasons["p4"] == ()
    mixed = _ranker("Multimodal LLMs that reason", "MLLMs for charts", "A multimodal model of language")
    reasons = {p.paper_id: p.reasons for p in mixed.pick(Profile.from_text("MLLM"), 10, set())}
    assert reasons == {"p0": ("mllm",), "p1": ("mllm",), "p2": ()}
    # Excluding an abbreviation excludes its spelled-out form too (and, as for every excluded
    # word, words starting with it: "RLHF").
    kept = [p.paper_id for p in ranker.pick(Profile.from_text("", "RL"), 10, set())]
    assert kept == ["p3", "p4", "p5"]


def test_ranker_without_topics_keeps_trending_order_and_skips_what_was_sent() -> None:
    ranker = _ranker("a paper on robots", "a robotics paper", "graphs", "more graphs")
    everyone = Profile.from_text("")
    assert [p.paper_id for p in ranker.pick(everyone, 10, set())] == ["p0", "p1", "p2", "p3"]
    assert [p.paper_id for p in ranker.pick(everyone, 2, {"p0", "p2"})] == ["p1", "p3"]
    # An excluded word also removes papers whose words merely start with it.
    assert [p.paper_id for p in ranker.pick(Profile.from_text("", "robot"), 10, set())] == ["p2", "p3"]
    # Equal profiles share one computed order.
    assert ranker.order(Profile.from_text("graphs")) is ranker.order(Profile.from_text(" Graphs "))


def test_more_relevant_papers_rank_higher_among_matches() -> None:
    ranker = _ranker(
        "a survey of many things, one of them diffusion",
        "diffusion diffusion: a diffusion model for diffusion-based editing",
    )
    picks = ranker.pick(Profile.from_text("diffusion"), 2, set())
    # p1 trends lower but is far more about the topic; relevance weighs 0.7.
    assert [p.paper_id for p in picks] == ["p1", "p0"]


def test_marks_of_another_field_lead_topics_that_do_not_explain_them() -> None:
    """Topics name 3D reconstruction; the reader marked three RL papers "More like this": papers
    like the marked ones come ahead of the 3D papers the twin (same topics, no marks) gets first."""
    import numpy as np

    from digest.ranking.profile import Reader

    def unit(*weights: float) -> np.ndarray:
        vector = np.array([*weights, 0.0, 0.0, 0.0, 0.0][:6], dtype=np.float32)
        return vector / np.linalg.norm(vector)

    three_d = [Candidate(f"3d-{i}", 1.0 - i / 10, f"3D reconstruction of scenes, part {i}") for i in range(3)]
    rl = [Candidate(f"rl-{i}", 0.5 - i / 10, f"policy optimisation with rewards, part {i}") for i in range(3)]
    vectors = np.vstack([unit(1, 0.1 * i, 0) for i in range(3)] + [unit(0.05, 1, 0.1 * i) for i in range(3)])
    topics = {"3d reconstruction": unit(1, 0, 0)}  # topics are kept lower-cased
    ranker = Ranker([*three_d, *rl], vectors=vectors, topic_vector=topics.get)
    liked = np.vstack([unit(0, 1, 0.05), unit(0.02, 1, 0.15), unit(0, 1, 0.25)])
    reader = Reader(key=(1, 0.0), liked=liked, liked_titles=("a", "b", "c"))

    twin = [p.paper_id for p in ranker.pick(Profile.from_text("3D reconstruction"), 3, set())]
    taught = [p.paper_id for p in ranker.pick(Profile.from_text("3D reconstruction", reader=reader), 3, set())]
    assert twin == ["3d-0", "3d-1", "3d-2"]
    assert taught == ["rl-0", "rl-1", "rl-2"]
