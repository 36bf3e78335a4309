"""`Server`: the nursery tree that ties the ports, the front, the hub and the chats.

::

    Server.run                     root nursery
    ├── Hub.run                    the broadcaster, its store loop and the backplane
    └── handler nursery            cancelled last, after the drain
        ├── Pauses.run             GC pauses and loop stalls for /metrics (pauses.py)
        ├── Ports._accept_loop     one per listener (and per --metrics-port listener,
        │                          which serves only /metrics and health); EMFILE
        │                          backs off; too many sockets not yet chats
        │                          (PendingSockets): closed at once
        └── Server._handle_stream  one per TCP connection (TLS first, with --certfile):
            │                      the front answers HTTP, or returns a chat to run
            └── connection nursery ChatRunner (chatrun.py), alike for an `Upgrade`
                                   (WebSocket) and an `SseOpen`: a `Connection` held
                                   in the `ConnectionRegistry` while it runs
                                   (trio-websocket's reader or the SSE stream's
                                   watcher; the writer when needed)

The server owns the tree and the lifecycle (`run`, `drain`), answers the
front (`FrontContext`: readiness, metrics, chat slots, SSE POSTs) and offers
the embedding API (`publish`, `hub`, `connections`, `stats`). The rest is
its collaborators': `Ports` (ports.py: the listeners, the accept loops, the
pending caps), `ChatRunner` (chatrun.py: a chat's transport, registration
and open/close log lines), `ConnectionRegistry` (registry.py: the open
chats, their slots per address, the drain), `SseSessions` (the SSE streams
by session id, and the relay of POSTs to another node's stream), the TLS
`Certificate`, and the metrics registry (the hub offers its own gauges).

Shutdown (`drain`): /readyz turns 503 and new chats get 503; every chat
connection flushes what is queued for it and closes with 1001, bounded by
``drain_timeout``; then the hub stores what it holds, history closes, the
listeners close, and `run` returns. A failed start-up comes out of `run`
as a plain `StorageError` or `OSError`, never inside an exception group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator, Sequence

import trio

from . import __version__
from .api import ChatApi, check_publish
from .backplane import Backplane
from .backplane.local import LocalBackplane, LocalBroker
from .chatrun import ChatRunner
from .config import Config, redact_url
from .connection import Connection
from .errors import StorageError
from .history import History
from .history.memory import MemoryHistory
from .history.sqlite import DB_FILE, SqliteHistory
from .hooks import Authenticator, SayHook
from .http import Routes, StaticFiles, handle_http
from .hub import Hub
from .metrics import Gauge, Stats, open_registry, render_metrics
from .pauses import Pauses
from .ports import Ports
from .protocol import CloseCode
from .registry import ConnectionRegistry
from .serverapi import ServerApi
from .tls import Certificate, start_tls
from .transports.replay import close_stream
from .transports.sse import PostAnswer, SseSessions

__all__ = ["Server", "redact_url", "serve", "serve_until_signalled", "summary_line"]

LOGGER = logging.getLogger("triochat.server")


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
        #: The listeners, their accept loops and the pending caps.
        self.ports = Ports(config, self.stats, listeners)
        #: Sockets accepted that are not chats yet (docs/protocol.md §9, #18).
        self.pending = self.ports.pending
        #: The chat connections, their slots per address, and the drain.
        self.chats = ConnectionRegistry(config, self.stats)
        self._runner = ChatRunner(config, self.stats, self.hub, self.chats, self.sse)
        self._drain_requested = trio.Event()
        self._static = StaticFiles()
        #: GC pauses and event-loop stalls, recorded into `stats` while running.
        self.pauses = Pauses(self.stats)
        gauges: dict[str, Gauge] = {
            **self.hub.gauges(),
            **self.pauses.gauges(),
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
        return self.ports.port

    @property
    def metrics_port(self) -> int | None:
        """The ``--metrics-port`` listener's port (useful with 0); None without one."""
        return self.ports.metrics_port

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
        ports = self.ports
        async with trio.open_nursery() as root:
            self.sse.serve_relays(root)
            await root.start(self.hub.run)
            await ports.open_public()
            try:
                await ports.open_operator()
                async with trio.open_nursery() as handlers:
                    ports.serve(handlers, self._handle_stream)
                    await handlers.start(self.pauses.run)
                    self._log_listening()
                    task_status.started(self)
                    await self._drain_requested.wait()
                    await self._drain()
                    handlers.cancel_scope.cancel()
            finally:
                await ports.aclose()
                self.hub.stop()
        LOGGER.info("stopped")

    def _log_listening(self) -> None:
        """The start-up lines, once every listener is open."""
        urls = [f"{self.scheme}://{address}" for address in self.ports.addresses()]
        worker = self.config.worker
        if worker is None:
            for url in urls:
                LOGGER.info("listening on %s", url)
        else:
            # Not "listening on" either: the supervisor says that once every
            # worker is (workers.py), and scripts connect on that line.
            LOGGER.info(
                "worker %d ready: pid %d, node %s, on %s",
                worker,
                os.getpid(),
                self.hub.backplane.node,
                ", ".join(urls),
            )
        for address in self.ports.addresses(operator=True):
            # Not "listening on": tests and scripts take that line's URL.
            LOGGER.info("metrics and health on http://%s", address)
        if worker is None:  # a worker's supervisor writes the summary
            LOGGER.info("%s", self.startup_summary())

    def startup_summary(self) -> str:
        """The start-up line: version, URL, storage, Redis (no password), TLS."""
        return summary_line(
            self.config,
            [f"{self.scheme}://{a}" for a in self.ports.addresses()],
            [f"http://{a}" for a in self.ports.addresses(operator=True)],
        )

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

    async def _drain(self) -> None:
        chats = self.chats
        LOGGER.info("draining %d connections", len(chats))
        chats.drain()
        with trio.move_on_after(self.config.drain_timeout) as scope:
            # Says already received are stored (and acked) before the 1001.
            await self.hub.settle()
            await chats.close_all(CloseCode.GOING_AWAY, "going away", deadline=scope.deadline)

    async def _handle_stream(
        self, stream: trio.abc.Stream, ip: str, routes: Routes = Routes.ALL
    ) -> None:
        """One accepted socket, from TLS to its close: the front, then its chat if any."""
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
            if start is not None:  # a chat, over either transport: it holds its address's slot
                await self._runner.run(stream, start)
        except Exception:
            LOGGER.exception("bug serving a connection")
        finally:
            await close_stream(stream)


def summary_line(config: Config, urls: Sequence[str], metrics_urls: Sequence[str]) -> str:
    """The start-up line of a server of ``config`` listening at ``urls`` (and,
    with ``--metrics-port``, ``metrics_urls``); a supervisor's too (workers.py)."""
    if config.redis:
        storage = "redis"
    elif config.memory:
        storage = "memory (lost on restart)"
    else:
        storage = f"sqlite {config.data_dir / DB_FILE}"
    redis = redact_url(config.redis) if config.redis else "off"
    tls = "on" if config.certfile is not None else "off"
    shown = ", ".join(urls) or "no socket"
    line = f"triochat {__version__} on {shown}; storage: {storage}; redis: {redis}; tls: {tls}"
    if config.metrics_port is not None:
        line += f"; metrics and health: {', '.join(metrics_urls) or 'no socket'}"
    return line


def _default_backplane(config: Config, history: History | None) -> Backplane:
    """Redis with ``--redis``; else this node alone on a private in-process broker."""
    if config.redis:
        from .backplane.redis import RedisBackplane  # imports coredis only when used

        return RedisBackplane(config)
    if history is None:
        history = (
            MemoryHistory(config.history_size, max_bytes=config.max_stored_bytes)
            if config.memory
            else SqliteHistory(
                config.data_dir,
                config.history_size,
                max_bytes=config.max_stored_bytes,
                snapshot_rooms=config.room_cache,
            )
        )
    return LocalBackplane(LocalBroker(history, config.history_size))


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a `Server` for ``config`` until it is drained."""
    await Server(config).run(task_status=task_status)


async def serve_until_signalled(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a server; SIGINT or SIGTERM drains it, a second one stops it at once;
    SIGHUP reloads its TLS certificate. ``task_status.started(server)`` once
    it listens (a worker then tells its supervisor, workers.py).

    Raises:
        ConfigError: the certificate cannot be loaded.
        StorageError: the history could not be opened.
        OSError: the port could not be bound.
    """
    server = Server(config)
    server.pauses.tune_gc = True  # this process is the server's: its collector too (pauses.py)
    signals_of_interest = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with _plain_startup_failures(), trio.open_signal_receiver(*signals_of_interest) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
            await server.run(task_status=task_status)
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
