"""A trio-websocket server handshake in the connection's own task, and what an
established connection sheds (issue #16: memory per idle connection).

`open_handshake` runs trio-websocket's handshake without its reader task
(transports/websocket.py's `WebSocketTransport.receive_message` reads
instead), with `CompressingHandshake` for permessage-deflate; then
`shed_handshake` replaces what an established connection no longer needs
with the small stand-ins below. Everything here leans on trio-websocket 0.12
and wsproto 1.3 internals; tests/test_websocket_state.py checks each
assumption, so an upgrade that breaks one fails there first.
"""

from __future__ import annotations

import dataclasses
import types
from collections import deque
from collections.abc import Mapping
from typing import Final

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request
from wsproto.utilities import RemoteProtocolError

from ..config import Config
from .deflate import DeflateExtension
from .replay import ReplayStream

__all__ = [
    "FINISHED_HANDSHAKE",
    "NO_CHANNEL",
    "NO_LOCK",
    "NO_PINGS",
    "CompressingHandshake",
    "EventList",
    "LazyEvent",
    "open_handshake",
    "shed_handshake",
]

# Bytes read from the socket at a time (trio-websocket's own default).
_RECEIVE_BYTES: Final = 4096


class CompressingHandshake(WSConnection):
    """wsproto's server side, with `DeflateExtension` added to the 101 response.

    trio-websocket's `WebSocketRequest.accept` sends an `AcceptConnection`
    without extensions; wsproto negotiates those in the event itself
    (calling `DeflateExtension.accept` with each offer) and then runs the
    connection's frames through the agreed ones.
    """

    def __init__(self, extension: DeflateExtension) -> None:
        super().__init__(ConnectionType.SERVER)
        self._extension = extension

    def send(self, event: Event) -> bytes:
        if isinstance(event, AcceptConnection):
            event = dataclasses.replace(event, extensions=[self._extension])
        return super().send(event)


async def open_handshake(
    stream: ReplayStream, protocol: WSConnection, config: Config
) -> WebSocketConnection:
    """trio-websocket's server handshake, run in the connection's own task.

    A `WebSocketConnection` over our wsproto object (`CompressingHandshake`
    with compression on, which trio-websocket's constructor takes, unlike its
    ``wrap_server_stream``); the request read here rather than by
    trio-websocket's reader task (the connection has none: its reader is
    `WebSocketTransport.receive_message`); trio-websocket's own
    `WebSocketRequest.accept` for the 101; then `shed_handshake` drops what
    an established connection no longer needs.

    Raises:
        wsproto's RemoteProtocolError: the request is not a valid upgrade
            (answered as wsproto suggests, as trio-websocket's reader does).
    """
    ws = WebSocketConnection(
        stream,
        protocol,
        message_queue_size=0,  # never used: replaced by `NO_CHANNEL` below
        max_message_size=config.max_frame_bytes,
    )
    request: Request | None = None
    while request is None:
        for event in protocol.events():
            if isinstance(event, Request):
                request = event
                break
        else:
            data = await stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("the peer closed during the handshake")
            try:
                protocol.receive_data(data)  # type: ignore[arg-type]  # (a bytearray is fine)
            except RemoteProtocolError as exc:
                if exc.event_hint is not None:
                    await ws._send(exc.event_hint)
                raise
    await WebSocketRequest(ws, request).accept()
    shed_handshake(ws, protocol)
    return ws


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
        await trio.lowlevel.checkpoint()

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


def shed_handshake(ws: WebSocketConnection, protocol: WSConnection) -> None:
    """Drop what an established connection no longer needs (issue #16: an idle
    connection holds its objects for hours: together some 6 KiB of it).

    All of it private to trio-websocket 0.12 and wsproto 1.3, and only
    replaced by what they do from then on (tests/test_websocket_state.py
    checks each assumption):

    - wsproto's handshake, with its h11 parser, the request, its headers and
      a deque: `WSConnection` asks an established handshake only for events;
    - trio-websocket's message channel (a memory channel, its deque and
      parking lots): nothing is sent on it any more (`receive_message` reads
      the messages), and trio-websocket's closing only closes it;
    - the handshake's future and events: ``_connection_proposal`` (the
      request: taken), ``_open_handshake`` (set) and
      ``_for_testing_peer_closed_connection`` (nobody waits on it; setting
      it again changes nothing);
    - the write lock (`NoLock`: the stream's gate serialises the writes),
      the pings awaiting a pong (none: ours are raw frames), and wsproto's
      queue of pending events (`EventList`: always empty here);
    - the close handshake's event, unset yet: made when it is waited for
      (`LazyEvent`).
    """
    connection = protocol.connection
    if connection is not None and not getattr(protocol.handshake, "_events", True):
        protocol.handshake = FINISHED_HANDSHAKE  # type: ignore[assignment]
    if connection is not None and isinstance(getattr(connection, "_events", None), deque):
        connection._events = EventList(connection._events)  # type: ignore[assignment]
    ws._send_channel = ws._recv_channel = NO_CHANNEL  # type: ignore[assignment]
    ws._stream_lock = NO_LOCK  # type: ignore[assignment]
    ws._pings = NO_PINGS  # type: ignore[assignment]
    ws._connection_proposal = None
    ws._open_handshake = ws._for_testing_peer_closed_connection = SET_EVENT
    if not ws._close_handshake.is_set():
        ws._close_handshake = LazyEvent()  # type: ignore[assignment]
