"""The front's side of the SSE transport (docs/protocol.md §13).

- ``GET /sse``: `vet_sse` checks it like a WebSocket upgrade (Origin 403,
  draining 503, the client address's slot 429) and the front hands it to
  the caller as an `SseOpen`, which `transports.sse` runs like an `Upgrade`.
- ``POST /sse``: `post_sse` reads one client frame (bounded in size and
  time) and hands it to the server's session (`FrontContext.post_sse`).

Refusals are JSON ``{"code", "message"}``, as the SSE client reads them.
"""

from __future__ import annotations

from typing import Final

import h11
import trio

from ..config import Config
from .access import Access, log_access
from .context import FrontContext
from .messages import JSON_ERROR_TYPE, Request, json_error
from .policy import origin_allowed
from .wire import read_body, send, send_raw, send_raw_json

#: Carries the SSE session id on ``POST /sse`` (docs/protocol.md §13): the id
#: is a bearer secret, and a path is what proxies and access logs record (#18).
SSE_SESSION_HEADER: Final = "x-triochat-session"


class SseOpen:
    """A vetted ``GET /sse``, for the caller to run like an `Upgrade`: nothing is
    written yet, and it holds the client address's chat slot ``ip``."""

    __slots__ = ("_access", "_config", "_peer", "ip")

    def __init__(self, ip: str, access: Access | None, peer: str, config: Config) -> None:
        #: The client address (behind a trusted proxy the forwarded one) whose
        #: slot was taken: release it with `release_ip_slot`.
        self.ip = ip
        self._access = access
        self._peer = peer
        self._config = config

    def finished(self) -> None:
        """The stream has ended: write its access line."""
        access, self._access = self._access, None
        if access is not None:
            if access.status is None:
                access.status = 200  # served (the stream's bytes are not counted)
            log_access(access, self._peer, self._config)


async def vet_sse(stream: trio.abc.Stream, request: Request, ctx: FrontContext, ip: str) -> bool:
    """``GET /sse``: vet it like a WebSocket upgrade (§1.1); True once it holds
    the chat slot of ``ip``, the client address."""
    headers = request.headers
    if not origin_allowed(headers.get("origin"), headers.get("host"), ctx.config.allow_origins):
        await send_raw_json(stream, 403, "forbidden", "origin not allowed")
        return False
    if ctx.draining:
        await send_raw_json(stream, 503, "unavailable", "the server is shutting down")
        return False
    if not ctx.take_ip_slot(ip):
        await send_raw_json(stream, 429, "too_many", "too many connections from your address")
        return False
    return True


async def post_sse(
    stream: trio.abc.Stream, conn: h11.Connection, request: Request, ctx: FrontContext
) -> bool:
    """``POST /sse`` (session id in `SSE_SESSION_HEADER`) or, kept for older
    clients, ``POST /sse/<session>``: one client frame. False when the
    connection must close. The path form ignores the header."""
    headers = request.headers
    config = ctx.config
    in_path = request.path.startswith("/sse/")
    session = (
        request.path[len("/sse/") :] if in_path else headers.get(SSE_SESSION_HEADER, "").strip()
    )

    async def answer(status: int, code: str = "", message: str = "") -> bool:
        body = json_error(code, message) if status != 204 else b""
        kind = JSON_ERROR_TYPE
        if status == 405:
            return await send(stream, conn, request, 405, body, content_type=kind, allow="POST")
        return await send(stream, conn, request, status, body, content_type=kind)

    if request.method != "POST":
        return await answer(405, "method_not_allowed", "POST a frame to this address")
    if not origin_allowed(headers.get("origin"), headers.get("host"), config.allow_origins):
        await send_raw_json(stream, 403, "forbidden", "origin not allowed")
        return False
    if not session:
        # A client bug, not a lost session: say what is missing (the body is
        # left unread; the request loop reads past it).
        return await answer(400, "no_session", "name the session in X-Triochat-Session")
    limit = config.max_frame_bytes
    declared = headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        await send_raw_json(stream, 413, "too_big", f"a frame is at most {limit} bytes")
        return False
    with trio.move_on_after(config.handshake_timeout) as scope:
        body = await read_body(stream, conn, limit)
    if scope.cancelled_caught:
        await send_raw(stream, 408, "the request body took too long")
        return False
    if body is None:
        await send_raw_json(stream, 413, "too_big", f"a frame is at most {limit} bytes")
        return False
    status, code, message = await ctx.post_sse(session, body)
    return await answer(status, code, message)
