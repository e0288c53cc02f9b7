"""The wheel test: a built wheel installed into a clean venv is a complete install.

Migrations, email templates, web templates, static files and sample data must ship inside the
package, so `digest db upgrade` and `digest demo` work from an empty folder, far from any
checkout. This builds the wheel with pip (no extra download: pip is in every venv), installs it
with its dependencies into one fresh venv per test session (pip's cache makes that a matter of
unpacking), and runs the installed `digest` from an empty temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from tests.support.processes import ROOT

pytestmark = pytest.mark.wheel

LOCAL_ONLY = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts", "outbox", "*.db*")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ folder of a fresh venv holding only the built wheel and its dependencies."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale
    # build/ in the checkout could smuggle deleted files into the wheel.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)], cwd=base)
    (wheel,) = dist.glob("digest-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)], cwd=base)
    yield bin_dir


def clean_env(bin_dir: Path, **digest: str) -> dict[str, str]:
    """No DIGEST_ settings from the caller, no PYTHONPATH pointing back at the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIGEST_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"DIGEST_{k.upper()}": v for k, v in digest.items()})
    return env


def test_the_installed_wheel_migrates_and_runs_the_demo_from_an_empty_folder(
    installed_wheel: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # The installed package is imported, not the checkout.
    python = str(installed_wheel / "python")
    where = _run([python, "-c", "import digest; print(digest.__file__)"], cwd=empty, env=clean_env(installed_wheel))
    assert str(ROOT) not in where and "site-packages" in where

    env = clean_env(installed_wheel, database_url=f"sqlite:///{empty / 'prod.db'}")
    assert "newest schema" in _run([str(installed_wheel / "digest"), "db", "upgrade"], cwd=empty, env=env)
    assert (empty / "prod.db").exists()

    # The papers API is closed: the demo uses the sample data shipped in the package.
    env = clean_env(installed_wheel, papers_api_url="http://127.0.0.1:9")
    out = _run([str(installed_wheel / "digest"), "demo"], cwd=empty, env=env)
    assert "Using the recorded sample data" in out
    emls = sorted((empty / "outbox").glob("*.eml"))
    assert len(emls) == 3, out
    for eml in emls:
        message = message_from_bytes(eml.read_bytes(), policy=policy.default)
        assert message.get_content_type() == "multipart/alternative"
        html = message.get_body(preferencelist=("html",))
        text = message.get_body(preferencelist=("plain",))
        assert html is not None and text is not None
        # The packaged templates and their inlined stylesheet made these.
        assert "huggingface.co/papers/" in html.get_content()
        assert "style=" in html.get_content()
        assert "/unsubscribe/" in text.get_content()
