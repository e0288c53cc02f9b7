"""Fixtures for the web app: the app on the test runtime and a client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from digest.orchestration.runtime import Runtime
from digest.web.app import create_app


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    return create_app(runtime)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    # follow_redirects off: a redirect where none belongs must show up as a failure.
    with TestClient(app, follow_redirects=False) as c:
        yield c
