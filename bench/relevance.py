"""How well personalised digests find what a subscriber asked for, on the recorded data.

For each hand-labelled topic profile (bench/relevance_labels.json) this compares orders of the
same candidates:

* ``trending``: the plain trending order (a subscriber without topics);
* ``bm25``: BM25 relevance alone (relevance weight 1.0, no vectors), today's lexical ranking;
* ``lexical``: the lexical blend as shipped before vectors (BM25 + trending, matches first);
* ``dense``: sentence-embedding cosine alone (relevance weight 1.0, no BM25);
* ``hybrid``: the shipped blend (BM25 + meaning + trending, word-for-word matches first);
* ``feedback``: hybrid plus a simulated reader, scored on the second day only (below);
  ``marksonly``: the same reader's marks without their topics, against ``trending`` that day.

Reports precision@5 and nDCG@10 (binary gains) per profile and their means, as a table and one
JSON line. The two recorded days are pooled into one candidate list of 51 papers, each with the
trending score of its own day (as its daily edition computed it).

Simulated feedback: the recorded days stand for "days 1-2" (2024-10-25) and "day 3"
(2026-04-16). On the first day the reader gets their hybrid top 10 and marks every labelled
paper in it "More like this" and every other one "Less like this"; the second day's new
papers are then ranked with and without those marks (``hybrid@day3`` vs ``feedback@day3``),
for the profiles with at least one relevant paper on that day.

Held-out day: 2025-06-05 (``bench/data/``, 30 papers), which no weight was tuned on and whose
labels (``held_out`` in the labels file) were written before any ranker ran on it. Its papers
alone are ranked by ``trending``, ``bm25``, ``dense`` and ``hybrid``; for ``feedback`` the
reader gets the hybrid top 10 of each recorded day (days 1-2) as their two digests, marks them
as above, and is scored on the held-out day, with and without their topics (``marksonly``).
Means over the profiles with at least one relevant paper that day.

Also: the per-paper embedding cost and the process's memory with the model loaded.
``--model DIR`` runs everything with another model folder (e.g. an fp32 export from
``scripts/build_embedding_model.py --fp32-too DIR``) to compare.

Run by hand: ``.venv/bin/python bench/relevance.py [--model DIR]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from digest.core.models import Paper
from digest.core.settings import Settings
from digest.core.text import parse_terms
from digest.delivery.composer import candidate_of, votes_of
from digest.orchestration.runtime import Runtime
from digest.papers.embedding import Embedder, load_embedder, paper_text
from digest.papers.source import SAMPLE_DATES, load_sample, parse_items
from digest.ranking.profile import Profile, Reader
from digest.ranking.ranker import Candidate, Ranker
from digest.ranking.trending import TrendingWeights, trending_order

LABELS = Path(__file__).with_name("relevance_labels.json")
# Bench-only recorded days (not shipped in the wheel), see bench/data/README.md.
BENCH_DATA = Path(__file__).with_name("data")
HELD_OUT = dt.date(2025, 6, 5)
# Labelled before any ranker ran on them, for how marks weigh against topics (issue 21).
HELD_OUT_DAYS = (HELD_OUT, dt.date(2025, 3, 12), dt.date(2025, 10, 22), dt.date(2025, 12, 3), dt.date(2026, 3, 11))
# Simulated readers whose topics mislead: they wrote the first profile's topics but want the
# second's papers (its labels), as a reader who names one field and marks another's.
MISLEADING = (
    ("3D reconstruction", "reinforcement learning"),
    ("hallucination", "video generation"),
    ("knowledge editing", "efficient inference"),
    ("GUI agents", "mathematical reasoning"),
    ("long context", "diffusion, video generation"),
    ("AI safety", "LLM agents"),
)


def day_papers(day: dt.date) -> list[Paper]:
    items = load_sample(day)
    if items is None:
        items = json.loads((BENCH_DATA / f"{day.isoformat()}.json").read_text(encoding="utf-8"))
    assert items is not None, day
    return [Paper(**dataclasses.asdict(record)) for record in parse_items(items, day)]


def candidates(
    weights: TrendingWeights, days: tuple[dt.date, ...] = SAMPLE_DATES
) -> tuple[list[Candidate], dict[str, Paper]]:
    pool = []
    papers: dict[str, Paper] = {}
    for day in days:
        as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
        top = None
        by_id = {paper.id: paper for paper in day_papers(day)}
        for votes, score in trending_order(map(votes_of, by_id.values()), as_of, weights):
            top = top or score
            paper = papers[votes.paper_id] = by_id[votes.paper_id]
            # Each day's scores relative to its leader, so the two days mix fairly.
            pool.append(candidate_of(paper, score / top))
    pool.sort(key=lambda c: (-c.trending, c.paper_id))
    return pool, papers


def precision_at(order: list[str], relevant: set[str], k: int) -> float:
    return sum(1 for pid in order[:k] if pid in relevant) / k


def ndcg_at(order: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, pid in enumerate(order[:k]) if pid in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def rankers(
    pool: list[Candidate], vectors: dict[str, np.ndarray], topic: dict[str, np.ndarray], weight: float
) -> dict[str, Ranker]:
    matrix = np.vstack([vectors[c.paper_id] for c in pool])
    dense = {"vectors": matrix, "topic_vector": topic.get}
    return {
        "trending": Ranker(pool, relevance_weight=weight),
        "bm25": Ranker(pool, relevance_weight=1.0),
        "lexical": Ranker(pool, relevance_weight=weight),
        "dense": Ranker(pool, relevance_weight=1.0, lexical_share=0.0, match_bonus=0.0, **dense),  # type: ignore[arg-type]
        "hybrid": Ranker(pool, relevance_weight=weight, **dense),  # type: ignore[arg-type]
    }


def order_of(ranker: Ranker, profile: Profile) -> list[str]:
    return [p.paper_id for p in ranker.pick(profile, len(ranker.candidates), set())]


def reader_of(
    key: tuple[int, float],
    shown: list[str],
    relevant: set[str],
    vectors: dict[str, np.ndarray],
    papers: dict[str, Paper],
) -> Reader:
    """The simulated reader: every labelled paper they were shown "more like this", every other one "less"."""
    liked = [pid for pid in shown if pid in relevant]
    disliked = [pid for pid in shown if pid not in relevant]
    return Reader(
        key=key,
        liked=np.vstack([vectors[p] for p in liked]) if liked else None,
        liked_titles=tuple(papers[p].title for p in liked),
        disliked=np.vstack([vectors[p] for p in disliked]) if disliked else None,
    )


def held_out_section(
    labels: list[dict[str, Any]],
    weights: TrendingWeights,
    embedder: Embedder,
    vectors: dict[str, np.ndarray],
    papers: dict[str, Paper],
    topic: dict[str, np.ndarray],
    weight: float,
) -> dict[str, float]:
    """nDCG@10 on the held-out day, printed as a table; returns the means."""
    pool, day_of = candidates(weights, (HELD_OUT,))
    # Embedded apart from the recorded days so the per-paper timing above stays what it was.
    texts = [paper_text(p.title, p.abstract, p.ai_keywords) for p in day_of.values()]
    held_vectors = dict(zip(day_of, embedder.embed(texts), strict=True))
    every = rankers(pool, held_vectors, topic, weight)
    variants = {name: every[name] for name in ("trending", "bm25", "dense", "hybrid")}
    old_days = [rankers(candidates(weights, (day,))[0], vectors, topic, weight)["hybrid"] for day in SAMPLE_DATES]
    metrics = [*variants, "feedback", "marksonly"]
    rows: list[tuple[str, int, dict[str, float]]] = []
    for index, label in enumerate(labels):
        relevant = set(label["held_out"][HELD_OUT.isoformat()])
        if not relevant:
            continue
        profile = Profile.from_text(label["topics"])
        scores = {
            name: ndcg_at(order_of(ranker, Profile() if name == "trending" else profile), relevant, 10)
            for name, ranker in variants.items()
        }
        # One digest per recorded day, each that day's hybrid top 10, marked against the old labels.
        shown = [pid for ranker in old_days for pid in order_of(ranker, profile)[:10]]
        reader = reader_of((1, float(index)), shown, set(label["relevant"]), vectors, papers)
        hybrid = variants["hybrid"]
        scores["feedback"] = ndcg_at(order_of(hybrid, dataclasses.replace(profile, reader=reader)), relevant, 10)
        scores["marksonly"] = ndcg_at(order_of(hybrid, Profile(reader=reader)), relevant, 10)
        rows.append((label["topics"], len(relevant), scores))
    means = {m: sum(scores[m] for _, _, scores in rows) / len(rows) for m in metrics}
    print()
    print(f"held-out day {HELD_OUT} ({len(pool)} papers, labelled before any ranker ran on it), nDCG@10")
    header = f"{'topics':<32} {'rel':>3} " + " ".join(f"{m:>10}" for m in metrics)
    print(header)
    print("-" * len(header))
    for topics, count, scores in rows:
        print(f"{topics[:32]:<32} {count:>3} " + " ".join(f"{scores[m]:>10.3f}" for m in metrics))
    print("-" * len(header))
    print(f"{'mean':<32} {'':>3} " + " ".join(f"{means[m]:>10.3f}" for m in metrics))
    print(
        f"(mean over the {len(rows)} profiles with a relevant paper on {HELD_OUT}; feedback: marks on the "
        "hybrid top 10 of each recorded day, scored here; marksonly: the same marks without topics, against trending)"
    )
    return means


def marks_section(
    labels: list[dict[str, Any]],
    weights: TrendingWeights,
    embedder: Embedder,
    vectors: dict[str, np.ndarray],
    papers: dict[str, Paper],
    topic: dict[str, np.ndarray],
    weight: float,
) -> dict[str, float]:
    """Day-3 nDCG@10 of twin (topics only), taught (topics + marks of days 1-2) and cold (marks
    only) readers on every held-out day, for the labelled profiles and for readers whose topics
    mislead (``MISLEADING``); printed as a table, returns the means.

    Days 1-2 are the recorded sample days: each day the reader gets their twin's top 10 and also
    sees that day's trending top 10 (the Daily Papers page); they mark "More like this" on every
    paper they want among both and "Less like this" on the digest's others.
    """
    by_topics = {label["topics"]: label for label in labels}
    readers = [(label["topics"], label) for label in labels]
    readers += [(f"{named} -> {wants}", by_topics[named] | {"wants": by_topics[wants]}) for named, wants in MISLEADING]
    old_days = [rankers(candidates(weights, (day,))[0], vectors, topic, weight)["hybrid"] for day in SAMPLE_DATES]
    plain = [order_of(ranker, Profile())[:10] for ranker in old_days]
    taught_readers = {}
    for index, (name, label) in enumerate(readers):
        wanted = label.get("wants", label)
        profile = Profile.from_text(label["topics"])
        digests = [order_of(ranker, profile)[:10] for ranker in old_days]
        relevant = set(wanted["relevant"])
        liked = [pid for shown in (*digests, *plain) for pid in shown if pid in relevant]
        disliked = [pid for shown in digests for pid in shown if pid not in relevant]
        reader = Reader(
            key=(2, float(index)),
            liked=np.vstack([vectors[p] for p in dict.fromkeys(liked)]) if liked else None,
            liked_titles=tuple(papers[p].title for p in dict.fromkeys(liked)),
            disliked=np.vstack([vectors[p] for p in dict.fromkeys(disliked)]) if disliked else None,
        )
        taught_readers[name] = (profile, reader, wanted)
    kinds = ("twin", "taught", "cold")
    rows: list[tuple[str, str, dict[str, float]]] = []
    for day in HELD_OUT_DAYS:
        pool, day_of = candidates(weights, (day,))
        texts = [paper_text(p.title, p.abstract, p.ai_keywords) for p in day_of.values()]
        day_vectors = dict(zip(day_of, embedder.embed(texts), strict=True))
        hybrid = rankers(pool, day_vectors, topic, weight)["hybrid"]
        for name, (profile, reader, wanted) in taught_readers.items():
            relevant = set(wanted["held_out"][day.isoformat()])
            if not relevant:
                continue
            orders = {
                "twin": order_of(hybrid, profile),
                "taught": order_of(hybrid, dataclasses.replace(profile, reader=reader)),
                "cold": order_of(hybrid, Profile(reader=reader)),
            }
            rows.append((day.isoformat(), name, {k: ndcg_at(orders[k], relevant, 10) for k in kinds}))
    print()
    print("day-3 nDCG@10 on the held-out days: twin (topics), taught (topics + marks of days 1-2), cold (marks only)")
    header = f"{'day':<10} {'reader (topics -> what they want)':<48} " + " ".join(f"{k:>7}" for k in kinds)
    print(header)
    print("-" * len(header))
    for when, name, scores in rows:
        print(f"{when:<10} {name[:48]:<48} " + " ".join(f"{scores[k]:>7.3f}" for k in kinds))
    print("-" * len(header))
    means: dict[str, float] = {}
    for group, members in (
        ("labelled", [r for r in rows if "->" not in r[1]]),
        ("misleading", [r for r in rows if "->" in r[1]]),
        ("all", rows),
    ):
        for k in kinds:
            means[f"{group}_{k}"] = sum(r[2][k] for r in members) / len(members)
        best = sum(max(r[2]["twin"], r[2]["cold"]) for r in members) / len(members)
        worst = min(r[2]["taught"] - max(r[2]["twin"], r[2]["cold"]) for r in members)
        means[f"{group}_worst_below_best"] = worst
        cells = " ".join(f"{means[f'{group}_{k}']:>7.3f}" for k in kinds)
        print(
            f"{'mean':<10} {group + f' ({len(members)} reader-days)':<48} {cells}  "
            f"taught-twin {means[f'{group}_taught'] - means[f'{group}_twin']:+.3f}, "
            f"best of twin/cold {best:.3f}, taught at worst {worst:+.3f} from it"
        )
    return means


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder (default: the shipped int8 model)")
    args = parser.parse_args()
    settings = Settings(_env_file=None)
    weights = Runtime(settings).weights
    weight = settings.relevance_weight

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    embedder: Embedder = load_embedder(args.model)
    load_seconds = time.perf_counter() - started
    pool, papers = candidates(weights)
    started = time.perf_counter()
    matrix = embedder.embed([paper_text(p.title, p.abstract, p.ai_keywords) for p in papers.values()])
    per_paper_ms = (time.perf_counter() - started) * 1000 / len(papers)
    vectors = dict(zip(papers, matrix, strict=True))
    labels = json.loads(LABELS.read_text())["profiles"]
    topics = sorted({t for label in labels for t in parse_terms(label["topics"])})
    started = time.perf_counter()
    topic = dict(zip(topics, embedder.embed(topics), strict=True))
    per_topic_ms = (time.perf_counter() - started) * 1000 / len(topics)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    variants = rankers(pool, vectors, topic, weight)
    day1, _ = candidates(weights, (SAMPLE_DATES[0],))
    day3, _ = candidates(weights, (SAMPLE_DATES[1],))
    day1_hybrid = rankers(day1, vectors, topic, weight)["hybrid"]
    day3_hybrid = rankers(day3, vectors, topic, weight)["hybrid"]
    day3_ids = {c.paper_id for c in day3}

    rows: list[dict[str, Any]] = []
    for label in labels:
        relevant = set(label["relevant"])
        profile = Profile.from_text(label["topics"])
        row: dict[str, Any] = {"topics": label["topics"], "relevant": len(relevant)}
        for name, ranker in variants.items():
            order = order_of(ranker, Profile() if name == "trending" else profile)
            row[f"{name}_p@5"] = precision_at(order, relevant, 5)
            row[f"{name}_ndcg@10"] = ndcg_at(order, relevant, 10)
        later = relevant & day3_ids
        if later:
            reader = reader_of((0, float(len(rows))), order_of(day1_hybrid, profile)[:10], relevant, vectors, papers)
            row["hybrid@day3_ndcg@10"] = ndcg_at(order_of(day3_hybrid, profile), later, 10)
            taught = dataclasses.replace(profile, reader=reader)
            row["feedback@day3_ndcg@10"] = ndcg_at(order_of(day3_hybrid, taught), later, 10)
            # The same marks from a reader who wrote no topics at all, against what they got before.
            row["trending@day3_ndcg@10"] = ndcg_at(order_of(day3_hybrid, Profile()), later, 10)
            row["marksonly@day3_ndcg@10"] = ndcg_at(order_of(day3_hybrid, Profile(reader=reader)), later, 10)
        rows.append(row)

    metrics = [f"{n}_{m}" for n in variants for m in ("p@5", "ndcg@10")]
    means = {m: sum(float(r[m]) for r in rows) / len(rows) for m in metrics}
    day3_rows = [r for r in rows if "feedback@day3_ndcg@10" in r]
    day3_metrics = ["hybrid@day3_ndcg@10", "feedback@day3_ndcg@10", "trending@day3_ndcg@10", "marksonly@day3_ndcg@10"]
    for m in day3_metrics:
        means[m] = sum(float(r[m]) for r in day3_rows) / len(day3_rows)
    shown_metrics = [m for m in metrics if m.endswith("ndcg@10")] + day3_metrics
    print(f"model {embedder.name} ({args.model or 'shipped int8'}), {len(pool)} candidates, {len(rows)} profiles")
    header = f"{'topics':<32} {'rel':>3} " + " ".join(f"{m.replace('_ndcg@10', ''):>13}" for m in shown_metrics)
    print("nDCG@10")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{float(r[m]):>13.3f}" if m in r else f"{'':>13}" for m in shown_metrics)
        print(f"{str(r['topics'])[:32]:<32} {r['relevant']:>3} " + cells)
    print("-" * len(header))
    print(f"{'mean':<32} {'':>3} " + " ".join(f"{means[m]:>13.3f}" for m in shown_metrics))
    print(f"(day-3 columns: mean over the {len(day3_rows)} profiles with a relevant paper on 2026-04-16)")
    added = {label["topics"] for label in labels if label.get("added")}
    for group, members in (
        ("earlier", [r for r in rows if r["topics"] not in added]),
        ("added", [r for r in rows if r["topics"] in added]),
    ):
        cells = " ".join(
            f"{sum(float(r[m]) for r in members) / len(members):>13.3f}" for m in metrics if m.endswith("ndcg@10")
        )
        print(f"{'mean of ' + str(len(members)) + ' ' + group + ' profiles':<36} " + cells)
    print(
        f"embedding: {per_paper_ms:.1f} ms per paper (title, keywords, abstract; one thread), "
        f"{per_topic_ms:.1f} ms per topic; model load {load_seconds:.2f} s; "
        f"peak RSS {rss_before / 1024:.0f} MB before the model, {rss_after / 1024:.0f} MB with it"
    )
    summary = {"bench": "relevance", "model": embedder.name, "profiles": len(rows), "candidates": len(pool)}
    extra = {"embed_ms_per_paper": round(per_paper_ms, 1), "rss_mb_with_model": round(rss_after / 1024)}
    held = held_out_section(labels, weights, embedder, vectors, papers, topic, weight)
    held_out = {f"heldout_{k}_ndcg@10": round(v, 4) for k, v in held.items()}
    marks = marks_section(labels, weights, embedder, vectors, papers, topic, weight)
    held_out |= {f"marks_{k}_ndcg@10": round(v, 4) for k, v in marks.items()}
    print(json.dumps(summary | {k: round(v, 4) for k, v in means.items()} | extra | held_out))


if __name__ == "__main__":
    main()
