"""Pauses: how long the process stops serving, measured and kept short (#16 goal 4).

Measured, as /metrics shows it, cheaply enough to leave on:

- **GC pauses.** `gc.callbacks` is called with ``"start"`` and ``"stop"``
  around every collection of Python's cyclic garbage collector; no task runs
  in between. Each pause is observed by generation
  (``triochat_gc_pause_seconds{generation}``; 2 is a full collection).
- **Loop stalls.** A watchdog task sleeps `WATCHDOG_INTERVAL` and records how
  late it woke (``triochat_loop_stall_seconds``): whatever kept the event
  loop from running it (a long hub step, a GC pause, a blocking call, a
  machine short of CPU) shows there. A stall that covers the watchdog's due
  time is seen from that time to its end, so a stall of d seconds reads
  between d - `WATCHDOG_INTERVAL` and d; one shorter than the interval may
  fall between two wake-ups and not be seen at all.

Each also keeps its longest of the last minute (`RecentMax`:
``triochat_gc_pause_max_seconds``, ``triochat_loop_stall_max_seconds``),
the figure an alert on "no stall over 20 ms" reads.

Kept short, in the server's own process only (`Pauses.tune_gc`, which
`serve_until_signalled` sets: the collector is process-wide, so never in a
test process or an embedding host). What CPython 3.11's collector did at
19,000 idle connections (docs/performance.md, "Pauses"):

- A full collection walks every tracked object, about 70 per idle
  connection: 0.9 s. Python runs one whenever the old generation has grown
  by a quarter, and each pong a connection receives makes its reader's await
  chain anew (about 20 objects that live until the next one): a full
  collection every 12 s or so.
- A young collection walks the young generations, which Python bounds by a
  *count*, allocations minus deallocations: objects made to replace old ones
  do not raise it, and the young generations grew to 250,000 objects (0.17 s).
- What needs a full collection is what a closed WebSocket leaves: wsproto's
  frame parser and its parsing generator hold each other (a cycle, 19
  blocks, 1.3 KiB per connection that lived long enough to grow old). No
  other cyclic garbage grew with connections or time in those measurements.

So `tune_collector` collects and freezes what start-up left (`gc.freeze`)
and sets the third threshold out of reach (`GC_THRESHOLD`): no full
collection runs by itself. The watchdog runs them instead when that garbage
is there (`FULL_AFTER_CLOSES` chats closed, or a quarter of those open if
more) and every `FULL_INTERVAL` in any case (any other cyclic garbage); and
it collects the young generations every `YOUNG_INTERVAL`, which bounds them
by time as well as by count.

Rule 1: the GC callback runs inside a collection, in whichever thread
allocated last (SQLite's worker threads too): it reads a clock and bumps
numbers, never awaits, logs or raises.

Rule 2: in virtual time (a `trio.testing.MockClock`) there are no stalls to
see, and a watchdog would only make every autojump stop at its wake-ups: the
server runs without it there (`Pauses.run`).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

import trio
import trio.testing

from .metrics import Gauge, Stats

__all__ = [
    "FULL_AFTER_CLOSES",
    "FULL_INTERVAL",
    "GC_THRESHOLD",
    "RECENT_SECONDS",
    "WATCHDOG_INTERVAL",
    "YOUNG_INTERVAL",
    "Pauses",
    "RecentMax",
    "tune_collector",
]

#: How often the watchdog wakes, s. A wake costs about 0.3 ms of CPU on the
#: benchmark machine (trio's sleep ends in a caught `Cancelled`): 0.6 % of a
#: core at this interval, 3 % at 10 ms.
WATCHDOG_INTERVAL: Final = 0.05
#: How often a tuned process collects the young generations (0 and 1), s.
YOUNG_INTERVAL: Final = 0.1
#: A tuned process collects every generation once this many chats have
#: closed since it last did, or a quarter of those open if that is more (so
#: the closed ones' cycles cost at most about 1.3 KiB x that many).
FULL_AFTER_CLOSES: Final = 1000
#: ... and at least this often, whatever closed, s.
FULL_INTERVAL: Final = 600.0
#: The span of the "longest of the last minute" gauges, s.
RECENT_SECONDS: Final = 60.0
#: The collector's thresholds in a tuned process: Python's own for the young
#: generations, and the third (young collections between two full ones) out
#: of reach, so that no full collection runs by itself.
GC_THRESHOLD: Final = (700, 10, 2**31 - 1)


class RecentMax:
    """The largest value recorded in the last ``span`` seconds, to within a
    slot of ``span / slots`` (a value ages out a slot at a time).

    Recording is O(1): one maximum per slot, oldest first, at most ``slots``
    of them kept.
    """

    __slots__ = ("_clock", "_maxima", "_slot", "_slots")

    def __init__(
        self,
        span: float = RECENT_SECONDS,
        slots: int = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slot = span / slots
        self._slots = slots
        self._clock = clock
        #: [slot number, the largest value recorded in it], oldest first.
        self._maxima: deque[list[float]] = deque()

    def record(self, value: float) -> None:
        index = self._clock() // self._slot
        maxima = self._maxima
        if maxima and maxima[-1][0] == index:
            last = maxima[-1]
            if value > last[1]:
                last[1] = value
            return
        maxima.append([index, value])
        while maxima[0][0] <= index - self._slots:
            maxima.popleft()

    def read(self) -> float:
        """The largest value of the last ``span`` seconds; 0.0 if none."""
        first = self._clock() // self._slot - self._slots + 1
        return max((value for index, value in self._maxima if index >= first), default=0.0)


class Pauses:
    """Records GC pauses and event-loop stalls into ``stats`` while `run` runs."""

    def __init__(self, stats: Stats, *, interval: float = WATCHDOG_INTERVAL) -> None:
        self._stats = stats
        self._gc_pause = stats.gc_pause
        self._loop_stall = stats.loop_stall
        self.interval = interval
        """How often the watchdog wakes, s."""
        self.gc_pause_max = RecentMax()
        """The longest GC pause of the last minute."""
        self.loop_stall_max = RecentMax()
        """The longest loop stall of the last minute."""
        self.tune_gc = False
        """Tune the process's collector: `run` calls `tune_collector` first and
        the watchdog runs the collections (`watch`). Set by the process that is
        this server's (`serve_until_signalled`), never by an embedding host or
        a test: the collector is process-wide."""
        self._gc_started = 0.0

    def gauges(self) -> dict[str, Gauge]:
        """The longest recent pauses, for /metrics."""
        return {
            "gc_pause_max_seconds": (
                "The longest collection of the cyclic garbage collector in the last minute.",
                self.gc_pause_max.read,
            ),
            "loop_stall_max_seconds": (
                "The longest the event loop's watchdog woke late in the last minute.",
                self.loop_stall_max.read,
            ),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record until cancelled: GC pauses always, loop stalls unless in
        virtual time (Rule 2). ``task_status.started()`` once recording.

        Cancellation: the way to stop it; the GC callback is removed on the way out.
        """
        if self.tune_gc:
            tune_collector()  # before recording: start-up's one collection is not a pause
        with self.recording_gc():
            task_status.started()
            if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
                await trio.sleep_forever()
            await self.watch(collect=self.tune_gc)

    @contextlib.contextmanager
    def recording_gc(self) -> Iterator[None]:
        """GC pauses are recorded while inside it."""
        callback = self._on_gc
        gc.callbacks.append(callback)
        try:
            yield
        finally:
            gc.callbacks.remove(callback)

    async def watch(self, *, collect: bool = False) -> None:
        """The watchdog: every `interval`, how late it woke. With ``collect``
        it also runs the collections of a tuned process (module docstring):
        the young generations every `YOUNG_INTERVAL`; all of them after
        `FULL_AFTER_CLOSES` closes (or a quarter of the chats open) and every
        `FULL_INTERVAL`. Runs until cancelled."""
        interval = self.interval
        observe = self._loop_stall.observe
        record = self.loop_stall_max.record
        now = trio.current_time()
        next_young, next_full = now + YOUNG_INTERVAL, now + FULL_INTERVAL
        closed_then = self._closed(self._open())
        while True:
            due = trio.current_time() + interval
            await trio.sleep_until(due)
            now = trio.current_time()
            late = now - due
            observe(late)
            record(late)
            if not collect or now < next_young:
                continue
            next_young = now + YOUNG_INTERVAL
            open_now = self._open()
            closed = self._closed(open_now)
            if now >= next_full or closed - closed_then >= max(FULL_AFTER_CLOSES, open_now / 4):
                next_full = now + FULL_INTERVAL
                closed_then = closed
                gc.collect()  # its pause is recorded as any other
            else:
                gc.collect(1)  # generations 0 and 1

    def _open(self) -> int:
        """Chats open now."""
        return sum(self._stats.open.values())

    def _closed(self, open_now: int) -> int:
        """Chats closed since the start (``open_now``: `_open`)."""
        return self._stats.connections_opened - open_now

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Rule 1. perf_counter, not trio.current_time(): this may run outside
        # trio's thread, and a pause is real time whatever the test clock.
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        self._gc_pause[info["generation"]].observe(pause)
        self.gc_pause_max.record(pause)


def tune_collector() -> None:
    """Set up the collector of a process that now serves (module docstring):
    collect once, freeze whatever is alive (modules, configuration, the
    listeners: what lives as long as the process) so that no collection walks
    it again, and set `GC_THRESHOLD`.

    Process-wide, so only for the process that is the server's: frozen
    objects are never collected, cycles among them included.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
