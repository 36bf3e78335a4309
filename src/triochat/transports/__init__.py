"""The transports a connection runs over (WebSocket, SSE), and what each provides.

`Transport` is what every transport does; `DirectWrite` is the optional
capability of one over a socket: the hub's direct, task-free write.
`TransportClosed` is the one exception a transport raises when its peer is
gone: each transport maps its libraries' errors to it at its boundary, in
one place (`websocket.WebSocketErrors`, `sse.SseErrors`).

::

    transports/
    ├── __init__.py   Transport, DirectWrite, TransportClosed
    ├── websocket.py  WebSocketTransport, accept_websocket, the error boundary
    ├── replay.py     ReplayStream (the socket under trio-websocket), FrameSizeGuard
    ├── deflate.py    permessage-deflate: negotiation and bounded inflating
    └── sse.py        SseTransport, SseSessions (the streams, the relay of POSTs),
                      the error boundary
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

from ..errors import TriochatError
from ..frames import OutFrame

__all__ = ["DirectWrite", "Transport", "TransportClosed", "direct_write"]


class TransportClosed(TriochatError):
    """The peer went away or closed; ``reason`` says how (for the log).

    ``failed``: the transport failed the connection (a protocol error of the
    peer's, RFC 6455 7.1.7) and owes the peer a close frame with ``code``.
    """

    def __init__(self, reason: str, code: int | None = None, *, failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.failed = failed


class Transport(Protocol):
    """What a connection needs of WebSocket or SSE."""

    async def receive_message(self) -> str | bytes:
        """The next whole message (text, or binary on WebSocket). Raises TransportClosed."""
        ...

    async def send(self, frames: list[OutFrame]) -> None:
        """Write ``frames`` with one write. Raises TransportClosed."""
        ...

    #: Seconds between keepalives (None: the configured ping interval).
    heartbeat: float | None
    #: True when the peer answers a ping (WebSocket); False for SSE.
    expects_pong: bool
    #: True when closing needs `receive_message` called until it raises: a
    #: WebSocket's reader reads the peer's close frame (the closing handshake).
    reads_to_close: bool

    @property
    def last_receive(self) -> float:
        """When bytes last arrived from the peer (trio clock)."""
        ...

    async def ping(self) -> None:
        """Send a keepalive (a ping frame, or an SSE comment). Raises TransportClosed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake (the caller bounds its time)."""
        ...

    async def abort(self) -> None:
        """Drop the underlying connection now (the caller bounds any lingering)."""
        ...


@runtime_checkable
class DirectWrite(Protocol):
    """A transport the hub may write to without a task (a socket): the hot path."""

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        """Write as much as the socket takes now; the rest, for `send_rest`.

        None (nothing written) when it cannot write now: the writer task then
        does, unless `write_closed`.
        """
        ...

    @property
    def write_closed(self) -> bool:
        """A close frame went out without the writer (the reader answered the
        peer's, or failed the connection): nothing can be written any more,
        and the reader ends the connection."""
        ...

    async def send_rest(self, data: bytes) -> None:
        """Finish a partial `send_nowait` (or `ping_nowait`). Raises TransportClosed."""
        ...

    def ping_nowait(self) -> bytes | None:
        """`send_nowait` of a keepalive ping: the unsent rest (for `send_rest`),
        or None when it cannot write now. Raises TransportClosed."""
        ...


#: Whether a transport class is a `DirectWrite`, found once per class: an
#: ``isinstance`` against a runtime-checkable protocol inspects its members
#: each time (about 1.5 % of the server's CPU while clients connect, #16).
_DIRECT_WRITE_TYPES: dict[type, bool] = {}


def direct_write(transport: Transport) -> DirectWrite | None:
    """``transport`` as a `DirectWrite` if it is one, else None."""
    kind = type(transport)
    direct = _DIRECT_WRITE_TYPES.get(kind)
    if direct is None:
        direct = _DIRECT_WRITE_TYPES[kind] = isinstance(transport, DirectWrite)
    return cast("DirectWrite", transport) if direct else None
