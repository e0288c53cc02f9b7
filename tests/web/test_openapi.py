"""Property-based checks of the JSON API against its own OpenAPI schema (schemathesis, bounded)."""

from __future__ import annotations

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def test_api_honours_its_schema(app: FastAPI) -> None:
    # Driven by hand rather than schemathesis's pytest plugin, whose fixture loader does not
    # work with this pytest; each operation gets a bounded number of generated requests.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = []
    for result in schema.get_all_operations():
        # An operation schemathesis cannot read is a broken schema: fail on it, do not skip it.
        if isinstance(result, Err):
            raise result.err()
        operations.append(result.ok())
    assert len(operations) >= 3
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            case.call_and_validate(checks=CHECKS)

        check()


def test_schema_lists_the_api(app: FastAPI) -> None:
    from fastapi.testclient import TestClient

    paths = TestClient(app).get("/openapi.json").json()["paths"]
    assert {"/api/subscribe", "/api/digests/latest", "/healthz"} <= set(paths)
    assert not any(p.startswith(("/confirm", "/unsubscribe", "/preferences")) for p in paths)
