"""One connection's bounded outbound queue.

The hub puts without ever waiting (`put_nowait` returns False when full, and
the connection then closes itself as a slow consumer); whoever sends takes
everything queued at once and sends it with one write: the hub itself when
the socket takes it at once (`Connection.flush_nowait`), else the writer
task, woken with `wake`. A list plus a `ParkingLot` costs less per delivery
than a memory channel, and the bound is the same: ``capacity`` frames.
"""

from __future__ import annotations

import trio

from .frames import OutFrame

__all__ = ["Outbox"]


class Outbox:
    """At most ``capacity`` frames, taken by one writer task."""

    __slots__ = ("_capacity", "_frames", "_lot", "_woken")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # A list, not a deque: the writer always takes everything at once, and
        # an empty list is a tenth of an empty deque's size.
        self._frames: list[OutFrame] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._woken = False

    def __len__(self) -> int:
        return len(self._frames)

    def put_nowait(self, frame: OutFrame) -> bool:
        """Queue ``frame``; False (and nothing queued) when the outbox is full."""
        frames = self._frames
        if len(frames) >= self._capacity:
            return False
        frames.append(frame)
        return True

    def wake(self) -> None:
        """Make the writer's `wait` return (with frames queued or not)."""
        self._woken = True
        self._lot.unpark_all()

    async def wait(self) -> None:
        """Return once `wake` was called (at once if it was since the last wait)."""
        while not self._woken:
            await self._lot.park()
        self._woken = False

    def take_all(self) -> list[OutFrame]:
        """Every queued frame, oldest first; the outbox is then empty."""
        frames = self._frames
        self._frames = []
        return frames

    def put_back(self, frames: list[OutFrame]) -> None:
        """Return frames taken by `take_all` (ahead of any queued since)."""
        self._frames = frames + self._frames

    def clear(self) -> None:
        self._frames.clear()
