"""One connection's outbound queue, counted in frames and bytes, and the
schedule on which an app's step flushes the queues it filled.

The hub puts without ever waiting; whoever sends takes everything queued at
once and sends it with one write: the hub itself when the socket takes it
at once (`Outbound.flush_nowait`), else the connection's writer task. The
queue itself has no capacity: the slow-consumer rule that bounds it
(`Outbound`, docs/protocol.md section 9) judges a connection by its
backlog over time, not by one burst. A plain list costs less per delivery
and per idle connection than a memory channel.
"""

from __future__ import annotations

from typing import Protocol

from .frames import OutFrame

__all__ = ["FlushSchedule", "Flushable", "Outbox"]


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


class Flushable(Protocol):
    def flush_nowait(self) -> None: ...


class FlushSchedule:
    """When delivered frames are written: as they come (write-through) or at the
    end of the app's step, one write per connection (coalescing).

    The app owns it and drives it (`write_through`, `end_step`: the hub's step
    policy); each connection's `Outbound` holds it and files itself once per
    step (`flush_later`), so a connection never reads or calls the app.
    """

    __slots__ = ("_due", "step", "write_through")

    def __init__(self, *, write_through: bool = False) -> None:
        #: True while the app delivers a lone message: a connection with
        #: nothing else queued writes it at once.
        self.write_through = write_through
        #: Counts the steps (each ends with `end_step`): a connection asks once
        #: per step to be flushed.
        self.step = 0
        self._due: list[Flushable] = []

    def flush_later(self, outbound: Flushable) -> None:
        """``outbound`` got its first frame of this step: flush it at the end."""
        self._due.append(outbound)

    def end_step(self) -> None:
        """End of a step: hand every frame queued during it to its socket."""
        self.step += 1
        due, self._due = self._due, []
        for outbound in due:
            outbound.flush_nowait()
