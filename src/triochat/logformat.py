"""How log records are written: plain text (the default) or one JSON object a line.

Rules:

1. A JSON line holds ``time`` (UTC, ISO 8601, milliseconds), ``level``,
   ``logger`` and ``message``, then the record's fields: those given with
   ``extra=`` on the call, over those of the current `log_context` (a
   connection's id, peer and transport, set once around its task; the hub
   restores them, with `log_fields`, for what it logs about a connection
   in its own task), and in a worker process its index (``worker``). A
   traceback goes in ``exception``.
2. Client text is escaped and cut before it reaches a message or a field
   (``log_safe`` in transports/websocket.py); JSON encoding then escapes
   every non-ASCII and control character, so one record is one line.
3. Nothing here runs per frame: fields are set per connection or per request.

The fields and their meaning: docs/operations.md, "Logs".
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import types
from collections.abc import Mapping
from typing import Final, TextIO

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "WORKER_TEXT_FORMAT",
    "JsonFormatter",
    "LogContext",
    "log_context",
    "log_fields",
    "set_task_log_fields",
    "setup_logging",
]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A worker's lines (`setup_logging` with ``worker``): the index after the level.
WORKER_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s worker %(worker)d %(name)s: %(message)s"

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


def log_context(**fields: object) -> LogContext:
    """Add ``fields`` to every JSON record logged by this task (and the tasks
    it starts meanwhile) until the block ends. Fields that are None are left out.

    A context variable, not an argument threaded through every call: the
    connection's own log calls (connection.py, outbound.py) then carry its
    id without knowing it.
    """
    return LogContext({name: value for name, value in fields.items() if value is not None})


class LogContext:
    """The context manager of `log_context`.

    A small class, not a ``@contextmanager`` generator: a chat connection
    holds one for its whole life, and a suspended generator with its frame
    costs several times these two slots (docs/performance.md, memory per
    connection).
    """

    __slots__ = ("_given", "_token")

    def __init__(self, given: Mapping[str, object]) -> None:
        self._given: Mapping[str, object] | None = given
        self._token: contextvars.Token[Mapping[str, object]] | None = None

    def __enter__(self) -> None:
        given, self._given = self._given, None  # (in the fields now: not kept twice)
        self._token = _FIELDS.set({**_FIELDS.get(), **(given or {})})

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _FIELDS.reset(self._token)
            self._token = None


def set_task_log_fields(fields: Mapping[str, object]) -> None:
    """Make ``fields`` the current `log_context` of this task, for the rest of
    it: for a task started on a connection's behalf by another task (its
    writer, started by the hub). Only at the start of a task of its own: the
    task's context is its own copy, so there is nothing to undo."""
    if _FIELDS.get() is not fields:
        _FIELDS.set(fields)


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


def setup_logging(
    level: str, log_format: str, stream: TextIO | None = None, *, worker: int | None = None
) -> None:
    """Send every record at ``level`` and above to ``stream`` (stderr) as ``log_format``.

    ``worker``: this process is that worker of a supervisor (workers.py):
    every record carries the index, as ``worker <n>`` after the level in
    text, as the field ``worker`` in JSON, so the lines of the processes
    sharing one stderr can be told apart.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif worker is not None:
        handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


class _WorkerField(logging.Filter):
    """Sets ``record.worker`` (a field JsonFormatter writes as any other extra)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True
