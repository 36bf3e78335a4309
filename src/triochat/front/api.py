"""The front's side of the server API (docs/protocol.md §16): ``/api/…``.

With ``--api-key``, on a listener that serves chats, `triochat.api` decides
every answer (401 included); the front only reads the body (bounded in size
and time) and writes the answer. Without the key, or on the operator
listener, ``/api/…`` is 404 like any unknown path.
"""

from __future__ import annotations

import h11
import trio

from ..api import JSON_TYPE, ApiError, ChatApi, answer_api
from ..config import Config
from .context import FrontContext
from .messages import Request
from .wire import MAX_BODY_BYTES, read_body, send


def api_of(ctx: FrontContext) -> ChatApi | None:
    """The server API when it is on: a key, and a chat side wired."""
    return ctx.api if ctx.config.api_key is not None else None


async def serve_api(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: Request,
    chat: ChatApi,
    config: Config,
) -> bool:
    """Answer one ``/api/…`` request. False when the connection must close."""

    async def read_api_body() -> bytes:
        too_big = ApiError(413, "too_big", f"a body is at most {MAX_BODY_BYTES} bytes")
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        with trio.move_on_after(config.handshake_timeout) as scope:
            body = await read_body(stream, conn, MAX_BODY_BYTES)
        if scope.cancelled_caught:
            raise ApiError(408, "timeout", "the request body took too long")
        if body is None:
            raise too_big
        return body

    answer = await answer_api(
        chat, config, request.method, request.target, request.headers, read_api_body
    )
    extra = [*answer.headers, *([("connection", "close")] if answer.close else [])]
    sent = await send(
        stream, conn, request, answer.status, answer.body, content_type=JSON_TYPE, extra=extra
    )
    return sent and not answer.close
