"""The Procfile's web line as a Procfile host (Heroku, Dokku, honcho) runs it: through a shell."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from digest.core.settings import Settings
from tests.support.processes import ROOT, Process, settings_env
from tests.support.servers import free_port, port_open, wait_until


def procfile_line(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip()
    raise KeyError(name)


def wait_for_health(process: Process, port: int, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise RuntimeError(f"web exited:\n{process.output()[-3000:]}")
        if port_open("127.0.0.1", port):
            answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            if answer.status_code == 200:
                return answer
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on {port}:\n{process.output()[-3000:]}")


def test_web_line_binds_all_interfaces_on_port_with_web_concurrency_workers(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = settings_env(settings, PORT=str(port), WEB_CONCURRENCY="2")
    env.pop("DIGEST_PORT")  # what a PaaS sets is PORT
    web = Process(["sh", "-c", procfile_line("web")], env, tmp_path / "web.log", cwd=tmp_path).start()
    try:
        assert wait_for_health(web, port).json() == {"status": "ok"}
        assert f"Uvicorn running on http://0.0.0.0:{port}" in web.output()
        # Two worker processes, each with its own app, answer on the one port.
        assert wait_until(lambda: web.output().count("Application startup complete") == 2, timeout=60), web.output()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        web.stop()


def test_without_port_the_web_line_listens_where_the_settings_say(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = settings_env(settings.model_copy(update={"port": port}))
    env.pop("PORT", None)
    env.pop("WEB_CONCURRENCY", None)
    web = Process(["sh", "-c", procfile_line("web")], env, tmp_path / "web.log", cwd=tmp_path).start()
    try:
        wait_for_health(web, port)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in web.output()
    finally:
        web.stop()
