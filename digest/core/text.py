"""Untrusted text made safe to store, put in a header, an XML feed or a CSV cell."""

from __future__ import annotations

import re

# C0 and C1 controls (tab, LF and CR are whitespace to the callers, who collapse it), DEL,
# lone surrogates (PostgreSQL and UTF-8 refuse them) and the two non-characters XML forbids.
UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_TERMS_SPLIT = re.compile(r"[,;\n]+")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def without_unsafe(value: str) -> str:
    """``value`` without control characters, lone surrogates and XML non-characters."""
    return UNSAFE.sub("", value)


def has_unsafe(value: str) -> bool:
    """Whether ``value`` holds a character no store accepts (NUL on PostgreSQL) or no reader sees."""
    return UNSAFE.search(value) is not None


def for_terminal(value: str) -> str:
    """``value`` safe to print on a terminal or in a log line: controls shown, never obeyed.

    An escape sequence in a stored address or a mail header could otherwise move the cursor,
    rewrite earlier lines or retitle the operator's window; each control (line breaks included)
    is written out as its ``\\xNN``/``\\uNNNN`` escape instead.
    """
    return _TERMINAL_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def one_line(value: str) -> str:
    """Safe text on one line: whitespace runs (line breaks included) become one space."""
    return " ".join(without_unsafe(value).split())


def error_line(exc: BaseException, limit: int = 500) -> str:
    """What went wrong, on one line for a log or a terminal: the driver's own error behind a
    SQLAlchemy wrapper, whitespace runs as one space, at most ``limit`` characters, and the
    exception's name when its message says nothing."""
    reason = getattr(exc, "orig", None) or exc
    return for_terminal(" ".join(str(reason).split())[:limit]) or type(exc).__name__


def csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula (OWASP CSV injection rule)."""
    return "'" + value if value.startswith(FORMULA_START) else value


def parse_terms(text: str) -> tuple[str, ...]:
    """Free text "diffusion, reinforcement learning" to normalised, de-duplicated terms.

    Here, not in ranking, because storing a reader's topics needs it and must not load the
    ranking models (every CLI command saves the numpy/BM25 import this way).
    """
    seen: dict[str, None] = {}
    for part in _TERMS_SPLIT.split(text or ""):
        term = " ".join(part.lower().split())[:80]
        if term:
            seen.setdefault(term, None)
    return tuple(seen)[:20]
