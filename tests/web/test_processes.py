"""Rate limits hold across web processes: two `digest serve` processes share one Redis."""

from __future__ import annotations

from pathlib import Path

import httpx

from digest.core.settings import Settings
from tests.support.rows import snapshot
from tests.support.servers import SMTPSink
from tests.web.live import serve_process


def test_rate_limit_is_shared_by_two_processes(
    settings: Settings, redis_url: str, smtp: SMTPSink, tmp_path: Path
) -> None:
    from digest.orchestration.runtime import Runtime

    shared = settings.model_copy(
        update={
            "redis_url": redis_url,
            "rate_limit_subscribe_per_ip": "4/hour",
            "rate_limit_subscribe_per_address": "100/hour",
        }
    )
    with serve_process(shared, tmp_path) as a, serve_process(shared, tmp_path) as b:
        codes = []
        for i, base in enumerate([a, b, a, b]):
            codes.append(httpx.post(f"{base}/subscribe", data={"email": f"r{i}@example.org"}).status_code)
        assert codes == [200, 200, 200, 200]
        smtp.wait_for(4)
        for base in (a, b):
            refused = httpx.post(f"{base}/api/subscribe", json={"email": "late@example.org"})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) > 0
    runtime = Runtime(settings)
    try:
        assert len(snapshot(runtime)) == 4
    finally:
        runtime.dispose()
    assert len(smtp.messages) == 4
