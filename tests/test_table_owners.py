"""One owner per table, checked in the source: only the ledger names the ``deliveries`` table,
and only the state machine changes a subscriber's status.

Everyone else calls them (``digest.delivery.ledger``, ``digest.subscribers.subscriptions``), so
"who has had edition D" and "may this person get mail" each have one answer. The scan reads
the syntax tree of every module of ``digest/`` and ``workers/`` (migrations, tests and
benchmarks are not scanned: they build and inspect the tables on purpose).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("digest", "workers")

DELIVERIES_OWNERS = {"digest/delivery/ledger.py", "digest/core/models.py"}
DELIVERIES_NAMES = {"Delivery", "DeliveryStatus"}
# SQL that names the table: after a keyword that takes a table, a column of it, or quoted.
DELIVERIES_SQL = re.compile(
    r"""\b(?:from|join|update|into|table|analyze|vacuum(?:\s*\([^)]*\))?)\s+deliveries\b
      | \bdeliveries\.\w
      | ['"]deliveries['"]""",
    re.IGNORECASE | re.VERBOSE,
)

STATUS_OWNER = "digest/subscribers/subscriptions.py"
# Writers of a subscriber's status besides the state machine, each with why it may.
STATUS_ALLOWED = {
    # The CSV import activates up to millions of people whose consent is on record: set-wise,
    # one UPDATE ... FROM and one INSERT ... SELECT over a staging table, after applying the
    # consent rules as one query (opt-outs and suppressed addresses are taken out first). It
    # makes only the operator's ACTIVATE move, the one ``subscriptions.add_confirmed`` makes
    # for a single address; row by row through the state machine it would take hours.
    ("digest/subscribers/importing.py", "_merge"),
}
SUBSCRIBER_STATUS_SQL = re.compile(
    r"\bupdate\s+subscribers\b.*\bset\b.*\bstatus\s*=|\binsert\s+into\s+subscribers\s*\([^)]*\bstatus\b",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class Finding:
    module: str
    line: int
    function: str  # the enclosing function, "" at module level
    what: str

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"{self.module}:{self.line}{where}: {self.what}"


def modules() -> Iterator[tuple[str, str]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def _docstrings(tree: ast.AST) -> set[int]:
    """Ids of the string nodes that are docstrings: prose about the table is not a use of it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(node: ast.AST) -> Iterator[str]:
    """The literal text of a string constant or f-string (its constant parts joined)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        yield "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))


def _named_table(node: ast.expr) -> str | None:
    """``Subscriber`` for ``update(Subscriber)`` / ``insert(Subscriber)`` anywhere in a call chain."""
    while True:
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in {"update", "insert"} and node.args and isinstance(node.args[0], ast.Name):
                return node.args[0].id
            node = func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return None


class Scan(ast.NodeVisitor):
    """Every naming of the deliveries table, and every write of a status, in one module."""

    def __init__(self, module: str, tree: ast.AST) -> None:
        self.module = module
        self.docstrings = _docstrings(tree)
        self.function: list[str] = []
        self.deliveries: list[Finding] = []
        self.status_writes: list[Finding] = []
        self.visit(tree)

    def _at(self, node: ast.AST, what: str) -> Finding:
        return Finding(self.module, getattr(node, "lineno", 0), ".".join(self.function), what)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in DELIVERIES_NAMES:
            self.deliveries.append(self._at(node, f"names {node.id}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in DELIVERIES_NAMES:
            self.deliveries.append(self._at(node, f"names {node.attr}"))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name in DELIVERIES_NAMES:
                self.deliveries.append(self._at(node, f"imports {alias.name}"))

    def visit_Constant(self, node: ast.Constant) -> None:
        self._text(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._text(node)
        for value in node.values:  # its constant parts were read with it
            if isinstance(value, ast.FormattedValue):
                self.visit(value)

    def _text(self, node: ast.Constant | ast.JoinedStr) -> None:
        if id(node) in self.docstrings:
            return
        for text in _strings(node):
            if DELIVERIES_SQL.search(text):
                self.deliveries.append(self._at(node, f"names the deliveries table in {text[:60]!r}"))
            if SUBSCRIBER_STATUS_SQL.search(text):
                self.status_writes.append(self._at(node, f"writes subscribers.status in SQL {text[:60]!r}"))

    def _targets(self, targets: list[ast.expr], node: ast.AST) -> None:
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "status":
                self.status_writes.append(self._at(node, f"assigns {ast.unparse(target)}"))

    def visit_Assign(self, node: ast.Assign) -> None:
        self._targets(node.targets, node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._targets([node.target], node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._targets([node.target], node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        # The bare name as an argument (``Table("deliveries", ...)``); as a key it is only a word.
        if any(isinstance(a, ast.Constant) and a.value == "deliveries" for a in node.args):
            self.deliveries.append(self._at(node, "names the deliveries table as an argument"))
        if any(k.arg == "status" for k in node.keywords):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "Subscriber":
                self.status_writes.append(self._at(node, "creates a Subscriber with a status"))
            elif isinstance(func, ast.Attribute) and func.attr == "values" and _named_table(func.value) == "Subscriber":
                self.status_writes.append(self._at(node, "writes Subscriber.status in a bulk statement"))
        self.generic_visit(node)


def scan(module: str, source: str) -> Scan:
    return Scan(module, ast.parse(source, filename=module))


def test_only_the_ledger_names_the_deliveries_table() -> None:
    found = [
        f for module, source in modules() if module not in DELIVERIES_OWNERS for f in scan(module, source).deliveries
    ]
    assert not found, (
        "only digest/delivery/ledger.py reads or writes the deliveries table; call a ledger function"
        " (returning plain values, e.g. ledger.Entry) instead:\n" + "\n".join(map(str, found))
    )


def test_only_the_state_machine_changes_a_subscribers_status() -> None:
    found = [
        f
        for module, source in modules()
        if module != STATUS_OWNER
        for f in scan(module, source).status_writes
        if (f.module, f.function) not in STATUS_ALLOWED
    ]
    assert not found, (
        "a subscriber's status changes only in digest/subscribers/subscriptions.py (it asks the consent"
        " rules); call it instead:\n" + "\n".join(map(str, found))
    )


def test_every_allowed_status_writer_still_writes_one() -> None:
    """An exception that no longer applies is removed, not left to excuse a new writer."""
    writers = {(f.module, f.function) for module, source in modules() for f in scan(module, source).status_writes}
    assert writers >= STATUS_ALLOWED, STATUS_ALLOWED - writers


def test_the_scan_finds_each_way_of_naming_the_table_or_writing_a_status() -> None:
    source = '''
"""A docstring may say: UPDATE deliveries SET status, or from deliveries."""
from digest.core.models import Delivery as D, Subscriber
from digest.core import models

def f(session, subscriber, table):
    session.get(models.DeliveryStatus, 1)
    session.execute(text("SELECT reltuples FROM pg_class WHERE oid = 'deliveries'::regclass"))
    session.execute(text(f"VACUUM (ANALYZE) deliveries"))
    Table("deliveries", metadata)
    session.execute(update(Subscriber).where(Subscriber.id == 1).values(status="active"))
    subscriber.status = "bounced"
    Subscriber(email="a@b.c", status="active")
    session.execute(text(f"INSERT INTO subscribers (email, status) SELECT email, 'active' FROM {table}"))
    print("its deliveries were compacted", {"deliveries": []})
'''
    found = scan("example.py", source)
    assert [(f.line, f.what.split(" in ")[0]) for f in found.deliveries] == [
        (3, "imports Delivery"),
        (7, "names DeliveryStatus"),
        (8, "names the deliveries table"),
        (9, "names the deliveries table"),
        (10, "names the deliveries table as an argument"),
    ]
    assert [(f.line, f.function) for f in found.status_writes] == [(11, "f"), (12, "f"), (13, "f"), (14, "f")]
    assert str(found.status_writes[1]) == "example.py:12 (in f): assigns subscriber.status"
