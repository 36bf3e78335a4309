"""The byte stream under trio-websocket: `ReplayStream` and its `FrameSizeGuard`.

The HTTP front has already read the request head and perhaps the first
frames after it, so trio-websocket gets a `ReplayStream` that returns those
frames first. Besides replaying, the stream:

- reads every client frame header as it goes by (`FrameSizeGuard`,
  sans-I/O): a message over ``--max-frame-bytes`` ends the read at its
  header, with `failure` set (1009), instead of once that many bytes arrived;
- gates every write, the 101 and trio-websocket's (pongs, close) and the
  writer's pre-framed batches alike, so frames never interleave, and lets
  the hub (and the keepalive, for a ping) write without a task
  (`write_nowait`, the hot path);
- writes nothing after a close frame, and lingers after it (`close_now`)
  so that a reset does not discard the close frame on its way.

It knows frames only by their first bytes; everything else about them is
wsproto's (transports/websocket.py).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Final

import trio

from ..protocol import CloseCode

__all__ = [
    "CLOSED_ERRNOS",
    "CLOSE_FRAME_BYTE",
    "FrameSizeGuard",
    "ReplayStream",
    "close_stream",
    "read_arrived",
    "stdlib_socket",
]

CLOSE_FRAME_BYTE = 0x88  # the first byte of a close frame: FIN + opcode 8
_RECEIVE_SIZE: Final = 65536  # bytes, when the caller names no size (trio's default)
#: A closed socket's errors (a read, a write, an accept): ClosedResourceError, as trio's.
CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})


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
        "_prefix",
        "_raw",
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
        max_message_bytes: int | None = None,
    ) -> None:
        """Args:
        prefix: the bytes already read past the request head (frames, perhaps).
        max_message_bytes: refuse a client message over this at its header
            (`FrameSizeGuard`); None: no guard.
        """
        self._stream = stream
        self._prefix = prefix
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
        self._direct = stdlib_socket(getattr(stream, "socket", None))
        #: What `receive_some` reads: the socket under a `trio.SocketStream`, or
        #: None (then the stream's own `receive_some`).
        self._raw = self._direct if isinstance(stream, trio.SocketStream) else None
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
        raw = self._raw
        try:
            if raw is None:
                data = await self._stream.receive_some(max_bytes)
            else:
                # `trio.SocketStream.receive_some` on its socket, as trio does it
                # (its checkpoints, its errors), inline: an idle connection
                # waits here for hours, and trio's way holds three more
                # coroutine frames and a generator meanwhile (issue #16).
                size = max_bytes or _RECEIVE_SIZE
                await trio.lowlevel.checkpoint_if_cancelled()
                received = _recv_nowait(raw, size)
                if received is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                while received is None:
                    await trio.lowlevel.wait_readable(raw)
                    received = _recv_nowait(raw, size)
                data = received
        except OSError as exc:
            if raw is None:
                raise
            if exc.errno in CLOSED_ERRNOS:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
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
        found = guard.feed(data)
        if found is None:
            return data
        self._guard = None
        self.failure = (CloseCode.MESSAGE_TOO_BIG, "message too big")
        if found == 0:
            raise trio.BrokenResourceError("message too big")
        return data[:found]

    @property
    def close_sent(self) -> bool:
        """Whether a close frame went out (trio-websocket's or ours)."""
        return self._close_sent

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """trio's ``send_all``, through the write gate (`send_reserved`). Unlike
        trio's, a close frame that the socket takes at once is written without
        letting other tasks run (cancellation is still checked first): the
        connection ends next, and every later write raises ClosedResourceError."""
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

    async def send_reserved(
        self, data: bytes | bytearray | memoryview, *, tail: bool = False
    ) -> None:
        """Write while holding the gate (taken by `send_all` or `write_nowait`), then pass it on.

        The gate goes to the longest-waiting `send_all` if there is one (it
        stays taken: a hand-off, as in `trio.Lock`), else it is freed.

        Args:
            tail: ``data`` is the rest of a partial `write_nowait` (never a
                close frame's), whose first byte may be any byte of a frame:
                it does not say what the data is.
        """
        rest: bytes | bytearray | memoryview = data
        try:
            if self._close_sent:
                raise trio.ClosedResourceError("a close frame was sent")
            direct = self._direct
            if direct is not None and data:
                # What the socket takes now goes without trio's stream (its
                # wrappers and a task switch before the gate is free): the
                # close reply of every connection the peer closes (#16: churn).
                rest = data[_send_now(direct, data) :]
            if rest:
                await self._stream.send_all(rest)
            if not tail and data and data[0] == CLOSE_FRAME_BYTE:
                self._close_sent = True
        finally:
            waiting = self._waiting
            if waiting:  # a ParkingLot is true while someone is parked in it
                waiting.unpark()
            else:
                self._busy = False
        if not rest and not self._close_sent:
            # (trio's send_all yields after a write: here once the gate is
            # free. Not after a close frame: the connection ends next, and
            # a task switch there is one per connection for nothing; #16.)
            await trio.lowlevel.cancel_shielded_checkpoint()

    def write_nowait(self, data: bytes) -> int | None:
        """Write what the socket takes now, without waiting.

        Returns how many bytes went, or None when nothing may be written now
        (no real socket, another write in progress, a close frame sent). When
        fewer than ``len(data)`` went, the gate stays taken, so nothing can come
        between the two halves of a frame: the caller must finish with
        `send_reserved` (``tail=True``). A close frame is never written here.

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
        """trio-websocket's TCP close, deferred to `close_now` (rule 2). (No
        checkpoint: trio-websocket calls it while closing, after its own.)"""

    async def close_now(self, *, handshake_done: bool = False) -> None:
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

        With ``handshake_done`` (both close frames have gone by) on plain TCP,
        the peer sends nothing more (RFC 6455 5.5.1): if nothing is unread, the
        socket is closed at once, which sends the same FIN without the wait
        for the peer's (#16: churn).

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
            if self._close_sent and tcp is not None and not (handshake_done and self._drained()):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tcp.send_eof()  # (the send side: no collision with a reader)
                    while self._receiving:
                        self._reader_idle = trio.Event()
                        await self._reader_idle.wait()
                    while await tcp.receive_some(65536):
                        pass
        finally:
            await close_stream(stream)

    def _drained(self) -> bool:
        """Nothing unread on a plain socket that no reader is in (a peek, no wait)."""
        raw = self._raw
        if raw is None or self._receiving or self._prefix:
            return False
        try:
            return not raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return True  # (broken: nothing to linger for)


async def close_stream(stream: trio.abc.Stream) -> None:
    """`trio.aclose_forcefully`, for a plain socket at once: its close is
    synchronous, and trio's way costs two cancel scopes per connection (#16:
    connection setup and churn). Closing an already closed stream does nothing."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def read_arrived(stream: trio.abc.Stream, size: int) -> bytes | None:
    """What has already arrived on a plain socket stream, read without waiting
    (at most ``size`` bytes; b"" once the peer closed); None when nothing has,
    the socket failed, or ``stream`` is not a `trio.SocketStream`.

    For a read that need not wait: no cancel scope, no checkpoint (#16).
    """
    raw = stdlib_socket(stream.socket) if isinstance(stream, trio.SocketStream) else None
    if raw is None:
        return None
    try:
        return _recv_nowait(raw, size)
    except OSError:
        return None  # (the read that waits meets the error again, or the close)


def _send_now(raw: socket.socket, data: bytes | bytearray | memoryview) -> int:
    """``raw.send(data)``: how many bytes went (0 when the socket is full); trio's
    stream errors for a closed or broken one."""
    try:
        return raw.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in CLOSED_ERRNOS:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def _recv_nowait(raw: socket.socket, size: int) -> bytes | None:
    """``raw.recv(size)``, or None when nothing has arrived (BlockingIOError).

    Caught here rather than in `ReplayStream.receive_some`: an exception's
    traceback gives every frame it passes through a frame object, and the
    reading coroutine's would be kept for its life (0.25 KiB per idle
    connection); this function's goes when it returns.
    """
    try:
        return raw.recv(size)
    except BlockingIOError:
        return None


def stdlib_socket(trio_socket: object) -> socket.socket | None:
    """The non-blocking stdlib socket under a trio socket, for `write_nowait`
    (and the accept loop's `ports.PlainAccept`).

    trio keeps it in a private attribute, so anything else gets None (and
    every write goes through the writer task). Why not ``os.write`` on the
    descriptor: send(2) skips the VFS layer, 6-8 % of the system call that
    is most of a delivery's cost (``python benchmarks/fanout.py``).
    """
    stdlib = getattr(trio_socket, "_sock", None)
    return stdlib if isinstance(stdlib, socket.socket) else None
