"""Mail-in fixtures: a private Dovecot (the ``digest mailin`` process is ``tests/conftest.py``'s ``listener``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.mailin import Dovecot, running_dovecot

# --------------------------------------------------------------------------- Dovecot


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server
