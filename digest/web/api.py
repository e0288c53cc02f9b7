"""JSON API under ``/api`` (documented in ``/openapi.json``); the probes are in ``digest.web.health``."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, BackgroundTasks
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from digest.core.addresses import MAX_ADDRESS_LENGTH
from digest.core.errors import DigestError
from digest.orchestration.runtime import Runtime
from digest.subscribers.subscriptions import MAX_TOPICS_CHARS
from digest.web.deps import ClientIP, LimitsDep, RuntimeDep
from digest.web.frontpage import front_page
from digest.web.ratelimit import RateLimited
from digest.web.signup import start_signup

router = APIRouter()


class Problem(BaseModel):
    detail: str


class SubscribeRequest(BaseModel):
    email: str = Field(max_length=MAX_ADDRESS_LENGTH + 2, examples=["ada@example.org"])
    topics: str | None = Field(default=None, max_length=MAX_TOPICS_CHARS, examples=["diffusion, LLM agents"])


class SubscribeAccepted(BaseModel):
    status: str = "pending"
    message: str


class PaperOut(BaseModel):
    id: str
    title: str
    authors: str
    upvotes: int
    comments: int
    summary: str
    url: str


class LatestDigest(BaseModel):
    date: dt.date | None
    papers: list[PaperOut]


ACCEPTED = SubscribeAccepted(
    message="If this address can subscribe, a confirmation email is on its way.",
)

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": Problem, "description": "The address or topics are not usable."},
    413: {"model": Problem, "description": "The request body is too large."},
    429: {"model": Problem, "description": "Too many requests; see Retry-After."},
}


async def subscribe_json(
    payload: SubscribeRequest, runtime: Runtime, limits: LimitsDep, ip: str, background: BackgroundTasks
) -> JSONResponse:
    try:
        await start_signup(runtime, limits, ip, payload.email, payload.topics, background)
    except RateLimited:
        raise
    except DigestError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse(ACCEPTED.model_dump(), status_code=202)


@router.post(
    "/api/subscribe",
    status_code=202,
    response_model=SubscribeAccepted,
    responses=ERRORS,
    summary="Start double opt-in for an address",
)
async def api_subscribe(
    payload: SubscribeRequest, runtime: RuntimeDep, limits: LimitsDep, ip: ClientIP, background: BackgroundTasks
) -> JSONResponse:
    """Sends a confirmation email when one is due. The answer is the same for every address."""
    return await subscribe_json(payload, runtime, limits, ip, background)


@router.get("/api/digests/latest", response_model=LatestDigest, summary="The latest daily digest's papers")
async def api_latest(runtime: RuntimeDep) -> LatestDigest:
    page = await run_in_threadpool(front_page, runtime)
    return LatestDigest(
        date=page.day,
        papers=[PaperOut.model_validate(p, from_attributes=True) for p in page.papers],
    )
