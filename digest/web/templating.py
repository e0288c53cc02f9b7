"""The Jinja2 environment for web pages (e-mail templates live elsewhere, see ``digest.rendering``).

Other routers (e.g. the archive) render through this same object so their pages can extend
``base.html``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.templating import Jinja2Templates

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"

templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
