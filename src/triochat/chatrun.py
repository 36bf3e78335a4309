"""`ChatRunner`: run one chat the HTTP front vetted, over either transport, alike.

The front returns what to run: an `Upgrade` (WebSocket) or an `SseOpen`
(Server-Sent Events). Each gets its transport here:

- WebSocket: a `ReplayStream` over the socket (the request head replayed,
  the frame-size guard), then trio-websocket's handshake
  (`accept_websocket`), whose reader task runs in the connection nursery;
  its closing race (`ClosingRace`) is caught around that nursery, only once
  our close frame was sent (`WebSocketErrors.our_close_sent`). That is
  `run_websocket`, which the Autobahn echo runs too (conformance/);
- SSE: a session in `SseSessions` (findable by the POSTs that carry the
  client's frames), its response head and ``session`` event, and a task
  that watches for the client closing the stream.

Then alike: a `Connection` to the hub, held in the `ConnectionRegistry`
while it runs (the opened and closed counts, the drain), in a connection
nursery of its own; every log record of it carries ``conn``, ``peer`` and
``transport``; an ``open`` line when it starts and a ``close`` line when it
ends (why, the code or none, how long); and at the end the client
address's chat slot is given back (and an SSE stream's access line written).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import trio

from .config import Config
from .connection import Connection
from .http import UNKNOWN_PEER, SseOpen, Upgrade
from .hub import Hub
from .logformat import log_context
from .metrics import Stats
from .registry import ConnectionRegistry
from .transports import Transport, TransportClosed
from .transports.replay import ReplayStream
from .transports.sse import SseSessions
from .transports.websocket import ClosingRace, WebSocketErrors, accept_websocket

__all__ = ["ChatRunner", "peer_name", "run_websocket"]

# The server's log (docs/operations.md lists its open and close lines).
LOGGER = logging.getLogger("triochat.server")


class ChatRunner:
    """Runs each vetted chat until it ends; one per server."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        hub: Hub,
        chats: ConnectionRegistry,
        sse: SseSessions,
    ) -> None:
        self._config = config
        self._stats = stats
        self._hub = hub
        self._chats = chats
        self._sse = sse
        #: Numbers chat connections for the log (the ``conn`` field).
        self._connection_ids = itertools.count(1)

    def run(self, stream: trio.abc.Stream, start: Upgrade | SseOpen) -> Coroutine[Any, Any, None]:
        """Run the chat ``start`` on ``stream`` until it ends; then give back its
        address's slot (the caller closes ``stream``).

        (A plain function returning the transport's coroutine: one frame less
        held by each of the hours-long chats.)
        """
        if isinstance(start, Upgrade):
            return self._serve_websocket(stream, start)
        return self._serve_sse(stream, start)

    async def _serve_websocket(self, stream: trio.abc.Stream, upgrade: Upgrade) -> None:
        peer = peer_name(stream, upgrade.ip)
        path = upgrade.path
        # A partial, not a closure: no coroutine frame of its own held for the
        # connection's life (docs/performance.md, memory per connection).
        run = functools.partial(
            self._run_connection,
            peer=peer,
            kind=f"ws{path}",
            medium="websocket",
            lobby=path == "/",
            address=upgrade.ip,
        )
        try:
            await run_websocket(stream, upgrade, self._config, run, peer=peer)
        finally:
            self._chats.release_ip_slot(upgrade.ip)

    async def _serve_sse(self, stream: trio.abc.Stream, opened: SseOpen) -> None:
        try:
            with self._sse.session(stream) as transport:
                try:
                    await transport.start()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(transport.watch_peer)
                        peer = peer_name(stream, opened.ip)
                        await self._run_connection(
                            transport,
                            nursery,
                            peer=peer,
                            kind="sse",
                            medium="sse",
                            lobby=False,
                            address=opened.ip,
                        )
                        nursery.cancel_scope.cancel()
                except TransportClosed:
                    pass  # gone before the session event got through
        finally:
            self._chats.release_ip_slot(opened.ip)
            opened.finished()

    async def _run_connection(
        self,
        transport: Transport,
        nursery: trio.Nursery,
        *,
        peer: str,
        kind: str,
        medium: str,
        lobby: bool,
        address: str,
    ) -> None:
        """Run the chat's `Connection` in ``nursery``, registered and logged.

        Args:
            kind: for the log lines: ``ws/ws``, ``ws/`` or ``sse``.
            medium: the transport, for the log and the metrics: websocket or sse.
            lobby: a classic ``/`` connection, which hears lobby from the start.
            address: the client address its chat slot is counted under.
        """
        started = trio.current_time()
        connection = Connection(
            transport, self._hub, self._config, self._stats, listener=lobby, address=address
        )
        # Every record of this task and the tasks it starts carries these (JSON logs).
        with (
            log_context(conn=next(self._connection_ids), peer=peer, transport=medium),
            self._chats.registered(connection, medium),
        ):
            # The compression negotiated, if any (--compression, docs/protocol.md §1.1).
            compression = getattr(transport, "compression", None)
            if compression is None:
                LOGGER.info("open %s %s", peer, kind)
            else:
                LOGGER.info(
                    "open %s %s %s", peer, kind, compression, extra={"compression": compression}
                )
            try:
                await connection.run(nursery)
            finally:
                code = connection.close_code
                duration = round(trio.current_time() - started, 3)
                # The reason never repeats the code: stated once, here (#11 §4).
                LOGGER.info(
                    "close %s %s: %s (code %s) after %.1f s",
                    peer,
                    kind,
                    connection.end_reason,
                    code if code is not None else "none",
                    duration,
                    extra={
                        "user": connection.user,
                        "code": code,
                        "reason": connection.end_reason,
                        "duration_s": duration,
                    },
                )


async def run_websocket(
    stream: trio.abc.Stream,
    upgrade: Upgrade,
    config: Config,
    run: Callable[[Transport, trio.Nursery], Awaitable[None]],
    *,
    peer: str,
) -> None:
    """The WebSocket half of a chat (the Autobahn echo runs it too, with its app).

    A `ReplayStream` over ``stream`` (the head replayed, the frame-size
    guard), trio-websocket's handshake, then ``run(transport, nursery)`` in
    the connection nursery, where trio-websocket's reader task runs. A
    failed handshake is logged; the closing race is caught only once our
    close frame was sent (anything else is a bug and propagates).
    """
    replay = ReplayStream(
        stream,
        upgrade.prefix,
        head_size=upgrade.head_size,
        max_message_bytes=config.max_frame_bytes,
    )
    upgrade.prefix = b""  # replayed from here: not kept for the chat's life
    errors = WebSocketErrors(replay)
    try:
        # trio-websocket's reader task, and our writer when it is needed.
        async with trio.open_nursery() as nursery:
            try:
                transport = await accept_websocket(nursery, replay, config, errors)
            except TransportClosed as exc:
                LOGGER.info("handshake from %s failed: %s", peer, exc.reason)
            else:
                await run(transport, nursery)
            nursery.cancel_scope.cancel()
    except* ClosingRace as race:
        if not errors.our_close_sent:
            raise  # not the race: a bug
        LOGGER.debug("peer sent a frame while we were closing: %r", race.exceptions[0])


def peer_name(stream: trio.abc.Stream, client: str | None = None) -> str:
    """Who a chat is, for its log lines: the TCP peer's ``host:port``; behind a
    trusted proxy, ``client via host:port`` (``client``: the address the front
    counted it under, `Upgrade.ip`; the same as the peer's host otherwise)."""
    # Under TLS the socket is the SSLStream's transport's.
    socket = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None
    )
    try:
        address = socket.getpeername() if socket is not None else None
    except OSError:
        address = None
    if isinstance(address, tuple):
        host, port = address[:2]
        name = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    else:
        host, name = UNKNOWN_PEER, "unknown peer"
    if client is None or client in (str(host), UNKNOWN_PEER):
        return name
    return f"{client} via {name}"
