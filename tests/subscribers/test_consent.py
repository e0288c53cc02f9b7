"""The consent rules: no sequence of actions without the person's own opt-in revives an opt-out.

Two levels: the rules table itself (every sequence, exhaustively short and randomly long), and
the real domain functions on PostgreSQL driven by Hypothesis with what a stranger, a forged
report, an operator or an old link can do.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
import time_machine
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from digest.core.db import transaction
from digest.core.errors import DigestError, InvalidToken
from digest.core.models import Delivery, Digest, DigestKind, SubscriberStatus, utcnow
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Purpose
from digest.subscribers import subscriptions
from digest.subscribers.consent import (
    ERASED,
    EVERY_STATE,
    OPTED_OUT_STATES,
    RULES,
    Action,
    Actor,
    NotAllowed,
    State,
    Suppressed,
    next_status,
)

NOT_THE_PERSONS_OPT_IN = [(action, actor) for action in Action for actor in Actor if actor is not Actor.OPT_IN]


def run(state: State, steps: list[tuple[Action, Actor]]) -> State:
    for action, actor in steps:
        try:
            state = next_status(state, action, actor)
        except NotAllowed:
            continue
    return state


@pytest.mark.parametrize("start", sorted(OPTED_OUT_STATES, key=str))
def test_every_short_sequence_without_opt_in_leaves_an_opt_out_inactive(start: State) -> None:
    """Exhaustive over all sequences of up to three steps; a bounce may be cleared by the operator."""
    for length in range(1, 4):
        for steps in itertools.product(NOT_THE_PERSONS_OPT_IN, repeat=length):
            end = run(start, list(steps))
            if start is SubscriberStatus.BOUNCED and (Action.UNSUPPRESS, Actor.OPERATOR) in steps:
                continue  # the one documented exception: an operator clears a hard bounce
            assert end is not SubscriberStatus.ACTIVE, (start, steps)


@given(
    start=st.sampled_from([SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.COMPLAINED, ERASED]),
    steps=st.lists(st.sampled_from(NOT_THE_PERSONS_OPT_IN), max_size=40),
)
def test_no_long_sequence_without_opt_in_revives_an_opt_out(start: State, steps: list[tuple[Action, Actor]]) -> None:
    assert run(start, steps) is not SubscriberStatus.ACTIVE


def test_only_the_rules_named_actors_may_act() -> None:
    assert next_status(SubscriberStatus.UNSUBSCRIBED, Action.CONFIRM, Actor.OPT_IN) is SubscriberStatus.ACTIVE
    for actor in Actor:
        if actor is not Actor.OPT_IN:
            with pytest.raises(NotAllowed):
                next_status(SubscriberStatus.UNSUBSCRIBED, Action.CONFIRM, actor)
    with pytest.raises(Suppressed):
        next_status(SubscriberStatus.COMPLAINED, Action.ACTIVATE, Actor.OPERATOR)
    with pytest.raises(NotAllowed):
        next_status(SubscriberStatus.UNSUBSCRIBED, Action.UNSUPPRESS, Actor.OPERATOR)
    assert set(RULES) == set(Action)
    assert set(EVERY_STATE) >= {s for s in SubscriberStatus}


# ------------------------------------------------------------------ the real functions

STRANGER_MOVES = [
    "subscribe request",
    "subscribe request with topics",
    "operator add --confirmed",
    "operator unsuppress",
    "old confirmation link",
    "forged mail unsubscribe",
    "person unsubscribes",
    "hard bounce report",
    "complaint report",
]
_addresses = itertools.count()
_days = itertools.count()


def opt_out(runtime: Runtime, kind: State) -> tuple[str, str]:
    """A subscriber who opted out (``kind``), and a confirmation link made before they did."""
    address = f"person{next(_addresses)}@example.org"
    made = utcnow() - dt.timedelta(hours=1)  # still within the link's 48 hours
    start = made + dt.timedelta(minutes=1)
    with transaction(runtime.session_factory) as session:
        person = subscriptions.add_confirmed(session, runtime.tokens, address, now=made)
        with time_machine.travel(made, tick=False):
            old_link = runtime.links.confirm(person).rsplit("/", 1)[1]
        if kind is SubscriberStatus.UNSUBSCRIBED:
            subscriptions.unsubscribe(session, person, now=start)
        elif kind is SubscriberStatus.BOUNCED:
            subscriptions.record_bounce(
                session, person.id, None, hard=True, detail="550", now=start, policy=runtime.policy
            )
        elif kind is SubscriberStatus.COMPLAINED:
            subscriptions.record_complaint(
                session, runtime.tokens, person, _delivery(session, person.id), detail="x", now=start
            )
        else:
            subscriptions.erase(session, runtime.tokens, person, now=start)
    return address, old_link


def _delivery(session: Session, subscriber_id: int) -> int:
    digest = Digest(
        kind=DigestKind.DAILY, date=dt.date(2001, 1, 1) + dt.timedelta(days=next(_days)), created_at=utcnow()
    )
    session.add(digest)
    session.flush()
    delivery = Delivery(digest_id=digest.id, subscriber_id=subscriber_id, message_id=f"<p{digest.id}@t>")
    session.add(delivery)
    session.flush()
    return delivery.id


def act(runtime: Runtime, address: str, old_link: str, move: str) -> None:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        person = subscriptions.find_by_email(session, address)
        try:
            if move.startswith("subscribe request"):
                subscriptions.subscribe(
                    session, runtime.tokens, address, now=now, topics="x" if "topics" in move else None
                )
            elif move == "operator add --confirmed":
                subscriptions.add_confirmed(session, runtime.tokens, address, now=now)
            elif move == "operator unsuppress" and person is not None:
                if person.status is not SubscriberStatus.BOUNCED:  # the one allowed undo
                    subscriptions.unsuppress(session, address, now=now)
            elif move == "old confirmation link" and person is not None:
                issued = dt.datetime.fromtimestamp(runtime.tokens.issued_at(Purpose.CONFIRM, old_link), dt.UTC)
                person_now = subscriptions.subscriber_from_token(session, runtime.tokens, Purpose.CONFIRM, old_link)
                subscriptions.confirm(session, runtime.tokens, person_now, now=now, issued_at=issued)
            elif move == "forged mail unsubscribe":
                pass  # mail-in without a token only mails a link: nothing to do to the state
            elif move == "person unsubscribes" and person is not None:
                subscriptions.unsubscribe(session, person, now=now)
            elif move == "hard bounce report" and person is not None:
                subscriptions.record_bounce(
                    session, person.id, None, hard=True, detail="550", now=now, policy=runtime.policy
                )
            elif move == "complaint report" and person is not None:
                subscriptions.record_complaint(
                    session, runtime.tokens, person, _delivery(session, person.id), detail="x", now=now
                )
        except (DigestError, InvalidToken):
            session.rollback()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(
        [SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED, SubscriberStatus.COMPLAINED, ERASED]
    ),
    moves=st.lists(st.sampled_from(STRANGER_MOVES), min_size=1, max_size=8),
)
@example(kind=SubscriberStatus.UNSUBSCRIBED, moves=["operator add --confirmed", "old confirmation link"])
@example(kind=SubscriberStatus.BOUNCED, moves=["subscribe request with topics", "operator add --confirmed"])
@example(kind=SubscriberStatus.COMPLAINED, moves=["operator unsuppress", "operator add --confirmed"])
@example(kind=ERASED, moves=["subscribe request", "operator add --confirmed", "old confirmation link"])
def test_no_stranger_operator_or_old_link_reactivates_an_opt_out(
    runtime: Runtime, kind: State, moves: list[str]
) -> None:
    address, old_link = opt_out(runtime, kind)
    for move in moves:
        act(runtime, address, old_link, move)
    with transaction(runtime.session_factory) as session:
        person = subscriptions.find_by_email(session, address)
        assert person is None or person.status is not SubscriberStatus.ACTIVE, (kind, moves)
        if kind in (ERASED, SubscriberStatus.COMPLAINED):
            assert subscriptions.is_suppressed(session, runtime.tokens, address)
