"""`Ports`: the server's listening sockets and what happens at accept.

Two kinds of port: the public one (``--host``/``--port``, or the listeners
an embedding program gives) serves the page and the chats; with
``--metrics-port`` a second one serves only /metrics and health
(`Routes.OPERATOR`), and the public one then answers those 404.

At accept, before anything is read:

- a plain TCP listener's connections are taken with their peer's address
  (`PlainAccept`: trio's ``accept`` forgets it, which then costs a system
  call, and wraps the call in an async context manager);
- ``accept()`` out of resources (EMFILE and kin) backs off, doubling from
  50 ms to 1 s, and logs once per episode rather than dying or spinning;
- each socket takes a slot in `PendingSockets` (docs/protocol.md §1, "a
  connection is pending"): over ``--max-pending-per-ip`` or
  ``--max-pending`` it is closed at once, without an answer or a task;
- the rest go to the server's handler, one task each, in the server's
  handler nursery (the nursery tree stays the server's).

In a worker of ``--workers`` (``config.worker`` set) the public port is
bound with SO_REUSEPORT (`open_shared_listeners`): every worker binds the
same port and the kernel spreads new connections over their listeners.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from .config import Config
from .http import PendingSockets, Routes, address_ip, peer_ip
from .metrics import Stats
from .transports.replay import CLOSED_ERRNOS, stdlib_socket

__all__ = [
    "ACCEPT_BACKOFF",
    "RESOURCE_ERRNOS",
    "Handler",
    "PlainAccept",
    "Ports",
    "bind_shared",
    "open_shared_listeners",
]

# The server's log (docs/operations.md lists its lines), whichever module writes them.
LOGGER = logging.getLogger("triochat.server")

# accept() errors that mean "out of resources for now": back off, don't die.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF: Final = (0.05, 1.0)  # seconds: first and longest pause
# accept() errors about one connection only, skipped (trio's list).
_SKIPPED_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)

Listener = trio.abc.Listener[trio.abc.Stream]
#: What runs one accepted socket: (stream, the TCP peer's address, what its port serves).
Handler = Callable[[trio.abc.Stream, str, Routes], Awaitable[None]]


class Ports:
    """The public and ``--metrics-port`` listeners, their accept loops and the pending caps."""

    def __init__(
        self, config: Config, stats: Stats, listeners: Sequence[Listener] | None = None
    ) -> None:
        """``listeners``: listen on these instead of ``config.host``/``port``."""
        self._config = config
        self._stats = stats
        self._given = listeners
        #: The public port's listeners (empty until `open_public`).
        self.public: list[Listener] = []
        #: The ``--metrics-port`` listeners (/metrics and health only), if any.
        self.operator: list[Listener] = []
        #: Sockets accepted that are not chats yet (docs/protocol.md §9, #18).
        self.pending = PendingSockets(config.max_pending_per_ip, config.max_pending)
        self._refusing_all = False  # the overall cap is refusing: logged once per episode

    async def open_public(self) -> None:
        """Bind the public port (or take the given listeners). Raises OSError."""
        config = self._config
        if self._given is not None:
            self.public = list(self._given)
        elif config.worker is not None:
            self.public = list(await open_shared_listeners(config.port, config.host))
        else:
            self.public = list(await trio.open_tcp_listeners(config.port, host=config.host))

    async def open_operator(self) -> None:
        """Bind ``--metrics-port``, if set. Raises OSError."""
        config = self._config
        if config.metrics_port is not None:
            self.operator = list(
                await trio.open_tcp_listeners(
                    config.metrics_port, host=config.metrics_host or config.host
                )
            )

    def serve(self, nursery: trio.Nursery, handler: Handler) -> None:
        """Start an accept loop per listener in ``nursery``; each socket taken runs
        ``handler`` there, in a task of its own."""
        public = Routes.PUBLIC if self._config.metrics_port is not None else Routes.ALL
        for listener in self.public:
            nursery.start_soon(self._accept_loop, listener, nursery, handler, public)
        for listener in self.operator:
            nursery.start_soon(self._accept_loop, listener, nursery, handler, Routes.OPERATOR)

    async def aclose(self) -> None:
        """Close every listener (shielded: this runs on the way out, cancelled or not)."""
        with trio.CancelScope(shield=True):
            for listener in [*self.public, *self.operator]:
                await trio.aclose_forcefully(listener)

    @property
    def port(self) -> int:
        """The first public listener's port (useful with ``port=0``)."""
        socket = getattr(self.public[0], "socket", None)
        if socket is None:
            raise RuntimeError("the first listener has no socket")
        return int(socket.getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        """The ``--metrics-port`` listener's port (useful with 0); None without one."""
        if not self.operator:
            return None
        socket = getattr(self.operator[0], "socket", None)
        return None if socket is None else int(socket.getsockname()[1])

    def addresses(self, *, operator: bool = False) -> list[str]:
        """``host:port`` of each public (or ``--metrics-port``) listener with a socket."""
        found = []
        for listener in self.operator if operator else self.public:
            socket = getattr(listener, "socket", None)
            if socket is None:
                continue
            host, port = socket.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def _accept_loop(
        self, listener: Listener, nursery: trio.Nursery, handler: Handler, routes: Routes
    ) -> None:
        raw = stdlib_socket(listener.socket) if isinstance(listener, trio.SocketListener) else None
        plain = None if raw is None else PlainAccept(raw)
        backoff = 0.0
        while True:
            try:
                if plain is None:
                    stream = await listener.accept()
                    ip = peer_ip(stream)
                else:
                    stream, ip = await plain.accept()
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
            if not self.pending.take(ip):
                self._refuse(stream, ip, nursery)
                continue
            if self._refusing_all:
                LOGGER.info("accepting connections again (pending sockets under the cap)")
                self._refusing_all = False
            nursery.start_soon(handler, stream, ip, routes)

    def _refuse(self, stream: trio.abc.Stream, ip: str, nursery: trio.Nursery) -> None:
        """Close a connection over a `PendingSockets` cap at once, without a task.

        No answer is written: it would cost a task or a write per refused
        socket, in a flood, and the client has sent nothing to answer yet.
        """
        self._stats.pending_refused += 1
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


class PlainAccept:
    """A plain TCP listener's connections, each with its peer's address.

    As trio's ``accept`` does, it lets other tasks run between two
    connections taken back to back, so a connection's task reads its head,
    and becomes a chat, before the next one is taken: a burst from one
    address is not refused by the pending cap (`PendingSockets`) just for
    being taken faster than it is served; when none is waiting, the wait for
    the next lets them run. What it saves over trio's (#16): the peer's
    address comes with the connection (no ``getpeername``), and no async
    context manager wraps each call.
    """

    __slots__ = ("_raw", "_took")

    def __init__(self, raw: socket.socket) -> None:
        self._raw = raw  # the listener's non-blocking stdlib socket
        self._took = False  # a connection was handed out since the last task switch

    async def accept(self) -> tuple[trio.SocketStream, str]:
        """The next connection and its peer's address (as `peer_ip` gives it).

        Raises:
            trio.ClosedResourceError: the listener was closed.
            OSError: what trio's ``accept`` raises too (EMFILE and kin).
        """
        raw = self._raw
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                sock, address = raw.accept()
            except BlockingIOError:
                self._took = False
                await trio.lowlevel.wait_readable(raw)
                continue
            except OSError as exc:
                if exc.errno in CLOSED_ERRNOS:
                    raise trio.ClosedResourceError from None
                if exc.errno in _SKIPPED_ERRNOS:
                    continue
                raise
            if self._took:
                # The one taken before has not run yet: it goes first (shielded:
                # this socket is ours to hand over now, as in trio's accept).
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._took = True
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), address_ip(address)


def bind_shared(
    family: socket.AddressFamily, kind: socket.SocketKind, proto: int, address: tuple[object, ...]
) -> socket.socket:
    """A socket bound to ``address`` with SO_REUSEPORT (and SO_REUSEADDR, as
    trio's listeners have), not listening yet: others of the same user may
    bind the same port the same way. Raises OSError."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_shared_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners`, with every socket bound by `bind_shared`:
    the listeners of a worker, whose siblings listen on the same port.

    Raises:
        OSError: an address cannot be bound (taken by a socket without
            SO_REUSEPORT, or another user's).
    """
    found = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in found:
            sock = bind_shared(family, kind, proto, address)
            try:
                sock.listen(0xFFFF)  # as trio's: the kernel caps it at somaxconn
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            except BaseException:
                sock.close()
                raise
            listeners.append(listener)
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
