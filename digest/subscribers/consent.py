"""Who may move a subscriber from which state to which: the rules, written once.

Everything that changes ``Subscriber.status`` asks ``next_status`` first (through
``digest.subscribers.subscriptions``), so these lines are the whole consent policy:

* An opt-out (unsubscribed, complained, erased) is undone only by the person's own double
  opt-in: a confirmation link they asked for *after* opting out, clicked.
* A hard bounce is undone by that double opt-in too, or by an operator's explicit
  ``digest subscribers unsuppress``.
* Nobody else — a stranger's request, a forged message, an import, ``add --confirmed`` —
  turns an opted-out address active.

``ERASED`` is not stored as a status: the row is deleted and a keyed hash of the address
(``Suppression``) stands for it.
"""

from __future__ import annotations

import enum

from digest.core.errors import DigestError
from digest.core.models import SubscriberStatus


class Actor(enum.StrEnum):
    STRANGER = "stranger"  # anyone: a web form, a mail-in request, an unauthenticated message
    PERSON = "person"  # whoever holds the subscriber's own link token (unsubscribe, preferences)
    OPT_IN = "opt-in"  # the person clicking a confirmation link mailed to the address
    REPORT = "report"  # a bounce or complaint report that names a delivery we signed
    SENDER = "sender"  # our own SMTP client, told by the recipient's server that it refuses
    OPERATOR = "operator"  # the list owner, through the CLI or the console


class Action(enum.StrEnum):
    REQUEST = "request"  # ask to subscribe (starts double opt-in; changes nothing else)
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    BOUNCE = "bounce"  # a hard bounce, or soft bounces past the window's threshold
    COMPLAIN = "complain"
    ERASE = "erase"
    ACTIVATE = "activate"  # operator: consent on record (add --confirmed, import)
    UNSUPPRESS = "unsuppress"  # operator: clear a hard bounce


ERASED = "erased"  # the pseudo-state of an address kept only as a suppression hash
NEW = "new"  # no row and no suppression: never seen, or forgotten before any opt-out

State = SubscriberStatus | str

P, A, U, B, C = (
    SubscriberStatus.PENDING,
    SubscriberStatus.ACTIVE,
    SubscriberStatus.UNSUBSCRIBED,
    SubscriberStatus.BOUNCED,
    SubscriberStatus.COMPLAINED,
)
OPTED_OUT_STATES: frozenset[State] = frozenset({U, B, C, ERASED})
EVERY_STATE: tuple[State, ...] = (NEW, P, A, U, B, C, ERASED)

# (action) -> (actors allowed, {from: to}); a from-state missing from the map is "no change".
RULES: dict[Action, tuple[frozenset[Actor], dict[State, State]]] = {
    # A request never changes an existing address: a confirmation link may go out, and only
    # its click (CONFIRM) does anything. A new address becomes pending; an erased one gets a
    # pending row too, but stays suppressed (erased, to these rules) until that click.
    Action.REQUEST: (frozenset(Actor), {NEW: P}),
    Action.CONFIRM: (frozenset({Actor.OPT_IN}), {P: A, U: A, B: A, C: A, ERASED: A}),
    Action.UNSUBSCRIBE: (frozenset({Actor.PERSON, Actor.OPT_IN, Actor.OPERATOR}), {P: U, A: U}),
    Action.BOUNCE: (frozenset({Actor.REPORT, Actor.SENDER}), {A: B}),
    Action.COMPLAIN: (frozenset({Actor.REPORT}), {P: C, A: C, U: C, B: C}),
    Action.ERASE: (frozenset({Actor.PERSON, Actor.OPERATOR}), {P: ERASED, A: ERASED, U: ERASED, B: ERASED, C: ERASED}),
    Action.ACTIVATE: (frozenset({Actor.OPERATOR}), {NEW: A, P: A}),
    Action.UNSUPPRESS: (frozenset({Actor.OPERATOR}), {B: A}),
}


class NotAllowed(DigestError):
    """This actor may not do this to a subscriber in this state."""


class Suppressed(NotAllowed):
    """The address opted out (or was erased); only the person's own double opt-in brings it back."""


def next_status(state: State, action: Action, actor: Actor) -> State:
    """The state after ``actor`` does ``action``; ``NotAllowed`` if they may not.

    Doing something to an address already in the resulting state (unsubscribing twice) is
    allowed and changes nothing, so repeated clicks succeed quietly.
    """
    actors, moves = RULES[action]
    if actor not in actors:
        raise NotAllowed(f"{actor.value} may not {action.value} a subscriber")
    if state in moves:
        return moves[state]
    if action is Action.ACTIVATE and state in OPTED_OUT_STATES:
        raise Suppressed(f"suppressed ({state}): only the person's own opt-in can bring the address back")
    if action is Action.UNSUPPRESS and state is not A:
        raise NotAllowed(f"only a bounced address can be unsuppressed (this one is {state})")
    return state
