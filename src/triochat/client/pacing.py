"""Pacing: the waits between reconnect attempts and the client's own send bucket.

`Backoff` is public (an option of `connect`); `SendBucket` paces says and
whispers under the server's rate limit. Both are arithmetic on the times
they are given: sans-I/O.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Backoff", "SendBucket"]


@dataclasses.dataclass(frozen=True)
class Backoff:
    """How long to wait before each reconnect attempt.

    Attempt ``n`` (0 for the first after a loss) waits a random time below
    ``min(maximum, initial * factor ** n)``: with ``jitter`` 1 (the default,
    "full jitter") anywhere from 0 to that ceiling, with ``jitter`` 0 exactly
    the ceiling; never less than ``floor``. The count starts again once a
    connection has joined a room.

    Attributes:
        initial: the first ceiling, in seconds.
        maximum: the largest ceiling, in seconds.
        factor: growth per failed attempt.
        jitter: the fraction of the ceiling that is random (0-1).
        floor: the shortest wait, in seconds.
        max_attempts: attempts in a row before giving up (`ConnectionEnded`);
            None tries for ever.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    floor: float = 0.05
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 <= floor <= initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("Backoff needs factor >= 1 and 0 <= jitter <= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("Backoff.max_attempts must be at least 1 (or None)")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (0-based)."""
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, rand: float) -> float:
        """The wait before attempt ``attempt``, for ``rand`` uniform in [0, 1)."""
        ceiling = self.ceiling(attempt)
        return max(self.floor, ceiling * (1 - self.jitter * rand))


class SendBucket:
    """The client's own token bucket, kept under the server's (10/s, burst 20),
    so a busy bot is paced instead of refused (refusals add up to 1008)."""

    def __init__(self, rate: float | None, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at: float | None = None

    def _refill(self, now: float) -> None:
        if self.rate and self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def delay(self, now: float) -> float:
        """Seconds until a token is free (0: now)."""
        if not self.rate:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        """Spend a token on a frame sent at ``now``."""
        if self.rate:
            self._refill(now)
            self.tokens -= 1
