"""Probes for load balancers and monitoring: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

``/healthz`` says only that the process answers (a PaaS restarts it when it does not; a
database outage must not restart every web process). ``/readyz`` says whether this process can
serve: the database answers, Redis answers when configured, and the schema is at the newest
migration; on failure it names the dependency that failed, never where it lives (host, port,
role or the driver's message stay in the log). ``/metrics`` is computed from the database and
Redis at each scrape; it needs ``DIGEST_METRICS_TOKEN`` when set, and in production it is
refused without one unless ``DIGEST_METRICS_PUBLIC`` opens it (with a warning at start-up).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Annotated, Literal, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from digest.core import db
from digest.core.settings import Settings
from digest.operations import heartbeat
from digest.operations.metrics import DigestCollector
from digest.orchestration.runtime import Runtime
from digest.web.deps import RuntimeDep

log = logging.getLogger(__name__)
T = TypeVar("T")
FINE = ("ok", "not configured", "unknown")  # "unknown": not checked because the database is away
UNAVAILABLE = "unavailable"
CHECK_TIMEOUT = 5.0  # seconds: a probe that hangs is as bad as one that fails
MetricsAccess = Literal["token", "open", "refused"]


def metrics_access(environment: str, token: str | None, public: bool) -> MetricsAccess:
    """Who may read ``/metrics``: token holders (a token always wins), anyone, or nobody.

    Development and test deployments stay open as before; production is closed by default,
    because the counts, complaints and pause state are a stranger's map of the service.
    """
    if token:
        return "token"
    if environment != "production" or public:
        return "open"
    return "refused"


def _metrics_access(settings: Settings) -> MetricsAccess:
    return metrics_access(settings.environment, settings.metrics_token, settings.metrics_public)


@asynccontextmanager
async def _say_how_metrics_are_served(app: FastAPI) -> AsyncIterator[None]:
    """At start-up, once per process: an open ``/metrics`` in production is a warning."""
    runtime: Runtime = app.state.runtime
    access = _metrics_access(runtime.settings)
    if access == "open" and runtime.settings.environment == "production":
        log.warning("DIGEST_METRICS_PUBLIC is true: /metrics is open to anyone; set DIGEST_METRICS_TOKEN instead")
    elif access == "refused":
        log.info("/metrics is refused: set DIGEST_METRICS_TOKEN for Prometheus to read it")
    yield


router = APIRouter(lifespan=_say_how_metrics_are_served)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
    problems: list[str] = []


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@lru_cache(maxsize=1)
def _expected_heads() -> frozenset[str]:
    return frozenset(db.schema_heads())  # parses the migration files: once per process


def _reason(exc: BaseException) -> str:
    detail = getattr(exc, "orig", None) or exc
    return " ".join(str(detail).split())[:300] or type(exc).__name__


def _check_database(runtime: Runtime) -> dict[str, str]:
    try:
        current = db.current_revisions(runtime.engine)
    except Exception as exc:  # any failure to reach the database means "not ready"
        # The driver's message names host, port and role: for the log, not for the answer.
        log.warning("readyz: the database did not answer: %s", _reason(exc))
        return {"database": UNAVAILABLE, "schema": "unknown"}
    expected = _expected_heads()
    if current == expected:
        return {"database": "ok", "schema": "ok"}
    at = ", ".join(sorted(current)) or "empty"
    return {
        "database": "ok",
        "schema": f"at {at}, this code needs {', '.join(sorted(expected))} (run `digest db upgrade`)",
    }


def _check_redis(url: str) -> str:
    client = heartbeat.client(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("readyz: Redis did not answer: %s", _reason(exc))
        return UNAVAILABLE
    finally:
        client.close()
    return "ok"


async def _within(name: str, timeout: float, func: Callable[[], T]) -> T | str:
    """``func()`` in a thread, or "unavailable" when it has not answered in ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(run_in_threadpool(func), timeout)
    except TimeoutError:
        log.warning("readyz: %s gave no answer within %.0f s", name, timeout)
        return UNAVAILABLE


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: database, Redis (when configured) and schema",
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    database = await _within("the database", CHECK_TIMEOUT, lambda: _check_database(runtime))
    checks = database if isinstance(database, dict) else {"database": database, "schema": "unknown"}
    url = runtime.settings.redis_url
    checks["redis"] = await _within("Redis", CHECK_TIMEOUT, lambda: _check_redis(url)) if url else "not configured"
    problems = [
        f"{name} {state}" if state == UNAVAILABLE else f"{name}: {state}"
        for name, state in checks.items()
        if state not in FINE
    ]
    body = Readiness(status="unavailable" if problems else "ok", checks=checks, problems=problems)
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


def metrics_registry(request: Request) -> CollectorRegistry:
    """One registry per app holding only our collector, built on first scrape."""
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        runtime: Runtime = request.app.state.runtime
        s = runtime.settings
        client = heartbeat.client(s.redis_url) if s.redis_url else None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DigestCollector(runtime.session_factory, runtime.pause_rules, client))
        request.app.state.metrics_registry = registry
    return registry


def _authorised(expected: str, authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    # Constant time, so the token cannot be guessed byte by byte from response times.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


@router.get("/metrics", include_in_schema=False)
async def metrics(
    runtime: RuntimeDep,
    registry: Annotated[CollectorRegistry, Depends(metrics_registry)],
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    access = _metrics_access(runtime.settings)
    if access == "refused":
        return JSONResponse(
            {"detail": "metrics are off: set DIGEST_METRICS_TOKEN"},
            status_code=403,
            headers={"Cache-Control": "no-store"},
        )
    if access == "token" and not _authorised(runtime.settings.metrics_token or "", authorization):
        return JSONResponse(
            {"detail": "metrics need Authorization: Bearer <DIGEST_METRICS_TOKEN>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
        )
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
