"""How log records are written: plain text (the default) or one JSON object a line.

Rules:

1. A JSON line holds ``time`` (UTC, ISO 8601, milliseconds), ``level``,
   ``logger`` and ``message``, then the record's fields: those given with
   ``extra=`` on the call, over those of the current `log_context` (a
   connection's id, peer and transport, set once around its task; the hub
   restores them, with `log_fields`, for what it logs about a connection
   in its own task). A traceback goes in ``exception``.
2. Client text is escaped and cut before it reaches a message or a field
   (``log_safe`` in transports/websocket.py); JSON encoding then escapes
   every non-ASCII and control character, so one record is one line.
3. Nothing here runs per frame: fields are set per connection or per request.

The fields and their meaning: docs/operations.md, "Logs".
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Final, TextIO

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "log_context",
    "log_fields",
    "setup_logging",
]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The fields of the task's current `log_context` (copied into tasks it starts).
_FIELDS: Final = contextvars.ContextVar[Mapping[str, object]](
    "triochat_log_fields", default=types.MappingProxyType({})
)

# What every LogRecord has: anything else on a record came with ``extra=``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` to every JSON record logged by this task (and the tasks
    it starts meanwhile) until the block ends. Fields that are None are left out.

    A context variable, not an argument threaded through every call: the
    connection's own log calls (connection.py, outbound.py) then carry its
    id without knowing it.
    """
    given = {name: value for name, value in fields.items() if value is not None}
    token = _FIELDS.set({**_FIELDS.get(), **given})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def log_fields() -> Mapping[str, object]:
    """The fields of the current `log_context`: kept by work done for a
    connection in another task (the hub's), which restores them with
    ``log_context(**fields)`` around its log call."""
    return _FIELDS.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (rule 1)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_FIELDS.get())
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (a Path, an enum) is still written.
        return json.dumps(line, ensure_ascii=True, default=str)


def setup_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send every record at ``level`` and above to ``stream`` (stderr) as ``log_format``."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
