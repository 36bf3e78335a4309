"""`AddressBudgets`: the rate budget each client address's connections share.

Every connection has its own rate budget (`RateLimiter`); the connections
of one client address (after a trusted proxy) also draw on one shared
budget, `ADDRESS_SCALE` times a connection's, so opening more connections
does not buy more rate (docs/protocol.md §9). The shared budget lives as
long as the address has a connection: a new one starts it full.

Called only from `Hub.connect` and `Hub.disconnect`: sync, never awaits.
"""

from __future__ import annotations

from .chat import Client
from .config import Config
from .ratelimit import ADDRESS_SCALE, RateLimiter

__all__ = ["AddressBudgets"]


class _Budget:
    """One address's shared budget and how many connections use it."""

    __slots__ = ("connections", "limiter")

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.connections = 0


class AddressBudgets:
    """Each client address's shared budget, and the address of each connection."""

    __slots__ = ("_address_of", "_budgets", "_config")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._budgets: dict[str, _Budget] = {}
        self._address_of: dict[Client, str] = {}

    def limiter(self, address: str, now: float) -> RateLimiter:
        """A new connection's own budget, drawing on its address's too (if known:
        ``address`` is "" when it is not); counts the connection."""
        config = self._config
        shared = None
        if address:
            budget = self._budgets.get(address)
            if budget is None:
                shared = RateLimiter(config.rate, config.burst, now, scale=ADDRESS_SCALE)
                budget = self._budgets[address] = _Budget(shared)
            budget.connections += 1
            shared = budget.limiter
        return RateLimiter(config.rate, config.burst, now, shared=shared)

    def add(self, client: Client, address: str) -> None:
        """Record the address of ``client``, whose limiter came from `limiter`."""
        if address:
            self._address_of[client] = address

    def remove(self, client: Client) -> None:
        """``client`` is gone: its address's budget goes with its last connection."""
        address = self._address_of.pop(client, None)
        if address is not None:
            budget = self._budgets[address]
            budget.connections -= 1
            if not budget.connections:
                del self._budgets[address]  # (a new connection starts a full one)

    def address_of(self, client: Client) -> str:
        """The address ``client`` connected from; "" if unknown."""
        return self._address_of.get(client, "")
