"""One log format for every line a command writes - uvicorn's and ours - as text or JSON.

:func:`configure` puts one stderr handler on the root logger (``--log-format text``:
``2026-01-02 03:04:05,678 INFO pqe2ee.proxy: ...``; ``json``: one object per line with
``time``, ``level``, ``logger``, ``message``) and makes uvicorn's loggers hand their lines to it
instead of printing their own format. uvicorn re-applies its default logging configuration
when a server starts; that default is rewritten here, in place, to "propagate to the root" so
the servers need no change. Lines hold what the code logs: never a prompt, completion or key.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["FORMATS", "JsonFormatter", "StderrHandler", "configure"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message."""

    converter = time.gmtime  # type: ignore[assignment]  # UTC, as the "Z" says

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(log_level: str, log_format: str) -> None:
    """Route every line (root, ``pqe2ee.*``, uvicorn) through one handler in ``log_format``.

    Plain stderr handlers on the root (``logging.basicConfig``'s, or an earlier call's) are
    replaced; other handlers (a test harness's capture) are kept."""
    handler = StderrHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    kept = [h for h in root.handlers if type(h) not in (logging.StreamHandler, StderrHandler)]
    root.handlers[:] = [*kept, handler]
    root.setLevel(log_level.upper())
    for name in _UVICORN:
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    try:
        import uvicorn.config
    except ImportError:  # pragma: no cover - the CLI's extras bring uvicorn
        return
    default = uvicorn.config.LOGGING_CONFIG
    default.clear()
    default.update(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "loggers": {name: {"handlers": [], "propagate": True} for name in _UVICORN},
        }
    )
