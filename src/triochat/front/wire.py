"""The front's reads and writes on a stream, through h11 or, to refuse and
close, around it.

- `next_event`, `read_body`, `finish_request`: read a request head (checked
  by `messages.check_head`), a bounded body, or past a body so the
  connection can be reused.
- `send`: an answer through h11 (the connection may stay open); `send_raw`
  and `send_raw_json`: an answer after which the connection closes.
  Every writer notes its status and size for the access line
  (`access.answered`).
- `answering_protocol_errors` (around a step), `answer_protocol_error` (for
  an error already caught): a client's broken HTTP gets its 4xx.

Rule: a broken or closed stream is never an error here: a writer returns
False (or nothing) and the caller closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Final, TypeVar

import h11
import trio

from .access import answered
from .messages import (
    JSON_ERROR_TYPE,
    REASONS,
    TEXT_TYPE,
    Request,
    check_head,
    json_error,
    raw_head,
    response_headers,
    screen_head,
)

_T = TypeVar("_T")

RECEIVE_BYTES: Final = 16384
MAX_BODY_BYTES: Final = 65536  # a body we must read past before the next request


def event_at_hand(
    conn: h11.Connection, *, head_limit: int | None = None
) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    """The next h11 event from what ``conn`` holds, without reading:
    `h11.NEED_DATA` if that is not enough. A request head passes `screen_head`
    before h11 reads it, and `check_head` (``head_limit``) after.

    Raises:
        h11.RemoteProtocolError: a broken request (its status hint: 400, 431, ...).
    """
    if conn.their_state is h11.IDLE:
        screen_head(conn.trailing_data[0])
    event = conn.next_event()
    if isinstance(event, h11.Request):
        check_head(event, head_limit)
    return event


async def next_event(
    conn: h11.Connection, stream: trio.abc.Stream, *, head_limit: int | None = None
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event, reading ``stream`` as needed (`event_at_hand`)."""
    while True:
        event = event_at_hand(conn, head_limit=head_limit)
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        data = await stream.receive_some(RECEIVE_BYTES)
        conn.receive_data(bytes(data))  # b"" means the peer closed


async def read_body(stream: trio.abc.Stream, conn: h11.Connection, limit: int) -> bytes | None:
    """The whole request body, or None when it is longer than ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                return None
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise h11.RemoteProtocolError("the request body ended early", error_status_hint=400)


async def finish_request(stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    """Read past a request body (bounded) so the connection can be reused."""
    received = 0
    while conn.their_state is h11.SEND_BODY:
        event = await next_event(conn, stream)
        if isinstance(event, h11.Data):
            received += len(event.data)
            if received > MAX_BODY_BYTES:
                return False
        elif not isinstance(event, h11.EndOfMessage):
            return False
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def send(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: Request,
    status: int,
    body: bytes,
    *,
    content_type: str = TEXT_TYPE,
    allow: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> bool:
    """Answer ``request`` through h11; False when the connection must close."""
    headers = response_headers(len(body), content_type, allow=allow, extra=extra)
    answered(status, 0 if request.method == "HEAD" else len(body))
    try:
        data = conn.send(
            h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
        )
        if request.method != "HEAD":
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return False
    return True


async def send_raw(
    stream: trio.abc.Stream, status: int, message: str, *, extra: str = "", head: bool = False
) -> None:
    """A complete response written without h11, then the connection closes.

    ``head``: it answers a HEAD request, so the body is left out (its length
    is still given, RFC 9110 9.3.2).
    """
    body = (message + "\n").encode()
    response = raw_head(status, len(body), TEXT_TYPE, extra)
    answered(status, 0 if head else len(body))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(response if head else response + body)


async def send_raw_json(stream: trio.abc.Stream, status: int, code: str, message: str) -> None:
    """A JSON error ``{"code", "message"}`` written without h11; then the connection closes."""
    body = json_error(code, message)
    head = raw_head(status, len(body), JSON_ERROR_TYPE)
    answered(status, len(body))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head + body)


async def answering_protocol_errors(stream: trio.abc.Stream, step: Awaitable[_T]) -> _T | None:
    """Await one step of a request; a client's broken HTTP gets its 4xx and None.

    A malformed request is answered (h11's status hint: 400, 431, ...); a
    connection that broke meanwhile just ends. Either way the caller closes.
    """
    try:
        return await step
    except h11.RemoteProtocolError as exc:
        await answer_protocol_error(stream, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return None


async def answer_protocol_error(stream: trio.abc.Stream, exc: h11.RemoteProtocolError) -> None:
    """A client's broken HTTP: its 4xx (h11's status hint), after which the caller closes."""
    await send_raw(stream, exc.error_status_hint, "malformed request")
