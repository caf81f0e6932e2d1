"""kvosd's log: Python logging to stderr, as text lines or one JSON object a line.

configure(level, fmt) puts one handler on the loggers kvos writes to ("kvosd" for the daemon,
"kvos" for the programs, uvicorn's own), so library code only calls logging.getLogger(...).
A record's `extra=` fields (a request's tenant, pids, tokens, timings) become keys of its JSON
object, and `key=value` pairs after the message in text.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys

LOGGERS = ("kvosd", "kvos", "uvicorn", "uvicorn.error", "uvicorn.access")
LEVELS = ("critical", "error", "warning", "info", "debug")
FORMATS = ("text", "json")
# What every LogRecord has: anything else on a record came in through extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def extra_fields(record: logging.LogRecord) -> dict:
    return {name: v for name, v in vars(record).items() if name not in _STANDARD and not name.startswith("_")}


class TextFormatter(logging.Formatter):
    """`2026-11-28 10:00:00 INFO kvosd: message key=value ...`"""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, the record's extra
    fields, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(extra_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (a test harness may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Send kvos's and uvicorn's loggers to one handler on `stream` (stderr) at `level`."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream) if stream is not None else StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        # uvicorn.error and uvicorn.access reach the handler through "uvicorn"; records still go on to
        # the root logger, which has no handler in the kvos command (an embedding program's may add one).
        logger.handlers = [] if name.startswith("uvicorn.") else [handler]
        logger.setLevel(level.upper())
        logger.propagate = True
    return handler
