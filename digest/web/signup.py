"""Starting double opt-in from the web: validation and the request limit, then (after the
answer) the database step, the confirmation limits and the confirmation mail.

The answer never depends on the address's state (no enumeration): callers show the same page
whatever happens here, unless the input itself is wrong or the client floods the form (429).
The requester's network's mail budget is counted while answering, for every address (a 429 that
says no mail went out, ``ConfirmationLimits.take_source``). Everything that does depend on the
address (storing, the per-mailbox/domain/overall limits, rendering, signing, sending) runs as a
background task after the answer has gone out, so neither the answer nor the time to answer
says anything.
"""

from __future__ import annotations

import datetime as dt
import logging

from starlette.background import BackgroundTasks
from starlette.concurrency import run_in_threadpool

from digest.core.addresses import normalise_address
from digest.core.db import transaction
from digest.core.errors import InvalidToken
from digest.core.models import Subscriber, SubscriberStatus, utcnow
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Purpose
from digest.subscribers import notifications, subscriptions
from digest.subscribers.confirmation_limits import source_network
from digest.transport.mailer import SendError
from digest.web.ratelimit import WebLimits

log = logging.getLogger(__name__)


async def start_signup(
    runtime: Runtime, limits: WebLimits, ip: str, email: str, topics: str | None, background: BackgroundTasks
) -> None:
    """Validate and rate-limit now; store a pending subscriber and send the confirmation (if
    one is due) after the answer."""
    await run_in_threadpool(limits.hit, "subscribe", "ip", ip)
    address = normalise_address(email)  # InvalidAddress: nothing stored or sent
    if topics is not None:
        subscriptions.clean_topics(topics)  # a bad value fails before anything is counted
    await run_in_threadpool(runtime.confirmation_limits.take_source, source_network(ip))
    background.add_task(_subscribe_and_confirm, runtime, address, topics)


async def _subscribe_and_confirm(
    runtime: Runtime, address: str, topics: str | None, *, only_if_pending: bool = False
) -> None:
    try:
        message = await run_in_threadpool(_store_pending, runtime, address, topics, utcnow(), only_if_pending)
        if message is None:
            return
        allowed = await run_in_threadpool(runtime.confirmation_limits.allow_address, "confirm", address)
    except Exception:  # after the answer: nobody to tell but the log
        log.exception("storing a web subscription failed")
        return
    if not allowed:
        await run_in_threadpool(_forget_confirmation, runtime, address)
        return
    await _send_confirmation(runtime, address, message)


def _store_pending(
    runtime: Runtime, address: str, topics: str | None, now: dt.datetime, only_if_pending: bool = False
) -> bytes | None:
    with transaction(runtime.session_factory) as session:
        if only_if_pending:
            # A resend: if they confirmed or left since the request, there is nothing to resend
            # (subscribing again would put an unsubscribed address back to pending).
            current = subscriptions.find_by_email(session, address)
            if current is None or current.status is not SubscriberStatus.PENDING:
                return None
        outcome = subscriptions.subscribe(session, runtime.tokens, address, now=now, topics=topics, source="web")
        if not outcome.send_confirmation:
            return None
        subscriber = session.get(Subscriber, outcome.subscriber_id)
        assert subscriber is not None
        return notifications.confirmation_message(runtime, subscriber, outcome.topics)


async def resend_confirmation(
    runtime: Runtime, limits: WebLimits, ip: str, token: str, background: BackgroundTasks
) -> None:
    """A fresh confirmation for the pending subscriber an (expired) confirmation link names."""
    await run_in_threadpool(limits.hit, "resend", "ip", ip)
    await run_in_threadpool(runtime.confirmation_limits.take_source, source_network(ip))
    try:
        subscriber_id: int | None = runtime.tokens.read(Purpose.CONFIRM, token)[0]
    except InvalidToken as exc:
        if not exc.expired:
            raise
        subscriber_id = exc.subscriber_id
    found = await run_in_threadpool(_pending_address, runtime, subscriber_id)
    if found is None:
        return  # already confirmed, unsubscribed or erased: same answer, nothing sent
    background.add_task(_subscribe_and_confirm, runtime, found, None, only_if_pending=True)


async def _send_confirmation(runtime: Runtime, address: str, message: bytes) -> None:
    """Send, or if the relay refuses or is down, log it and forget that a link was sent.

    The answer stays the same either way (no enumeration, no 500); forgetting the send lets the
    person's next attempt send a link at once instead of waiting out the resend window.
    """
    try:
        await notifications.deliver(runtime, address, message)
    except SendError as exc:
        log.warning("confirmation to a subscriber could not be sent: %s", exc.reason)
    except Exception:
        log.exception("confirmation to a subscriber could not be sent")
    else:
        return
    try:
        await run_in_threadpool(_forget_confirmation, runtime, address)
    except Exception:
        log.exception("could not record that a confirmation was not sent")


async def send_welcome(runtime: Runtime, address: str, message: bytes) -> None:
    """The welcome after confirming; the subscription stands whether or not it arrives."""
    try:
        await notifications.deliver(runtime, address, message)
    except SendError as exc:
        log.warning("welcome to a new subscriber could not be sent: %s", exc.reason)
    except Exception:  # after the answer: nobody to tell but the log
        log.exception("welcome to a new subscriber could not be sent")


def _forget_confirmation(runtime: Runtime, address: str) -> None:
    with transaction(runtime.session_factory) as session:
        subscriber = subscriptions.find_by_email(session, address)
        if subscriber is not None and subscriber.status is SubscriberStatus.PENDING:
            subscriber.confirmation_sent_at = None


def _pending_address(runtime: Runtime, subscriber_id: int | None) -> str | None:
    if subscriber_id is None:
        return None
    with transaction(runtime.session_factory) as session:
        subscriber = session.get(Subscriber, subscriber_id)
        if subscriber is None or subscriber.status is not SubscriberStatus.PENDING:
            return None
        return subscriber.email
