"""Probes for load balancers and monitoring: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

``/healthz`` says only that the process answers (a PaaS restarts it when it does not; a
database outage must not restart every web process). ``/readyz`` says whether this process can
serve: the database answers, Redis answers when configured, and the schema is at the newest
migration. ``/metrics`` is computed from the database and Redis at each scrape.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, TypeVar

import redis
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from digest import db, heartbeat
from digest.metrics import DigestCollector
from digest.runtime import Runtime
from digest.web.deps import RuntimeDep

router = APIRouter()
T = TypeVar("T")
FINE = ("ok", "not configured", "unknown")  # "unknown": not checked because the database is away
CHECK_TIMEOUT = 5.0  # seconds: a probe that hangs is as bad as one that fails


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
        return {"database": f"unavailable: {_reason(exc)}", "schema": "unknown"}
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
        return f"unavailable: {_reason(exc)}"
    finally:
        client.close()
    return "ok"


async def _within(timeout: float, func: Callable[[], T]) -> T | str:
    """``func()`` in a thread, or a reason when it has not answered in ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(run_in_threadpool(func), timeout)
    except TimeoutError:
        return f"unavailable: no answer within {timeout:.0f} s"


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: database, Redis (when configured) and schema",
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    database = await _within(CHECK_TIMEOUT, lambda: _check_database(runtime))
    checks = database if isinstance(database, dict) else {"database": database, "schema": "unknown"}
    url = runtime.settings.redis_url
    checks["redis"] = await _within(CHECK_TIMEOUT, lambda: _check_redis(url)) if url else "not configured"
    problems = [f"{name}: {state}" for name, state in checks.items() if state not in FINE]
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


def _authorised(expected: str | None, authorization: str | None) -> bool:
    if not expected:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # Constant time, so the token cannot be guessed byte by byte from response times.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


@router.get("/metrics", include_in_schema=False)
async def metrics(
    runtime: RuntimeDep,
    registry: Annotated[CollectorRegistry, Depends(metrics_registry)],
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    if not _authorised(runtime.settings.metrics_token, authorization):
        return JSONResponse(
            {"detail": "metrics need Authorization: Bearer <DIGEST_METRICS_TOKEN>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
        )
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
