"""Plain requests, sans-I/O: which listener serves which path, the page's
files, and what each path answers.

- `Routes`: what one listener serves. With ``--metrics-port`` the public
  listener serves everything but `OPERATOR_PATHS`, the operator one only
  those (#11 §4); without it one listener serves all.
- `StaticFiles`: the page (``/``) and its assets (``/static/…``), read once
  at start-up: no listings, no paths from the request.
- `route`: the table of the plain paths (page, assets, health, readiness,
  metrics, ``HEAD /sse``, ``/ws`` without an upgrade); None answers 404.

Rule: no trio here (the front's loop writes the answers).
"""

from __future__ import annotations

import enum
import importlib.resources
import mimetypes
import os
from collections.abc import Callable
from typing import Final

from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .context import FrontContext
from .messages import TEXT_TYPE

#: What ``--metrics-port`` moves to a listener of its own.
OPERATOR_PATHS: Final = frozenset({"/metrics", "/healthz", "/readyz"})
GET_HEAD: Final = "GET, HEAD"  # the methods a plain path takes (the Allow of a 405)
GET_HEAD_POST: Final = "GET, HEAD, POST"  # /sse's: a stream, or a frame of one

#: An answer: status, body, content type, extra headers.
Answer = tuple[int, bytes, str, list[tuple[str, str]]]
#: A path's answer, made when the request is answered (readiness and metrics
#: are read then, and only for a method the path takes).
Route = Callable[[], Answer]


class Routes(enum.Enum):
    """Which endpoints one listener serves (#11 §4)."""

    ALL = "all"  # one port for everything: no --metrics-port
    PUBLIC = "public"  # the page and chats; OPERATOR_PATHS answer 404
    OPERATOR = "operator"  # OPERATOR_PATHS only; everything else, chats too, 404

    @property
    def chats(self) -> bool:
        """Whether WebSocket upgrades and SSE are served here."""
        return self is not Routes.OPERATOR


class StaticFiles:
    """The page's files, read once at start-up (no listings, no paths)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        root = importlib.resources.files("triochat.static")
        for entry in root.iterdir():
            name = entry.name
            if entry.is_file() and not name.startswith((".", "_")) and name != "__init__.py":
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                if kind.startswith("text/") or kind == "application/javascript":
                    kind += "; charset=utf-8"
                self.files[name] = (entry.read_bytes(), kind)


def route(
    path: str, ctx: FrontContext, static: StaticFiles, routes: Routes = Routes.ALL
) -> Route | None:
    """The answer of a plain request for ``path`` on a listener serving ``routes``."""
    text = TEXT_TYPE
    if (path in OPERATOR_PATHS) != (routes is Routes.OPERATOR) and routes is not Routes.ALL:
        return None  # served on the other listener
    if path == "/" and "index.html" in static.files:
        body, kind = static.files["index.html"]
        return lambda: (200, body, kind, [])
    if path.startswith("/static/"):
        found = static.files.get(path[len("/static/") :])
        if found is None:
            return None
        body, kind = found
        return lambda: (200, body, kind, [])
    if path == "/healthz":
        # A worker of --workers says which one answered (docs/operations.md,
        # "Several workers on one machine"): the port alone does not tell.
        worker = ctx.config.worker
        who = (
            []
            if worker is None
            else [("x-triochat-worker", str(worker)), ("x-triochat-pid", str(os.getpid()))]
        )
        return lambda: (200, b"ok\n", text, who)
    if path == "/readyz":
        return lambda: (
            (200, b"ready\n", text, []) if ctx.ready() else (503, b"not ready\n", text, [])
        )
    if path == "/metrics":
        return lambda: (200, ctx.metrics(), METRICS_CONTENT_TYPE, [])
    if path == "/sse":  # GET opens a stream (front.sse); this answers HEAD
        return lambda: (200, b"", "text/event-stream; charset=utf-8", [])
    if path == "/ws":
        return lambda: (
            426,
            b"this endpoint needs a WebSocket upgrade\n",
            text,
            [("upgrade", "websocket")],
        )
    return None
