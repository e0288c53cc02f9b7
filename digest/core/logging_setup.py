"""Log format for every process: readable text, or one JSON object per line (``DIGEST_LOG_FORMAT=json``).

JSON lines are for log collectors (Loki, CloudWatch, Datadog): each carries the time, level,
logger and message, the exception if any, and the ids of what the line is about. Ids come from
``extra=`` on the logging call (``log.warning(..., extra={"delivery_id": d.id})``) or from
``log_context(...)``, which tags every line logged inside it, in this thread or task, without
passing ids down through functions that do not otherwise need them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[dict[str, Any]] = ContextVar("digest_log_context", default={})  # noqa: B039 - never mutated
# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
# ("color_message" is uvicorn's copy of the message with terminal colours.)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Tag every line logged inside with these ids (e.g. ``delivery_id=…, subscriber_id=…``)."""
    token = _context.set({**_context.get(), **ids})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get())
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(log_format: LogFormat, level: int = logging.WARNING) -> None:
    """One handler on the root logger, writing to standard error in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces its context at INFO on every /readyz; only its warnings matter here.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


def reformat(logger: logging.Logger, log_format: LogFormat) -> None:
    """Keep a logger's handlers (e.g. those Celery set up) but write in ``log_format``."""
    if log_format == "json":
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())
