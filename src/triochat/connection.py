"""One connection, whatever its transport: the reader and its keepalive.

It talks to an `App` (the chat's `Hub`; the conformance run's echo), which
gets each message (`App.receive`) and delivers frames back through the
connection's `Outbound` (outbound.py: the outbox, the app's direct writes,
the writer task, the slow-consumer rule and the close sequence).

::

    Connection.run(nursery)        the connection's task: read loop and keepalive
    └── Outbound._write            (in nursery) started only when needed

The app writes each step's frames itself when the socket takes them, so an
idle or keeping-up connection has one task of its own: the reader. Every
``ping_interval`` of silence the reader has a ping sent (a comment on SSE,
every 15 s), and a peer that has sent nothing at all within
``ping_timeout`` after it is gone; while a write is pending, the write's own
bound watches the peer instead.

Rules:

1. The connection ends by cancelling the nursery it was given
   (`Outbound.end`): whoever ends it first, the reader or the writer, stops
   the other.
2. Nothing but that cancellation escapes `run`: a bug closes this connection
   with 1011 and is logged with a traceback; other connections never notice.
3. A failure of the transport (a protocol error of the peer's) is closed with
   its code, after what is queued (docs/protocol.md section 11).
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from .config import Config
from .metrics import Stats
from .outbound import Outbound
from .outbox import FlushSchedule
from .protocol import CloseCode
from .transports import DirectWrite as DirectWrite
from .transports import Transport as Transport
from .transports import TransportClosed as TransportClosed

__all__ = ["App", "Connection", "DirectWrite", "Transport", "TransportClosed"]

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

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection until it ends, then cancel ``nursery``.

        ``nursery`` (the caller's, holding nothing that should outlive the
        connection) runs the writer when it is needed. Returns, or raises
        Cancelled once ``nursery`` is cancelled; never anything else.
        """
        out = self.outbound
        out.start(nursery)
        client = self._client = self._hub.connect(
            out, listener=self._listener, address=self._address
        )
        try:
            await self._read(client)
        finally:
            out.stop()  # the hub may still flush it: no writer any more
            self._hub.disconnect(client)
            # Shielded (the nursery may be cancelled already) but bounded: a
            # WebSocket lingers there for the peer's FIN after our close frame.
            with trio.CancelScope(shield=True, deadline=out.linger_deadline):
                await self._transport.abort()

    async def _read(self, client: object) -> None:
        """Run the read loop; however it ends, end the connection."""
        out = self.outbound
        try:
            await self._read_loop(client)
        except TransportClosed as exc:
            if exc.failed and exc.code is not None:
                # The peer broke the protocol: the writer sends the close frame
                # with its code (after what is queued, bounded by close_timeout).
                out.close_soon(exc.code, exc.reason)
            if out.close_request is not None:
                # We are closing (which also ends trio-websocket's reads): the
                # writer sends the close frame and ends the connection.
                await trio.sleep_forever()
            out.end_reason = exc.reason
            out.close_code = exc.code
        except Exception:
            LOGGER.exception("bug in a connection task; closing it with 1011")
            out.end_reason = "internal error"
            out.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            await trio.sleep_forever()  # the writer sends the 1011
        out.end()

    async def _read_loop(self, client: object) -> None:
        out = self.outbound
        transport = self._transport
        app = self._hub
        stats = self._stats
        config = self._config
        max_bytes = config.max_frame_bytes
        interval = transport.heartbeat or config.ping_interval
        ping_sent: float | None = None  # an unanswered ping went out then
        next_ping = trio.current_time() + interval
        while True:
            message: str | bytes | None = None
            deadline = next_ping if ping_sent is None else ping_sent + config.ping_timeout
            with trio.move_on_at(deadline):
                message = await transport.receive_message()
            if message is None:  # silence until the deadline
                now = trio.current_time()
                if ping_sent is None:
                    # A pending write is bounded on its own (`_bounded_send`).
                    if not out.writing:
                        out.ping_soon()
                        ping_sent = now if transport.expects_pong else None
                    next_ping = now + interval
                elif transport.last_receive >= ping_sent:
                    ping_sent = None  # any bytes, the pong included, prove the peer is there
                else:
                    raise TransportClosed(f"no pong within {config.ping_timeout:g} s")
                continue
            stats.frames_received += 1
            # A code point is 1-4 bytes: encode only when the size could be over.
            # (WebSocket's stream refuses a bigger message at its header already.)
            if len(message) * 4 > max_bytes and len(_utf8(message)) > max_bytes:
                out.close_soon(CloseCode.MESSAGE_TOO_BIG, "frame too big")
                await trio.sleep_forever()
            if out.backlog_high():
                await out.backlog_low()
            await app.receive(client, message)
            if out.close_request is not None:
                await trio.sleep_forever()  # the app closes it: the writer ends the connection
