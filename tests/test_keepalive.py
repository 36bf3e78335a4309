"""`Keepalive`: every connection's ping timer in one task (#16), and what the
writer it starts logs."""

from __future__ import annotations

import logging

import trio
import trio.testing

from triochat.config import Config
from triochat.frames import OutFrame
from triochat.keepalive import Keepalive
from triochat.metrics import Stats
from triochat.outbound import Outbound
from triochat.outbox import FlushSchedule

from .test_logformat import json_log, records


class _Timed:
    """Records when it is due; asks to come back ``every`` seconds, ``times`` times."""

    def __init__(self, every: float, times: int, *, fail: bool = False) -> None:
        self.every = every
        self.times = times
        self.fail = fail
        self.calls: list[float] = []

    def keepalive_due(self, now: float) -> float | None:
        self.calls.append(now)
        if self.fail:
            raise RuntimeError("a bug")
        return now + self.every if len(self.calls) < self.times else None


async def test_keepalive_calls_each_timer_when_due_and_drops_removed_ones(autojump_clock):
    """Timers run at their exact due times, each as often as it asks; a removed one never."""
    keepalive = Keepalive.current()
    assert Keepalive.current() is keepalive  # one per run
    start = trio.current_time()
    fast, slow, gone = _Timed(1.5, 4), _Timed(5, 2), _Timed(1, 10)
    keepalive.add(start + 1.5, fast)
    keepalive.add(start + 5, slow)
    Keepalive.remove(keepalive.add(start + 1, gone))
    await trio.sleep(60)
    assert [round(t - start, 3) for t in fast.calls] == [1.5, 3.0, 4.5, 6.0]
    assert [round(t - start, 3) for t in slow.calls] == [5.0, 10.0]
    assert gone.calls == []


async def test_keepalive_earlier_timer_wakes_the_waiting_task(autojump_clock):
    """A timer added while the task waits for a later one runs at its own time."""
    keepalive = Keepalive.current()
    start = trio.current_time()
    late, early = _Timed(1, 1), _Timed(1, 1)
    keepalive.add(start + 100, late)
    await trio.sleep(1)
    keepalive.add(start + 2, early)
    await trio.sleep(200)
    assert [round(t - start, 3) for t in early.calls] == [2.0]
    assert [round(t - start, 3) for t in late.calls] == [100.0]


async def test_keepalive_timer_that_raises_is_logged_and_dropped(autojump_clock, caplog):
    """A bug in one connection's keepalive is logged; the task and the other timers go on."""
    keepalive = Keepalive.current()
    start = trio.current_time()
    broken, fine = _Timed(1, 10, fail=True), _Timed(1, 3)
    keepalive.add(start + 1, broken)
    keepalive.add(start + 1, fine)
    await trio.sleep(10)
    assert len(broken.calls) == 1
    assert len(fine.calls) == 3
    assert any("keepalive" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


class _PingFails:
    """A transport whose ping is a bug; everything else does nothing."""

    heartbeat = None
    expects_pong = True
    reads_to_close = False
    last_receive = 0.0

    async def receive_message(self) -> str:
        await trio.sleep_forever()
        raise AssertionError

    async def send(self, frames: list[OutFrame]) -> None:
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
        raise RuntimeError("a bug in ping")

    async def close(self, code: int, reason: str) -> None:
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_keepalive_writer_started_by_another_task_logs_the_connections_fields():
    """The writer's lines carry its connection's log fields, whichever task started it
    (the keepalive's, the hub's): here a bug in a ping."""
    out = Outbound(_PingFails(), FlushSchedule(), Config(), Stats())
    out.log_fields = {"conn": 7, "peer": "192.0.2.1:5000", "transport": "websocket"}
    with json_log() as log, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            out.start(nursery)
            out.ping_soon()  # from this task, whose log context is empty
        lines = [r for r in records(log) if r["message"].startswith("bug in a connection task")]
    assert lines, records(log)
    assert {k: lines[0][k] for k in ("conn", "peer", "transport")} == out.log_fields
    assert out.close_code == 1011
