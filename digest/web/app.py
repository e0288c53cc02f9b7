"""The web app factory: pages, JSON API, error pages, security headers, body limit, rate limits."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from digest.core.errors import DigestError, InvalidToken, NotFound
from digest.orchestration.runtime import Runtime
from digest.web import admin, api, archive, health, pages
from digest.web.ratelimit import RateLimited, WebLimits
from digest.web.security import BodyLimit, SecurityHeaders
from digest.web.templating import STATIC_DIR, templates

FAVICON_CACHE = {"Cache-Control": "public, max-age=86400"}


def wants_json(request: Request) -> bool:
    if request.url.path.startswith("/api/"):
        return True
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    return content_type == "application/json"


def error_response(request: Request, status: int, title: str, detail: str, **extra: object) -> Response:
    headers = {"Cache-Control": "no-store"}
    if isinstance(extra.get("retry_after"), int):
        headers["Retry-After"] = str(extra["retry_after"])
    if wants_json(request):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)
    return templates.TemplateResponse(
        request,
        "error.html",
        {"title": title, "detail": detail, **extra},
        status_code=status,
        headers=headers,
    )


def install_error_pages(app: FastAPI) -> None:
    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> Response:
        return error_response(request, 429, "Slow down", str(exc), retry_after=exc.retry_after)

    @app.exception_handler(InvalidToken)
    async def invalid_token(request: Request, exc: InvalidToken) -> Response:
        if exc.expired and request.url.path.startswith("/confirm/"):
            token = request.url.path.removeprefix("/confirm/")
            return error_response(
                request,
                410,
                "This link has expired",
                "Confirmation links are valid for a limited time. We can send you a new one.",
                resend_token=token,
            )
        if exc.expired:
            return error_response(
                request, 410, "This link has expired", "Ask for a new one from your preferences page."
            )
        return error_response(request, 400, "This link is not valid", str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return error_response(request, 404, "Not found", str(exc))

    @app.exception_handler(DigestError)
    async def digest_error(request: Request, exc: DigestError) -> Response:
        return error_response(request, 400, "Something is not right", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        titles = {404: "Not found", 405: "Not allowed", 413: "Too large"}
        return error_response(request, exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if wants_json(request):
            return JSONResponse({"detail": jsonable_errors(exc)}, status_code=422)
        return error_response(request, 400, "Something is missing", "The form was incomplete. Please try again.")


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, object]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app for one process; rate limits are shared through ``DIGEST_REDIS_URL`` if set."""
    settings = runtime.settings
    # Mail goes out after the answer, where nobody sees an error: a broken DKIM setup must stop
    # the app from starting instead.
    _ = runtime.dkim_signer
    app = DigestApp(
        title="Daily Papers digest",
        version="1",
        description="Subscribe to a daily email of trending AI research papers.",
        docs_url=None,  # Swagger UI needs inline scripts, which the CSP forbids; the schema stays.
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.limits = WebLimits(
        settings.redis_url,
        per_ip=settings.rate_limit_subscribe_per_ip,
    )
    install_error_pages(app)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(archive.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        # Browsers and feed readers ask for /favicon.ico whatever the page links; the SVG (which
        # they all draw) answers it rather than a 404 in every access log.
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers=FAVICON_CACHE)

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    return app


class DigestApp(FastAPI):
    """FastAPI with the security headers outside everything, Starlette's own 500 page included
    (``add_middleware`` would put them inside ``ServerErrorMiddleware``)."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())
