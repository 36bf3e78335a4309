"""Pauses: how long the process stops serving, measured as /metrics shows it (#16).

Two measures, cheap enough to leave on in production:

- **GC pauses.** `gc.callbacks` is called with ``"start"`` and ``"stop"``
  around every collection of Python's cyclic garbage collector; no task runs
  in between. Each pause is observed by generation
  (``triochat_gc_pause_seconds{generation}``; 2 is a full collection, whose
  length grows with every object alive).
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

`freeze_startup` is the process's GC set-up once it serves (the numbers
behind it: docs/performance.md, "Pauses").

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
    "GC_THRESHOLD",
    "RECENT_SECONDS",
    "WATCHDOG_INTERVAL",
    "Pauses",
    "RecentMax",
    "freeze_startup",
]

#: How often the watchdog wakes, s: one wake costs about 20 µs of CPU.
WATCHDOG_INTERVAL: Final = 0.01
#: The span of the "longest recent" gauges, s.
RECENT_SECONDS: Final = 60.0
#: The collector's thresholds once the server runs (`freeze_startup`); None:
#: Python's own (700, 10, 10).
GC_THRESHOLD: Final[tuple[int, int, int] | None] = None


class RecentMax:
    """The largest value recorded in the last ``span`` seconds, to within a
    slot of ``span / slots`` (a value ages out a slot at a time).

    Recording is O(1): one max per slot, oldest first, at most ``slots``
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
        self._gc_pause = stats.gc_pause
        self._loop_stall = stats.loop_stall
        self.interval = interval
        """How often the watchdog wakes, s."""
        self.gc_pause_max = RecentMax()
        """The longest GC pause of the last minute."""
        self.loop_stall_max = RecentMax()
        """The longest loop stall of the last minute."""
        self.freeze_at_start = False
        """`run` calls `freeze_startup` first: set by the process that is
        this server's (`serve_until_signalled`), never by an embedding host's
        or a test's."""
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
        if self.freeze_at_start:
            freeze_startup()  # before recording: start-up's one collection is not a pause
        import os  # TEMPORARY EXPERIMENT HOOK (#16): removed before commit

        if "trace" in os.environ.get("TRIOCHAT_GC_EXPERIMENT", ""):
            _trace: list[tuple[int, float, int, int]] = []
            _t = [0.0, 0, 0]

            def _cb(phase: str, info: dict[str, int]) -> None:
                if phase == "start":
                    _t[:] = [time.perf_counter(), len(gc.get_objects(0)), len(gc.get_objects(1))]
                else:
                    ms = 1000 * (time.perf_counter() - _t[0])
                    _trace.append((info["generation"], ms, int(_t[1]), int(_t[2])))

            gc.callbacks.append(_cb)
            import atexit

            def _dump() -> None:
                found = gc.collect()
                with open(f"/tmp/pz/found-{os.getpid()}.txt", "w") as f:
                    f.write(f"{found} {gc.get_freeze_count()} {len(gc.get_objects())}\n")
                with open(f"/tmp/pz/trace-{os.getpid()}.txt", "w") as f:
                    for row in _trace:
                        f.write(f"{row[0]} {row[1]:.3f} {row[2]} {row[3]}\n")

            atexit.register(_dump)
        with self.recording_gc():
            task_status.started()
            if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
                await trio.sleep_forever()
            await self.watch()

    @contextlib.contextmanager
    def recording_gc(self) -> Iterator[None]:
        """GC pauses are recorded while inside it."""
        callback = self._on_gc
        gc.callbacks.append(callback)
        try:
            yield
        finally:
            gc.callbacks.remove(callback)

    async def watch(self) -> None:
        """The watchdog: every `interval`, how late it woke. Runs until cancelled."""
        interval = self.interval
        observe = self._loop_stall.observe
        record = self.loop_stall_max.record
        import os  # TEMPORARY EXPERIMENT HOOK (#16)

        exp = os.environ.get("TRIOCHAT_GC_EXPERIMENT", "")
        every = int(exp.split("tick=")[1].split()[0]) if "tick=" in exp else 0
        gen = int(exp.split("gen=")[1].split()[0]) if "gen=" in exp else 1
        wakes = 0
        while True:
            due = trio.current_time() + interval
            await trio.sleep_until(due)
            late = trio.current_time() - due
            observe(late)
            record(late)
            if every:
                wakes += 1
                if wakes >= every:
                    wakes = 0
                    gc.collect(gen)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Rule 1. perf_counter, not trio.current_time(): this may run outside
        # trio's thread, and a pause is real time whatever the test clock.
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        self._gc_pause[info["generation"]].observe(pause)
        self.gc_pause_max.record(pause)


def freeze_startup() -> None:
    """Set up the collector for a process that now serves: collect once, then
    freeze whatever is alive (modules, configuration, the listeners: what
    lives as long as the process) so that no later collection walks it again,
    and apply `GC_THRESHOLD`.

    Process-wide, so only for the process that is the server's: never call it
    in a test process or an embedding host (frozen objects are never
    collected, cycles among them included).
    """
    import os  # TEMPORARY EXPERIMENT HOOK (#16): removed before commit

    exp = os.environ.get("TRIOCHAT_GC_EXPERIMENT", "")
    if "nofreeze" not in exp:
        gc.collect()
        gc.freeze()
    if "t=" in exp:
        gc.set_threshold(*(int(x) for x in exp.split("t=")[1].split(",")))
        return
    if GC_THRESHOLD is not None:
        gc.set_threshold(*GC_THRESHOLD)
