"""One chat connection, whatever its transport: reader, writer, keepalive.

::

    Connection.run(nursery)        the connection's task: read loop and keepalive
    └── _write (in nursery)        started only when the hub could not write at
                                   once (full socket, partial write, SSE), for a
                                   ping, or to close; returns when nothing is left

The hub writes each step's frames itself when the socket takes them
(`flush_nowait`), so an idle or keeping-up connection has one task of its
own: the reader. Every ``ping_interval`` of silence the reader has a ping
sent (a comment on SSE, every 15 s), and a peer that has sent nothing at all
within ``ping_timeout`` after it is gone; while a write is pending, the
write's own bound watches the peer instead.

Rules:

1. The connection ends by cancelling the nursery it was given (`_end`):
   whoever ends it first, the reader or the writer, stops the other.
2. Only the writer closes: `close_soon` records the close code (first one
   wins) and starts it. From then on everything left (a pending write, the
   queued frames unless it is a slow consumer, the close frame) must finish
   within ``close_timeout`` (the drain's own timeout while draining); then
   the TCP connection is aborted.
3. Nothing but that cancellation escapes `run`: a bug closes this connection
   with 1011 and is logged with a traceback; other connections never notice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from typing import Protocol

import trio

from .chat import Client
from .config import Config
from .errors import ClientProtocolError
from .frames import OutFrame
from .hub import Hub
from .metrics import Stats
from .outbox import Outbox
from .protocol import CloseCode, decode_client_frame

__all__ = ["BinaryFrameError", "Connection", "Transport", "TransportClosed"]

LOGGER = logging.getLogger("triochat.connection")


class TransportClosed(Exception):
    """The peer went away or closed; ``reason`` says how (for the log)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class BinaryFrameError(Exception):
    """The peer sent a binary frame (closed with 1003)."""


class Transport(Protocol):
    """What a connection needs of WebSocket or SSE."""

    async def receive(self) -> str:
        """The next text frame. Raises TransportClosed, BinaryFrameError."""
        ...

    async def send(self, frames: list[OutFrame]) -> None:
        """Write ``frames`` with one write. Raises TransportClosed."""
        ...

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        """Write as much as the socket takes now; the rest, for `send_rest`.

        None (nothing written) when it cannot write now: the writer task then does.
        """
        ...

    async def send_rest(self, data: bytes) -> None:
        """Finish a partial `send_nowait`. Raises TransportClosed."""
        ...

    #: Seconds between keepalives (None: the configured ping interval).
    heartbeat: float | None
    #: True when the peer answers a ping (WebSocket); False for SSE.
    expects_pong: bool

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
        """Drop the underlying connection now."""
        ...


class Connection:
    """A chat connection; it is the `Peer` the chat state delivers to."""

    __slots__ = (
        "_broken",
        "_close_deadline",
        "_config",
        "_hub",
        "_listener",
        "_lost",
        "_nursery",
        "_ping_due",
        "_send_scope",
        "_stats",
        "_transport",
        "_unsent",
        "_writing",
        "close_code",
        "close_request",
        "end_reason",
        "outbox",
    )

    def __init__(
        self,
        transport: Transport,
        hub: Hub,
        config: Config,
        stats: Stats,
        *,
        listener: bool = False,
    ) -> None:
        self._transport = transport
        self._hub = hub
        self._config = config
        self._stats = stats
        self._listener = listener
        self.outbox = Outbox(config.outbox_frames)
        #: (code, reason), set once by `close_soon`.
        self.close_request: tuple[int, str] | None = None
        #: Everything after a close request (flush, close frame) ends by then.
        self._close_deadline = math.inf
        #: How the connection ended, for the log line.
        self.end_reason = "closed"
        self.close_code: int | None = None
        self._send_scope: trio.CancelScope | None = None
        self._broken = False  # a write was cut short: no close frame possible
        #: The tail of a frame batch the hub could only half write; the writer sends it.
        self._unsent = b""
        self._lost: TransportClosed | None = None  # the hub's direct write found the peer gone
        self._ping_due = False  # the reader asks the writer for a ping
        self._writing = False  # the writer task is running
        #: Where the writer starts, and whose cancellation ends the connection
        #: (set while `run` runs).
        self._nursery: trio.Nursery | None = None

    # --- Peer (sync, never blocks) ---------------------------------------------

    def deliver(self, frame: OutFrame) -> None:
        if self.close_request is not None:
            return
        queued = self.outbox.put_nowait(frame)
        if queued == 1:
            hub = self._hub
            if hub.write_through:
                self.flush_nowait()  # a lone message: nothing to coalesce it with
            else:
                hub.mark_dirty(self)  # the hub calls flush_nowait after this step
        elif not queued:
            self._stats.slow_consumers += 1
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer", flush=False)

    def flush_nowait(self) -> None:
        """Send what is queued right now, from the hub, if the socket takes it.

        The hot path: most of the time the socket's buffer has room, so the
        frames queued during one hub step go out in one write without waking
        the writer task. Otherwise (a busy or full socket, a partial write,
        SSE, a close in progress) the writer is woken and does it.
        """
        outbox = self.outbox
        if self.close_request is None:
            frames = outbox.peek()
            if frames:
                try:
                    rest = self._transport.send_nowait(frames)
                except TransportClosed as exc:
                    self._lost = exc
                else:
                    if rest is not None:
                        stats = self._stats
                        stats.frames_sent += len(frames)
                        stats.writes += 1
                        outbox.clear()
                        if not rest:
                            return
                        self._unsent = rest
        self._want_writer()

    def close_soon(
        self, code: int, reason: str, *, flush: bool = True, timeout: float | None = None
    ) -> None:
        """Ask the writer to close with ``code``; the first request wins.

        Args:
            flush: send the frames already queued first (not for a slow
                consumer: its queue is what is wrong).
            timeout: seconds for the rest (pending write, flush, close frame)
                before the TCP connection is aborted; ``close_timeout`` by default.
        """
        if self.close_request is not None:
            return
        self.close_request = (code, reason)
        if timeout is None:
            timeout = self._config.close_timeout
        self._close_deadline = trio.current_time() + timeout
        if not flush:
            self.outbox.clear()
        if self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, self._close_deadline)
        self._want_writer()

    def _want_writer(self) -> None:
        """Have the writer run: started unless it is running (or the connection is over)."""
        if not self._writing and self._nursery is not None:
            self._writing = True
            self._nursery.start_soon(self._write)

    # --- the tasks ---------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection until it ends, then cancel ``nursery``.

        ``nursery`` (the caller's, holding nothing that should outlive the
        connection) runs the writer when it is needed. Returns, or raises
        Cancelled once ``nursery`` is cancelled; never anything else.
        """
        self._nursery = nursery
        client = self._hub.connect(self, listener=self._listener)
        try:
            if self.close_request is not None:
                self._want_writer()  # asked to close before it started (a drain)
            await self._read(client)
        finally:
            self._nursery = None  # the hub may still flush it: no writer any more
            self._hub.disconnect(client)
            with trio.CancelScope(shield=True):
                await self._transport.abort()

    def _end(self) -> None:
        """End the connection: cancel the nursery (the reader, the writer)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _read(self, client: Client) -> None:
        """Run the read loop; however it ends, end the connection."""
        try:
            await self._read_loop(client)
        except TransportClosed as exc:
            if self.close_request is not None:
                # We are closing (which also ends trio-websocket's reads): the
                # writer sends the close frame and ends the connection.
                await trio.sleep_forever()
            self.end_reason = exc.reason
            self.close_code = exc.code
        except Exception:
            LOGGER.exception("bug in a connection task; closing it with 1011")
            self.end_reason = "internal error"
            self.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            await trio.sleep_forever()  # the writer sends the 1011
        self._end()

    async def _read_loop(self, client: Client) -> None:
        transport = self._transport
        hub = self._hub
        stats = self._stats
        config = self._config
        max_bytes = config.max_frame_bytes
        max_chars = config.max_msg_chars
        interval = transport.heartbeat or config.ping_interval
        ping_sent: float | None = None  # an unanswered ping went out then
        next_ping = trio.current_time() + interval
        while True:
            text: str | None = None
            deadline = next_ping if ping_sent is None else ping_sent + config.ping_timeout
            with trio.move_on_at(deadline):
                try:
                    text = await transport.receive()
                except BinaryFrameError:
                    self.close_soon(CloseCode.UNSUPPORTED_DATA, "binary frames are not accepted")
                    await trio.sleep_forever()  # the writer's close ends the connection
            if text is None:  # silence until the deadline
                now = trio.current_time()
                if ping_sent is None:
                    # A pending write is bounded on its own (`_bounded_send`).
                    if not self._writing:
                        self._ping_due = True
                        self._want_writer()
                        ping_sent = now if transport.expects_pong else None
                    next_ping = now + interval
                elif transport.last_receive >= ping_sent:
                    ping_sent = None  # any bytes, the pong included, prove the peer is there
                else:
                    raise TransportClosed(f"no pong within {config.ping_timeout:g} s")
                continue
            stats.frames_received += 1
            # A code point is 1-4 bytes: encode only when the size could be over.
            if len(text) * 4 > max_bytes and len(text.encode()) > max_bytes:
                self.close_soon(CloseCode.MESSAGE_TOO_BIG, "frame too big")
                await trio.sleep_forever()
            try:
                item: object = decode_client_frame(text, max_msg_chars=max_chars)
            except ClientProtocolError as exc:
                item = exc
            await hub.submit(client, item)  # type: ignore[arg-type]

    async def _write(self) -> None:
        """The writer: what the hub could not write, a ping, the close; then return.

        A write that fails ends the connection; a bug closes it with 1011.
        """
        try:
            await self._write_pending()
        except TransportClosed as exc:
            if self.close_request is None:
                self.end_reason = exc.reason
                self.close_code = exc.code
            else:  # the close we asked for, cut short: it still says why
                self.close_code, self.end_reason = self.close_request
            self._end()
        except Exception:
            LOGGER.exception("bug in a connection task; closing it with 1011")
            self.end_reason = "internal error"
            self.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            await self._close_now()
            self._end()
        finally:
            self._writing = False

    async def _write_pending(self) -> None:
        outbox = self.outbox
        transport = self._transport
        stats = self._stats
        while True:
            if self._lost is not None:
                raise self._lost
            if self._unsent:
                rest, self._unsent = self._unsent, b""
                await self._bounded_send(transport.send_rest(rest))
            frames = outbox.take_all()
            if frames:
                await self._bounded_send(transport.send(frames))
                stats.frames_sent += len(frames)
                stats.writes += 1
            elif self._ping_due:
                self._ping_due = False
                await self._bounded_send(transport.ping())
            elif self.close_request is not None:
                await self._close_now()
                self._end()
                return
            else:
                return  # nothing left: the hub writes directly again

    async def _bounded_send(self, sending: Awaitable[None]) -> None:
        """Await one write, cut off when the peer stops reading for too long.

        A write that cannot finish within a ping interval plus timeout (a
        frozen peer whose buffers are full), or by the close deadline once a
        close is requested, is cancelled: the stream is then broken and the
        connection ends without a close frame.
        """
        config = self._config
        stuck = trio.current_time() + config.ping_interval + config.ping_timeout
        with trio.CancelScope(deadline=min(stuck, self._close_deadline)) as scope:
            self._send_scope = scope
            await sending
        self._send_scope = None
        # Read after the block: the scope sets cancelled_caught on its way out.
        self._broken = scope.cancelled_caught
        if self._broken:
            raise TransportClosed("the peer stopped reading")

    async def _close_now(self) -> None:
        """Send the requested close frame (bounded), then end the connection."""
        code, reason = self.close_request or (CloseCode.INTERNAL_ERROR, "internal error")
        self.end_reason = reason
        self.close_code = code
        if not self._broken:
            with trio.move_on_at(self._close_deadline):
                await self._transport.close(code, reason)
