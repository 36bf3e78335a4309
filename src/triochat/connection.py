"""One chat connection, whatever its transport: reader, writer, keepalive.

::

    Connection.run                 connection nursery
    ├── _read_loop                 transport -> decode -> hub inbound
    └── _write_loop (in run)       outbox -> one write per batch; pings; then the close

The writer also keeps the connection alive: every ``ping_interval`` it sends
a ping (a comment on SSE, every 15 s), busy or not, and a peer that has sent
nothing at all within ``ping_timeout`` after it is gone. No keepalive task:
one task less per connection is memory and scheduling saved.

Rules:

1. Whoever ends first cancels the nursery; the others stop with it.
2. Only the writer closes: `close_soon` records the close code (first one
   wins) and wakes it. From then on everything left (a pending write, the
   queued frames unless it is a slow consumer, the close frame) must finish
   within ``close_timeout`` (the drain's own timeout while draining); then
   the TCP connection is aborted.
3. Nothing escapes `run`: a bug closes this connection with 1011 and is
   logged with a traceback; other connections never notice.
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

    def can_send_nowait(self) -> bool:
        """True when `send_nowait` may be called now."""
        ...

    def send_nowait(self, frames: list[OutFrame]) -> bytes:
        """Write as much as the socket takes now; the rest, for `send_rest`."""
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

    # --- Peer (sync, never blocks) ---------------------------------------------

    def deliver(self, frame: OutFrame) -> None:
        if self.close_request is not None:
            return
        if not self.outbox.put_nowait(frame):
            self._stats.slow_consumers += 1
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer", flush=False)
        elif len(self.outbox) == 1:
            self._hub.mark_dirty(self)  # the hub calls flush_nowait after this step

    def flush_nowait(self) -> None:
        """Send what is queued right now, from the hub, if the socket takes it.

        The hot path: most of the time the socket's buffer has room, so the
        frames queued during one hub step go out in one write without waking
        the writer task. Otherwise (a busy or full socket, a partial write,
        SSE, a close in progress) the writer is woken and does it.
        """
        transport = self._transport
        if self.close_request is not None or not self.outbox or not transport.can_send_nowait():
            self.outbox.wake()
            return
        frames = self.outbox.take_all()
        try:
            rest = transport.send_nowait(frames)
        except TransportClosed as exc:
            self._lost = exc
            self.outbox.wake()
            return
        stats = self._stats
        stats.frames_sent += len(frames)
        stats.writes += 1
        if rest:
            self._unsent = rest
            self.outbox.wake()

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
        self.outbox.wake()

    # --- the tasks ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends; never raises (but Cancelled)."""
        client = self._hub.connect(self, listener=self._listener)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._read_loop, client, nursery.cancel_scope)
                await self._guard(self._write_loop, None, nursery.cancel_scope)
        finally:
            self._hub.disconnect(client)
            with trio.CancelScope(shield=True):
                await self._transport.abort()

    async def _guard(self, loop: _Loop, client: Client | None, scope: trio.CancelScope) -> None:
        """Run one loop; whatever ends it ends the connection."""
        try:
            await loop(client)
        except TransportClosed as exc:
            if self.close_request is None:
                self.end_reason = exc.reason
                self.close_code = exc.code
            elif loop != self._write_loop:
                # We are closing (which also ends trio-websocket's reads): the
                # writer sends the close frame and ends the connection.
                await trio.sleep_forever()
            else:  # the close we asked for, cut short: it still says why
                self.close_code, self.end_reason = self.close_request
        except Exception:
            LOGGER.exception("bug in a connection task; closing it with 1011")
            self.end_reason = "internal error"
            self.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            if loop != self._write_loop:
                return  # the writer sends the 1011
            await self._close_now()
        scope.cancel()

    async def _read_loop(self, client: Client | None) -> None:
        assert client is not None
        transport = self._transport
        hub = self._hub
        stats = self._stats
        max_bytes = self._config.max_frame_bytes
        max_chars = self._config.max_msg_chars
        while True:
            try:
                text = await transport.receive()
            except BinaryFrameError:
                self.close_soon(CloseCode.UNSUPPORTED_DATA, "binary frames are not accepted")
                await trio.sleep_forever()  # the writer's close ends the connection
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

    async def _write_loop(self, _: Client | None) -> None:
        outbox = self.outbox
        transport = self._transport
        stats = self._stats
        config = self._config
        interval = transport.heartbeat or config.ping_interval
        ping_sent: float | None = None  # an unanswered ping went out then
        next_ping = trio.current_time() + interval
        while True:
            deadline = next_ping if ping_sent is None else ping_sent + config.ping_timeout
            with trio.move_on_at(deadline) as idle:
                await outbox.wait()
            if idle.cancelled_caught:
                now = trio.current_time()
                if ping_sent is None:
                    await self._bounded_send(transport.ping())
                    ping_sent = now if transport.expects_pong else None
                    next_ping = now + interval
                elif transport.last_receive >= ping_sent:
                    ping_sent = None  # any bytes, the pong included, prove the peer is there
                else:
                    raise TransportClosed(f"no pong within {config.ping_timeout:g} s")
                continue
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
            if self.close_request is not None and not outbox:
                await self._close_now()
                return

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


class _Loop(Protocol):
    async def __call__(self, client: Client | None, /) -> None: ...
