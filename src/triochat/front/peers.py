"""The TCP peer of an accepted socket: its address, and the count of sockets
that are not a chat yet.

The accept loop takes a `PendingSockets` slot under `peer_ip` before
anything else is read; the front releases it once the socket is a chat or
closes. Counting goes by the TCP peer, never a forwarded address: it
happens before any header is read (#11 §3).

Rule: no trio at run time here (it names trio's stream type only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import trio

UNKNOWN_PEER: Final = "?"  # a stream with no peer address (in memory, or already reset)


def peer_ip(stream: trio.abc.Stream) -> str:
    """The client's address, or `UNKNOWN_PEER` when the stream has none."""
    socket = getattr(stream, "socket", None)
    if socket is None:
        return UNKNOWN_PEER
    try:
        address = socket.getpeername()
    except OSError:
        return UNKNOWN_PEER
    return address_ip(address)


def address_ip(address: object) -> str:
    """The host part of a socket address (``getpeername``'s or ``accept``'s)."""
    return str(address[0]) if isinstance(address, tuple) else str(address)


class PendingSockets:
    """Sockets that are not a chat yet, counted per client address and overall.

    Each costs a file descriptor for up to ``handshake_timeout`` (a head, a
    body or a keep-alive pause on its way), so without a cap one address
    could open silent sockets until accept() fails for everyone (#18). The
    accept loop takes a slot before anything else; the front releases it
    when the socket becomes a chat or closes (docs/protocol.md §9).

    Rule: ``take`` and ``release`` never await and are O(1): they run on the
    accept path of every connection and in ``finally``.
    """

    __slots__ = ("_per_ip", "per_ip_limit", "total", "total_limit")

    def __init__(self, per_ip_limit: int, total_limit: int) -> None:
        self.per_ip_limit = per_ip_limit  # 0 = off
        self.total_limit = total_limit  # 0 = off
        #: Sockets counted now (the ``triochat_pending_sockets`` gauge).
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def take(self, ip: str) -> bool:
        """Count one more socket from ``ip``; False (nothing counted) when over a cap.

        A socket with no known address is counted overall only: lumping all
        of those under one key would let them refuse each other.
        """
        if self.total_limit and self.total >= self.total_limit:
            return False
        if ip != UNKNOWN_PEER:
            held = self._per_ip.get(ip, 0)
            if self.per_ip_limit and held >= self.per_ip_limit:
                return False
            self._per_ip[ip] = held + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        """Uncount one socket taken for ``ip`` (exactly once per successful `take`)."""
        self.total -= 1
        if ip != UNKNOWN_PEER:
            held = self._per_ip[ip] - 1
            if held:
                self._per_ip[ip] = held
            else:
                del self._per_ip[ip]  # the dict holds only addresses with sockets now
