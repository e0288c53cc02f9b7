"""Settings for a test, built per test: the test database, SMTP sink and papers API, plus overrides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from digest.core.settings import Settings
from digest.orchestration.runtime import Runtime
from tests.support.servers import PapersAPI, SMTPSink

TEST_SECRET = "test-secret-key-0123456789abcdef0123456789"


def make_settings(
    database_url: str, smtp: SMTPSink, papers_api: PapersAPI | None = None, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "database_url": database_url,
        "redis_url": None,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "secret_key": TEST_SECRET,
        "base_url": "http://digest.test",
        "mail_from": "Daily Papers <papers@digest.example.org>",
        "inbound_address": "papers@digest.example.org",
        "papers_api_url": papers_api.url if papers_api else "http://127.0.0.1:9",
        "papers_api_backoff": 0.01,
        "send_retry_base_seconds": 0.05,
        "send_retry_max_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def rebuilt(settings: Settings, **overrides: object) -> Settings:
    """``settings`` with ``overrides``, validated again as a deployment's would be."""
    return Settings(_env_file=None, **{**settings.model_dump(), **overrides})


@contextmanager
def runtime_with(settings: Settings, **overrides: object) -> Iterator[Runtime]:
    """A second runtime on the same database and servers with some settings changed, for a test
    that needs two configurations (the test's own runtime is left as it was built)."""
    runtime = Runtime(rebuilt(settings, **overrides))
    try:
        yield runtime
    finally:
        runtime.dispose()
