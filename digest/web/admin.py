"""The operator console under ``/admin``: sign-in by a mailed one-time link, a dashboard, and
one address's record with the actions the consent rules allow.

Sign-in: an address listed in ``DIGEST_ADMIN_EMAILS`` gets a link, within a budget of its own
(``ConfirmationLimits.take_operator_source`` while answering, ``allow_operator_address`` after:
strangers can ask for an operator's link too, so it only has windows of at most an hour); every
address gets the same answer, or the same 429 once one network asked too often for it, with the time
after which asking again surely sends a link (from the clock alone), and the work happens
after it, so neither the page nor its timing says who is an operator or was asked for. The
link opens a page with one button (scanners fetch links); its POST uses the link up
(``AdminSignIn.used_at``) and starts a session: a signed cookie naming the row, HttpOnly,
SameSite=Strict, Secure outside development, good until ``expires_at`` or sign-out. Every form
POST carries the session's CSRF token.

Everything that changes a subscriber goes through ``digest.subscribers.subscriptions`` (which asks
``digest.subscribers.consent``) and the pause through ``digest.delivery.reputation``: the console decides nothing.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from digest.core.addresses import normalise_address
from digest.core.db import count_per_day, transaction
from digest.core.errors import DigestError, InvalidToken
from digest.core.models import (
    AdminSignIn,
    Digest,
    EventKind,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
    utcnow,
)
from digest.delivery import ledger, reputation
from digest.orchestration.runtime import Runtime
from digest.rendering.emails import LinkContext
from digest.rendering.tokens import Purpose
from digest.subscribers import notifications, subscriptions
from digest.subscribers.confirmation_limits import describe_limits, retry_after, source_network
from digest.subscribers.consent import ERASED, Action, Actor, NotAllowed, State, next_status
from digest.web.deps import ClientIP, LimitsDep, RuntimeDep
from digest.web.templating import templates

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", include_in_schema=False)

COOKIE = "digest_admin"
CHART_DAYS = 30
EDITION_DAYS = 7  # days with an edition shown on the dashboard
NO_STORE = {"Cache-Control": "no-store"}
# What the look-up page may offer, in the order shown; each is offered only when the consent
# rules let an operator make that move from the person's state.
OPERATOR_ACTIONS = (Action.UNSUBSCRIBE, Action.UNSUPPRESS, Action.ERASE)
SIGN_IN_SENT = "If this address may sign in, a link is on its way. It works once, within {minutes} minutes."
SIGN_IN_RETRY = (
    "Sign-in links to one address: at most {per_source} asked from one network, {per_address} in all. "
    "If none arrives, ask again after {at:%H:%M} UTC."
)


@dataclass(frozen=True)
class Operator:
    email: str
    sign_in_id: int
    csrf_token: str


# ------------------------------------------------------------------------------- sessions


def _stamp(moment: dt.datetime) -> int:
    return int(moment.timestamp())


def current_operator(request: Request, session: Session, runtime: Runtime, now: dt.datetime) -> Operator | None:
    """The operator whose live session the request's cookie names, or None."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        row_id, stamp = runtime.tokens.read(Purpose.ADMIN_SESSION, cookie)
    except InvalidToken:
        return None
    row = session.get(AdminSignIn, row_id)
    if (
        row is None
        or row.used_at is None
        or _stamp(row.used_at) != stamp
        or row.ended_at is not None
        or row.expires_at is None
        or row.expires_at <= now
        or row.csrf_token is None
        # Removed from DIGEST_ADMIN_EMAILS since: the session ends with the permission.
        or row.email not in runtime.settings.admin_addresses
    ):
        return None
    return Operator(row.email, row.id, row.csrf_token)


def _sign_in_redirect() -> Response:
    return RedirectResponse("/admin/sign-in", status_code=303, headers=NO_STORE)


def _refused(request: Request) -> Response:
    return page(request, "admin/refused.html", {}, status=403)


def page(request: Request, name: str, context: dict[str, Any], *, status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status, headers=NO_STORE)


def _csrf_ok(operator: Operator, token: str) -> bool:
    return hmac.compare_digest(operator.csrf_token.encode(), token.encode())


# -------------------------------------------------------------------------------- sign-in


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_form(request: Request) -> HTMLResponse:
    return page(request, "admin/sign_in.html", {"sent": False})


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in_request(
    request: Request,
    email: Annotated[str, Form(max_length=320)],
    runtime: RuntimeDep,
    limits: LimitsDep,
    ip: ClientIP,
    background: BackgroundTasks,
) -> HTMLResponse:
    """The same answer for every address; only an operator's gets mail, after the answer."""
    await run_in_threadpool(limits.hit, "admin-sign-in", "ip", ip)
    source = source_network(ip)
    try:
        keyed = normalise_address(email)
    except DigestError:
        keyed = email  # nobody's link; counted all the same, so the answer is every address's
    await run_in_threadpool(runtime.confirmation_limits.take_operator_source, source, keyed)
    background.add_task(_mail_sign_in_link, runtime, source, email)
    return page(request, "admin/sign_in.html", {"sent": True, **sign_in_answer(runtime, utcnow())})


def sign_in_answer(runtime: Runtime, now: dt.datetime) -> dict[str, str]:
    """The answer to every sign-in request. Nothing in it depends on the address or on what was
    counted for it (that would tell who is an operator, or was asked for): the retry time is when
    the operator budget's windows have forgotten every request made until now."""
    s = runtime.settings
    return {
        "message": SIGN_IN_SENT.format(minutes=s.admin_link_minutes),
        "retry": SIGN_IN_RETRY.format(
            per_source=describe_limits(s.admin_link_limit_per_source),
            per_address=describe_limits(s.admin_link_limit_per_address),
            at=retry_after(now, runtime.confirmation_limits.operator_window),
        ),
    }


def _new_sign_in(runtime: Runtime, email: str, source: str) -> tuple[str, bytes] | None:
    try:
        address = normalise_address(email)
    except DigestError:
        return None
    if address not in runtime.settings.admin_addresses:
        return None
    if not runtime.confirmation_limits.allow_operator_address(address):
        return None
    with transaction(runtime.session_factory) as session:
        row = AdminSignIn(email=address, created_at=utcnow())
        session.add(row)
        session.flush()
        token = runtime.tokens.make(Purpose.ADMIN_SIGN_IN, row.id, _stamp(row.created_at))
    minutes = runtime.settings.admin_link_minutes
    rendered = runtime.renderer.render(
        LinkContext(
            recipient=address,
            heading="Sign in to the Daily Papers console",
            explanation="Use the button to sign in to the operator console.",
            action="Sign in",
            url=f"{runtime.settings.base_url}/admin/sign-in/{token}",
            validity=f"The link works once, within {minutes} minutes.",
            postal_address=runtime.settings.postal_address,
        )
    )
    # The shared envelope of every requested mail (Message-ID, DKIM), not a second copy of it.
    return address, notifications._message(runtime, rendered, address, None)


async def _mail_sign_in_link(runtime: Runtime, source: str, email: str) -> None:
    try:
        prepared = await run_in_threadpool(_new_sign_in, runtime, email, source)
        if prepared is not None:
            await notifications.deliver(runtime, *prepared)
    except Exception:  # after the answer: nobody to tell but the log
        log.exception("a console sign-in link could not be sent")


def _usable_link(session: Session, runtime: Runtime, token: str, now: dt.datetime) -> AdminSignIn:
    row_id, stamp = runtime.tokens.read(Purpose.ADMIN_SIGN_IN, token)  # InvalidToken: 400
    row = session.get(AdminSignIn, row_id, with_for_update=True)
    if row is None or _stamp(row.created_at) != stamp:
        raise InvalidToken("This sign-in link is not valid.")
    if row.used_at is not None:
        raise InvalidToken("This sign-in link was already used. Ask for a new one.")
    if now - row.created_at > dt.timedelta(minutes=runtime.settings.admin_link_minutes):
        raise InvalidToken("This sign-in link has expired. Ask for a new one.")
    if row.email not in runtime.settings.admin_addresses:
        raise InvalidToken("This address may no longer sign in.")
    return row


@router.get("/sign-in/{token}", response_class=HTMLResponse)
def sign_in_link(request: Request, token: str, runtime: RuntimeDep) -> HTMLResponse:
    """Shows one button: a link scanner fetching this page must not use the link up."""
    with transaction(runtime.session_factory) as session:
        _usable_link(session, runtime, token, utcnow())
    return page(request, "admin/sign_in_link.html", {"token": token})


@router.post("/sign-in/{token}")
def sign_in(request: Request, token: str, runtime: RuntimeDep) -> Response:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        row = _usable_link(session, runtime, token, now)
        row.used_at = now
        row.expires_at = now + dt.timedelta(hours=runtime.settings.admin_session_hours)
        row.csrf_token = secrets.token_urlsafe(32)
        session.flush()
        cookie = runtime.tokens.make(Purpose.ADMIN_SESSION, row.id, _stamp(now))
        log.warning("console: %s signed in", row.email)
    response = RedirectResponse("/admin", status_code=303, headers=NO_STORE)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(runtime.settings.admin_session_hours * 3600),
        path="/admin",
        httponly=True,
        secure=runtime.settings.environment != "development",
        samesite="strict",
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request, runtime: RuntimeDep, csrf: Annotated[str, Form(max_length=100)] = "") -> Response:
    with transaction(runtime.session_factory) as session:
        operator = current_operator(request, session, runtime, utcnow())
        if operator is None or not _csrf_ok(operator, csrf):
            return _refused(request)
        row = session.get(AdminSignIn, operator.sign_in_id)
        assert row is not None
        row.ended_at = utcnow()
    response = _sign_in_redirect()
    response.delete_cookie(COOKIE, path="/admin")
    return response


# ------------------------------------------------------------------------------ dashboard


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    height: int
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    total: int
    peak: int
    bars: list[Bar]
    width: int
    height: int
    first_day: str
    last_day: str


def chart(title: str, counts: dict[str, int], today: dt.date) -> Chart:
    """A bar per day of the last ``CHART_DAYS`` days, laid out here so the page needs no script."""
    days = [today - dt.timedelta(days=CHART_DAYS - 1 - i) for i in range(CHART_DAYS)]
    values = [counts.get(d.isoformat(), 0) for d in days]
    peak = max(values) if values else 0
    height, step = 60, 10
    bars = []
    for i, (d, v) in enumerate(zip(days, values, strict=True)):
        h = round(v / peak * height) if peak else 0
        if v and h == 0:
            h = 1
        bars.append(Bar(x=i * step, y=height - h, height=h, label=f"{d.isoformat()}: {v}"))
    return Chart(title, sum(values), peak, bars, CHART_DAYS * step, height, days[0].isoformat(), days[-1].isoformat())


@dataclass(frozen=True)
class EditionRow:
    kind: str
    day: dt.date
    counts: dict[str, int]


def dashboard_data(session: Session, runtime: Runtime, now: dt.datetime) -> dict[str, Any]:
    rules = runtime.pause_rules
    by_status = {s.value: 0 for s in SubscriberStatus}
    for status, n in session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status)):
        by_status[SubscriberStatus(status).value] = int(n)
    since = dt.datetime.combine(now.date() - dt.timedelta(days=CHART_DAYS - 1), dt.time(), dt.UTC)
    growth = count_per_day(session, Subscriber.confirmed_at, Subscriber.status == SubscriberStatus.ACTIVE, since=since)
    sends = ledger.sent_per_day(session, since)
    # The newest days that have an edition (not the calendar's: a quiet week still shows).
    days = select(Digest.date).distinct().order_by(Digest.date.desc()).limit(EDITION_DAYS).subquery()
    recent = select(Digest).where(Digest.date.in_(select(days.c.date))).order_by(Digest.date.desc(), Digest.kind)
    editions = [
        EditionRow(d.kind.value, d.date, ledger.counts_by_status(session, d.id)) for d in session.scalars(recent)
    ]
    sent = reputation.sent_in(session, now, rules.window)
    bounces = (
        session.scalar(
            select(func.count(SubscriberEvent.id)).where(
                SubscriberEvent.kind == EventKind.HARD_BOUNCE, SubscriberEvent.created_at > now - rules.window
            )
        )
        or 0
    )
    counted, domains = reputation.counted_complaints(session, now, rules)
    failures = ledger.recent_failures(session, 20)
    return {
        "by_status": by_status,
        "growth": chart("New active subscribers per day", growth, now.date()),
        "sends": chart("Digests sent per day", sends, now.date()),
        "editions": editions,
        "window_days": rules.window.days,
        "sent": sent,
        "bounces": bounces,
        "bounce_rate": bounces / sent if sent else 0.0,
        "complaints": reputation.complaints_in(session, now, rules.window),
        "complaint_rate": reputation.complaint_rate(session, now, rules.window),
        "counted_complaints": counted,
        "complaint_domains": domains,
        "threshold": rules.threshold,
        "pause": reputation.active_pause(session),
        "failures": failures,
    }


@router.get("", response_class=HTMLResponse, response_model=None)
def dashboard(request: Request, runtime: RuntimeDep) -> Response:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        operator = current_operator(request, session, runtime, now)
        if operator is None:
            return _sign_in_redirect()
        data = dashboard_data(session, runtime, now)
    notice = {"resumed": "Sending resumed.", "not-paused": "Sending was not paused."}.get(
        request.query_params.get("done", "")
    )
    return page(request, "admin/dashboard.html", {"operator": operator, "notice": notice, **data})


@router.post("/sending/resume", response_model=None)
def resume_sending(request: Request, runtime: RuntimeDep, csrf: Annotated[str, Form(max_length=100)] = "") -> Response:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        operator = current_operator(request, session, runtime, now)
        if operator is None or not _csrf_ok(operator, csrf):
            return _refused(request)
        lifted = reputation.resume(session, now, f"console:{operator.email}")
    done = "resumed" if lifted else "not-paused"
    return RedirectResponse(f"/admin?done={done}", status_code=303, headers=NO_STORE)


# -------------------------------------------------------------------------------- look-up


def allowed_actions(state: State, has_row: bool) -> list[Action]:
    """The moves an operator may make from ``state`` that change something (digest.subscribers.consent)."""
    allowed = []
    for action in OPERATOR_ACTIONS:
        try:
            after = next_status(state, action, Actor.OPERATOR)
        except NotAllowed:
            continue
        if after != state and has_row:
            allowed.append(action)
    return allowed


def look_up(session: Session, runtime: Runtime, address: str) -> dict[str, Any]:
    subscriber, state = subscriptions.state_of(session, runtime.tokens, address)
    deliveries: list[ledger.Attempt] = []
    events: list[Any] = []
    if subscriber is not None:
        deliveries = ledger.of_subscriber(session, subscriber.id, 30)
        events = list(
            session.scalars(
                select(SubscriberEvent)
                .where(SubscriberEvent.subscriber_id == subscriber.id)
                .order_by(SubscriberEvent.id.desc())
                .limit(30)
            )
        )
    return {
        "address": address,
        "subscriber": subscriber,
        "state": str(state),
        "erased": state == ERASED,
        "deliveries": deliveries,
        "events": events,
        "actions": [a.value for a in allowed_actions(state, subscriber is not None)],
    }


@router.get("/subscribers", response_class=HTMLResponse, response_model=None)
def subscriber_page(request: Request, runtime: RuntimeDep, email: str = "") -> Response:
    with transaction(runtime.session_factory) as session:
        operator = current_operator(request, session, runtime, utcnow())
        if operator is None:
            return _sign_in_redirect()
        context: dict[str, Any] = {
            "operator": operator,
            "query": email[:320],
            "notice": request.query_params.get("done"),
        }
        if email.strip():
            try:
                context.update(look_up(session, runtime, normalise_address(email[:320])))
            except DigestError as exc:
                context["error"] = str(exc)
    return page(request, "admin/subscriber.html", context)


@router.post("/subscribers", response_model=None)
def subscriber_action(
    request: Request,
    runtime: RuntimeDep,
    email: Annotated[str, Form(max_length=320)],
    action: Annotated[str, Form(max_length=20)],
    csrf: Annotated[str, Form(max_length=100)] = "",
    confirm: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    now = utcnow()
    with transaction(runtime.session_factory) as session:
        operator = current_operator(request, session, runtime, now)
        if operator is None or not _csrf_ok(operator, csrf):
            return _refused(request)
        if action == Action.ERASE.value and confirm != "erase":
            # Erasure cannot be undone: one stray click must not do it (the form's box says so).
            raise NotAllowed("Erasing cannot be undone: tick the box that confirms it, then erase.")
        address = normalise_address(email)
        subscriber, state = subscriptions.state_of(session, runtime.tokens, address)
        wanted = Action(action) if action in {a.value for a in OPERATOR_ACTIONS} else None
        if subscriber is None or wanted not in allowed_actions(state, True):
            raise NotAllowed(f"An operator may not {action[:20]} this address ({state}).")
        if wanted is Action.UNSUBSCRIBE:
            subscriptions.unsubscribe(session, subscriber, now=now, actor=Actor.OPERATOR)
        elif wanted is Action.UNSUPPRESS:
            subscriptions.unsuppress(session, address, now=now)
        else:
            subscriptions.erase(session, runtime.tokens, subscriber, now=now, actor=Actor.OPERATOR)
        log.warning("console: %s did %s to a subscriber", operator.email, action)
    target = f"/admin/subscribers?email={quote(address)}&done={quote(action)}"
    return RedirectResponse(target, status_code=303, headers=NO_STORE)
