"""Per-connection rate limiting (PROTOCOL.md §5), sans-I/O: time is passed in."""

from __future__ import annotations

import collections
from typing import Final

__all__ = [
    "ABUSE_DROPS",
    "ABUSE_WINDOW",
    "JOIN_BURST",
    "JOIN_RATE",
    "WHISPERS_IN_BURST",
    "WHISPERS_IN_RATE",
    "RateLimiter",
]

ABUSE_DROPS: Final = 100  # the 100th drop (or refused frame) ...
ABUSE_WINDOW: Final = 60.0  # ... within any 60 seconds closes the connection (1008)
#: Joins and leaves that change a membership have their own bucket (presence
#: frames to every member are what they cost): a page restoring its rooms
#: fits the burst, a join/leave loop gets 2 a second.
JOIN_RATE: Final = 2.0  # per second
JOIN_BURST: Final = 32  # the default --max-rooms
#: Whispers one user receives, from everybody together: a crowd, each sender
#: within its own limit, cannot bury a recipient.
WHISPERS_IN_RATE: Final = 10.0  # per second
WHISPERS_IN_BURST: Final = 20


class RateLimiter:
    """Two token buckets that start full (messages; membership changes), plus a
    count of recent drops and refusals.

    ``rate == 0`` turns both buckets off (the count still works).
    """

    __slots__ = ("_burst", "_drops", "_join_stamp", "_join_tokens", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now
        self._join_tokens = float(JOIN_BURST)
        self._join_stamp = now
        # Made on the first drop: most connections never need it.
        self._drops: collections.deque[float] | None = None

    def allow_membership(self, now: float) -> bool:
        """Take one token of the membership bucket; False means: refuse the join or leave."""
        if self._rate <= 0:
            return True
        elapsed = now - self._join_stamp
        self._join_stamp = now
        self._join_tokens = min(float(JOIN_BURST), self._join_tokens + elapsed * JOIN_RATE)
        if self._join_tokens >= 1.0:
            self._join_tokens -= 1.0
            return True
        return False

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
