"""Atom (RFC 4287) validation for the feed tests: the RFC's RELAX NG grammar (``atom.rng``, run by
libxml2 through lxml) plus the rules a grammar cannot state: the Schematron assertions of the
RFC's Appendix B and the MUSTs of section 4.1 about links, ids and summaries.

``atom_problems`` lists what is wrong (empty for a valid document); ``assert_valid_atom`` fails
a test with that list.
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path

from lxml import etree

NS = {"atom": "http://www.w3.org/2005/Atom"}


@cache
def _grammar() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(Path(__file__).with_name("atom.rng"))))


def _alternates(parent: etree._Element) -> list[str]:
    """4.1.1 and 4.1.2: at most one alternate link per (type, hreflang)."""
    seen = Counter(
        (link.get("type"), link.get("hreflang"))
        for link in parent.findall("atom:link", NS)
        if link.get("rel", "alternate") == "alternate"
    )
    return [f"two alternate links with type={t!r} hreflang={h!r}" for (t, h), n in seen.items() if n > 1]


def _entry_problems(entry: etree._Element, feed_has_author: bool) -> list[str]:
    where = f"entry {entry.findtext('atom:id', namespaces=NS)!r}"
    problems = [f"{where}: {p}" for p in _alternates(entry)]
    has_alternate = any(link.get("rel", "alternate") == "alternate" for link in entry.findall("atom:link", NS))
    content = entry.find("atom:content", NS)
    if not has_alternate and content is None:
        problems.append(f"{where}: neither an alternate link nor content (4.1.2)")
    authored = entry.find("atom:author", NS) is not None or entry.find("atom:source/atom:author", NS) is not None
    if not feed_has_author and not authored:
        problems.append(f"{where}: no author, and the feed has none (4.1.2)")
    if content is not None and content.get("src") is not None and entry.find("atom:summary", NS) is None:
        problems.append(f"{where}: content by src without a summary (4.1.1.1)")
    return problems


def atom_problems(body: bytes) -> list[str]:
    """Everything that makes ``body`` invalid Atom; empty when it is valid."""
    try:
        root = etree.fromstring(body)
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed XML: {exc}"]
    grammar = _grammar()
    if not grammar.validate(root):
        return [f"RELAX NG: line {e.line}: {e.message}" for e in grammar.error_log]
    if root.tag != "{http://www.w3.org/2005/Atom}feed":
        return _entry_problems(root, feed_has_author=False)
    problems = _alternates(root)
    feed_has_author = root.find("atom:author", NS) is not None
    for entry in root.findall("atom:entry", NS):
        problems += _entry_problems(entry, feed_has_author)
    return problems


def assert_valid_atom(body: bytes) -> None:
    problems = atom_problems(body)
    assert not problems, "\n".join(problems)
