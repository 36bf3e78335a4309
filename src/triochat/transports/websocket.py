"""The WebSocket transport: trio-websocket behind the HTTP front.

The front has already read the request head, so trio-websocket gets a
`ReplayStream` that first returns those bytes. Every write to the socket,
trio-websocket's (handshake, pongs, close) and the writer's pre-framed
batches, goes through one lock in that stream, so frames never interleave.

Failing a connection (RFC 6455 7.1.7, docs/protocol.md section 11): when
wsproto finds a protocol error (1002, or 1007 for invalid UTF-8)
trio-websocket records the code but sends no close frame, and a frame header
that announces more than ``--max-frame-bytes`` is only noticed by it once
that many bytes have arrived. So the stream reads every client frame header
as it goes by (`FrameSizeGuard`: over the limit ends the read at once, 1009),
`receive` reports such ends as `TransportClosed` with ``failed`` set, and
`close` then writes the close frame itself.

permessage-deflate (RFC 7692, ``--compression on``): trio-websocket's
`accept` gives wsproto no extensions, so with compression on the handshake
goes through `_CompressingHandshake`, which adds our `DeflateExtension` to
the 101 (negotiation and inflating: transports/deflate.py). A connection
that agreed to it gets a `DeflateWebSocketTransport`, which writes each
frame's compressed framing (`OutFrame.wsz`, compressed once for all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event
from wsproto.utilities import LocalProtocolError

from ..config import Config
from ..connection import TransportClosed
from ..frames import OutFrame
from ..protocol import CloseCode
from .deflate import DeflateExtension

__all__ = [
    "ClosingRace",
    "DeflateWebSocketTransport",
    "FrameSizeGuard",
    "ReplayStream",
    "WebSocketTransport",
    "accept_websocket",
    "close_frame",
    "log_safe",
]

PING_FRAME = b"\x89\x00"  # FIN + opcode 9 (ping), no payload, unmasked

# trio-websocket's reader stops reading (pongs and close frames included)
# while its queue is full; ours drains it at once, so a few frames suffice.
LIBRARY_QUEUE = 4
CLOSE_FRAME_BYTE = 0x88  # the first byte of a close frame: FIN + opcode 8
ABNORMAL_CLOSURE = 1006  # trio-websocket's code for a TCP connection lost without a close
MAX_CLOSE_REASON = 123  # bytes: a control frame's payload is at most 125 (RFC 6455 5.5)

#: trio-websocket's known closing race: its reader answers a ping that
#: arrives after our close frame went out, wsproto refuses to send that pong,
#: and the reader task raises this. The connection was closing anyway: catch
#: it (``except*``) around the nursery that runs the reader.
ClosingRace = LocalProtocolError


def log_safe(text: str, limit: int = 80) -> str:
    """A peer's text for a log line: quoted, cut to ``limit``, every character
    outside printable ASCII escaped (no newline, ANSI escape or bidi control
    reaches the log raw)."""
    shown = [
        c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text[:limit]
    ]
    return '"' + "".join(shown) + ('..."' if len(text) > limit else '"')


def close_frame(code: int, reason: str) -> bytes:
    """A close frame (RFC 6455 5.5.1) with ``reason`` cut to fit, on a character boundary."""
    data = reason.encode()[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()
    payload = struct.pack("!H", code) + data
    return bytes((CLOSE_FRAME_BYTE, len(payload))) + payload


class FrameSizeGuard:
    """Reads client frame headers as the bytes go by; sans-I/O.

    A data message (its fragments added up) over ``limit`` payload bytes is
    refused at the header that takes it over, before its payload arrives.
    Everything else about the frames is wsproto's to check.
    """

    __slots__ = ("_header", "_limit", "_message", "_skip")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._skip = 0  # payload bytes of the current frame still to pass
        self._header = b""  # a header split over two reads, so far
        self._message = 0  # payload bytes of the current data message so far

    def feed(self, data: bytes | bytearray) -> int | None:
        """Where in ``data`` the header of a message over the limit starts, or None.

        0 when that header started in an earlier read. After a non-None
        answer the guard is spent: feed it nothing more.
        """
        size = len(data)
        index = 0
        while index < size:
            skip = self._skip
            if skip:
                step = min(skip, size - index)
                self._skip = skip - step
                index += step
                continue
            carried = self._header
            start = index - len(carried)  # where this header began, in ``data``
            end = max(start + 2, index)
            header = carried + data[index:end]
            if len(header) < 2:
                self._header = bytes(header)
                return None
            length = header[1] & 0x7F
            extended = 2 if length == 126 else 8 if length == 127 else 0
            needed = 2 + extended + (4 if header[1] & 0x80 else 0)
            header += data[end : max(start + needed, end)]
            if len(header) < needed:
                self._header = bytes(header)
                return None
            self._header = b""
            index = start + needed
            if extended:
                length = int.from_bytes(header[2 : 2 + extended], "big")
            opcode = header[0] & 0x0F
            if opcode < 8:  # a data frame: text, binary or a continuation
                self._message = length if opcode else self._message + length
                if self._message > self._limit:
                    return max(start, 0)
            self._skip = length
        return None


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
        "_guard",
        "_head_left",
        "_prefix",
        "_reader_idle",
        "_receiving",
        "_stream",
        "_waiting",
        "failure",
        "last_receive",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        prefix: bytes,
        *,
        head_size: int | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        """Args:
        prefix: the bytes already read: the request head, then perhaps frames.
        head_size: how many bytes of ``prefix`` are the request head (all by default).
        max_message_bytes: refuse a client message over this at its header
            (`FrameSizeGuard`); None: no guard.
        """
        self._stream = stream
        self._prefix = prefix
        self._head_left = len(prefix) if head_size is None else head_size
        self._guard = None if max_message_bytes is None else FrameSizeGuard(max_message_bytes)
        #: Why the stream stopped reading on its own (code, reason), or None.
        self.failure: tuple[int, str] | None = None
        self._receiving = False  # trio-websocket's reader is in `receive_some`
        self._reader_idle: trio.Event | None = None  # set when it leaves (`close_now` waits)
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
        if self.failure is not None:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError(self.failure[1])
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            replayed, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return self._screen(replayed)
        self._receiving = True
        try:
            data = await self._stream.receive_some(max_bytes)
        finally:
            self._receiving = False
            if self._reader_idle is not None:
                self._reader_idle.set()
        self.last_receive = trio.current_time()
        return self._screen(data)

    def _screen(self, data: bytes | bytearray) -> bytes | bytearray:
        """``data`` up to the header of a message over the limit (then `failure` is set)."""
        guard = self._guard
        if guard is None:
            return data
        head = self._head_left
        if head:  # the request head is not frames
            if len(data) <= head:
                self._head_left = head - len(data)
                return data
            self._head_left = 0
        found = guard.feed(data[head:] if head else data)
        if found is None:
            return data
        self._guard = None
        self.failure = (CloseCode.MESSAGE_TOO_BIG, "message too big")
        if found + head == 0:
            raise trio.BrokenResourceError("message too big")
        return data[: found + head]

    @property
    def close_sent(self) -> bool:
        """Whether a close frame went out (trio-websocket's or ours)."""
        return self._close_sent

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._busy:
            if self._waiting is None:
                self._waiting = trio.lowlevel.ParkingLot()
            # Woken only by `send_reserved`, which hands the gate over without
            # freeing it: nobody (the hub's `write_nowait` included) can write
            # between the writer before us and us.
            await self._waiting.park()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._busy = True
        await self.send_reserved(data)

    async def send_reserved(self, data: bytes | bytearray | memoryview) -> None:
        """Write while holding the gate (taken by `send_all` or `write_nowait`), then pass it on.

        The gate goes to the longest-waiting `send_all` if there is one (it
        stays taken: a hand-off, as in `trio.Lock`), else it is freed.
        """
        try:
            if self._close_sent:
                raise trio.ClosedResourceError("a close frame was sent")
            await self._stream.send_all(data)
            if data and data[0] == CLOSE_FRAME_BYTE:
                self._close_sent = True
        finally:
            waiting = self._waiting
            if waiting:  # a ParkingLot is true while someone is parked in it
                waiting.unpark()
            else:
                self._busy = False

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
        """Close the TCP connection (the connection's end), lingering after a close frame.

        After our close frame the peer may still be sending (the rest of a
        message we refused, say, or its close reply). Closing a socket with
        unread data resets the connection, and so does data arriving after the
        close; a reset discards what we sent that the peer has not read yet,
        our close frame included. So we send FIN and read (and drop) until the
        peer closes too, bounded by the caller's cancel scope; then close.
        trio-websocket's reader may still be in `receive_some` (its loop reads
        once more after a close, until cancelled with the connection or the
        peer sends): we wait for it to leave first, as two readers collide.

        Cancellation: the socket is closed, then Cancelled propagates.
        """
        # No direct write after this: the descriptor's number may soon belong
        # to a new connection, and the hub can still flush a step's frames.
        self._direct = None
        stream = self._stream
        # Under TLS the linger happens below the TLS layer: our close frame is
        # already in TLS records, and what the peer still sends is dropped unread.
        tcp = stream if isinstance(stream, trio.SocketStream) else None
        if isinstance(stream, trio.SSLStream) and isinstance(
            stream.transport_stream, trio.SocketStream
        ):
            tcp = stream.transport_stream
        try:
            if self._close_sent and tcp is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tcp.send_eof()  # (the send side: no collision with a reader)
                    while self._receiving:
                        self._reader_idle = trio.Event()
                        await self._reader_idle.wait()
                    while await tcp.receive_some(65536):
                        pass
        finally:
            await trio.aclose_forcefully(stream)


def _stdlib_socket(trio_socket: object) -> socket.socket | None:
    """The non-blocking stdlib socket under a trio socket, for `write_nowait`.

    trio keeps it in a private attribute, so anything else gets None (and
    every write goes through the writer task). Why not ``os.write`` on the
    descriptor: send(2) skips the VFS layer, 6-8 % of the system call that
    is most of a delivery's cost (``python benchmarks/fanout.py``).
    """
    stdlib = getattr(trio_socket, "_sock", None)
    return stdlib if isinstance(stdlib, socket.socket) else None


class _CompressingHandshake(WSConnection):
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


async def _wrap_compressing(
    nursery: trio.Nursery, stream: ReplayStream, config: Config, extension: DeflateExtension
) -> WebSocketConnection:
    """`trio_websocket.wrap_server_stream` with `_CompressingHandshake` as its wsproto.

    (The three lines of trio-websocket 0.12's own, which takes no wsproto
    object: its constructor does, the reader task and request wait are
    private. tests/test_deflate.py fails if they change.)
    """
    connection = WebSocketConnection(
        stream,
        _CompressingHandshake(extension),
        message_queue_size=LIBRARY_QUEUE,
        max_message_size=config.max_frame_bytes,
    )
    nursery.start_soon(connection._reader_task)
    request = await connection._get_request()
    return await request.accept()


async def accept_websocket(
    nursery: trio.Nursery, stream: ReplayStream, config: Config
) -> WebSocketTransport:
    """Complete the handshake the front vetted; its reader runs in ``nursery``.

    With ``config.compression`` a permessage-deflate offer is taken (the
    first acceptable one), and the transport is a `DeflateWebSocketTransport`.

    Raises:
        TransportClosed: the handshake failed or timed out.
    """
    extension = DeflateExtension(config.max_frame_bytes) if config.compression else None
    try:
        with trio.fail_after(config.handshake_timeout):
            if extension is None:
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=LIBRARY_QUEUE,
                    max_message_size=config.max_frame_bytes,
                )
                ws = await request.accept()
            else:
                ws = await _wrap_compressing(nursery, stream, config, extension)
    except (ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise TransportClosed(f"handshake failed: {exc!r}") from exc
    if extension is not None and extension.agreement is not None:
        return DeflateWebSocketTransport(ws, stream, extension)
    return WebSocketTransport(ws, stream)


class WebSocketTransport:
    """The `Transport` of a WebSocket connection."""

    __slots__ = ("_stream", "_ws")

    heartbeat: float | None = None  # the configured ping interval
    expects_pong = True
    #: The compression negotiated (for the log), or None.
    compression: str | None = None

    def __init__(self, ws: WebSocketConnection, stream: ReplayStream) -> None:
        self._ws = ws
        self._stream = stream

    @property
    def last_receive(self) -> float:
        return self._stream.last_receive

    async def receive_message(self) -> str | bytes:
        """The next whole message, text or binary. Raises TransportClosed."""
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    def _closed(self, exc: ConnectionClosed) -> TransportClosed:
        """How the reading ended: a close received, the TCP connection lost, or a failure.

        A failure (``failed``: our close frame is owed) is a message over the
        limit (the stream's guard), or a code trio-websocket recorded without
        any close frame on the wire: wsproto failed the connection.
        """
        stream = self._stream
        reason = exc.reason
        failure = stream.failure
        if (
            failure is None
            and reason is not None
            and reason.code != ABNORMAL_CLOSURE
            and not stream.close_sent
        ):
            failure = (reason.code, reason.reason or "protocol error")
        if failure is not None:
            return TransportClosed(failure[1], failure[0], failed=True)
        if reason is None:
            return TransportClosed("closed")
        if reason.code == ABNORMAL_CLOSURE:
            # The TCP connection ended without a close frame: no code was
            # exchanged (1006 is trio-websocket's word for that, never sent), so
            # the close line and triochat_closes_total say "none" (#11 §4).
            return TransportClosed("connection lost")
        # The peer's reason goes into the log: escaped and cut, never raw.
        # The code is not repeated here: the close line states it once (#11 §4).
        said = f" {log_safe(reason.reason)}" if reason.reason else ""
        return TransportClosed(f"closed by the peer{said}", reason.code)

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
            if self._ws.closed is None:
                await self._ws.aclose(code, reason)  # the closing handshake
            elif not self._stream.close_sent:
                # trio-websocket gave up without a close frame (a failure): ours.
                await self._stream.send_all(close_frame(code, reason))

    async def abort(self) -> None:
        await self._stream.close_now()


class DeflateWebSocketTransport(WebSocketTransport):
    """A `WebSocketTransport` that agreed to permessage-deflate (RFC 7692).

    It writes each frame's compressed framing, `OutFrame.wsz`: compressed
    once, shared by every connection that compresses (uncompressed when
    small, RSV1 clear). With ``server_max_window_bits=N`` under 15, a
    payload longer than 2^N bytes goes out uncompressed: the shared
    compression uses a 32 KiB window, and its back-references fit the
    client's 2^N-byte window only when the payload itself does (RFC 7692
    7.1.2.1). `send` and `send_nowait` repeat the base class's rather than
    share a helper with it: the uncompressed path stays exactly as fast.
    """

    __slots__ = ("_extension", "_window")

    compression = "permessage-deflate"

    def __init__(
        self, ws: WebSocketConnection, stream: ReplayStream, extension: DeflateExtension
    ) -> None:
        super().__init__(ws, stream)
        self._extension = extension
        agreement = extension.agreement
        assert agreement is not None
        #: Payloads up to this many bytes may go compressed; None: any.
        self._window: int | None = (
            None
            if agreement.server_max_window_bits == 15
            else 1 << agreement.server_max_window_bits
        )

    def _wire(self, frames: list[OutFrame]) -> bytes:
        window = self._window
        if window is None:
            return frames[0].wsz if len(frames) == 1 else b"".join([f.wsz for f in frames])
        return b"".join([f.wsz if f.payload_size <= window else f.ws for f in frames])

    async def send(self, frames: list[OutFrame]) -> None:
        data = self._wire(frames)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed("connection lost") from exc

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        data = self._wire(frames)
        try:
            written = self._stream.write_nowait(data)
        except trio.BrokenResourceError as exc:
            raise TransportClosed("connection lost") from exc
        return None if written is None else data[written:]

    def _closed(self, exc: ConnectionClosed) -> TransportClosed:
        failure = self._extension.failure
        if failure is not None and self._stream.failure is None and not self._stream.close_sent:
            # Inflating failed (a zip bomb, bad deflate data): wsproto's own
            # reason says only "error in extension".
            return TransportClosed(failure[1], failure[0], failed=True)
        return super()._closed(exc)
