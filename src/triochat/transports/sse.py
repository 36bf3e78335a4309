"""The Server-Sent Events transport (PROTOCOL.md §7), for networks whose
proxies break WebSockets.

Server -> client: one long ``GET /sse`` response, one ``data:`` event per
frame (``id:`` set to the message id where there is one), a comment line as
heartbeat. Client -> server: each frame is a ``POST /sse`` naming the
session in an ``X-Triochat-Session`` header (or, the older form, a ``POST
/sse/<session>``) whose body the front hands to `SseTransport.post`. The chat logic is the same
`Connection` as on a WebSocket; only the framing differs.

The stream has no close frame, so `close` sends a last named event,
``event: close`` with ``{"code": …, "reason": …}`` (ignored by an
``onmessage`` handler, read by a client that listens for it), then ends the
response.
"""

from __future__ import annotations

import contextlib
import json
import secrets

import trio

from ..connection import TransportClosed
from ..frames import OutFrame

__all__ = ["HEARTBEAT", "SseTransport"]

HEARTBEAT = 15.0  # seconds between comment lines that keep proxies from timing out
INBOX_FRAMES = 16  # POSTed frames waiting for the connection's reader

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"x-accel-buffering: no\r\n"  # tell nginx not to buffer the stream
    b"connection: close\r\n"
    b"\r\n"
)


class SseTransport:
    """The `Transport` of one SSE session (one ``GET /sse`` stream)."""

    #: The keepalive interval this transport wants (comments, not pings).
    heartbeat: float | None = HEARTBEAT
    #: Nothing answers a comment: only a write that cannot finish shows a dead peer.
    expects_pong = False
    last_receive = 0.0

    def __init__(self, stream: trio.abc.Stream, node: str = "") -> None:
        self._stream = stream
        #: The unguessable session id the client POSTs to.
        # ``<node>.<random>``: a POST that reaches another node of a cluster
        # knows where to relay it.
        self.session_id = (
            f"{node}.{secrets.token_urlsafe(24)}" if node else secrets.token_urlsafe(24)
        )
        self._write_lock = trio.Lock()
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[str](INBOX_FRAMES)
        self._ended = False

    async def start(self) -> None:
        """Send the response head and the ``session`` event."""
        session = json.dumps(
            {"type": "session", "id": self.session_id}, separators=(",", ":")
        ).encode()
        await self._write(_HEAD + b"data: " + session + b"\n\n")

    async def watch_peer(self) -> None:
        """Return when the client closes the stream (it sends nothing else)."""
        try:
            while await self._stream.receive_some(4096):
                pass  # a client has nothing to say on this stream: ignore it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self._end()

    async def post(self, text: str) -> bool:
        """Hand one POSTed frame to the connection; False when the session is gone.

        Waits while the connection's reader is behind, like a WebSocket
        client whose frames are not read yet.
        """
        try:
            await self._inbox_send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    @property
    def ended(self) -> bool:
        return self._ended

    def _end(self) -> None:
        self._ended = True
        self._inbox_send.close()

    # --- Transport -------------------------------------------------------------

    async def receive_message(self) -> str:
        try:
            return await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed("event stream closed") from None

    async def send(self, frames: list[OutFrame]) -> None:
        data = frames[0].sse if len(frames) == 1 else b"".join([frame.sse for frame in frames])
        await self._write(data)

    async def ping(self) -> None:
        await self._write(b": keepalive\n\n")

    async def close(self, code: int, reason: str) -> None:
        event = json.dumps({"code": code, "reason": reason}, separators=(",", ":")).encode()
        with contextlib.suppress(TransportClosed):
            await self._write(b"event: close\ndata: " + event + b"\n\n")
        self._end()

    async def abort(self) -> None:
        self._end()
        await trio.aclose_forcefully(self._stream)

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._end()
                raise TransportClosed("event stream lost") from exc
