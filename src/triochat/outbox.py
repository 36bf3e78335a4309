"""One connection's bounded outbound queue.

The hub puts without ever waiting (`put_nowait` returns 0 when full, and
the connection then closes itself as a slow consumer); whoever sends takes
everything queued at once and sends it with one write: the hub itself when
the socket takes it at once (`Connection.flush_nowait`), else the
connection's writer task. A plain list costs less per delivery and per idle
connection than a memory channel, and the bound is the same: ``capacity``
frames.
"""

from __future__ import annotations

from .frames import OutFrame

__all__ = ["Outbox"]


class Outbox:
    """At most ``capacity`` frames, oldest first."""

    __slots__ = ("_capacity", "_frames")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # A list, not a deque: the writer always takes everything at once, and
        # an empty list is a tenth of an empty deque's size.
        self._frames: list[OutFrame] = []

    def __len__(self) -> int:
        return len(self._frames)

    def put_nowait(self, frame: OutFrame) -> int:
        """Queue ``frame``; how many are queued now, or 0 (nothing queued) when full.

        One call answers both questions a delivery asks: did it fit, and is it
        the first frame since the last write (then the connection needs a flush).
        """
        frames = self._frames
        queued = len(frames)
        if queued >= self._capacity:
            return 0
        frames.append(frame)
        return queued + 1

    def peek(self) -> list[OutFrame]:
        """The queued frames, oldest first, in place: for a synchronous write.

        The caller must not keep the list, and calls `clear` once they are sent.
        """
        return self._frames

    def take_all(self) -> list[OutFrame]:
        """Every queued frame, oldest first; the outbox is then empty."""
        frames = self._frames
        self._frames = []
        return frames

    def clear(self) -> None:
        self._frames.clear()
