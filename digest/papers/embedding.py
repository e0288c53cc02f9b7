"""Sentence embeddings on the CPU through ONNX Runtime: what a paper or a topic is about.

The default model ships inside the package (``digest/papers/embedding_model/``): all-MiniLM-L6-v2
(Apache-2.0, 384 dimensions), exported to ONNX and quantised to int8 by
``scripts/build_embedding_model.py``, which records its source and hashes in ``manifest.json``.
``DIGEST_EMBEDDING_MODEL`` names another folder with a ``model.onnx`` (inputs ``input_ids``,
``attention_mask``, optional ``token_type_ids``; first output the token states) and a
``tokenizer.json``. Only ``onnxruntime``, ``tokenizers`` and numpy run here, never torch.

A vector is the mean of the token states over the attention mask, L2-normalised, so a dot
product is the cosine. Vectors are stored as float32 bytes (``to_blob``/``from_blob``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from tokenizers import Tokenizer

from digest.core.models import Paper, PaperEmbedding, TopicEmbedding, utcnow

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "embedding_model"
MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained on; longer texts are cut
BATCH = 1  # measured: one text at a time is fastest here (no padding) and keeps RSS ~170 MB, 16 took ~590 MB


class Embedder:
    """One loaded model. ``name`` identifies it in stored vectors: a vector made by another
    model is never compared with this one's."""

    def __init__(self, model_dir: Path | str = DEFAULT_MODEL_DIR, *, threads: int = 1):
        folder = Path(model_dir)
        options = ort.SessionOptions()
        # One thread: workers run several processes on few cores, and a paper is a small batch.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.no_padding()
        self.name = _model_name(folder)
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text (float32)."""
        if not texts:
            return np.zeros((0, getattr(self, "dimensions", 0)), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        out: list[np.ndarray | None] = [None] * len(texts)
        # Batches of similar length waste little on padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            states = np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
            weights = mask[:, :, None].astype(np.float32)
            pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            for row, i in enumerate(chunk):
                out[i] = pooled[row]
        matrix = np.vstack([v for v in out if v is not None]).astype(np.float32)
        return normalise(matrix)


def normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    unit: np.ndarray = (matrix / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


@lru_cache(maxsize=8)
def model_name(model_dir: str | None = None) -> str:
    """The name vectors of this model are stored under, without loading the model."""
    return _model_name(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR)


def _model_name(folder: Path) -> str:
    """The model file's hash (from the manifest when there is one): stable across installs."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        digest = json.loads(manifest.read_text(encoding="utf-8")).get("files", {}).get("model.onnx")
        if isinstance(digest, str):
            return digest[:16]
    h = hashlib.sha256()
    with (folder / "model.onnx").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def load_embedder(model_dir: str | None = None) -> Embedder:
    """The model of ``model_dir`` (default: the shipped one), loaded once per process."""
    return Embedder(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR)


def paper_text(title: str, abstract: str, ai_keywords: Sequence[str] = ()) -> str:
    """What a paper's vector is made of: title first (it is what the model sees in full)."""
    keywords = ", ".join(ai_keywords)
    return ". ".join(part for part in (title, keywords, abstract) if part)


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dimensions: int | None = None) -> np.ndarray:
    """A vector (or rows of vectors when ``dimensions`` is given) from ``to_blob`` bytes."""
    array = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return array.reshape(-1, dimensions) if dimensions else array


# ---------------------------------------------------------------------------------------------
# Stored vectors: papers once when collected, topics once per distinct topic


def store_paper_vectors(session: Session, papers: Sequence[Paper], embedder: Embedder) -> int:
    """Compute and store the vectors these papers lack (or have from another model)."""
    if not papers:
        return 0
    ids = [p.id for p in papers]
    stored = session.execute(
        select(PaperEmbedding.paper_id, PaperEmbedding.model).where(PaperEmbedding.paper_id.in_(ids))
    )
    current = {pid: model for pid, model in stored}
    todo = [p for p in papers if current.get(p.id) != embedder.name]
    if not todo:
        return 0
    vectors = embedder.embed([paper_text(p.title, p.abstract, p.ai_keywords or []) for p in todo])
    rows = [
        {"paper_id": p.id, "model": embedder.name, "vector": to_blob(v), "created_at": utcnow()}
        for p, v in zip(todo, vectors, strict=True)
    ]
    # An upsert: two workers loading the same old edition may both compute its missing vectors.
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(PaperEmbedding).values(rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["paper_id"],
            set_={"model": statement.excluded.model, "vector": statement.excluded.vector},
        )
    )
    return len(todo)


def paper_vectors(
    session: Session, papers: Sequence[Paper], model: str, embedder: Callable[[], Embedder] | None
) -> dict[str, np.ndarray]:
    """Stored vectors of ``papers`` made by ``model``. Missing ones (papers stored before
    vectors existed, or under another model) are computed and stored first when ``embedder``
    is given; the model is only loaded then."""
    if not papers:
        return {}
    found = _stored(session, [p.id for p in papers], model)
    missing = [p for p in papers if p.id not in found]
    if missing and embedder is not None:
        store_paper_vectors(session, missing, embedder())
        found.update(_stored(session, [p.id for p in missing], model))
    return found


def _stored(session: Session, paper_ids: list[str], model: str) -> dict[str, np.ndarray]:
    rows = session.execute(
        select(PaperEmbedding.paper_id, PaperEmbedding.vector).where(
            PaperEmbedding.paper_id.in_(paper_ids), PaperEmbedding.model == model
        )
    )
    return {pid: from_blob(blob) for pid, blob in rows}


def topic_vectors(
    session: Session, topics: Sequence[str], model: str, embedder: Callable[[], Embedder] | None
) -> dict[str, np.ndarray]:
    """Vectors of normalised topics, computed once per topic and model and shared by everyone
    who names it; two processes computing one at once both succeed."""
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return {}
    found = {
        topic: from_blob(blob)
        for topic, blob in session.execute(
            select(TopicEmbedding.topic, TopicEmbedding.vector).where(
                TopicEmbedding.model == model, TopicEmbedding.topic.in_(wanted)
            )
        )
    }
    missing = [t for t in wanted if t not in found]
    if missing and embedder is not None:
        vectors = embedder().embed(missing)
        rows = [{"model": model, "topic": t, "vector": to_blob(v)} for t, v in zip(missing, vectors, strict=True)]
        insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(TopicEmbedding).on_conflict_do_nothing(index_elements=["model", "topic"]), rows)
        found.update(zip(missing, vectors, strict=True))
    return found
