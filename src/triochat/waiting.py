"""Frames that may wait, held once for a whole room rather than once per member.

A room's presence, typing and `deleted` frames may wait up to `outbox.SOON` seconds
(docs/protocol.md §6). During one round of `outbox.FlushSchedule` they are
added to the room's `WaitingRun`, once each, whatever the room's size; every
typed subscriber holds a `Share` of the run (from where it was when the
subscriber came) and takes its frames into its own outbox when it next
writes, when a frame that cannot wait comes, or when the round ends. A
crowd of 1000 joining one room then costs 1000 additions to one list
instead of half a million deliveries (#16).

Order (§6: a connection's frames arrive in the order the server produced
them): a subscriber takes its shares before anything else is queued for it,
and frames from several runs are merged by the number each got when added.
Taking costs nothing when no run has had a frame since the subscriber last
took (`WaitingRun.produced`), which keeps a message's delivery cheap while
shares are held.
"""

from __future__ import annotations

import heapq
from typing import ClassVar

from .frames import OutFrame

__all__ = ["Share", "WaitingRun", "take_shared"]


class WaitingRun:
    """One room's frames that wait, during one round; open until the round ends."""

    __slots__ = ("ends", "filed", "frames", "numbers", "open")

    #: How many frames every run of the process has had: each frame's number,
    #: so one connection's shares of several rooms merge in the order the
    #: frames were produced, and a connection that took its shares when it
    #: was this knows there is nothing new to take.
    produced: ClassVar[int] = 0

    def __init__(self) -> None:
        self.frames: list[OutFrame] = []
        #: Parallel to ``frames``: the order they were produced in, across runs.
        self.numbers: list[int] = []
        #: ``ends[i]``: the bytes of ``frames[:i]`` as framed for WebSocket.
        self.ends: list[int] = [0]
        #: Frames may still be added; the schedule closes it when its round ends.
        self.open = True
        #: A schedule closes it when the round ends (`outbox.FlushSchedule`);
        #: a run nobody shares is never filed, and never used.
        self.filed = False

    def add(self, frame: OutFrame) -> None:
        WaitingRun.produced += 1
        self.frames.append(frame)
        self.numbers.append(WaitingRun.produced)
        self.ends.append(self.ends[-1] + len(frame.ws))

    def close(self) -> None:
        """The round is over (its sharers took their frames): no more frames, none kept."""
        self.open = False
        self.frames = []
        self.numbers = []
        self.ends = [0]


class Share:
    """One subscriber's part of a run: its frames from ``at`` on."""

    __slots__ = ("at", "run")

    def __init__(self, run: WaitingRun) -> None:
        self.run = run
        self.at = len(run.frames)


def take_shared(shares: list[Share]) -> tuple[list[OutFrame], int]:
    """The frames added to ``shares`` since they were last taken, in the order
    produced, and their size in bytes; each share then starts after them."""
    found: list[tuple[Share, int]] = []
    for share in shares:
        end = len(share.run.frames)
        if share.at < end:  # (a closed run has none: a share kept past it takes nothing)
            found.append((share, end))
    if not found:
        return [], 0
    if len(found) == 1:  # a member of one busy room, say: no merge
        share, end = found[0]
        run, at = share.run, share.at
        share.at = end
        return run.frames[at:end], run.ends[end] - run.ends[at]
    size = 0
    numbered: list[list[tuple[int, OutFrame]]] = []
    for share, end in found:
        run, at = share.run, share.at
        numbered.append(list(zip(run.numbers[at:end], run.frames[at:end], strict=True)))
        size += run.ends[end] - run.ends[at]
        share.at = end
    return [frame for _, frame in heapq.merge(*numbered, key=_number)], size


def _number(numbered: tuple[int, OutFrame]) -> int:
    return numbered[0]
