"""Structured logs: one JSON object per line, with the record's ``extra`` fields."""

from __future__ import annotations

import json
import logging
import sys
import time
from logging.handlers import MemoryHandler

STARTUP_LOG_CAPACITY_RECORDS = 10_000  # records held back until the server listens

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


class StartupLog:
    """Holds log records back while a server starts, so a start that fails is ONE line on
    stderr (the command's error), not log lines plus the error. ``started()`` releases them
    and logs directly from then on; ``failed()`` drops them (kept when the level is DEBUG:
    whoever asked for debug logs wants to see how the start failed)."""

    def __init__(self, level: str = "INFO") -> None:
        setup_logging(level)
        root = logging.getLogger()
        self.level = level.upper()
        self.target = root.handlers[0]
        self.buffer = MemoryHandler(
            STARTUP_LOG_CAPACITY_RECORDS, flushLevel=logging.CRITICAL + 1, target=self.target,
            flushOnClose=False,
        )
        root.handlers[:] = [self.buffer]

    def started(self) -> None:
        root = logging.getLogger()
        if self.buffer in root.handlers:
            self.buffer.flush()
            root.handlers[:] = [self.target]

    def failed(self) -> None:
        if self.level == "DEBUG":
            self.started()
            return
        root = logging.getLogger()
        if self.buffer in root.handlers:
            self.buffer.buffer.clear()
            root.handlers[:] = [self.target]
