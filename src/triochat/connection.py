"""One connection, whatever its transport: the reader and its keepalive.

It talks to an `App` (the chat's `Hub`; the conformance run's echo), which
gets each message (`App.receive`) and delivers frames back through the
connection's `Outbound` (outbound.py: the outbox, the app's direct writes,
the writer task, the slow-consumer rule and the close sequence).

::

    Connection.run(nursery)        the connection's task: the read loop
    └── Outbound._write            (in nursery) started only when needed
    Keepalive                      one task for every connection's ping timer

(``nursery``: the connection's own, or, for a chat, `SharedTasks`: the
writer in the server's nursery, under a cancel scope that ends with the
connection.)

The app writes each step's frames itself when the socket takes them, so an
idle or keeping-up connection has one task of its own: the reader (on a
WebSocket it is trio-websocket's reader as well: transports/websocket.py).
Every ``ping_interval`` a ping is sent (a comment on SSE, every 15 s), and a
peer that has sent nothing at all within ``ping_timeout`` after it is gone;
while a write is pending, the write's own bound watches the peer instead.
The timers are `Keepalive`'s (`keepalive_due`), not a deadline around each
read: less memory per idle connection (issue #16).

Rules:

1. The connection ends by cancelling the nursery it was given
   (`Outbound.end`): whoever ends it first, the reader, the writer or the
   keepalive, stops the others.
2. Nothing but that cancellation escapes `run`: a bug closes this connection
   with 1011 and is logged with a traceback; other connections never notice.
3. A failure of the transport (a protocol error of the peer's) is closed with
   its code, after what is queued (docs/protocol.md section 11).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .config import Config
from .keepalive import Keepalive
from .logformat import log_fields
from .metrics import Stats
from .outbound import Outbound, TaskGroup
from .outbox import FlushSchedule
from .protocol import CloseCode
from .transports import DirectWrite as DirectWrite
from .transports import Transport as Transport
from .transports import TransportClosed as TransportClosed

__all__ = ["App", "Connection", "DirectWrite", "SharedTasks", "Transport", "TransportClosed"]

LOGGER = logging.getLogger("triochat.connection")


def _utf8(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


class App(Protocol):
    """What a connection needs of the application behind it (the chat's hub; the
    conformance run's echo). The client token is the app's own business."""

    #: When the app's deliveries are written (its step policy); the connection
    #: hands it to its `Outbound` and never reads it itself.
    schedule: FlushSchedule

    def connect(self, peer: Outbound, *, listener: bool, address: str = "") -> object:
        """Register a connection (``peer`` is where its frames go; ``address``: the
        client's, "" if unknown); the token its messages are given with."""
        ...

    def disconnect(self, client: object) -> None:
        """Unregister (sync: safe in ``finally``)."""
        ...

    async def receive(self, client: object, message: str | bytes) -> None:
        """Take one message from the client; may wait (backpressure on its reader)."""
        ...


class Connection:
    """A connection: its reader, and its `Outbound` (the `Peer` the app delivers to)."""

    __slots__ = (
        "_address",
        "_client",
        "_config",
        "_hub",
        "_listener",
        "_next_ping",
        "_ping_sent",
        "_stats",
        "_transport",
        "outbound",
    )

    def __init__(
        self,
        transport: Transport,
        hub: App,
        config: Config,
        stats: Stats,
        *,
        listener: bool = False,
        address: str = "",
    ) -> None:
        self._transport = transport
        self._address = address  # the client's (after a trusted proxy): its shared budget
        self._hub = hub
        self._config = config
        self._stats = stats
        self._listener = listener
        self.outbound = Outbound(transport, hub.schedule, config, stats)
        self._client: object = None  # the app's token for it, once `run` has connected it
        # The keepalive (`keepalive_due`): when the next ping is due, and when
        # an unanswered one went out (trio time).
        self._next_ping = 0.0
        self._ping_sent: float | None = None

    # What the server asks of a connection (drain, the close log line).

    def close_soon(self, code: int, reason: str, *, timeout: float | None = None) -> None:
        self.outbound.close_soon(code, reason, timeout=timeout)

    @property
    def end_reason(self) -> str:
        return self.outbound.end_reason

    @property
    def close_code(self) -> int | None:
        return self.outbound.close_code

    @property
    def user(self) -> str | None:
        """The name the connection chatted under (for the log), if it took one.

        The chat's token (`chat.Client`) has a ``name``; another app's (the
        conformance echo's) may not, hence ``getattr``.
        """
        name = getattr(self._client, "name", None)
        return name if isinstance(name, str) else None

    async def run(self, nursery: TaskGroup) -> None:
        """Serve the connection until it ends, then cancel ``nursery``.

        ``nursery`` (the caller's, holding nothing that should outlive the
        connection; or `SharedTasks`) runs the writer when it is needed.
        Returns, or raises Cancelled once ``nursery`` is cancelled; never
        anything else.

        The read loop is inline (one coroutine frame per idle connection,
        not three: issue #16); its keepalive timer is in `Keepalive`.
        """
        out = self.outbound
        out.start(nursery)
        out.log_fields = log_fields()  # (this task's `log_context`: for the writer, the hub)
        transport = self._transport
        app = self._hub
        client = self._client = app.connect(out, listener=self._listener, address=self._address)
        config = self._config
        interval = transport.heartbeat or config.ping_interval
        self._next_ping = trio.current_time() + interval
        timer = Keepalive.current().add(self._next_ping, self)
        try:
            stats = self._stats
            max_bytes = config.max_frame_bytes
            try:
                while True:
                    message = await transport.receive_message()
                    stats.frames_received += 1
                    # A code point is 1-4 bytes: encode only when the size could be
                    # over. (WebSocket's stream refuses a bigger message at its header.)
                    if len(message) * 4 > max_bytes and len(_utf8(message)) > max_bytes:
                        out.close_soon(CloseCode.MESSAGE_TOO_BIG, "frame too big")
                        break
                    if out.backlog_high():
                        await out.backlog_low()
                    await app.receive(client, message)
                    del message  # not kept while the next read waits (hours, if idle)
                    if out.close_request is not None:
                        break  # the app closes it: the writer ends the connection
            except TransportClosed as exc:
                if exc.failed and exc.code is not None:
                    # The peer broke the protocol: the writer sends the close frame
                    # with its code (after what is queued, bounded by close_timeout).
                    out.close_soon(exc.code, exc.reason)
                if out.close_request is None:
                    out.end_reason = exc.reason
                    out.close_code = exc.code
                    out.end()
                    return
            except Exception:
                LOGGER.exception("bug in a connection task; closing it with 1011")
                out.end_reason = "internal error"
                out.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            await self._closing()
        finally:
            Keepalive.remove(timer)
            out.stop()  # the hub may still flush it: no writer any more
            app.disconnect(client)
            # Shielded (the nursery may be cancelled already) but bounded: a
            # WebSocket lingers there for the peer's FIN after our close frame.
            with trio.CancelScope(shield=True, deadline=out.linger_deadline):
                await transport.abort()

    async def _closing(self) -> None:
        """We are closing (a close request): the writer sends the close frame and
        ends the connection. Meanwhile a transport that needs it goes on reading
        (`Transport.reads_to_close`: a WebSocket's closing handshake waits for
        the peer's close frame), its messages dropped."""
        transport = self._transport
        if transport.reads_to_close:
            try:
                while True:
                    await transport.receive_message()
            except TransportClosed:
                pass
            except Exception:
                # The reading itself is broken: the close is bounded without it.
                LOGGER.exception("bug in a connection task while it closes")
        await trio.sleep_forever()

    def keepalive_due(self, now: float) -> float | None:
        """The keepalive (`Keepalive` calls it at the due time; never raises).

        Every ``ping_interval`` (the transport's heartbeat for SSE) a ping goes
        out, unless a write is pending (bounded on its own: the writer's
        `_bounded_send`). A peer that has sent nothing at all within
        ``ping_timeout`` after a ping is gone: the connection ends. Returns
        when it is due next; None once the connection is closing.
        """
        out = self.outbound
        if out.close_request is not None:
            return None  # the close is bounded on its own
        transport = self._transport
        ping_sent = self._ping_sent
        if ping_sent is None:
            interval = transport.heartbeat or self._config.ping_interval
            if not out.writing:
                out.ping_soon()
                if transport.expects_pong:
                    self._ping_sent = ping_sent = now
            self._next_ping = now + interval
        elif transport.last_receive >= ping_sent:
            # Any bytes, the pong included, prove the peer is there.
            self._ping_sent = ping_sent = None
        else:
            out.end_reason = f"no pong within {self._config.ping_timeout:g} s"
            out.close_code = None
            out.end()
            return None
        if ping_sent is None:
            return self._next_ping
        return ping_sent + self._config.ping_timeout


class SharedTasks:
    """A connection's `TaskGroup` without a nursery of its own (issue #16: a
    nursery per idle connection costs twice a cancel scope, 1.2 KiB).

    The reader runs in the caller's task, under ``reader`` (the cancel scope
    the caller opens around `Connection.run`); the writer, when it is needed,
    in ``nursery`` (the server's, which holds the connections' own tasks),
    under a cancel scope of its own. Cancelling (``cancel_scope.cancel()``, as
    `Outbound.end` does) cancels both, as cancelling a connection's nursery
    would; unlike a nursery's end, nothing waits for the writer: cancelled,
    it ends at its next checkpoint, holding no resource of its own.
    """

    __slots__ = ("_cancelled", "_nursery", "_reader", "_writer")

    def __init__(self, nursery: trio.Nursery, reader: trio.CancelScope) -> None:
        self._nursery = nursery
        self._reader = reader
        self._writer: trio.CancelScope | None = None
        self._cancelled = False

    @property
    def cancel_scope(self) -> SharedTasks:
        return self

    def cancel(self) -> None:
        """End the connection: its reader and its writer. Never blocks."""
        self._cancelled = True
        self._reader.cancel()
        if self._writer is not None:
            self._writer.cancel()

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], /) -> None:
        # Named after ``async_fn``, as a task of the connection's nursery would be.
        self._nursery.start_soon(self._run_writer, async_fn, name=async_fn)

    async def _run_writer(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        with trio.CancelScope() as scope:
            if self._cancelled:
                scope.cancel()
            self._writer = scope
            try:
                await async_fn()
            finally:
                if self._writer is scope:
                    self._writer = None
