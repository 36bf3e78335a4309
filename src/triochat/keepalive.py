"""`Keepalive`: the ping timers of every connection, in one task.

Each `Connection` asks for a keepalive every ping interval and judges the
pong a ping timeout later (connection.py, `Connection.keepalive_due`). The
timers of all of them are kept here, in one heap, and one task per
`trio.run` wakes when the first is due: an idle connection then holds a
heap entry (a small list) instead of a cancel scope with a deadline around
its read, about 0.9 KiB less each (issue #16, docs/performance.md).

Rules:

1. `add` and `remove` never block: safe in ``finally``.
2. A due connection is asked once for its next due time (`Timed.keepalive_due`),
   which must never raise (what it raises is logged and the timer dropped):
   the task is a system task, whose exception would end the whole run.
3. The timers are exact: the task wakes at the first due time, not on a tick,
   so a connection is pinged and judged when it would have been by a timer
   of its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Final, Protocol

import trio

__all__ = ["Keepalive", "Timed", "Timer"]

LOGGER = logging.getLogger("triochat.keepalive")


class Timed(Protocol):
    def keepalive_due(self, now: float) -> float | None:
        """Its keepalive work at ``now``; when it is due next, or None: no more. Never raises."""
        ...


class Timer:
    """One connection's place in the heap (`Keepalive.add`)."""

    __slots__ = ("connection", "due", "order")

    def __init__(self, due: float, order: int, connection: Timed) -> None:
        self.due = due
        self.order = order  # ties go first come, first served
        #: None once removed (it leaves the heap when it comes due).
        self.connection: Timed | None = connection

    def __lt__(self, other: Timer) -> bool:
        return (self.due, self.order) < (other.due, other.order)


class Keepalive:
    """Every connection's keepalive timer in one heap, served by one task (per `trio.run`)."""

    __slots__ = ("_heap", "_order", "_started", "_wait")

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._order = itertools.count()
        #: The task's wait for the first due time (None while it runs the due ones).
        self._wait: trio.CancelScope | None = None
        self._started = False

    @staticmethod
    def current() -> Keepalive:
        """This run's keepalive (made on first use; its task starts with the first timer)."""
        try:
            return _CURRENT.get()
        except LookupError:
            keepalive = Keepalive()
            _CURRENT.set(keepalive)
            return keepalive

    def add(self, due: float, connection: Timed) -> Timer:
        """Call ``connection.keepalive_due`` at ``due`` (trio time); the timer, for `remove`."""
        timer = Timer(due, next(self._order), connection)
        heapq.heappush(self._heap, timer)
        if not self._started:
            # A system task: it serves every server of the run, and no nursery
            # of theirs outlives their connections.
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="triochat.keepalive")
        wait = self._wait
        if wait is not None and due < wait.deadline:
            wait.deadline = due
        return timer

    @staticmethod
    def remove(timer: Timer) -> None:
        """Cancel ``timer`` (it leaves the heap when it comes due). Never blocks."""
        timer.connection = None

    async def _run(self) -> None:
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0].due if heap else math.inf) as wait:
                self._wait = wait
                await trio.sleep_forever()
            self._wait = None
            now = trio.current_time()
            due: list[Timer] = []
            while heap and heap[0].due <= now:
                due.append(heapq.heappop(heap))
            for timer in due:
                connection = timer.connection
                if connection is None:
                    continue
                try:
                    later = connection.keepalive_due(now)
                except Exception:
                    LOGGER.exception("bug in a connection's keepalive; its timer is dropped")
                    later = None
                if later is None or timer.connection is None:
                    timer.connection = None
                    continue
                timer.due = later
                timer.order = next(self._order)
                heapq.heappush(heap, timer)


_CURRENT: Final = trio.lowlevel.RunVar[Keepalive]("triochat_keepalive")
