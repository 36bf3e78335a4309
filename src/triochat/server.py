"""`Server`: the nursery tree that ties the front, the hub and connections.

::

    Server.run                     root nursery
    ├── Hub.run                    the broadcaster, its store loop and the backplane
    └── handler nursery            cancelled last, after the drain
        ├── _accept_loop           one per listener (and per --metrics-port listener,
        │                          which serves only /metrics and health); EMFILE
        │                          backs off; too many sockets not yet chats
        │                          (PendingSockets): closed at once
        └── _handle_stream         one per TCP connection (TLS first, with --certfile):
            │                      the front answers HTTP, or returns a chat to run
            └── connection nursery _serve_websocket (an `Upgrade`) or _serve_sse (an
                                   `SseOpen`), alike: a `Connection` held in the
                                   `ConnectionRegistry` while it runs (trio-websocket's
                                   reader or the SSE stream's watcher; the writer when
                                   needed)

What the server holds besides: `ConnectionRegistry` (registry.py: the open
chats, their slots per address, the drain), `SseSessions` (the SSE streams
by session id, and the relay of POSTs to another node's stream), the
`PendingSockets` caps, the TLS `Certificate`, and the metrics registry (the
hub offers its own gauges).

Shutdown (`drain`): /readyz turns 503 and new chats get 503; every chat
connection flushes what is queued for it and closes with 1001, bounded by
``drain_timeout``; then the hub stores what it holds, history closes, the
listeners close, and `run` returns.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Final

import trio

from . import __version__
from .api import ChatApi, check_publish
from .backplane import Backplane
from .backplane.local import LocalBackplane, LocalBroker
from .config import Config, redact_url
from .connection import Connection, Transport, TransportClosed
from .errors import StorageError
from .history import History
from .history.memory import MemoryHistory
from .history.sqlite import DB_FILE, SqliteHistory
from .hooks import Authenticator, SayHook
from .http import (
    UNKNOWN_PEER,
    PendingSockets,
    Routes,
    SseOpen,
    StaticFiles,
    Upgrade,
    handle_http,
    peer_ip,
)
from .hub import Hub
from .logformat import log_context
from .metrics import Gauge, Stats, open_registry, render_metrics
from .protocol import CloseCode
from .registry import ConnectionRegistry
from .serverapi import ServerApi
from .tls import Certificate, start_tls
from .transports.sse import PostAnswer, SseSessions, SseTransport
from .transports.websocket import ClosingRace, ReplayStream, accept_websocket

__all__ = ["Server", "serve", "serve_until_signalled"]

LOGGER = logging.getLogger("triochat.server")

# accept() errors that mean "out of resources for now": back off, don't die.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF: Final = (0.05, 1.0)  # seconds: first and longest pause


class Server:
    """One triochat server. Start it with ``await nursery.start(server.run)``."""

    def __init__(
        self,
        config: Config,
        *,
        history: History | None = None,
        backplane: Backplane | None = None,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
        authenticate: Authenticator | None = None,
        on_say: SayHook | None = None,
    ) -> None:
        """A server for ``config``; nothing runs until `run`.

        Args:
            history, backplane: storage and the cluster link (by default from
                ``config``: SQLite, memory or Redis).
            listeners: listen on these instead of ``config.host``/``port``.
            authenticate: the host's authenticator (`triochat.hooks`): given
                one, connections must authenticate and it decides who they are.
            on_say: the host's say hook (`triochat.hooks`): sees, rewrites or
                refuses each say before it is stored.
        """
        self.config = config
        self.stats = Stats()
        if backplane is None:
            backplane = _default_backplane(config, history)
        self.hub = Hub(config, backplane, self.stats, authenticate=authenticate, on_say=on_say)
        #: The public port's TLS certificate (``--certfile``), reloaded on SIGHUP.
        self.certificate = (
            Certificate(config.certfile, config.keyfile) if config.certfile is not None else None
        )
        #: This node's SSE streams; POSTs for another node's are relayed by the hub.
        self.sse = SseSessions(backplane, config)
        self.hub.relay = self.sse.relayed
        self._server_api = ServerApi(self.hub, config)
        #: The server API's chat side (docs/protocol.md §16); None: /api/ answers 404.
        self.api: ChatApi | None = self._server_api if config.api_key else None
        self._given_listeners = listeners
        self.listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        #: The ``--metrics-port`` listeners (/metrics and health only), if any.
        self.metrics_listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        #: Numbers chat connections for the log (the ``conn`` field).
        self._connection_ids = itertools.count(1)
        #: The chat connections, their slots per address, and the drain.
        self.chats = ConnectionRegistry(config, self.stats)
        #: Sockets accepted that are not chats yet (docs/protocol.md §9, #18).
        self.pending = PendingSockets(config.max_pending_per_ip, config.max_pending)
        self._refusing_all = False  # the overall cap is refusing: logged once per episode
        self._drain_requested = trio.Event()
        self._static = StaticFiles()
        gauges: dict[str, Gauge] = {
            **self.hub.gauges(),
            "draining": (
                "1 while the server drains (SIGTERM), else 0.",
                lambda: self.chats.draining,
            ),
            "pending_sockets": (
                "Accepted sockets that are not chats yet (request, body or keep-alive).",
                lambda: self.pending.total,
            ),
        }
        self._registry = open_registry(self.stats, gauges, version=__version__)

    # --- FrontContext ------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.chats.draining

    @property
    def connections(self) -> set[Connection]:
        """The open chat connections (`ConnectionRegistry`)."""
        return self.chats.connections

    def ready(self) -> bool:
        return not self.chats.draining and self.hub.available()

    def metrics(self) -> bytes:
        self.stats.rate_limited = self.hub.chat.rate_limited
        return render_metrics(self._registry)

    def take_ip_slot(self, ip: str) -> bool:
        return self.chats.take_ip_slot(ip)

    def release_ip_slot(self, ip: str) -> None:
        self.chats.release_ip_slot(ip)

    async def post_sse(self, session_id: str, body: bytes) -> PostAnswer:
        return await self.sse.post(session_id, body)

    @property
    def port(self) -> int:
        """The first listener's port (useful with ``port=0``)."""
        socket = getattr(self.listeners[0], "socket", None)
        if socket is None:
            raise RuntimeError("the first listener has no socket")
        return int(socket.getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        """The ``--metrics-port`` listener's port (useful with 0); None without one."""
        if not self.metrics_listeners:
            return None
        socket = getattr(self.metrics_listeners[0], "socket", None)
        return None if socket is None else int(socket.getsockname()[1])

    # --- lifecycle -------------------------------------------------------------

    def drain(self) -> None:
        """Start the graceful shutdown described in the module docstring."""
        self._drain_requested.set()

    async def publish(self, room: str, msg: str, name: str = "server") -> str:
        """Post ``msg`` to ``room`` as ``name`` from the host program; its id once stored.

        As ``POST /api/publish`` does (docs/protocol.md §16), with no key
        needed: members get a `message`, and history keeps it.

        Raises:
            ApiError: ``bad_room``, ``bad_name``, ``too_long``, ``bad_frame``;
                ``unavailable`` when it could not be stored.
        """
        room, name = check_publish(room, msg, name, self.config.max_msg_chars)
        message_id, _ = await self._server_api.publish(room, msg, name)
        return message_id

    async def run(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until drained. ``task_status.started(self)`` once listening.

        Raises:
            StorageError: the history could not be opened.
            OSError: the port could not be bound.
        """
        with _plain_startup_failures():
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        config = self.config
        async with trio.open_nursery() as root:
            self.sse.serve_relays(root)
            await root.start(self.hub.run)
            if self._given_listeners is not None:
                self.listeners = list(self._given_listeners)
            else:
                self.listeners = list(await trio.open_tcp_listeners(config.port, host=config.host))
            try:
                if config.metrics_port is not None:
                    self.metrics_listeners = list(
                        await trio.open_tcp_listeners(
                            config.metrics_port, host=config.metrics_host or config.host
                        )
                    )
                public = Routes.PUBLIC if config.metrics_port is not None else Routes.ALL
                async with trio.open_nursery() as handlers:
                    for listener in self.listeners:
                        handlers.start_soon(self._accept_loop, listener, handlers, public)
                    for listener in self.metrics_listeners:
                        handlers.start_soon(self._accept_loop, listener, handlers, Routes.OPERATOR)
                    for address in self._addresses():
                        LOGGER.info("listening on %s://%s", self.scheme, address)
                    for address in self._addresses(self.metrics_listeners):
                        # Not "listening on": tests and scripts take that line's URL.
                        LOGGER.info("metrics and health on http://%s", address)
                    LOGGER.info("%s", self.startup_summary())
                    task_status.started(self)
                    await self._drain_requested.wait()
                    await self._drain()
                    handlers.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    for listener in [*self.listeners, *self.metrics_listeners]:
                        await trio.aclose_forcefully(listener)
                self.hub.stop()
        LOGGER.info("stopped")

    def startup_summary(self) -> str:
        """The start-up line: version, URL, storage, Redis (no password), TLS."""
        config = self.config
        urls = ", ".join(f"{self.scheme}://{a}" for a in self._addresses()) or "no socket"
        if config.redis:
            storage = "redis"
        elif config.memory:
            storage = "memory (lost on restart)"
        else:
            storage = f"sqlite {config.data_dir / DB_FILE}"
        redis = redact_url(config.redis) if config.redis else "off"
        tls = "on" if self.certificate is not None else "off"
        line = f"triochat {__version__} on {urls}; storage: {storage}; redis: {redis}; tls: {tls}"
        if config.metrics_port is not None:
            metrics = ", ".join(f"http://{a}" for a in self._addresses(self.metrics_listeners))
            line += f"; metrics and health: {metrics or 'no socket'}"
        return line

    @property
    def scheme(self) -> str:
        """How the public port is reached: ``https`` with a certificate, else ``http``."""
        return "http" if self.certificate is None else "https"

    def reload_certificate(self) -> None:
        """SIGHUP: new connections use the certificate files as they are now."""
        if self.certificate is None:
            LOGGER.info("SIGHUP: no --certfile to reload")
        else:
            self.certificate.reload()

    def _addresses(
        self, listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None
    ) -> list[str]:
        found = []
        for listener in self.listeners if listeners is None else listeners:
            socket = getattr(listener, "socket", None)
            if socket is None:
                continue
            host, port = socket.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def _drain(self) -> None:
        chats = self.chats
        LOGGER.info("draining %d connections", len(chats))
        chats.drain()
        with trio.move_on_after(self.config.drain_timeout) as scope:
            # Says already received are stored (and acked) before the 1001.
            await self.hub.settle()
            await chats.close_all(CloseCode.GOING_AWAY, "going away", deadline=scope.deadline)

    async def _accept_loop(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        nursery: trio.Nursery,
        routes: Routes = Routes.ALL,
    ) -> None:
        backoff = 0.0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                if not backoff:
                    LOGGER.warning("accept failed (%s); backing off", errno.errorcode[exc.errno])
                backoff = min(max(backoff * 2, ACCEPT_BACKOFF[0]), ACCEPT_BACKOFF[1])
                await trio.sleep(backoff)
                continue
            if backoff:
                LOGGER.warning("accepting connections again")
                backoff = 0.0
            ip = peer_ip(stream)
            if not self.pending.take(ip):
                self._refuse(stream, ip, nursery)
                continue
            if self._refusing_all:
                LOGGER.info("accepting connections again (pending sockets under the cap)")
                self._refusing_all = False
            nursery.start_soon(self._handle_stream, stream, ip, routes)

    def _refuse(self, stream: trio.abc.Stream, ip: str, nursery: trio.Nursery) -> None:
        """Close a connection over a `PendingSockets` cap at once, without a task.

        No answer is written: it would cost a task or a write per refused
        socket, in a flood, and the client has sent nothing to answer yet.
        """
        self.stats.pending_refused += 1
        pending = self.pending
        if pending.total_limit and pending.total >= pending.total_limit:
            if not self._refusing_all:  # the server's state, not one client's: once
                LOGGER.warning(
                    "%d sockets are not chats yet (--max-pending): closing new connections",
                    pending.total,
                )
                self._refusing_all = True
        else:
            LOGGER.debug("closed a connection from %s: over --max-pending-per-ip", ip)
        socket = getattr(stream, "socket", None)
        if isinstance(socket, trio.socket.SocketType):
            socket.close()  # synchronous: nothing else holds this fresh socket
        else:
            nursery.start_soon(trio.aclose_forcefully, stream)

    async def _handle_stream(
        self, stream: trio.abc.Stream, ip: str, routes: Routes = Routes.ALL
    ) -> None:
        try:
            certificate = self.certificate
            # The public port only: --metrics-port stays plain HTTP (an internal network's).
            if certificate is not None and routes is not Routes.OPERATOR:
                tls = None
                if isinstance(stream, trio.SocketStream):
                    tls = await start_tls(
                        stream, certificate.context, self.config.handshake_timeout
                    )
                if tls is None:
                    self.pending.release(ip)
                    return
                stream = tls
            start = await handle_http(
                stream, self, self._static, ip=ip, pending=self.pending, routes=routes
            )
            # A chat, over either transport: it holds its address's slot.
            if start is not None:
                try:
                    if isinstance(start, Upgrade):
                        await self._serve_websocket(stream, start)
                    else:
                        await self._serve_sse(stream, start)
                finally:
                    self.chats.release_ip_slot(start.ip)
                    if isinstance(start, SseOpen):
                        start.finished()
        except Exception:
            LOGGER.exception("bug serving a connection")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_websocket(self, stream: trio.abc.Stream, upgrade: Upgrade) -> None:
        """Run one chat connection over WebSocket (an upgrade the front vetted)."""
        peer = _peer_name(stream, upgrade.ip)
        path = upgrade.path
        replay = ReplayStream(
            stream,
            upgrade.prefix,
            head_size=upgrade.head_size,
            max_message_bytes=self.config.max_frame_bytes,
        )
        upgrade.prefix = b""  # replayed from here: not kept for the chat's life
        try:
            # trio-websocket's reader task, and our writer when it is needed.
            async with trio.open_nursery() as nursery:
                try:
                    transport = await accept_websocket(nursery, replay, self.config)
                except TransportClosed as exc:
                    LOGGER.info("handshake from %s failed: %s", peer, exc.reason)
                else:
                    await self._run_connection(
                        transport, nursery, peer, f"ws{path}", path == "/", upgrade.ip
                    )
                nursery.cancel_scope.cancel()
        except* ClosingRace as group:
            LOGGER.debug("peer sent a frame while we were closing: %r", group.exceptions[0])

    async def _serve_sse(self, stream: trio.abc.Stream, opened: SseOpen) -> None:
        """Run one chat connection over Server-Sent Events (a stream the front vetted)."""
        with self.sse.session(stream) as transport:
            try:
                await transport.start()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(transport.watch_peer)
                    peer = _peer_name(stream, opened.ip)
                    await self._run_connection(transport, nursery, peer, "sse", False, opened.ip)
                    nursery.cancel_scope.cancel()
            except TransportClosed:
                pass  # gone before the session event got through

    async def _run_connection(
        self,
        transport: Transport,
        nursery: trio.Nursery,
        peer: str,
        kind: str,
        listener: bool,
        address: str,
    ) -> None:
        started = trio.current_time()
        connection = Connection(
            transport, self.hub, self.config, self.stats, listener=listener, address=address
        )
        medium = "sse" if isinstance(transport, SseTransport) else "websocket"
        # Every record of this task and the tasks it starts carries these (JSON logs).
        with (
            log_context(conn=next(self._connection_ids), peer=peer, transport=medium),
            self.chats.registered(connection, medium),
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


def _default_backplane(config: Config, history: History | None) -> Backplane:
    """Redis with ``--redis``; else this node alone on a private in-process broker."""
    if config.redis:
        from .backplane.redis import RedisBackplane  # imports coredis only when used

        return RedisBackplane(config)
    if history is None:
        history = (
            MemoryHistory(config.history_size)
            if config.memory
            else SqliteHistory(config.data_dir, config.history_size)
        )
    return LocalBackplane(LocalBroker(history, config.history_size))


def _peer_name(stream: trio.abc.Stream, client: str | None = None) -> str:
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


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a `Server` for ``config`` until it is drained."""
    await Server(config).run(task_status=task_status)


async def serve_until_signalled(config: Config) -> None:
    """Run a server; SIGINT or SIGTERM drains it, a second one stops it at once;
    SIGHUP reloads its TLS certificate.

    Raises:
        ConfigError: the certificate cannot be loaded.
        StorageError: the history could not be opened.
        OSError: the port could not be bound.
    """
    server = Server(config)
    signals_of_interest = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with _plain_startup_failures(), trio.open_signal_receiver(*signals_of_interest) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
            await server.run()
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _plain_startup_failures() -> Iterator[None]:
    """Re-raise a lone StorageError or OSError out of the nurseries' exception
    groups as itself, so that callers catch it plainly (a failed start-up)."""
    try:
        yield
    except BaseExceptionGroup as group:
        failure: BaseException = group
        while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
            failure = failure.exceptions[0]
        if isinstance(failure, StorageError | OSError):
            raise failure from None
        raise


async def _watch_signals(
    signals: AsyncIterator[int], server: Server, scope: trio.CancelScope
) -> None:
    count = 0
    async for signum in signals:
        if signum == signal.SIGHUP:
            server.reload_certificate()
            continue
        count += 1
        if count == 1:
            LOGGER.info("%s: draining (again to stop now)", signal.Signals(signum).name)
            server.drain()
        else:
            LOGGER.warning("%s again: stopping now", signal.Signals(signum).name)
            scope.cancel()
