"""`ConnectionRegistry`: the server's open chat connections, whatever their
transport: the set, the count per client address (``--max-conns-per-ip``),
the drain, and the opened/closed counts of the metrics."""

from __future__ import annotations

from collections import Counter

import trio

from .config import Config
from .connection import Connection
from .metrics import Stats
from .protocol import CloseCode

__all__ = ["ConnectionRegistry"]


class ConnectionRegistry:
    """Every chat connection from its handshake to its end (never blocks but `closed`)."""

    def __init__(self, config: Config, stats: Stats) -> None:
        self._per_ip_limit = config.max_conns_per_ip
        self._stats = stats
        self.connections: set[Connection] = set()
        self._per_ip: Counter[str] = Counter()
        #: Set by `drain`: new chats are refused (503), open ones are closed.
        self.draining = False
        self._all_closed = trio.Event()

    def __len__(self) -> int:
        return len(self.connections)

    def take_ip_slot(self, ip: str) -> bool:
        """Count one more chat from ``ip``; False when over ``--max-conns-per-ip``."""
        limit = self._per_ip_limit
        if limit and self._per_ip[ip] >= limit:
            return False
        self._per_ip[ip] += 1
        return True

    def release_ip_slot(self, ip: str) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def register(self, connection: Connection, transport: str) -> None:
        """Hold ``connection`` (``transport``: "websocket" or "sse") while it runs,
        until `unregister` (in a ``finally``: plain calls, not a context manager
        held for the connection's life; never blocks).

        Every end is counted, with its close code or without one, so that
        opened = open + closed (docs/operations.md, metrics). A connection
        that opens while the server drains is told to go away at once.
        """
        self.connections.add(connection)
        self._stats.opened_one(transport)
        if self.draining:
            connection.close_soon(CloseCode.GOING_AWAY, "going away")

    def unregister(self, connection: Connection, transport: str) -> None:
        """``connection`` has ended (see `register`)."""
        self.connections.discard(connection)
        self._stats.closed_one(transport, connection.close_code)
        if self.draining and not self.connections:
            self._all_closed.set()

    def drain(self) -> None:
        """Refuse new chats from now on (open ones are closed by `close_all`)."""
        self.draining = True

    async def close_all(self, code: int, reason: str, *, deadline: float) -> None:
        """Close every open connection with ``code``; return once all have ended.

        Each flushes what is queued for it first; all of it is bounded by
        ``deadline`` (trio time), after which a connection is aborted.
        """
        self.drain()
        for connection in list(self.connections):
            connection.close_soon(code, reason, timeout=deadline - trio.current_time())
        if self.connections:
            await self._all_closed.wait()
