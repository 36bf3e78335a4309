"""Per-connection rate limiting (PROTOCOL.md §5), sans-I/O: time is passed in."""

from __future__ import annotations

import collections
from typing import Final

__all__ = ["ABUSE_DROPS", "ABUSE_WINDOW", "RateLimiter"]

ABUSE_DROPS: Final = 100  # the 100th drop ...
ABUSE_WINDOW: Final = 60.0  # ... within any 60 seconds closes the connection (1008)


class RateLimiter:
    """A token bucket that starts full, plus a count of recent drops.

    ``rate == 0`` turns limiting off.
    """

    __slots__ = ("_burst", "_drops", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now
        # Made on the first drop: most connections never need it.
        self._drops: collections.deque[float] | None = None

    def allow(self, now: float) -> bool:
        """Take one token if there is one; False means: drop the frame."""
        if self._rate <= 0:
            return True
        elapsed = now - self._stamp
        self._stamp = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def record_drop(self, now: float) -> bool:
        """Count one drop; True when it is the ABUSE_DROPS-th within ABUSE_WINDOW."""
        drops = self._drops
        if drops is None:
            drops = self._drops = collections.deque()
        drops.append(now)
        while drops and drops[0] <= now - ABUSE_WINDOW:
            drops.popleft()
        return len(drops) >= ABUSE_DROPS
