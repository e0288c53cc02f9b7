"""Semantic ranking and what readers teach it: meaning without shared words, a reader with no
topics who marked papers, and the preferences page (list, undo, examples, follows, reset)."""

from __future__ import annotations

import datetime as dt
import re

import httpx
import numpy as np
from sqlalchemy import select

from digest.core.db import transaction
from digest.core.models import Paper, PaperEmbedding, PaperMark, ReaderProfile, Subscriber, utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.papers.embedding import from_blob, load_embedder
from digest.ranking.profile import Profile
from digest.ranking.ranker import Candidate, Ranker
from digest.subscribers import feedback
from digest.subscribers.subscriptions import add_confirmed
from tests.support.inbox import papers_of, text_part
from tests.support.servers import SMTPSink

DAY1, DAY2 = dt.date(2024, 10, 25), dt.date(2026, 4, 16)


def test_a_topic_ranks_papers_by_meaning_without_a_shared_word() -> None:
    texts = [
        "A benchmark for table question answering over spreadsheets",
        "Faster sampling for video diffusion models",
        "3D Gaussian splatting for large outdoor scenes",
        "Red-teaming chatbots: measuring and reducing harmful outputs of language models",
        "Compressing image tokenizers with vector quantization",
    ]
    # Trending falls with position: the paper about harm trends below two unrelated ones.
    candidates = [Candidate(f"p{i}", 10.0 - i, text.lower()) for i, text in enumerate(texts)]
    embedder = load_embedder()
    vectors = embedder.embed(texts)
    topics = {"ai safety": embedder.embed(["ai safety"])[0]}
    semantic = Ranker(candidates, vectors=vectors, topic_vector=topics.get)
    order = [p.paper_id for p in semantic.order(Profile.from_text("AI safety"))]
    assert order[0] == "p3", order
    (pick,) = semantic.pick(Profile.from_text("AI safety"), 1, set())
    assert pick.reasons == () and pick.why == ("About: ai safety",)  # no word matched, its meaning did
    # Words alone cannot see it: without vectors the same profile keeps the trending order.
    lexical = [p.paper_id for p in Ranker(candidates).order(Profile.from_text("AI safety"))]
    assert lexical == ["p0", "p1", "p2", "p3", "p4"]


def test_paper_references_are_read_from_ids_and_links() -> None:
    ids, bad = feedback.parse_paper_refs(
        "2604.14148, arXiv:2410.18252v2\nhttps://huggingface.co/papers/2604.11626 "
        "https://arxiv.org/pdf/2410.18451.pdf https://arxiv.org/abs/cs/0112017v1 hello 2604.14148"
    )
    assert ids == ["2604.14148", "2410.18252", "2604.11626", "2410.18451", "cs/0112017"]
    assert bad == ["hello"]


def test_a_reader_without_topics_who_marked_three_papers_gets_a_matching_order(
    site: tuple[Runtime, str], smtp: SMTPSink
) -> None:
    runtime, _ = site
    with transaction(runtime.session_factory) as session:
        reader = add_confirmed(session, runtime.tokens, "marks@example.org", now=utcnow())
        add_confirmed(session, runtime.tokens, "plain@example.org", now=utcnow())
    run_inprocess(runtime, DAY1)
    (mail,) = smtp.to("marks@example.org")
    liked = ["2410.15580", "2410.16429", "2410.18693"]  # arithmetic, theorem proving, math questions
    links = {pid: more for pid, more, _, _ in papers_of(mail)}
    with httpx.Client(timeout=30) as http:
        for pid in liked:
            url = links.get(pid)
            if url is None:  # not in this reader's first digest: the same link, signed for them
                url = runtime.links.feedback(reader, pid)[0]
            assert http.post(url).status_code == 200
    smtp.clear()
    run_inprocess(runtime, DAY2)
    (taught,) = smtp.to("marks@example.org")
    (plain,) = smtp.to("plain@example.org")
    taught_order = [pid for pid, *_ in papers_of(taught)]
    plain_order = [pid for pid, *_ in papers_of(plain)]
    assert taught_order != plain_order
    # The papers that rose say which marked paper they are like, and they are the ones nearest
    # in meaning to the marked papers.
    with runtime.session_factory() as session:
        titles = {p.id: p.title for p in session.scalars(select(Paper))}
    marked_titles = {titles[pid] for pid in liked}
    reasons = {pid: block for pid, _, _, block in papers_of(taught)}
    assert any(f"Like: {t}" in reasons[taught_order[0]] for t in marked_titles), reasons[taught_order[0]]
    with runtime.session_factory() as session:
        stored = {
            pid: from_blob(v) for pid, v in session.execute(select(PaperEmbedding.paper_id, PaperEmbedding.vector))
        }
    day2 = [pid for pid in titles if pid.startswith("26")]
    likes = np.vstack([stored[pid] for pid in liked])
    near = np.vstack([stored[pid] for pid in day2]) @ likes.T
    nearest = {day2[i] for i in np.argsort(-near.max(axis=1))[:5]}
    assert len(nearest & set(taught_order[:5])) > len(nearest & set(plain_order[:5])), (nearest, taught_order)


def test_preferences_list_undo_examples_follows_and_reset(site: tuple[Runtime, str], smtp: SMTPSink) -> None:
    runtime, base = site
    with transaction(runtime.session_factory) as session:
        reader = add_confirmed(session, runtime.tokens, "prefs@example.org", now=utcnow())
    run_inprocess(runtime, DAY1)
    (mail,) = smtp.to("prefs@example.org")
    first, second = papers_of(mail)[:2]
    preferences = runtime.links.preferences(reader)
    with httpx.Client(timeout=30) as http:
        assert http.post(first[1]).status_code == 200  # more like this
        assert http.post(second[2]).status_code == 200  # less like this
        assert http.post(second[1]).status_code == 200  # changed their mind: the last mark wins
        page = http.get(preferences).text
        with runtime.session_factory() as session:
            titles = {p.id: p.title for p in session.scalars(select(Paper))}
        assert page.count("More like this:") == 2 and "Less like this:" not in page
        assert titles[first[0]] in page and titles[second[0]] in page

        teach = f"{preferences.removeprefix(base)}/teach"
        undo = http.post(f"{base}{teach}/undo", data={"paper_id": first[0]})
        assert undo.status_code == 200 and titles[first[0]] not in undo.text
        saved = http.post(
            f"{base}{teach}/save",
            data={
                "examples": "https://huggingface.co/papers/2410.18451, 9999.99999",
                "follows": "kaist ai, Yoshua Bengio",
                "personal": "personal",
            },
        )
        # An id we never collected is named back; the rest is saved.
        assert saved.status_code == 400 and "9999.99999" in saved.text
        assert "Example:" in saved.text and titles["2410.18451"] in saved.text
        assert 'value="kaist ai, Yoshua Bengio"' in saved.text
        assert re.search(r'value="personal" checked', saved.text)
        with runtime.session_factory() as session:
            marked = {m.paper_id: (m.signal, m.source.value) for m in session.scalars(select(PaperMark))}
            profile = session.get(ReaderProfile, reader.id)
            assert profile is not None and profile.personal_weight == feedback.PERSONAL_CHOICES["personal"]
        assert marked == {second[0]: (1, "email"), "2410.18451": (1, "example")}

        # Papers of a followed organisation (the API's "organization") come first, saying so.
        smtp.clear()
        run_inprocess(runtime, DAY2)
        (next_mail,) = smtp.to("prefs@example.org")
        top_id, _, _, top_block = papers_of(next_mail)[0]
        assert top_id == "2604.14004" and "From: KAIST AI" in top_block
        assert text_part(next_mail).count("From:") == 1

        reset = http.post(f"{base}{teach}/reset")
        assert reset.status_code == 200 and "Nothing yet" in reset.text
        with runtime.session_factory() as session:
            assert session.scalars(select(PaperMark)).all() == []
            assert session.get(ReaderProfile, reader.id) is None
            assert session.get(Subscriber, reader.id) is not None

        # Erasing the person erases what they taught, too.
        assert http.post(first[1]).status_code == 200
        with runtime.session_factory() as session:
            person = session.get(Subscriber, reader.id)
            assert person is not None
            my_data = runtime.links.data_access(person).removeprefix(runtime.settings.base_url)
        assert http.post(f"{base}{my_data}/delete").status_code == 200
        with runtime.session_factory() as session:
            assert session.scalars(select(PaperMark)).all() == []
            assert session.scalars(select(ReaderProfile)).all() == []


def test_papers_stored_before_vectors_existed_get_them_when_an_edition_is_loaded(
    site: tuple[Runtime, str], smtp: SMTPSink
) -> None:
    from digest.papers.source import load_sample, parse_items, store_papers

    runtime, _ = site
    with transaction(runtime.session_factory) as session:
        store_papers(session, parse_items(load_sample(DAY2) or [], DAY2))  # no embedding hook
        add_confirmed(session, runtime.tokens, "safety@example.org", now=utcnow(), topics="AI safety")
    with runtime.session_factory() as session:
        assert session.scalars(select(PaperEmbedding)).all() == []
    run_inprocess(runtime, DAY2)
    with runtime.session_factory() as session:
        models = set(session.scalars(select(PaperEmbedding.model)))
    assert models == {runtime.embedding_model}
    (mail,) = smtp.to("safety@example.org")
    # No paper of the day says "AI safety", yet the first one is there for its meaning.
    assert "Matches:" not in text_part(mail)
    top, *_ = papers_of(mail)
    assert "About: ai safety" in top[3], [p[0] for p in papers_of(mail)]


def test_less_like_this_alone_pushes_similar_papers_down() -> None:
    from digest.ranking.profile import Reader

    texts = [
        "Video diffusion models that generate long clips",
        "A survey of reward modelling for language models",
        "Text-to-video generation with diffusion transformers",
        "Graph neural networks for molecules",
    ]
    embedder = load_embedder()
    vectors = embedder.embed(texts)
    ranker = Ranker([Candidate(f"p{i}", 10.0 - i, t.lower()) for i, t in enumerate(texts)], vectors=vectors)
    unmarked = [p.paper_id for p in ranker.order(Profile())]
    assert unmarked == ["p0", "p1", "p2", "p3"]
    # The reader said "less like this" to a video generation paper: both video papers sink.
    less = Reader(key=(1, 0.0), disliked=embedder.embed(["Generating videos with diffusion models"]))
    marked = [p.paper_id for p in ranker.order(Profile(reader=less))]
    assert marked[:2] == ["p1", "p3"] and set(marked[2:]) == {"p0", "p2"}


def test_a_readers_digest_is_the_same_whoever_shares_their_page() -> None:
    """Planning ranks a page's taught readers together (one product, one sort for all): each
    must get exactly the papers and reasons they get when ranked alone."""
    from digest.ranking.profile import Reader

    rng = np.random.default_rng(11)
    texts = [f"paper {i} about {word}" for i, word in enumerate(["diffusion", "agents", "speech", "robots"] * 8)]
    candidates = [
        Candidate(f"p{i:02d}", 30.0 - i, text, (f"author {i % 5}",), "Qwen" if i % 7 == 0 else None)
        for i, text in enumerate(texts)
    ]
    vectors = rng.normal(size=(len(candidates), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    topic_vectors = {"diffusion": vectors[0] * 0.6 + vectors[4] * 0.4, "agents": vectors[1]}

    def near(*rows: int) -> np.ndarray:
        """Papers a reader marked: close to these candidates, not the same."""
        found = vectors[list(rows)] + rng.normal(0, 0.03, (len(rows), 384)).astype(np.float32)
        unit: np.ndarray = (found / np.linalg.norm(found, axis=1, keepdims=True)).astype(np.float32)
        return unit

    readers = [
        Reader((1, 0.0), liked=near(2, 6, 10), liked_titles=("a", "b", "c")),  # no topics: marks alone
        Reader((2, 0.0), liked=near(3), liked_titles=("d",), disliked=near(0, 8)),
        Reader((3, 0.0), disliked=near(1, 5)),  # "less" only
        Reader((4, 0.0), follows=("qwen", "author 3")),  # follows, no vectors
        Reader((5, 0.0), liked=near(*range(0, 32, 2)), liked_titles=tuple("efghijklmnopqrst"), personal_weight=0.9),
        Reader((6, 0.0), liked=near(7, 11), liked_titles=("u", "v"), disliked=near(15), personal_weight=0.35),
    ]
    profiles = [
        Profile.from_text("", "", readers[0]),
        Profile.from_text("diffusion, agents", "", readers[1]),
        Profile.from_text("agents", "", readers[2]),
        Profile.from_text("speech", "robots", readers[3]),
        Profile.from_text("", "", readers[4]),
        Profile.from_text("diffusion", "speech", readers[5]),
    ]
    for with_vectors in (True, False):
        options = {"vectors": vectors, "topic_vector": topic_vectors.get} if with_vectors else {}
        together = Ranker(candidates, **options)  # type: ignore[arg-type]
        together.learn(profiles)
        for profile in profiles:
            alone = Ranker(candidates, **options).pick(profile, 10, {"p05"})  # type: ignore[arg-type]
            assert together.pick(profile, 10, {"p05"}) == alone, (profile, with_vectors)
        if with_vectors:  # (without vectors the two readers without topics both get trending)
            orders = {tuple(p.paper_id for p in together.pick(profile, 10, set())) for profile in profiles}
            assert len(orders) == len(profiles), "every reader has an order of their own"
    # What the reasons say survived the batching too.
    shown = {
        line
        for profile in profiles
        for pick in Ranker(candidates, vectors=vectors).pick(profile, 10, set())
        for line in pick.lines
    }
    assert {"Like: a", "From: Qwen", "From: Author 3"} <= shown, shown
