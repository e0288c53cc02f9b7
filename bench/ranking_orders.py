"""Every pick and reason of bench/ranking.py's first subscribers, to compare two codes' orders.

    .venv/bin/python bench/ranking_orders.py save FILE [subscribers]
    .venv/bin/python bench/ranking_orders.py compare FILE [subscribers]

For the bench's first ``subscribers`` (20 000 by default; one in five taught): each one's ten
picks with their reasons, lexical (no vectors), hybrid (nobody taught) and shipped (taught
readers learnt a page at a time, as the dispatcher plans), the shipped ones also ranked one by
one, and every taught reader's whole order (``Ranker.order``). ``save`` writes them to FILE
(a pickle), ``compare`` tells where the current code differs from FILE. A speed-up that
changes any of them is not a speed-up of the same ranking.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.ranking import PAGE, workload  # noqa: E402
from digest.ranking.profile import Profile, Reader  # noqa: E402
from digest.ranking.ranker import Ranker  # noqa: E402

Picks = list[tuple[str, tuple[str, ...], tuple[str, ...]]]


def orders(count: int) -> dict[str, list[Picks]]:
    candidates, people, vectors, topic_vectors, taught = workload(count)
    nobody: list[Reader | None] = [None] * count

    def run(ranker: Ranker, readers_of: list[Reader | None], by_page: bool) -> list[Picks]:
        found = []
        for start in range(0, count, PAGE):
            page = range(start, min(start + PAGE, count))
            if by_page:
                ranker.learn(
                    Profile.from_text(people[i][0], people[i][1], r) for i in page if (r := readers_of[i]) is not None
                )
            for i in page:
                topics, excluded, sent = people[i]
                picks = ranker.pick(Profile.from_text(topics, excluded, readers_of[i]), 10, sent)
                found.append([(p.paper_id, p.reasons, p.why) for p in picks])
        return found

    def hybrid() -> Ranker:
        return Ranker(candidates, vectors=vectors, topic_vector=topic_vectors.get)

    whole = hybrid()
    return {
        "lexical": run(Ranker(candidates), nobody, True),
        "hybrid": run(hybrid(), nobody, True),
        "shipped": run(hybrid(), taught, True),
        "shipped, one by one": run(hybrid(), taught, False),
        "taught, whole orders": [
            [(p.paper_id, p.reasons, p.why) for p in whole.order(Profile.from_text(t, e, r))]
            for (t, e, _), r in zip(people, taught, strict=True)
            if r is not None
        ],
    }


def main() -> None:
    action, file = sys.argv[1], Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    found = orders(count)
    if action == "save":
        file.write_bytes(pickle.dumps(found))
        print(f"saved {', '.join(f'{len(v)} {k}' for k, v in found.items())} to {file}")
        return
    saved = pickle.loads(file.read_bytes())
    differ = 0
    for name, rows in found.items():
        wrong = [k for k, (a, b) in enumerate(zip(rows, saved[name], strict=True)) if a != b]
        differ += len(wrong)
        print(f"{name}: {len(rows)} compared, {len(wrong)} differ" + (f" (first: {wrong[:5]})" if wrong else ""))
    print("identical" if not differ else f"{differ} DIFFER")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
