"""`Backlog`: one connection's outbox and the slow-consumer rule over it.

The state and the judgement that `Outbound` (the way out: direct writes,
the writer task, the close) builds on. The rule (docs/protocol.md §9):

1. The backlog (the outbox: frames not yet handed to the socket or to the
   writer; a room's frames that wait join it when the connection takes its
   share, `waiting`) is bounded in frames and bytes, and judged at the end of each
   step, after the write (`_check_backlog`): over the bound at the end of
   two steps with no write completed in between, the client does not read
   and is closed 1013. Over four times the byte bound it is closed at once
   (`Outbound.deliver`), but only once its writer had a chance: it was over
   the bound at the end of an earlier step with no write completed since
   (or it is held). A burst within one step is never judged before its
   write, however big: the writer cannot run during a step.
2. The reader waits (`backlog_low`) while its own backlog is over half the
   bound, at most ``BACKLOG_PAUSE`` seconds; a flooder is slowed by its own
   backlog, not closed.

A base class rather than a member: `Outbound.deliver` and `flush_nowait`
are the hot path, and read these fields without another object in between.
"""

from __future__ import annotations

from typing import Final

import trio

from .config import Config
from .metrics import Stats
from .outbox import Outbox

__all__ = ["BACKLOG_PAUSE", "HARD_BOUND_FACTOR", "Backlog"]

#: A backlog this many times the byte bound closes the connection at once,
#: without waiting for the end of the step, once its writer had a chance (`deliver`).
HARD_BOUND_FACTOR: Final = 4
#: Seconds a reader waits at most for its own backlog to go down (`backlog_low`).
BACKLOG_PAUSE: Final = 1.0


class Backlog:
    """The outbox, its bounds, and the slow-consumer rule (rules 1-2)."""

    __slots__ = (
        "_config",
        "_drained",
        "_hard_bound",
        "_over_at",
        "_stats",
        "_unpaused_at",
        "_writes",
        "outbox",
    )

    def __init__(self, config: Config, stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self.outbox = Outbox()
        self._writes = 0  # writes completed so far: the proof that the peer reads
        #: ``_writes`` when a step last ended with the backlog over the bound
        #: (-1: it did not): the slow-consumer rules (`_check_backlog`, `deliver`).
        self._over_at = -1
        self._hard_bound = HARD_BOUND_FACTOR * config.outbox_bytes
        #: Set when the backlog shrinks, for a reader waiting in `backlog_low`.
        self._drained: trio.Event | None = None
        #: ``_writes`` when a wait in `backlog_low` ran out: until the next
        #: completed write the reader does not wait, and the step-end rule holds off.
        self._unpaused_at = -1

    def _slow_consumer(self) -> None:
        """Close the connection 1013 (the subclass knows how)."""
        raise NotImplementedError

    def backlog_high(self) -> bool:
        """Whether the reader should wait (`backlog_low`) before taking the next frame."""
        return self._unpaused_at != self._writes and self._over_bound(2)

    def _over_bound(self, fraction: int = 1) -> bool:
        """Whether the backlog is over either bound / ``fraction``.

        The backlog is the outbox: what waits behind the write in progress
        (if any), which is already the socket's.
        """
        config = self._config
        outbox = self.outbox
        return (
            len(outbox) > config.outbox_frames // fraction
            or outbox.size > config.outbox_bytes // fraction
        )

    def _check_backlog(self) -> None:
        """The slow-consumer rule (docs/protocol.md section 9), at the end of a hub step.

        A backlog over the bound at the end of a step is allowed once: a burst
        (one step's fan-out) may take a reading client over it. Over the bound
        again at the end of a later step with no write completed in between,
        the client is not reading: close 1013, dropping what is queued. Not
        while we read it without waiting for its backlog (`backlog_low` gave
        up): it may be stuck writing to us, and only the hard bound applies
        (`deliver`: armed by ``_over_at`` here).
        """
        if not self._over_bound():
            self._over_at = -1
        elif self._over_at != self._writes:
            self._over_at = self._writes
        elif self._unpaused_at != self._writes:
            self._slow_consumer()

    async def backlog_low(self) -> None:
        """Wait until this connection's own backlog is at most half the bound.

        The reader waits here before it takes the client's next frame, so a
        client that sends faster than it reads is slowed by its own backlog,
        not closed. At most ``BACKLOG_PAUSE`` seconds, though: some clients
        cannot read while a write of theirs is blocked (the `websockets`
        library's sync client holds one lock across both), and they would
        deadlock with a server that stopped reading them. Once a wait runs
        out, the reader reads on without waiting until a write to the client
        completes again (``_unpaused_at``).
        """
        with trio.move_on_after(BACKLOG_PAUSE) as scope:
            while self._over_bound(2):
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
        if scope.cancelled_caught:
            self._unpaused_at = self._writes

    def _written(self) -> None:
        """A write completed: the peer reads (the slow-consumer rule); wake a waiting reader."""
        self._writes += 1
        self._wake_reader()

    def _wake_reader(self) -> None:
        """Wake a reader waiting in `backlog_low` (it checks the backlog again)."""
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.set()
