"""Pauses (#16 goal 4): GC pauses from `gc.callbacks`, event-loop stalls from
the watchdog, the last minute's longest, and their series on /metrics."""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import time

import pytest
import trio
import trio.testing

from triochat.metrics import Stats
from triochat.pauses import FULL_AFTER_CLOSES, YOUNG_INTERVAL, Pauses, RecentMax

from .conftest import running_server
from .test_metrics import scrape, total


def test_pauses_gc_collection_is_recorded_by_generation_while_recording():
    """gc.collect() inside recording_gc() is one generation-2 pause, and the
    longest recent pause; once outside, collections are not recorded."""
    stats = Stats()
    pauses = Pauses(stats)
    with pauses.recording_gc():
        gc.collect()
    full = stats.gc_pause[2]
    assert full.count >= 1
    assert full.sum > 0
    assert pauses.gc_pause_max.read() > 0
    counts = [h.count for h in stats.gc_pause]
    gc.collect()
    assert [h.count for h in stats.gc_pause] == counts
    assert pauses._on_gc not in gc.callbacks


async def test_pauses_watchdog_records_how_late_it_woke(mock_clock):
    """The watchdog due at 0.1 s that can only run at 0.35 s records a 0.25 s
    stall, in the histogram and as the longest recent stall."""
    stats = Stats()
    pauses = Pauses(stats, interval=0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pauses.watch)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.35)  # no checkpoint: the loop could not run it until now
        await trio.testing.wait_all_tasks_blocked()
        assert stats.loop_stall.count == 1
        assert stats.loop_stall.sum == pytest.approx(0.25)
        assert pauses.loop_stall_max.read() == pytest.approx(0.25)
        mock_clock.jump(0.1)  # on time
        await trio.testing.wait_all_tasks_blocked()
        assert stats.loop_stall.count == 2
        assert stats.loop_stall.sum == pytest.approx(0.25)
        nursery.cancel_scope.cancel()


async def test_pauses_watchdog_sees_a_loop_blocked_by_a_blocking_call():
    """time.sleep(0.1) in a task is a stall of about 0.1 s on the real clock.

    Real time on purpose: the blocking call is what is measured. The watchdog
    wakes every 10 ms, so its due time falls inside the block.
    """
    stats = Stats()
    pauses = Pauses(stats, interval=0.01)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pauses.watch)
            await trio.sleep(0.03)
            time.sleep(0.1)  # noqa: ASYNC251 - the stall under test
            await trio.sleep(0.03)
            nursery.cancel_scope.cancel()
    assert pauses.loop_stall_max.read() >= 0.085
    assert stats.loop_stall.counts[-1] == 0  # nothing over the last bound (5 s)


async def test_pauses_run_in_virtual_time_records_gc_but_runs_no_watchdog(autojump_clock):
    """Under a MockClock run() records GC pauses only: an hour of virtual time
    wakes no watchdog; cancelled, its GC callback is gone."""
    stats = Stats()
    pauses = Pauses(stats)
    async with trio.open_nursery() as nursery:
        await nursery.start(pauses.run)
        await trio.sleep(3600)
        gc.collect()
        assert stats.loop_stall.count == 0
        assert stats.gc_pause[2].count >= 1
        nursery.cancel_scope.cancel()
    assert pauses._on_gc not in gc.callbacks


def test_pauses_recent_max_forgets_after_its_span():
    """The longest of the last 60 s (1 s slots): a value ages out a minute later."""
    now = [0.0]
    recent = RecentMax(span=60.0, slots=60, clock=lambda: now[0])
    assert recent.read() == 0.0
    recent.record(0.005)
    now[0] = 30.0
    recent.record(0.003)
    recent.record(0.001)
    assert recent.read() == 0.005
    now[0] = 60.5  # slot 0 (the 5 ms) is over a minute old
    assert recent.read() == 0.003
    now[0] = 95.0
    assert recent.read() == 0.0


def test_pauses_tune_collector_freezes_start_up_and_stops_automatic_full_collections():
    """tune_collector() leaves what start-up made frozen and the third threshold
    out of reach (a fresh process: it is process-wide, never run in the test process)."""
    code = (
        "import gc; from triochat.pauses import GC_THRESHOLD, tune_collector; "
        "tune_collector(); print(gc.get_freeze_count()); "
        "assert gc.get_threshold() == GC_THRESHOLD, gc.get_threshold()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert int(out.stdout) > 1000


async def test_pauses_watchdog_collects_young_generations_then_all_after_closes(mock_clock):
    """watch(collect=True) collects generations 0-1 every 0.1 s, and all of
    them once FULL_AFTER_CLOSES chats have closed (#16 goal 4)."""
    stats = Stats()
    pauses = Pauses(stats, interval=0.01)
    gc.disable()  # only the watchdog's collections, so the counts are exact
    try:
        with pauses.recording_gc():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(pauses.watch, collect=True))
                await trio.testing.wait_all_tasks_blocked()
                young, full = stats.gc_pause[1].count, stats.gc_pause[2].count
                mock_clock.jump(YOUNG_INTERVAL)
                await trio.testing.wait_all_tasks_blocked()
                assert stats.gc_pause[1].count > young
                assert stats.gc_pause[2].count == full
                for _ in range(FULL_AFTER_CLOSES):
                    stats.opened_one("websocket")
                    stats.closed_one("websocket", 1000)
                mock_clock.jump(YOUNG_INTERVAL)
                await trio.testing.wait_all_tasks_blocked()
                assert stats.gc_pause[2].count == full + 1
                mock_clock.jump(YOUNG_INTERVAL)  # nothing closed since: a young one again
                await trio.testing.wait_all_tasks_blocked()
                assert stats.gc_pause[2].count == full + 1
                nursery.cancel_scope.cancel()
    finally:
        gc.enable()


async def test_pauses_series_on_metrics():
    """/metrics has the GC pause histogram by generation, the loop stall
    histogram, and the longest of each in the last minute (#16 goal 4)."""
    with trio.fail_after(10):
        async with running_server() as server:
            gc.collect()
            found = await scrape(server)
            assert total(found, "triochat_gc_pause_seconds_count", generation="2") >= 1
            assert total(found, "triochat_gc_pause_seconds_bucket", generation="2", le="+Inf") >= 1
            assert total(found, "triochat_gc_pause_max_seconds") > 0
            assert ("triochat_loop_stall_max_seconds", ()) in found
            while total(found, "triochat_loop_stall_seconds_count") == 0:
                await trio.sleep(0.01)  # the watchdog wakes every 10 ms
                found = await scrape(server)
            assert total(found, "triochat_loop_stall_seconds_bucket", le="+Inf") >= 1
