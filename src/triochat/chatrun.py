"""`ChatRunner`: run one chat the HTTP front vetted, over either transport, alike.

The front returns what to run: an `Upgrade` (WebSocket) or an `SseOpen`
(Server-Sent Events). Each gets its transport here:

- WebSocket: a `ReplayStream` over the socket (what followed the request
  head replayed, the frame-size guard), then the 101 and trio-websocket's
  connection (`accept_websocket`), in the connection's own task, which reads the
  connection from then on (no reader task of trio-websocket's). The same
  steps as `run_websocket`, which the Autobahn echo runs (conformance/),
  but inline: one coroutine frame per chat rather than three (#16);
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

import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import trio

from .config import Config
from .connection import Connection, SharedTasks
from .http import UNKNOWN_PEER, SseOpen, Upgrade
from .hub import Hub
from .logformat import log_context
from .metrics import Stats
from .registry import ConnectionRegistry
from .transports import Transport, TransportClosed
from .transports.replay import ReplayStream
from .transports.sse import SseSessions
from .transports.websocket import accept_websocket

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
        # All in this one coroutine frame, the connection's `run` under it, for
        # the hours a chat may last: no wrapper frames (`run_websocket`'s steps
        # inline, `_opened` and `_closed` plain calls; issue #16).
        try:
            peer = peer_name(stream, upgrade.ip)
            replay = _replay_stream(stream, upgrade, self._config)
            try:
                transport = await accept_websocket(
                    replay, upgrade.key, upgrade.offers, self._config, path=upgrade.path
                )
            except TransportClosed as exc:
                LOGGER.info("handshake from %s failed: %s", peer, exc.reason)
                return
            kind = f"ws{upgrade.path}"
            connection = Connection(
                transport,
                self._hub,
                self._config,
                self._stats,
                listener=upgrade.path == "/",
                address=upgrade.ip,
            )
            # No nursery of the chat's own: its writer, when needed, runs in the
            # server's handler nursery (`SharedTasks`, #16).
            handlers = trio.lowlevel.current_task().parent_nursery
            assert handlers is not None  # (the server's handler nursery runs this task)
            with trio.CancelScope() as reader:
                tasks = SharedTasks(handlers, reader)
                # Every record of this task and the tasks it starts carries these.
                with log_context(
                    conn=next(self._connection_ids), peer=peer, transport="websocket"
                ):
                    started = self._opened(connection, transport, peer, kind, "websocket")
                    try:
                        await connection.run(tasks)
                    finally:
                        self._closed(connection, peer, kind, "websocket", started)
                tasks.cancel()  # the writer too, as the end of a nursery would
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
                        connection = Connection(
                            transport, self._hub, self._config, self._stats, address=opened.ip
                        )
                        with log_context(
                            conn=next(self._connection_ids), peer=peer, transport="sse"
                        ):
                            started = self._opened(connection, transport, peer, "sse", "sse")
                            try:
                                await connection.run(nursery)
                            finally:
                                self._closed(connection, peer, "sse", "sse", started)
                        nursery.cancel_scope.cancel()
                except TransportClosed:
                    pass  # gone before the session event got through
        finally:
            self._chats.release_ip_slot(opened.ip)
            opened.finished()

    def _opened(
        self, connection: Connection, transport: Transport, peer: str, kind: str, medium: str
    ) -> float:
        """A chat's `Connection` starts: registered, and its ``open`` line logged
        (in its `log_context`); when it started (trio time), for `_closed`.

        Args:
            kind: for the log lines: ``ws/ws``, ``ws/`` or ``sse``.
            medium: the transport, for the log and the metrics: websocket or sse.
        """
        # Plain calls, not a context manager held for the chat's life (#16).
        self._chats.register(connection, medium)
        # The compression negotiated, if any (--compression, docs/protocol.md §1.1).
        compression = getattr(transport, "compression", None)
        if compression is None:
            LOGGER.info("open %s %s", peer, kind)
        else:
            LOGGER.info(
                "open %s %s %s", peer, kind, compression, extra={"compression": compression}
            )
        return trio.current_time()

    def _closed(
        self, connection: Connection, peer: str, kind: str, medium: str, started: float
    ) -> None:
        """A chat's `Connection` has ended (see `_opened`): its ``close`` line
        (why, the code or none, how long), then unregistered. Never blocks."""
        code = connection.close_code
        duration = round(trio.current_time() - started, 3)
        # The reason never repeats the code: stated once, here (#11 §4).
        try:
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
        finally:
            self._chats.unregister(connection, medium)


def _replay_stream(stream: trio.abc.Stream, upgrade: Upgrade, config: Config) -> ReplayStream:
    """The stream trio-websocket reads: what the client sent after the request
    head replayed, then ``stream``, with the frame-size guard."""
    replay = ReplayStream(
        stream,
        upgrade.early,
        max_message_bytes=config.max_frame_bytes,
    )
    upgrade.early = b""  # replayed from here: not kept for the chat's life
    return replay


async def run_websocket(
    stream: trio.abc.Stream,
    upgrade: Upgrade,
    config: Config,
    run: Callable[[Transport, trio.Nursery], Awaitable[None]],
    *,
    peer: str,
) -> None:
    """The WebSocket half of a chat, for another app (the Autobahn echo runs
    it, with its own): the steps `ChatRunner` takes inline.

    A `ReplayStream` over ``stream`` (what followed the head replayed, the
    frame-size guard), the 101 and trio-websocket's connection in this task, then
    ``run(transport, nursery)`` with the connection nursery, where the
    writer runs when it is needed (the reading is ``run``'s, in this task:
    transports/websocket.py). A failed handshake is logged.
    """
    replay = _replay_stream(stream, upgrade, config)
    try:
        transport = await accept_websocket(
            replay, upgrade.key, upgrade.offers, config, path=upgrade.path
        )
    except TransportClosed as exc:
        LOGGER.info("handshake from %s failed: %s", peer, exc.reason)
        return
    async with trio.open_nursery() as nursery:
        await run(transport, nursery)
        nursery.cancel_scope.cancel()


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
