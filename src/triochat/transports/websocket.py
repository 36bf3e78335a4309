"""The WebSocket transport: trio-websocket behind the HTTP front.

The front has already read the request head, so trio-websocket gets a
`ReplayStream` that first returns those bytes. Every write to the socket,
trio-websocket's (handshake, pongs, close) and the writer's pre-framed
batches, goes through one lock in that stream, so frames never interleave.
"""

from __future__ import annotations

import contextlib
import socket

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream
from wsproto.utilities import LocalProtocolError

from ..config import Config
from ..connection import BinaryFrameError, TransportClosed
from ..frames import OutFrame

__all__ = ["ClosingRace", "ReplayStream", "WebSocketTransport", "accept_websocket"]

PING_FRAME = b"\x89\x00"  # FIN + opcode 9 (ping), no payload, unmasked

# trio-websocket's reader stops reading (pongs and close frames included)
# while its queue is full; ours drains it at once, so a few frames suffice.
LIBRARY_QUEUE = 4
CLOSE_FRAME_BYTE = 0x88  # the first byte of a close frame: FIN + opcode 8

#: trio-websocket's known closing race: its reader answers a ping that
#: arrives after our close frame went out, wsproto refuses to send that pong,
#: and the reader task raises this. The connection was closing anyway: catch
#: it (``except*``) around the nursery that runs the reader.
ClosingRace = LocalProtocolError


class ReplayStream(trio.abc.Stream):
    """A stream that replays ``prefix`` before reading ``stream``; writes are locked.

    Two more rules keep our frames and trio-websocket's in a valid order:

    1. Nothing is written after a close frame. trio-websocket writes each
       frame with its own ``send_all`` and the writer's batches start with a
       data frame, so a write starting with 0x88 is the close frame; later
       writes raise ClosedResourceError (the writer sees TransportClosed).
    2. trio-websocket's `aclose` (right after it answers a close, or when
       wsproto fails the connection on a protocol error) does not drop the
       TCP connection; `close_now` does, when the connection ends
       (`WebSocketTransport.abort`). Frames the application accepted before
       a protocol error can still be flushed, bounded by the caller.
    """

    __slots__ = (
        "_busy",
        "_close_sent",
        "_direct",
        "_prefix",
        "_stream",
        "_waiting",
        "last_receive",
    )

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        # The write gate: a flag and a parking lot rather than a trio.Lock,
        # because `write_nowait` (called by the hub, not by a writing task)
        # may have to keep it for the writer to finish a partial write. The
        # lot is made when two writers first meet (rare: an idle connection
        # saves it).
        self._busy = False
        self._waiting: trio.lowlevel.ParkingLot | None = None
        self._close_sent = False
        #: What `write_nowait` writes to: the socket under trio's, or None
        #: (not a socket stream, or closed).
        self._direct = _stdlib_socket(getattr(stream, "socket", None))
        #: When bytes last arrived (trio clock): the keepalive's proof of life.
        self.last_receive = trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            replayed, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return replayed
        data = await self._stream.receive_some(max_bytes)
        self.last_receive = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while self._busy:
            if self._waiting is None:
                self._waiting = trio.lowlevel.ParkingLot()
            await self._waiting.park()
        self._busy = True
        await self.send_reserved(data)

    async def send_reserved(self, data: bytes | bytearray | memoryview) -> None:
        """Write while holding the gate (taken by `send_all` or `write_nowait`), then free it."""
        try:
            if self._close_sent:
                raise trio.ClosedResourceError("a close frame was sent")
            await self._stream.send_all(data)
            if data and data[0] == CLOSE_FRAME_BYTE:
                self._close_sent = True
        finally:
            self._busy = False
            if self._waiting is not None:
                self._waiting.unpark()

    def write_nowait(self, data: bytes) -> int | None:
        """Write what the socket takes now, without waiting.

        Returns how many bytes went, or None when nothing may be written now
        (no real socket, another write in progress, a close frame sent). When
        fewer than ``len(data)`` went, the gate stays taken, so nothing can come
        between the two halves of a frame: the caller must finish with
        `send_reserved`.

        Raises:
            trio.BrokenResourceError: the peer is gone.
        """
        direct = self._direct
        if direct is None or self._busy or self._close_sent:
            return None
        try:
            written = direct.send(data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if written < len(data):
            self._busy = True
        return written

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """trio-websocket's TCP close, deferred to `close_now` (rule 2)."""
        await trio.lowlevel.checkpoint()

    async def close_now(self) -> None:
        """Drop the TCP connection (the connection's end)."""
        # No direct write after this: the descriptor's number may soon belong
        # to a new connection, and the hub can still flush a step's frames.
        self._direct = None
        await trio.aclose_forcefully(self._stream)


def _stdlib_socket(trio_socket: object) -> socket.socket | None:
    """The non-blocking stdlib socket under a trio socket, for `write_nowait`.

    trio keeps it in a private attribute, so anything else gets None (and
    every write goes through the writer task). Why not ``os.write`` on the
    descriptor: send(2) skips the VFS layer, 6-8 % of the system call that
    is most of a delivery's cost (``python benchmarks/fanout.py``).
    """
    stdlib = getattr(trio_socket, "_sock", None)
    return stdlib if isinstance(stdlib, socket.socket) else None


async def accept_websocket(
    nursery: trio.Nursery, stream: ReplayStream, config: Config
) -> WebSocketTransport:
    """Complete the handshake the front vetted; its reader runs in ``nursery``.

    Raises:
        TransportClosed: the handshake failed or timed out.
    """
    try:
        with trio.fail_after(config.handshake_timeout):
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=LIBRARY_QUEUE,
                max_message_size=config.max_frame_bytes,
            )
            ws = await request.accept()
    except (ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise TransportClosed(f"handshake failed: {exc!r}") from exc
    return WebSocketTransport(ws, stream)


class WebSocketTransport:
    """The `Transport` of a WebSocket connection."""

    __slots__ = ("_stream", "_ws")

    heartbeat: float | None = None  # the configured ping interval
    expects_pong = True

    def __init__(self, ws: WebSocketConnection, stream: ReplayStream) -> None:
        self._ws = ws
        self._stream = stream

    @property
    def last_receive(self) -> float:
        return self._stream.last_receive

    async def receive(self) -> str:
        # Not `receive_message` plus a check: one coroutine frame less held by
        # every idle connection.
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None
        if isinstance(message, bytes):
            raise BinaryFrameError
        return message

    async def receive_message(self) -> str | bytes:
        """The next whole message, text or binary. Raises TransportClosed."""
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def send(self, frames: list[OutFrame]) -> None:
        data = frames[0].ws if len(frames) == 1 else b"".join([frame.ws for frame in frames])
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed("connection lost") from exc

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        """Write ``frames`` as far as the socket takes them now; the unsent rest.

        None when nothing may be written now (see `ReplayStream.write_nowait`).
        A non-empty rest must be finished with `send_rest` before anything
        else is written (the write gate stays taken until then).
        """
        data = frames[0].ws if len(frames) == 1 else b"".join([frame.ws for frame in frames])
        try:
            written = self._stream.write_nowait(data)
        except trio.BrokenResourceError as exc:
            raise TransportClosed("connection lost") from exc
        return None if written is None else data[written:]

    async def send_rest(self, data: bytes) -> None:
        try:
            await self._stream.send_reserved(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed("connection lost") from exc

    async def ping(self) -> None:
        # A raw ping frame (not trio-websocket's ping(), which needs a task
        # waiting for each pong): any bytes the peer sends, the pong
        # included, update `last_receive`.
        try:
            await self._stream.send_all(PING_FRAME)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed("connection lost") from exc

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._ws.aclose(code, reason)

    async def abort(self) -> None:
        await self._stream.close_now()


def _closed(exc: ConnectionClosed) -> TransportClosed:
    reason = exc.reason
    if reason is None:
        return TransportClosed("closed")
    text = f"closed ({reason.code}{' ' + reason.reason if reason.reason else ''})"
    return TransportClosed(text, reason.code)
