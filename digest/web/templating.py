"""The Jinja2 environment for web pages (e-mail templates live elsewhere, see ``digest.rendering.emails``).

Other routers (e.g. the archive) render through this same object so their pages can extend
``base.html``.
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path

from fastapi.templating import Jinja2Templates

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"

templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
# The zone picker's choices (templates/_timezone_select.html): every IANA zone this Python
# knows, read once per process. "localtime" and the like are not zones a reader picks.
templates.env.globals["time_zones"] = sorted(z for z in zoneinfo.available_timezones() if "/" in z or z == "UTC")
