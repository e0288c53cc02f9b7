"""HTML pages: the front page with the latest digest, confirm, unsubscribe, preferences.

Links in mail are opened by scanners too, so every GET only shows a page; changes happen on
POST (one button). Handlers are thin: the domain functions in ``digest.subscribers.subscriptions`` work.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from digest.core.db import transaction
from digest.core.errors import DigestError, NotFound
from digest.core.models import Frequency, Paper, ReaderProfile, Subscriber, SubscriberStatus, utcnow
from digest.core.text import parse_terms
from digest.orchestration.runtime import Runtime
from digest.papers.embedding import topic_vectors
from digest.rendering.links import subscriber_stamp
from digest.rendering.tokens import Purpose
from digest.subscribers import feedback, notifications, subscriptions
from digest.subscribers.confirmation_limits import describe_limits, longest_window, retry_after, source_network
from digest.web import archive
from digest.web.api import SubscribeRequest, subscribe_json
from digest.web.deps import ClientIP, LimitsDep, RuntimeDep, UnknownLink, link_limit, load_subscriber
from digest.web.frontpage import front_page
from digest.web.ratelimit import RateLimited
from digest.web.signup import resend_confirmation, send_welcome, start_signup
from digest.web.templating import templates

router = APIRouter(include_in_schema=False)

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def render_front(
    request: Request,
    runtime: Runtime,
    *,
    error: str | None = None,
    status: int = 200,
    typed: dict[str, str] | None = None,
) -> HTMLResponse:
    """The front page; ``typed`` refills the form after an error, so nobody types it twice."""
    page = front_page(runtime)
    context = {"page": page, "error": error, "typed": typed or {}}
    return templates.TemplateResponse(request, "index.html", context, status_code=status)


def message_page(request: Request, title: str, text: str, *, status: int = 200, **extra: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "message.html", {"title": title, "text": text, **extra}, status_code=status
    )


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, runtime: RuntimeDep) -> HTMLResponse:
    return await run_in_threadpool(render_front, request, runtime)


CHECK_INBOX = (
    "Check your inbox",
    "If this address can subscribe, a confirmation email is on its way. "
    "Open the link in it to start receiving the digest.",
)
# Said on every "on its way" page, whatever happened: which of these budgets withheld a mail
# is never said to a stranger (it would tell them about the address), so the limit is stated.
MAILBOX_LIMIT = (
    "We send at most {limits} of these emails to one address, however many are asked for; "
    "if none arrives, check your spam folder, or ask again later."
)
DATA_LINK_WITHHELD = (
    "Not sent: this address has had the most emails of this kind we send ({limits}). Ask again after {at:%H:%M} UTC."
)


def check_inbox_page(request: Request, runtime: Runtime, title: str, text: str) -> HTMLResponse:
    limit = MAILBOX_LIMIT.format(limits=describe_limits(runtime.settings.confirmation_limit_per_mailbox))
    return message_page(request, title, f"{text} {limit}")


@router.post("/subscribe", response_model=None)
async def subscribe(
    request: Request, runtime: RuntimeDep, limits: LimitsDep, ip: ClientIP, background: BackgroundTasks
) -> Response:
    """Form or JSON; the same answer for new, pending, active and unsubscribed addresses."""
    wants_json = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    if wants_json:
        try:
            payload = SubscribeRequest.model_validate_json(await request.body())
        except ValueError:
            return Response(
                json.dumps({"detail": "Send a JSON object with an email field."}),
                status_code=422,
                media_type="application/json",
            )
        return await subscribe_json(payload, runtime, limits, ip, background)
    form = await request.form()
    email, topics, website = (str(form.get(k) or "") for k in ("email", "topics", "website"))
    form_topics = topics or None
    if website:
        # The hidden honeypot field is filled only by bots: pretend it worked, do nothing.
        return check_inbox_page(request, runtime, *CHECK_INBOX)
    try:
        await start_signup(runtime, limits, ip, email, form_topics, background)
    except RateLimited:
        raise  # the app's handler answers 429 with Retry-After
    except DigestError as exc:  # a bad address or topics: say what is wrong, nothing stored
        error = str(exc)
        typed = {"email": email, "topics": topics}
        return await run_in_threadpool(lambda: render_front(request, runtime, error=error, status=400, typed=typed))
    return check_inbox_page(request, runtime, *CHECK_INBOX)


# ----------------------------------------------------------------------------------- confirm


@router.get("/confirm/{token}", response_class=HTMLResponse)
def confirm_page(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.CONFIRM, token)
        if subscriber.status is SubscriberStatus.ACTIVE:
            return message_page(
                request,
                "You are subscribed",
                "This address is already confirmed.",
                preferences_url=runtime.links.preferences(subscriber),
            )
        (_, topics) = runtime.tokens.read_with_extra(Purpose.CONFIRM, token)
    return templates.TemplateResponse(request, "confirm.html", {"token": token, "topics": topics})


@router.post("/confirm/resend", response_class=HTMLResponse)
async def confirm_resend(
    request: Request,
    token: Annotated[str, Form(max_length=1000)],
    runtime: RuntimeDep,
    limits: LimitsDep,
    ip: ClientIP,
    background: BackgroundTasks,
) -> HTMLResponse:
    await resend_confirmation(runtime, limits, ip, token, background)
    return check_inbox_page(
        request, runtime, "Check your inbox", "If this address still needs confirming, a new link is on its way."
    )


@router.post("/confirm/{token}", response_class=HTMLResponse)
async def confirm(request: Request, token: str, runtime: RuntimeDep, background: BackgroundTasks) -> HTMLResponse:
    welcome, preferences_url = await run_in_threadpool(_confirm, runtime, token)
    if welcome is not None:
        background.add_task(send_welcome, runtime, *welcome)
    return message_page(
        request,
        "You are subscribed",
        "Thanks for confirming. The next digest comes at your delivery hour; you can change when "
        "and what you receive on your preferences page.",
        preferences_url=preferences_url,
    )


def _confirm(runtime: Runtime, token: str) -> tuple[tuple[str, bytes] | None, str]:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.CONFIRM, token)
        (_, topics) = runtime.tokens.read_with_extra(Purpose.CONFIRM, token)
        issued_at = dt.datetime.fromtimestamp(runtime.tokens.issued_at(Purpose.CONFIRM, token), dt.UTC)
        activated = subscriptions.confirm(
            session, runtime.tokens, subscriber, now=utcnow(), issued_at=issued_at, topics=topics
        )
        welcome = (subscriber.email, notifications.welcome_message(runtime, subscriber)) if activated else None
        return welcome, runtime.links.preferences(subscriber)


# ------------------------------------------------------------------------------- unsubscribe


@router.get("/unsubscribe/{token}", response_class=HTMLResponse)
def unsubscribe_page(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.UNSUBSCRIBE, token)
        done = subscriber.status is SubscriberStatus.UNSUBSCRIBED
        return templates.TemplateResponse(
            request, "unsubscribe.html", {"token": token, "email": subscriber.email, "done": done}
        )


@router.post("/unsubscribe/{token}", response_class=HTMLResponse)
def unsubscribe(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    """The button and RFC 8058 one-click (``List-Unsubscribe=One-Click``): 200, no redirect, idempotent.

    The body is not required: a POST to this signed URL is the request, whatever the client
    sends (form-urlencoded, multipart or nothing).
    """
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.UNSUBSCRIBE, token)
        subscriptions.unsubscribe(session, subscriber, now=utcnow())
        home = runtime.links.home
    return message_page(
        request,
        "You are unsubscribed",
        "You will not receive any more digests. Changed your mind? You can subscribe again "
        "from the front page at any time.",
        home_url=home,
    )


# ------------------------------------------------------------------------------- preferences


def _prefs_context(runtime: Runtime, subscriber: Subscriber, token: str, **extra: Any) -> dict[str, Any]:
    return {
        "token": token,
        "subscriber": subscriber,
        "frequencies": [f.value for f in Frequency],
        "weekdays": list(enumerate(WEEKDAYS)),
        "hours": range(24),
        "min_size": subscriptions.MIN_DIGEST_SIZE,
        "max_size": subscriptions.MAX_DIGEST_SIZE,
        "default_size": runtime.settings.digest_size,
        "unsubscribe_url": runtime.links.unsubscribe(subscriber),
        "feed_url": archive.personal_feed_url(runtime.settings.base_url, subscriber),
        **extra,
    }


@router.get("/preferences/{token}", response_class=HTMLResponse)
def preferences_page(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.PREFERENCES, token)
        context = _prefs_context(runtime, subscriber, token, **_taught_context(session, subscriber))
        return templates.TemplateResponse(request, "preferences.html", context)


def _form_int(values: dict[str, list[str]], name: str, default: int) -> int:
    raw = (values.get(name) or [""])[0].strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise DigestError(f"{name.replace('_', ' ').capitalize()} must be a whole number.") from exc


def _parse_preferences(values: dict[str, list[str]], subscriber: Subscriber) -> subscriptions.PreferencesUpdate:
    def text(name: str, default: str) -> str:
        return (values.get(name) or [default])[0]

    try:
        frequency = Frequency(text("frequency", subscriber.frequency.value))
    except ValueError as exc:
        raise DigestError("Choose daily, weekly, monthly or paused.") from exc
    return subscriptions.PreferencesUpdate(
        frequency=frequency,
        digest_size=_form_int(values, "digest_size", subscriber.digest_size or 10),
        topics=text("topics", subscriber.topics),
        excluded=text("excluded", subscriber.excluded),
        send_hour=_form_int(values, "send_hour", subscriber.send_hour),
        timezone=text("timezone", subscriber.timezone).strip(),
        weekday=_form_int(values, "weekday", subscriber.weekday),
        # A checkbox is sent only when ticked; the form always marks that it carries one.
        only_for_you=bool(values.get("only_for_you")) if "has_only_for_you" in values else None,
    )


@router.post(
    "/preferences/{token}", response_class=HTMLResponse, dependencies=[link_limit("preferences", Purpose.PREFERENCES)]
)
async def save_preferences(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    form = await request.form()
    values = {key: [str(v) for v in form.getlist(key)] for key in form}
    return await run_in_threadpool(_save_preferences, request, runtime, token, values)


def _save_preferences(request: Request, runtime: Runtime, token: str, values: dict[str, list[str]]) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.PREFERENCES, token)
        try:
            subscriptions.update_preferences(session, subscriber, _parse_preferences(values, subscriber))
        except DigestError as exc:
            session.rollback()
            session.refresh(subscriber)
            return templates.TemplateResponse(
                request,
                "preferences.html",
                _prefs_context(runtime, subscriber, token, error=str(exc), **_taught_context(session, subscriber)),
                status_code=400,
            )
        # Topic vectors when the reader changes topics, not when a digest is planned.
        topic_vectors(session, parse_terms(subscriber.topics), runtime.embedding_model, lambda: runtime.embedder)
        return templates.TemplateResponse(
            request,
            "preferences.html",
            _prefs_context(runtime, subscriber, token, saved=True, **_taught_context(session, subscriber)),
        )


@router.post(
    "/preferences/{token}/feed",
    response_class=HTMLResponse,
    dependencies=[link_limit("preferences", Purpose.PREFERENCES)],
)
def replace_feed(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    """A new address for the reader's own feed (a leaked one stops working at once)."""
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.PREFERENCES, token)
        archive.replace_feed_token(subscriber)
        context = _prefs_context(runtime, subscriber, token, feed_replaced=True, **_taught_context(session, subscriber))
        return templates.TemplateResponse(request, "preferences.html", context)


@router.post(
    "/preferences/{token}/data-link",
    response_class=HTMLResponse,
    dependencies=[link_limit("data-link", Purpose.PREFERENCES)],
)
async def data_link(
    request: Request, token: str, runtime: RuntimeDep, ip: ClientIP, background: BackgroundTasks
) -> HTMLResponse:
    """Mail the short-lived export/erase link to the subscriber's own address."""
    context = await run_in_threadpool(_data_link_context, runtime, token)
    subscriber_id = context["subscriber"].id
    limits = runtime.confirmation_limits
    await run_in_threadpool(limits.take_source, source_network(ip))
    # The page belongs to the subscriber (it shows their address), so it may say when their
    # mailbox's budget is spent, which a stranger's page never does.
    if not await run_in_threadpool(limits.allow_address, "data-link", context["subscriber"].email):
        at = retry_after(utcnow(), longest_window(runtime.settings.confirmation_limit_per_mailbox))
        notice = DATA_LINK_WITHHELD.format(
            limits=describe_limits(runtime.settings.confirmation_limit_per_mailbox), at=at
        )
        return templates.TemplateResponse(request, "preferences.html", {**context, "data_link_withheld": notice})
    background.add_task(
        notifications.send_requested,
        runtime,
        "data-link",
        source_network(ip),
        subscriber_id,
        notifications.data_access_message,
        limited=False,  # counted just now
    )
    return templates.TemplateResponse(request, "preferences.html", {**context, "data_link_sent": True})


def _data_link_context(runtime: Runtime, token: str) -> dict[str, Any]:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.PREFERENCES, token)
        session.expunge(subscriber)
        return _prefs_context(runtime, subscriber, token)


@router.get("/my-data/{token}", response_class=HTMLResponse)
def my_data_page(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.DATA_ACCESS, token)
        return templates.TemplateResponse(request, "my_data.html", {"token": token, "email": subscriber.email})


@router.get("/my-data/{token}/export")
def export(token: str, runtime: RuntimeDep) -> Response:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.DATA_ACCESS, token)
        data = subscriptions.export_data(session, subscriber)
    return Response(
        json.dumps(data, indent=2, ensure_ascii=False),
        media_type="application/json",
        headers={
            "Content-Disposition": 'attachment; filename="my-digest-data.json"',
            "Cache-Control": "no-store",
        },
    )


@router.get("/my-data/{token}/delete", response_class=HTMLResponse)
def delete_page(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.DATA_ACCESS, token)
        return templates.TemplateResponse(request, "delete.html", {"token": token, "email": subscriber.email})


@router.post(
    "/my-data/{token}/delete", response_class=HTMLResponse, dependencies=[link_limit("delete", Purpose.DATA_ACCESS)]
)
def delete(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.DATA_ACCESS, token)
        subscriptions.erase(session, runtime.tokens, subscriber, now=utcnow())
    return message_page(
        request,
        "Your data is deleted",
        "We deleted your address and everything we kept about you. You will receive nothing more from us.",
    )


# ---------------------------------------------------------------------------- teaching the digest

MARKS = {"more": (feedback.MORE, "More like this"), "less": (feedback.LESS, "Less like this")}


def _feedback_target(session: Session, runtime: Runtime, token: str, mark: str) -> tuple[Subscriber, Paper, int, str]:
    """Who marks which paper how; a tampered link is refused (400), an unknown mark or a
    subscriber or paper that is gone is not found (404)."""
    if mark not in MARKS:
        raise NotFound("There is no such link.")
    subscriber_id, stamp, paper_id = runtime.tokens.read_for(Purpose.FEEDBACK, token)
    subscriber = session.get(Subscriber, subscriber_id)
    paper = session.get(Paper, paper_id)
    if subscriber is None or subscriber_stamp(subscriber) != stamp or paper is None:
        raise UnknownLink("This link does not lead anywhere any more.")
    signal, label = MARKS[mark]
    return subscriber, paper, signal, label


@router.get("/feedback/{token}/{mark}", response_class=HTMLResponse)
def feedback_page(request: Request, token: str, mark: str, runtime: RuntimeDep) -> HTMLResponse:
    """One button; nothing changes on GET (mail scanners open every link)."""
    with transaction(runtime.session_factory) as session:
        _, paper, _, label = _feedback_target(session, runtime, token, mark)
        return templates.TemplateResponse(
            request, "feedback.html", {"token": token, "mark": mark, "label": label, "title": paper.title}
        )


@router.post(
    "/feedback/{token}/{mark}", response_class=HTMLResponse, dependencies=[link_limit("feedback", Purpose.FEEDBACK)]
)
def record_feedback(request: Request, token: str, mark: str, runtime: RuntimeDep) -> HTMLResponse:
    """Records the mark: no cookie or login, idempotent, the last mark on a paper wins.

    The answer names the paper and nothing of the reader: a paper's links travel with a
    forwarded digest, so whoever holds them must not reach the reader's preferences (which
    show their address) from here. The way there is the reader's own preferences link.
    """
    with transaction(runtime.session_factory) as session:
        subscriber, paper, signal, label = _feedback_target(session, runtime, token, mark)
        feedback.record_mark(session, subscriber.id, paper.id, signal, now=utcnow(), embedder=runtime.embedder)
        title = paper.title
    more = signal == feedback.MORE
    return message_page(
        request,
        "Noted: " + label.lower(),
        f"“{title}”: your next digests rank papers like it "
        + ("higher." if more else "lower.")
        + " To see and undo what you taught, open your preferences from the link at the foot of any digest.",
    )


def _taught_context(session: Session, subscriber: Subscriber) -> dict[str, Any]:
    profile = session.get(ReaderProfile, subscriber.id)
    return {
        "taught": feedback.taught(session, subscriber.id),
        "follows": ", ".join(profile.follows) if profile else "",
        "personal": feedback.personal_choice(profile.personal_weight if profile else None),
        "personal_choices": list(feedback.PERSONAL_CHOICES),
    }


def _teach(request: Request, runtime: Runtime, token: str, values: dict[str, list[str]], action: str) -> HTMLResponse:
    def text(name: str) -> str | None:
        given = values.get(name)
        return given[0] if given else None

    with transaction(runtime.session_factory) as session:
        subscriber = load_subscriber(session, runtime, Purpose.PREFERENCES, token)
        now, notice, status = utcnow(), "Saved. Your next digest follows what you taught it.", 200
        try:
            if action == "reset":
                feedback.reset(session, subscriber.id, now=now)
                notice = "Everything you taught is forgotten: your digest starts again from your topics."
            elif action == "undo":
                feedback.remove_mark(session, subscriber.id, text("paper_id") or "", now=now, embedder=runtime.embedder)
            else:
                follows, personal = text("follows"), text("personal")
                feedback.set_choices(session, subscriber.id, follows=follows, personal=personal, now=now)
                _, unknown = feedback.add_examples(
                    session, subscriber.id, text("examples") or "", now=now, embedder=runtime.embedder
                )
                if unknown:
                    notice = (
                        "Saved, except these, which name no paper we have collected yet: " + ", ".join(unknown) + "."
                    )
                    status = 400
        except DigestError as exc:
            session.rollback()
            session.refresh(subscriber)
            notice, status = str(exc), 400
        context = _prefs_context(runtime, subscriber, token, **_taught_context(session, subscriber))
        context["teach_notice"] = notice
        return templates.TemplateResponse(request, "preferences.html", context, status_code=status)


@router.post(
    "/preferences/{token}/teach/{action}",
    response_class=HTMLResponse,
    dependencies=[link_limit("teach", Purpose.PREFERENCES)],
)
async def teach(request: Request, token: str, action: str, runtime: RuntimeDep) -> HTMLResponse:
    """Example papers, follows and how personal (``save``), undo one mark (``undo``), ``reset``."""
    if action not in ("save", "undo", "reset"):
        raise NotFound("There is no such page.")
    form = await request.form()
    values = {key: [str(v) for v in form.getlist(key)] for key in form}
    return await run_in_threadpool(_teach, request, runtime, token, values, action)
