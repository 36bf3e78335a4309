"""Access lines: one per plain request on ``triochat.access`` once answered (#11 §4).

An SSE stream's line is written when the stream ends; a WebSocket upgrade
gets none (the chat logs its own open and close). A line names the peer (and
the client behind a trusted proxy), method, path without the query and
without an SSE session id, status, body bytes and duration.

The request a task is answering is kept in a context variable (`begin`), so
that the writers in `wire` note the status and size (`answered`) from every
place that refuses a request without seeing it.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Final

import trio

from ..config import Config
from .messages import Request
from .policy import client_ip

#: A logger of its own, so that an operator can route or silence access
#: lines apart from the rest.
ACCESS_LOGGER: Final = logging.getLogger("triochat.access")
LOGGED_PATH_CHARS: Final = 80  # an access line's path is cut there, like client text


class Access:
    """One plain request on its way to its access line."""

    __slots__ = ("request", "sent", "started", "status")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.started = trio.current_time()
        self.status: int | None = None  # None: nothing was answered
        self.sent: int | None = None  # body bytes; None: not counted (an SSE stream)


#: The request the current task answers, for `answered` to note status and size in.
_CURRENT: Final = contextvars.ContextVar[Access | None]("triochat_access", default=None)


def begin(request: Request) -> Access:
    """Start ``request``'s line: the current task's answers are noted in it."""
    access = Access(request)
    _CURRENT.set(access)
    return access


def detach() -> None:
    """The current task's answers are no longer noted (a chat, or a line out)."""
    _CURRENT.set(None)


def answered(status: int, sent: int | None) -> None:
    """Note an answer's status and body bytes in the current request's line."""
    access = _CURRENT.get()
    if access is not None:
        access.status, access.sent = status, sent


def log_access(access: Access, ip: str, config: Config) -> None:
    """Write ``access``'s line: peer, method, path, status, body bytes, duration."""
    detach()
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    request = access.request
    client = client_ip(ip, request.headers, config)
    peer = ip if client == ip else f"{client} via {ip}"
    path = logged_path(request.path)
    millis = round((trio.current_time() - access.started) * 1000, 1)
    status, sent = access.status, access.sent
    ACCESS_LOGGER.info(
        "%s %s %s %s %s %.1f ms",
        peer,
        request.method,
        path,
        "-" if status is None else status,
        "-" if sent is None else sent,
        millis,
        extra={
            "peer": peer,
            "method": request.method,
            "path": path,
            "status": status,
            "bytes": sent,
            "duration_ms": millis,
        },
    )


def logged_path(path: str) -> str:
    """A path for the access line: the query is cut off already (`Request`); an
    SSE session id in it is a bearer secret, and an absolute-form target may
    carry credentials. h11 admits only visible ASCII: nothing to escape."""
    if path.startswith("/sse/"):
        return "/sse/*"
    if not path.startswith("/"):
        return "-"
    return path if len(path) <= LOGGED_PATH_CHARS else path[:LOGGED_PATH_CHARS] + "..."
