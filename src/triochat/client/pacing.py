"""Pacing: the waits between reconnect attempts and the client's own send bucket.

`Backoff` is public (an option of `connect`); `SendBucket` paces says and
whispers under the server's rate limit, as the server tells it in
``joined.limits`` (docs/protocol.md §4). Both are arithmetic on the times
they are given: sans-I/O.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Final, Literal

__all__ = [
    "AUTO",
    "DEFAULT_SEND_BURST",
    "DEFAULT_SEND_RATE",
    "Backoff",
    "SendBucket",
    "under_server",
]

#: The ``send_rate`` and ``send_burst`` that follow the server's ``joined.limits``.
AUTO: Final = "auto"
#: The pacing before a server told its limits, and with one that does not:
#: under the server's default (10/s, burst 20).
DEFAULT_SEND_RATE: Final = 8.0
DEFAULT_SEND_BURST: Final = 10
#: The share of the server's ``say_rate`` the client sends at, and of its ``say_burst``.
RATE_SHARE: Final = 0.8
BURST_SHARE: Final = 0.5


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


def under_server(say_rate: float, say_burst: int | None) -> tuple[float | None, int]:
    """The pacing (rate or None for none, burst) that keeps under a server's
    ``say_rate`` and ``say_burst``: 80 % of the rate, half the burst (at least 1);
    a ``say_rate`` of 0 (no limit on the server) needs no pacing."""
    burst = max(1, math.floor(say_burst * BURST_SHARE)) if say_burst else 1
    return (say_rate * RATE_SHARE if say_rate > 0 else None), burst


class SendBucket:
    """The client's own token bucket, kept under the server's rate limit so a
    busy bot is paced instead of refused (refusals add up to 1008).

    ``rate`` and ``burst`` are `connect`'s ``send_rate`` and ``send_burst``.
    ``"auto"`` follows the server: `under_server` of the latest
    ``joined.limits``, or `DEFAULT_SEND_RATE` and `DEFAULT_SEND_BURST` until a
    server tells (and with one that does not). A number is the caller's own
    ceiling, kept under the server's figures too when it tells them. A ``rate``
    of None turns the pacing off, whatever the server says.
    """

    def __init__(self, rate: float | Literal["auto"] | None, burst: int | Literal["auto"]) -> None:
        if isinstance(rate, str) and rate != AUTO:
            raise ValueError(f"send_rate must be a number, None or {AUTO!r}")
        if isinstance(burst, str) and burst != AUTO:
            raise ValueError(f"send_burst must be a number or {AUTO!r}")
        self._own_rate = rate
        self._own_burst = burst
        self.rate, self.burst = self._pacing(None, None)
        self.tokens = self.burst
        self.at: float | None = None

    def follow(self, say_rate: float | None, say_burst: int | None) -> None:
        """Pace under a server's ``say_rate`` and ``say_burst`` (its ``joined.limits``;
        None: it did not tell them). Tokens over the new burst are dropped."""
        if say_rate is not None and not say_rate >= 0:  # negative or NaN: not a figure
            say_rate = None
        if say_burst is not None and say_burst < 1:
            say_burst = None
        self.rate, self.burst = self._pacing(say_rate, say_burst)
        self.tokens = min(self.tokens, self.burst)

    def _pacing(self, say_rate: float | None, say_burst: int | None) -> tuple[float | None, float]:
        told = say_rate is not None
        if say_rate is None:
            server_rate: float | None = DEFAULT_SEND_RATE
            server_burst = DEFAULT_SEND_BURST
        else:
            server_rate, server_burst = under_server(say_rate, say_burst)
        own_rate, own_burst = self._own_rate, self._own_burst
        rate: float | None
        if own_rate is None:
            rate = None
        elif isinstance(own_rate, str):  # "auto"
            rate = server_rate
        elif told and server_rate is not None:
            rate = min(float(own_rate), server_rate)
        else:
            rate = float(own_rate)
        if isinstance(own_burst, str):  # "auto"
            burst = server_burst
        else:
            burst = min(own_burst, server_burst) if told else own_burst
        return rate, float(burst)

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
