"""`Server`: the nursery tree that ties the front, the hub and connections.

::

    Server.run                     root nursery
    ├── Hub.run                    the broadcaster, its store loop and the backplane
    └── handler nursery            cancelled last, after the drain
        ├── _accept_loop           one per listener (and per --metrics-port listener,
        │                          which serves only /metrics and health); EMFILE
        │                          backs off; too many sockets not yet chats
        │                          (PendingSockets): closed at once
        └── _handle_stream         one per TCP connection: HTTP, or a chat (Connection.run)
            └── connection nursery (trio-websocket's reader; the writer when needed)

Shutdown (`drain`): /readyz turns 503 and new chats get 503; every chat
connection flushes what is queued for it and closes with 1001, bounded by
``drain_timeout``; then the hub stores what it holds, history closes, the
listeners close, and `run` returns.
"""

from __future__ import annotations

import errno
import itertools
import logging
import signal
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Final

import msgspec
import trio

from . import __version__
from .backplane import Backplane
from .backplane.local import LocalBackplane, LocalBroker
from .config import Config
from .connection import Connection, Transport, TransportClosed
from .events import SsePost, SsePostResult
from .history import History
from .history.memory import MemoryHistory
from .history.sqlite import DB_FILE, SqliteHistory
from .http import (
    SSE_CLIENT,
    UNKNOWN_PEER,
    PendingSockets,
    Routes,
    StaticFiles,
    Upgrade,
    handle_http,
    peer_ip,
)
from .hub import Hub
from .logformat import log_context
from .metrics import Gauge, Stats, open_registry, render_metrics
from .protocol import CloseCode
from .tls import Certificate, start_tls
from .transports.sse import SseTransport
from .transports.websocket import ClosingRace, ReplayStream, accept_websocket

__all__ = ["Server", "serve", "serve_until_signalled"]

LOGGER = logging.getLogger("triochat.server")

_JSON: Final = msgspec.json.Decoder()

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
    ) -> None:
        self.config = config
        self.stats = Stats()
        if backplane is None:
            backplane = _default_backplane(config, history)
        self.hub = Hub(config, backplane, self.stats)
        #: The public port's TLS certificate (``--certfile``), reloaded on SIGHUP.
        self.certificate = (
            Certificate(config.certfile, config.keyfile) if config.certfile is not None else None
        )
        self.hub.relay = self._relayed
        self._given_listeners = listeners
        self.listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        #: The ``--metrics-port`` listeners (/metrics and health only), if any.
        self.metrics_listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        #: Numbers chat connections for the log (the ``conn`` field).
        self._connection_ids = itertools.count(1)
        self.connections: set[Connection] = set()
        self._per_ip: Counter[str] = Counter()
        #: Sockets accepted that are not chats yet (docs/protocol.md §9, #18).
        self.pending = PendingSockets(config.max_pending_per_ip, config.max_pending)
        self._refusing_all = False  # the overall cap is refusing: logged once per episode
        self._draining = False
        self._drain_requested = trio.Event()
        self._chats_closed = trio.Event()
        self._static = StaticFiles()
        self._sse_sessions: dict[str, SseTransport] = {}
        # SSE POSTs relayed to the node that holds the stream, awaiting its answer.
        self._relay_ids = itertools.count(1)
        self._relay_waiting: dict[int, tuple[trio.Event, list[SsePostResult]]] = {}
        self._relay_nursery: trio.Nursery | None = None
        gauges: dict[str, Gauge] = {
            "rooms": ("Rooms that have members or history.", lambda: len(self.hub.chat.rooms)),
            "users": (
                "Names held: connected, or within their presence grace.",
                lambda: len(self.hub.chat.users),
            ),
            "draining": ("1 while the server drains (SIGTERM), else 0.", lambda: self._draining),
            "backplane_available": (
                "1 while says can be stored (history, or Redis, reachable), else 0.",
                lambda: self.hub.available(),
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
        return self._draining

    def ready(self) -> bool:
        return not self._draining and self.hub.available()

    def metrics(self) -> bytes:
        self.stats.rate_limited = self.hub.chat.rate_limited
        return render_metrics(self._registry)

    def take_ip_slot(self, ip: str) -> bool:
        limit = self.config.max_conns_per_ip
        if limit and self._per_ip[ip] >= limit:
            return False
        self._per_ip[ip] += 1
        return True

    def release_ip_slot(self, ip: str) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

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

    async def run(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until drained. ``task_status.started(self)`` once listening.

        Raises:
            StorageError: the history could not be opened.
            OSError: the port could not be bound.
        """
        config = self.config
        async with trio.open_nursery() as root:
            self._relay_nursery = root
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
        LOGGER.info("draining %d connections", len(self.connections))
        self._draining = True
        timeout = self.config.drain_timeout
        with trio.move_on_after(timeout) as scope:
            # Says already received are stored (and acked) before the 1001.
            await self.hub.settle()
            for connection in list(self.connections):
                connection.close_soon(
                    CloseCode.GOING_AWAY,
                    "going away",
                    timeout=scope.deadline - trio.current_time(),
                )
            if self.connections:
                await self._chats_closed.wait()

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
            upgrade = await handle_http(
                stream, self, self._static, ip=ip, pending=self.pending, routes=routes
            )
            if upgrade is not None:
                try:
                    await self._serve_websocket(stream, upgrade)
                finally:
                    self.release_ip_slot(upgrade.ip)
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

    async def serve_sse(self, stream: trio.abc.Stream) -> None:
        """Run one chat connection over Server-Sent Events (called by the front)."""
        transport = SseTransport(stream, self.hub.backplane.node)
        self._sse_sessions[transport.session_id] = transport
        try:
            await transport.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.watch_peer)
                client = SSE_CLIENT.get()
                peer = _peer_name(stream, client)
                await self._run_connection(transport, nursery, peer, "sse", False, client or "")
                nursery.cancel_scope.cancel()
        except TransportClosed:
            pass  # gone before the session event got through
        finally:
            del self._sse_sessions[transport.session_id]

    async def post_sse(self, session_id: str, body: bytes) -> tuple[int, str, str]:
        transport = self._sse_sessions.get(session_id)
        node = session_id.partition(".")[0] if "." in session_id else ""
        backplane = self.hub.backplane
        remote = (
            transport is None and node not in ("", backplane.node) and backplane.node_alive(node)
        )
        if not remote and (transport is None or transport.ended):
            return 404, "no_such_session", "unknown or closed session: open a new stream"
        try:
            text = body.decode("utf-8")
            _JSON.decode(text)
        except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
            return 400, "bad_json", "the body is not a JSON value"
        if remote:
            return await self._relay_post(node, session_id, text)
        assert transport is not None
        return await self._post_local(transport, text)

    async def _post_local(self, transport: SseTransport, text: str) -> tuple[int, str, str]:
        with trio.move_on_after(self.config.handshake_timeout):
            if await transport.post(text):
                return 204, "", ""
            return 404, "no_such_session", "the session closed: open a new stream"
        return 503, "unavailable", "the session is not reading: try again"

    async def _relay_post(self, node: str, session_id: str, text: str) -> tuple[int, str, str]:
        """The stream is on ``node``: relay the POST there and wait for its answer."""
        request = next(self._relay_ids)
        done = trio.Event()
        answer: list[SsePostResult] = []
        self._relay_waiting[request] = (done, answer)
        backplane = self.hub.backplane
        try:
            backplane.publish(SsePost(node, session_id, text, backplane.node, request))
            with trio.move_on_after(self.config.backplane_timeout):
                await done.wait()
        finally:
            del self._relay_waiting[request]
        if not answer:
            return 503, "unavailable", "the node holding the session did not answer: try again"
        return answer[0].status, answer[0].code, answer[0].message

    def _relayed(self, event: SsePost | SsePostResult) -> None:
        """A relayed POST for a stream here, or the answer to one we relayed."""
        if isinstance(event, SsePostResult):
            waiting = self._relay_waiting.get(event.request)
            if waiting is not None:
                waiting[1].append(event)
                waiting[0].set()
            return
        if self._relay_nursery is not None:
            self._relay_nursery.start_soon(self._answer_relayed, event)

    async def _answer_relayed(self, post: SsePost) -> None:
        transport = self._sse_sessions.get(post.session)
        if transport is None or transport.ended:
            status, code, message = 404, "no_such_session", "unknown or closed session"
        else:
            status, code, message = await self._post_local(transport, post.body)
        result = SsePostResult(post.sender, post.request, status, code, message)
        self.hub.backplane.publish(result)

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
        self.connections.add(connection)
        self.stats.opened_one(medium)
        # Every record of this task and the tasks it starts carries these (JSON logs).
        with log_context(conn=next(self._connection_ids), peer=peer, transport=medium):
            LOGGER.info("open %s %s", peer, kind)
            if self._draining:
                connection.close_soon(CloseCode.GOING_AWAY, "going away")
            try:
                await connection.run(nursery)
            finally:
                self.connections.discard(connection)
                if self._draining and not self.connections:
                    self._chats_closed.set()
                code = connection.close_code
                self.stats.closed_one(medium, code)  # every end, with a code or without
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


def redact_url(url: str) -> str:
    """``url`` without its password (for logs): ``redis://user:***@host:port/db``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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
    SIGHUP reloads its TLS certificate."""
    server = Server(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
            await server.run()
        nursery.cancel_scope.cancel()


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
