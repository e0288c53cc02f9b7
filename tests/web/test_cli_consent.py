"""Operator commands never undo consent: import and `add --confirmed` against opted-out people.

Run as the real `digest` command against PostgreSQL, as an operator would, with a list that
holds people who unsubscribed, complained, hard-bounced and asked to be erased.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from digest.core.db import transaction
from digest.core.models import SubscriberStatus, utcnow
from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.rows import subscriber
from tests.web.test_cli_subscribers import digest

OPTED_OUT = {
    "left@example.org": SubscriberStatus.UNSUBSCRIBED,
    "reported@example.org": SubscriberStatus.COMPLAINED,
    "gone@example.org": SubscriberStatus.BOUNCED,
}


@pytest.fixture
def opted_out(runtime: Runtime) -> None:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        for address in [*OPTED_OUT, "erased@example.org"]:
            subscriptions.add_confirmed(session, runtime.tokens, address, now=now)
        left = subscriptions.get_by_email(session, "left@example.org")
        subscriptions.unsubscribe(session, left, now=now)
        reported = subscriptions.get_by_email(session, "reported@example.org")
        from tests.subscribers.test_consent import _delivery

        subscriptions.record_complaint(
            session, runtime.tokens, reported, _delivery(session, reported.id), detail="abuse", now=now
        )
        gone = subscriptions.get_by_email(session, "gone@example.org")
        subscriptions.record_bounce(
            session, gone.id, None, hard=True, detail="550 5.1.1", now=now, policy=runtime.policy
        )
        erased = subscriptions.get_by_email(session, "erased@example.org")
        subscriptions.erase(session, runtime.tokens, erased, now=now)


def test_import_skips_every_opted_out_address_and_fails_visibly(
    settings: Settings, runtime: Runtime, opted_out: None, tmp_path: Path
) -> None:
    source = tmp_path / "list.csv"
    source.write_text(
        "email,topics\n"
        "new@example.org,diffusion\n"
        "LEFT@example.org,robotics\n"
        "reported@example.org\n"
        "gone@example.org\n"
        "Erased@Example.org\n",
        encoding="utf-8",
    )
    done = digest(settings, tmp_path, "subscribers", "import", str(source))
    assert done.returncode != 0
    for line in (3, 4, 5, 6):
        assert f"line {line}: suppressed" in done.stderr, done.stderr
    assert "imported 1 subscribers" in done.stdout
    assert subscriber(runtime, "new@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]
    for address, status in OPTED_OUT.items():
        person = subscriber(runtime, address)
        assert person is not None and person.status is status and person.topics == ""
    assert subscriber(runtime, "erased@example.org") is None  # nothing came back for the erased

    again = digest(settings, tmp_path, "subscribers", "import", str(source))
    assert "imported 1 subscribers" in again.stdout  # a re-import changes nothing more


@pytest.mark.parametrize("address", [*OPTED_OUT, "erased@example.org"])
def test_add_confirmed_refuses_an_opted_out_address(
    settings: Settings, runtime: Runtime, opted_out: None, tmp_path: Path, address: str
) -> None:
    done = digest(settings, tmp_path, "subscribers", "add", address, "--confirmed", "--topics", "x")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "suppressed" in done.stderr and done.stderr.count("\n") == 1
    person = subscriber(runtime, address)
    assert person is None or person.status is not SubscriberStatus.ACTIVE


def test_only_a_hard_bounce_can_be_unsuppressed_by_the_operator(
    settings: Settings, runtime: Runtime, opted_out: None, tmp_path: Path
) -> None:
    assert digest(settings, tmp_path, "subscribers", "unsuppress", "left@example.org").returncode == 1
    assert subscriber(runtime, "left@example.org").status is SubscriberStatus.UNSUBSCRIBED  # type: ignore[union-attr]
    done = digest(settings, tmp_path, "subscribers", "unsuppress", "gone@example.org")
    assert done.returncode == 0, done.stderr
    assert subscriber(runtime, "gone@example.org").status is SubscriberStatus.ACTIVE  # type: ignore[union-attr]


def test_erasure_keeps_only_a_keyed_hash(runtime: Runtime, opted_out: None) -> None:
    from sqlalchemy import select

    from digest.core.models import Suppression

    with runtime.session_factory() as session:
        kept = session.scalars(select(Suppression)).all()
    assert {s.reason for s in kept} == {"erased", "complained"}
    assert all(len(s.address_hash) == 64 and "@" not in s.address_hash for s in kept)
    assert runtime.tokens.address_fingerprint("erased@example.org") in {s.address_hash for s in kept}


def test_export_neutralises_cells_that_would_run_as_formulas(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    with transaction(runtime.session_factory) as session:
        subscriptions.subscribe(
            session, runtime.tokens, "=1+1@example.org", now=utcnow(), topics='=HYPERLINK("http://evil.example","x")'
        )
        subscriptions.subscribe(session, runtime.tokens, "-2+3@example.org", now=utcnow(), topics="@SUM(A1)")
    target = tmp_path / "out.csv"
    assert digest(settings, tmp_path, "subscribers", "export", str(target)).returncode == 0
    rows = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    cells = [cell for row in rows for cell in (row["email"], row["topics"]) if cell]
    assert cells and not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), cells
    assert "'=1+1@example.org" in cells
