"""Rate limiting per connection and per client address (docs/protocol.md §9),
sans-I/O: time is passed in."""

from __future__ import annotations

import collections
from typing import Final

__all__ = [
    "ABUSE_DROPS",
    "ABUSE_WINDOW",
    "ADDRESS_SCALE",
    "JOIN_BURST",
    "JOIN_RATE",
    "REPLY_BURST",
    "REPLY_RATE",
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
#: Replies that copy history (`history`, a `join`'s replay) draw their size in
#: bytes on a bucket of their own, so asking again and again for big pages
#: cannot make the server encode and queue megabytes: a burst of one outbox
#: byte bound (the default 1 MiB), then 256 KiB a second.
REPLY_RATE: Final = 256 * 1024  # bytes per second
REPLY_BURST: Final = 1024 * 1024
#: Every client address has the buckets of five connections, shared by all
#: its connections: a crowd from one address is one budget, while a family or
#: an office behind one NAT address still chats.
ADDRESS_SCALE: Final = 5.0


class RateLimiter:
    """Three token buckets that start full (messages; membership changes; reply
    bytes), plus a count of recent drops and refusals.

    ``rate == 0`` turns the buckets off (the count still works). ``scale``
    multiplies every bucket (an address's budget: `ADDRESS_SCALE`). ``shared``
    is the budget of the client's address: a frame must find room in both.
    """

    __slots__ = (
        "_burst",
        "_drops",
        "_join_stamp",
        "_join_tokens",
        "_rate",
        "_reply_stamp",
        "_reply_tokens",
        "_scale",
        "_stamp",
        "_tokens",
        "shared",
    )

    def __init__(
        self,
        rate: float,
        burst: int,
        now: float,
        *,
        scale: float = 1.0,
        shared: RateLimiter | None = None,
    ) -> None:
        self._rate = rate * scale
        self._burst = float(burst) * scale
        self._scale = scale
        self._tokens = self._burst
        self._stamp = now
        self._join_tokens = JOIN_BURST * scale
        self._join_stamp = now
        self._reply_tokens = REPLY_BURST * scale
        self._reply_stamp = now
        self.shared = shared
        # Made on the first drop: most connections never need it.
        self._drops: collections.deque[float] | None = None

    def allow_membership(self, now: float) -> bool:
        """Take one token of the membership bucket; False means: refuse the join or leave."""
        if self._rate <= 0:
            return True
        scale = self._scale
        elapsed = now - self._join_stamp
        self._join_stamp = now
        self._join_tokens = min(
            JOIN_BURST * scale, self._join_tokens + elapsed * JOIN_RATE * scale
        )
        if self._join_tokens < 1.0:
            return False
        if self.shared is not None and not self.shared.allow_membership(now):
            return False
        self._join_tokens -= 1.0
        return True

    def allow(self, now: float) -> bool:
        """Take one token if there is one; False means: drop the frame."""
        if self._rate <= 0:
            return True
        elapsed = now - self._stamp
        self._stamp = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens < 1.0:
            return False
        if self.shared is not None and not self.shared.allow(now):
            return False
        self._tokens -= 1.0
        return True

    def allow_reply(self, now: float) -> bool:
        """Whether a reply that copies history may be made now: the reply bucket
        (and the address's) is not in debt. Its size is charged afterwards
        (`charge_reply`), so one reply may take the bucket below zero."""
        if self._rate <= 0:
            return True
        scale = self._scale
        elapsed = now - self._reply_stamp
        self._reply_stamp = now
        self._reply_tokens = min(
            REPLY_BURST * scale, self._reply_tokens + elapsed * REPLY_RATE * scale
        )
        if self._reply_tokens <= 0:
            return False
        return self.shared is None or self.shared.allow_reply(now)

    def charge_reply(self, size: int) -> None:
        """Draw ``size`` bytes (a reply `allow_reply` let through) from the bucket."""
        if self._rate > 0:
            self._reply_tokens -= size
            if self.shared is not None:
                self.shared.charge_reply(size)

    def record_drop(self, now: float) -> bool:
        """Count one drop; True when it is the ABUSE_DROPS-th within ABUSE_WINDOW."""
        drops = self._drops
        if drops is None:
            drops = self._drops = collections.deque()
        drops.append(now)
        while drops and drops[0] <= now - ABUSE_WINDOW:
            drops.popleft()
        return len(drops) >= ABUSE_DROPS
