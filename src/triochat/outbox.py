"""One connection's outbound queue, counted in frames and bytes.

The hub puts without ever waiting; whoever sends takes everything queued at
once and sends it with one write: the hub itself when the socket takes it
at once (`Outbound.flush_nowait`), else the connection's writer task. The
queue itself has no capacity: the slow-consumer rule that bounds it
(`Outbound`, docs/protocol.md section 9) judges a connection by its
backlog over time, not by one burst. A plain list costs less per delivery
and per idle connection than a memory channel.
"""

from __future__ import annotations

from .frames import OutFrame

__all__ = ["Outbox"]


class Outbox:
    """Frames waiting to be written, oldest first, and their size."""

    __slots__ = ("_frames", "size")

    def __init__(self) -> None:
        # A list, not a deque: the writer always takes everything at once, and
        # an empty list is a tenth of an empty deque's size.
        self._frames: list[OutFrame] = []
        #: Bytes queued, as framed for WebSocket (the SSE framing is a few
        #: bytes longer per frame).
        self.size = 0

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: OutFrame) -> int:
        """Queue ``frame``; how many are queued now (1: the first since the last write)."""
        frames = self._frames
        frames.append(frame)
        self.size += len(frame.ws)
        return len(frames)

    def peek(self) -> list[OutFrame]:
        """The queued frames, oldest first, in place: for a synchronous write.

        The caller must not keep the list, and calls `clear` once they are sent.
        """
        return self._frames

    def take_all(self) -> list[OutFrame]:
        """Every queued frame, oldest first; the outbox is then empty."""
        frames = self._frames
        self._frames = []
        self.size = 0
        return frames

    def clear(self) -> None:
        self._frames.clear()
        self.size = 0
