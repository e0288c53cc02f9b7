"""Text analysis shared by papers and topics, so both sides reduce words the same way.

Lower case, words split at punctuation and hyphens, English stop words dropped, Snowball
stemming, acronym plurals folded; and the field's abbreviations, spelled out both ways.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

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
