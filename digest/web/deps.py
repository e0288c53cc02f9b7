"""Request dependencies: the runtime, the rate limits, the client's address, subscribers by token."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from digest.core.errors import InvalidToken, NotFound
from digest.core.models import Subscriber
from digest.orchestration.runtime import Runtime
from digest.rendering.tokens import Purpose
from digest.subscribers import subscriptions
from digest.web.ratelimit import WebLimits


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_limits(request: Request) -> WebLimits:
    limits: WebLimits = request.app.state.limits
    return limits


def peer_address(request: Request) -> str:
    """The client's address: the TCP peer, or what trusted proxies say it is.

    ``X-Forwarded-For`` is believed only from ``DIGEST_TRUSTED_PROXIES`` (default: nobody), and
    only as far back as the chain stays inside them: the right-most address a trusted proxy
    received the request from is the client. Anything to its left was written by the client.
    uvicorn's own proxy handling is off (``digest serve``), so this is the one place that decides.
    """
    host = request.client.host if request.client else "unknown"
    trusted = get_runtime(request).settings.trusted_proxy_networks
    if not trusted or not _inside(host, trusted):
        return host
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    for hop in reversed(hops):
        if not _inside(hop, trusted):
            return hop if _parses(hop) else host
        host = hop
    return host


def _parses(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _inside(host: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def client_ip(request: Request) -> str:
    """The rate-limit key of a client: its IPv4 address, or its IPv6 /64.

    One IPv6 subscriber usually holds a whole /64, so limiting single v6 addresses would not
    limit anyone.
    """
    host = peer_address(request)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped) if address.version == 6 else host


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
LimitsDep = Annotated[WebLimits, Depends(get_limits)]
ClientIP = Annotated[str, Depends(client_ip)]
PeerAddress = Annotated[str, Depends(peer_address)]


class UnknownLink(NotFound):
    """A well-signed token whose subscriber no longer exists (404, unlike a bad token's 400)."""


def load_subscriber(session: Session, runtime: Runtime, purpose: Purpose, token: str) -> Subscriber:
    """The subscriber a link names; ``InvalidToken`` (400) if forged, ``UnknownLink`` (404) if gone."""
    runtime.tokens.read(purpose, token)  # tampered, foreign or expired: InvalidToken
    try:
        return subscriptions.subscriber_from_token(session, runtime.tokens, purpose, token)
    except InvalidToken as exc:
        raise UnknownLink("This link does not lead anywhere any more.") from exc


def link_limit(action: str, purpose: Purpose) -> Any:
    """A route dependency: the ``TOKEN_LIMITS`` of ``action`` for the route's ``{token}``.

    Checked before the body is read or the database is opened, so a flood costs a signature
    check and two counters, nothing more; 429 with Retry-After once used up.
    """

    def limited(token: str, runtime: RuntimeDep, limits: LimitsDep, ip: ClientIP) -> None:
        def subscriber_of() -> int | None:
            # A bad token is left to the handler, which refuses it in its own way (400, or 410
            # for an expired one) after the body limit has had its say.
            try:
                if purpose is Purpose.FEEDBACK:
                    return runtime.tokens.read_for(purpose, token)[0]
                return runtime.tokens.read(purpose, token)[0]
            except InvalidToken:
                return None

        limits.hit_link(action, ip, subscriber_of)

    return Depends(limited)
