"""How well personalised digests find what a subscriber asked for, on the recorded data.

For each hand-labelled topic profile (bench/relevance_labels.json) this compares three orders of
the same candidates: the plain trending order (what a subscriber without topics gets), BM25
relevance alone (relevance weight 1.0), and the personalised order as shipped (the blend with
DIGEST_RELEVANCE_WEIGHT's default). Reports precision@5 and nDCG@10 (binary gains) per profile
and their means, as a table and one JSON line.

The two recorded days are pooled into one candidate list of 51 papers, each with the trending
score of its own day (as its daily edition computed it).

Run by hand: ``.venv/bin/python bench/relevance.py``
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path

from digest.models import Paper
from digest.papers import SAMPLE_DATES, load_sample, parse_items
from digest.ranking import Candidate, Profile, Ranker, TrendingWeights, candidate_text, trending_order
from digest.runtime import Runtime
from digest.settings import Settings

LABELS = Path(__file__).with_name("relevance_labels.json")


def candidates(weights: TrendingWeights) -> list[Candidate]:
    pool = []
    for day in SAMPLE_DATES:
        items = load_sample(day)
        assert items is not None, day
        papers = [Paper(**dataclasses.asdict(record)) for record in parse_items(items, day)]
        as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
        top = None
        for paper, score in trending_order(papers, as_of, weights):
            top = top or score
            # Each day's scores relative to its leader, so the two days mix fairly.
            pool.append(Candidate(paper.id, score / top, candidate_text(paper)))
    pool.sort(key=lambda c: (-c.trending, c.paper_id))
    return pool


def precision_at(order: list[str], relevant: set[str], k: int) -> float:
    return sum(1 for pid in order[:k] if pid in relevant) / k


def ndcg_at(order: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, pid in enumerate(order[:k]) if pid in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def main() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    pool = candidates(Runtime(settings).weights)
    labels = json.loads(LABELS.read_text())["profiles"]
    variants = {
        "trending": Ranker(pool, relevance_weight=settings.relevance_weight),
        "bm25_only": Ranker(pool, relevance_weight=1.0),
        "personalised": Ranker(pool, relevance_weight=settings.relevance_weight),
    }
    rows = []
    for label in labels:
        relevant = set(label["relevant"])
        row: dict[str, object] = {"topics": label["topics"], "relevant": len(relevant)}
        for name, ranker in variants.items():
            profile = Profile() if name == "trending" else Profile.from_text(label["topics"])
            order = [p.paper_id for p in ranker.pick(profile, len(pool), set())]
            row[f"{name}_p@5"] = precision_at(order, relevant, 5)
            row[f"{name}_ndcg@10"] = ndcg_at(order, relevant, 10)
        rows.append(row)

    metrics = [f"{n}_{m}" for n in variants for m in ("p@5", "ndcg@10")]
    means = {m: sum(float(r[m]) for r in rows) / len(rows) for m in metrics}  # type: ignore[arg-type]
    print(f"{len(pool)} candidates, {len(rows)} profiles, relevance_weight={settings.relevance_weight}")
    header = f"{'topics':<30} {'rel':>3}  " + "  ".join(f"{m:>20}" for m in metrics)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['topics']:<30} {r['relevant']:>3}  " + "  ".join(f"{float(r[m]):>20.3f}" for m in metrics))  # type: ignore[arg-type]
    print("-" * len(header))
    print(f"{'mean':<30} {'':>3}  " + "  ".join(f"{means[m]:>20.3f}" for m in metrics))
    summary = {"bench": "relevance", "profiles": len(rows), "candidates": len(pool)}
    print(json.dumps(summary | {k: round(v, 4) for k, v in means.items()}))


if __name__ == "__main__":
    main()
