"""The WebSocket opening handshake, answered in the connection's own task,
and the established connection it makes (issue #16: connection setup and
memory per idle connection).

The front has read and vetted the request (front/handshake.py: every check
of RFC 6455 4.2.1 and docs/protocol.md section 1.1), so nothing parses it
again: `accept_upgrade` makes the 101 itself (the accept token, and the
permessage-deflate agreement through wsproto's own negotiation with our
`DeflateExtension`) and wsproto's side already established, and the caller
(transports/websocket.py: `accept_websocket`) writes it and builds
trio-websocket's connection over it: `EstablishedProtocol` (wsproto's `WSConnection`
without its h11 handshake) and `EstablishedWebSocket` (trio-websocket's
`WebSocketConnection` with, from the start, the small stand-ins below for
what an established connection never uses: no reader task, no message
channel, no write lock). trio-websocket and wsproto then run the protocol
as before: frames, pongs, the closing handshake, message assembly.

Everything here leans on trio-websocket 0.12 and wsproto 1.3 internals;
tests/test_websocket_state.py checks each assumption (the same attributes
as their own constructors set, used only where the stand-ins cover them),
so an upgrade that breaks one fails there first.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Final

import trio
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import Event
from wsproto.extensions import Extension
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import generate_accept_token

from .deflate import DeflateExtension

__all__ = [
    "FINISHED_HANDSHAKE",
    "NO_CHANNEL",
    "NO_LOCK",
    "NO_PINGS",
    "RECEIVE_BYTES",
    "EstablishedProtocol",
    "EstablishedWebSocket",
    "EventList",
    "LazyEvent",
    "accept_upgrade",
    "switching_protocols",
]

#: Bytes read from the socket at a time (trio-websocket's own default).
RECEIVE_BYTES: Final = 4096
_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


def switching_protocols(key: bytes, agreed: bytes | None) -> bytes:
    """The 101 answering Sec-WebSocket-Key ``key`` (RFC 6455 4.2.2), with the
    Sec-WebSocket-Extensions agreement ``agreed`` if any: what wsproto's
    handshake writes, byte for byte."""
    response = _SWITCHING + generate_accept_token(key) + b"\r\n"
    if agreed:
        response += b"Sec-WebSocket-Extensions: " + agreed + b"\r\n"
    return response + b"\r\n"


def accept_upgrade(
    key: bytes, offers: Sequence[str], extension: DeflateExtension | None = None
) -> tuple[bytes, EstablishedProtocol]:
    """The 101 for a vetted upgrade (Sec-WebSocket-Key ``key``, extension
    ``offers``), and wsproto's side of the connection it opens (sans-I/O).

    With ``extension`` (compression on) the first acceptable permessage-deflate
    offer is agreed, by wsproto's own negotiation (`DeflateExtension.accept`),
    and named in the 101.
    """
    extensions: list[Extension] = [] if extension is None else [extension]
    agreed = server_extensions_handshake(offers, extensions) if extensions and offers else None
    # After the negotiation (it enables the extension it agrees to): wsproto's
    # connection keeps only the enabled ones of those it is given.
    return switching_protocols(key, agreed), EstablishedProtocol(extensions)


class EstablishedProtocol(WSConnection):
    """wsproto's server side, established from the start: its `Connection`
    (frames, close handshake) without the h11 handshake that would have led
    to it (`FINISHED_HANDSHAKE` stands in: an established `WSConnection`
    only asks its handshake for events)."""

    def __init__(self, extensions: list[Extension]) -> None:
        # The attributes `WSConnection.__init__` sets, established.
        self.client = False
        self.handshake = FINISHED_HANDSHAKE  # type: ignore[assignment]
        connection = Connection(ConnectionType.SERVER, extensions)
        # Appended to only on receive_data(None), which nobody calls here.
        connection._events = EventList()  # type: ignore[assignment]
        self.connection = connection


class EstablishedWebSocket(WebSocketConnection):
    """trio-websocket's connection, its opening handshake done, holding only
    what an established connection uses (issue #16: an idle connection holds
    its objects for hours).

    Every attribute `WebSocketConnection.__init__` sets is set here, and
    tests/test_websocket_state.py checks that the two sets are the same; what
    an established server connection never uses is a shared stand-in:

    - no message channel (`NO_CHANNEL`): the connection reads its messages
      itself (transports/websocket.py: `WebSocketTransport.receive_message`),
      and trio-websocket only closes the channel;
    - no write lock (`NO_LOCK`): every write goes through the stream's own
      gate (`ReplayStream.send_all`), first come, first served;
    - no pings awaiting a pong (`NO_PINGS`): ours are raw frames;
    - the handshake's future (None) and events (set: `SET_EVENT`);
      ``_for_testing_peer_closed_connection`` is set once more on a close,
      which changes nothing;
    - the close handshake's event, made when it is waited for (`LazyEvent`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: WSConnection,
        *,
        path: str,
        max_message_size: int,
    ) -> None:
        # (Not trio-websocket's constructor: it would make each stand-in's real
        # object first, only for it to be dropped.)
        self._close_reason = None
        self._id = next(WebSocketConnection.CONNECTION_ID)
        self._stream = stream
        self._stream_lock = NO_LOCK  # type: ignore[assignment]
        self._wsproto = protocol
        self._message_size = 0
        self._message_parts = []
        self._max_message_size = max_message_size
        self._receive_buffer_size = RECEIVE_BYTES
        self._reader_running = True
        self._initial_request = None
        self._path = path
        self._subprotocol = None
        self._handshake_headers = ()
        self._reject_status = 0
        self._reject_headers = ()
        self._reject_body = b""
        self._send_channel = self._recv_channel = NO_CHANNEL  # type: ignore[assignment]
        self._pings = NO_PINGS  # type: ignore[assignment]
        self._connection_proposal = None
        self._open_handshake = SET_EVENT
        self._close_handshake = LazyEvent()  # type: ignore[assignment]
        self._for_testing_peer_closed_connection = SET_EVENT


class FinishedHandshake:
    """Stands in for wsproto's `H11Handshake` once the connection is established:
    `WSConnection` then only asks it for events, and it has none."""

    __slots__ = ()

    def events(self) -> tuple[()]:
        return ()


class EventList(list[Event]):
    """Stands in for the deque of wsproto's `Connection._events` (624 bytes
    empty; this, 56): wsproto queues an event there only when given
    ``receive_data(None)``, which trio-websocket and we never call, and
    `events` pops them from the left."""

    __slots__ = ()

    def popleft(self) -> Event:
        return self.pop(0)


class NoLock:
    """Stands in for trio-websocket's write lock (a `trio.StrictFIFOLock`, its
    parking lot and ordered dict): every write goes through the stream's own
    gate (`ReplayStream.send_all`), which already serialises them first come,
    first served."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class LazyEvent:
    """Stands in for trio-websocket's close-handshake event (a `trio.Event` and
    its set of waiting tasks): the event is made only when someone waits for
    it, i.e. when we close (`WebSocketConnection.aclose`)."""

    __slots__ = ("_event", "_is_set")

    def __init__(self) -> None:
        self._is_set = False
        self._event: trio.Event | None = None

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        self._is_set = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if self._is_set:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class NoChannel:
    """Stands in for trio-websocket's message channel: the connection reads its
    messages itself (`WebSocketTransport.receive_message`), and trio-websocket
    only closes the channel from then on."""

    __slots__ = ()

    async def aclose(self) -> None:
        return None  # (no checkpoint: trio-websocket's close awaits enough of them)

    async def send(self, value: object) -> None:
        raise trio.BrokenResourceError  # (trio-websocket's reader task would drop it)

    async def receive(self) -> object:
        raise trio.ClosedResourceError  # (trio-websocket's get_message: ConnectionClosed)


FINISHED_HANDSHAKE: Final = FinishedHandshake()
NO_CHANNEL: Final = NoChannel()
NO_LOCK: Final = NoLock()
#: trio-websocket's pings waiting for their pong: none (ours are raw frames,
#: `WebSocketTransport.ping`); read-only, so that a ping of its own would fail loudly.
NO_PINGS: Final[Mapping[bytes, trio.Event]] = types.MappingProxyType({})
#: An event that is set: stands in for those nobody waits on any more.
SET_EVENT: Final = trio.Event()
SET_EVENT.set()
