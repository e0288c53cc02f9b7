"""Running the web app for real: uvicorn in a thread (same process) or as `digest serve` processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from digest.core.settings import Settings
from tests.support.processes import BIN, Process, settings_env
from tests.support.servers import free_port, port_open


@contextmanager
def server_thread(app: FastAPI, port: int) -> Iterator[str]:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_until_up(f"http://127.0.0.1:{port}", lambda: thread.is_alive())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_process(settings: Settings, cwd: Path) -> Iterator[str]:
    """`digest serve` as its own process (what the Procfile's `web` runs); yields the base URL."""
    port = free_port()
    argv = [str(BIN / "digest"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = Process(argv, settings_env(settings), cwd / f"serve-{port}.log", cwd=cwd).start()
    try:
        _wait_until_up(f"http://127.0.0.1:{port}", lambda: server.running)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _wait_until_up(base: str, alive: object) -> None:
    deadline = time.monotonic() + 30
    port = int(base.rsplit(":", 1)[1])
    while time.monotonic() < deadline:
        if not alive():  # type: ignore[operator]
            raise RuntimeError(f"web server on {base} exited")
        if port_open("127.0.0.1", port) and httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"web server on {base} did not start")
