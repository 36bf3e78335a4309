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

import math
from typing import Final, Protocol

from .frames import OutFrame
from .waiting import WaitingRun

__all__ = ["SOON", "FlushSchedule", "Flushable", "Outbox"]

#: Seconds a frame shared with `Outbound.share` may wait to be
#: written, at most (docs/protocol.md section 6), plus a step's length.
SOON: Final = 0.05


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

    def extend(self, frames: list[OutFrame], size: int) -> None:
        """Queue ``frames`` (``size`` bytes in all, as framed for WebSocket)."""
        self._frames += frames
        self.size += size

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

    def flush_if_queued(self) -> None:
        """Write what is queued or shared; the round is over, so drop the shares."""
        ...


class FlushSchedule:
    """When delivered frames are written: as they come (write-through), at the
    end of the app's step, one write per connection (coalescing), or, for
    frames that may wait (`Outbound.share`: presence, typing), at the
    end of the first step `SOON` seconds after.

    The app owns it and drives it (`write_through`, `end_step`: the hub's step
    policy, and `soon_at`, when a step must run for the frames that wait);
    each connection's `Outbound` holds it and files itself once per step
    (`flush_later`) or once per round of waiting frames (`flush_soon`), so a
    connection never reads or calls the app.

    Why frames may wait: 1000 joins into one room, one per step, would write
    to every member once per join (half a million writes); presence frames
    that wait up to 50 ms go to each member in a few writes instead
    (docs/protocol.md section 6). A connection's frames are written in the
    order delivered whatever waits: the ones that wait go with the next write.
    A room's frames that wait are held once for all its members, in a
    `waiting.WaitingRun` per round, which the schedule closes when the round
    ends, after every connection that shares it has taken its frames.
    """

    __slots__ = ("_due", "_runs", "_soon", "soon_at", "soon_round", "step", "write_through")

    def __init__(self, *, write_through: bool = False) -> None:
        #: True while the app delivers a lone message: a connection with
        #: nothing else queued writes it at once.
        self.write_through = write_through
        #: Counts the steps (each ends with `end_step`): a connection asks once
        #: per step to be flushed.
        self.step = 0
        self._due: list[Flushable] = []
        #: Counts the rounds of frames that wait: a connection asks once per round.
        self.soon_round = 0
        self._soon: list[Flushable] = []
        #: The rooms' runs of frames that wait, closed when the round ends.
        self._runs: list[WaitingRun] = []
        #: When the frames that wait are written (inf: none wait): the app runs
        #: a step by then.
        self.soon_at = math.inf

    def flush_later(self, outbound: Flushable) -> None:
        """``outbound`` got its first frame of this step: flush it at the end."""
        self._due.append(outbound)

    def flush_soon(self, outbound: Flushable) -> None:
        """``outbound`` shares a run of frames that may wait: flush it, and drop
        its shares, when the round ends (within `SOON` seconds)."""
        self._soon.append(outbound)

    def close_at_round_end(self, run: WaitingRun) -> None:
        """``run`` is shared by a connection of this schedule: it ends with the round."""
        run.filed = True
        self._runs.append(run)

    def end_step(self, now: float) -> None:
        """End of a step: hand every frame queued during it to its socket, and
        the frames that waited long enough (``now``: the app's clock)."""
        self.step += 1
        due, self._due = self._due, []
        for outbound in due:
            outbound.flush_nowait()
        if not self._soon:
            return
        if self.soon_at == math.inf:
            self.soon_at = now + SOON
        elif now >= self.soon_at:
            self.soon_round += 1
            self.soon_at = math.inf
            soon, self._soon = self._soon, []
            for outbound in soon:
                outbound.flush_if_queued()  # (and drops its shares of the runs)
            runs, self._runs = self._runs, []
            for run in runs:
                run.close()
