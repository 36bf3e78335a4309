"""Memory: 10,000 idle connections joined to rooms of 100, then RSS per connection.

Also against the floor, ``floor_trio_websocket.py`` (bare trio +
trio-websocket, the same protocol subset): the least an idle joined
connection can cost with trio-websocket underneath. Its figures get a table
of their own: triochat, the floor, the peer, and triochat - floor. Target:
at most 12 KiB per connection with every connection held.
"""

from __future__ import annotations

from typing import Final

from ..report import (
    Comparison,
    Fields,
    Row,
    Table,
    at_least_field,
    at_most,
    difference,
    run_and_window_notes,
    side_by_side,
)
from ..results import Params, Result, get, is_nan
from ..runs import Bench, compared, each_server
from ..servers import describe_argv
from .base import Scenario, seconds

__all__ = ["MEMORY"]


def fields(tr: Result, pr: Result) -> Fields:
    """``conns``: how many connections the scenario opened."""
    return {"conns": tr.get("conns") or pr.get("conns") or 0}


COMPARISON = Comparison(
    rows=(
        Row(
            "RSS per idle joined conn, KiB",
            "kibPerConn",
            "{:.1f}",
            target="<= 12",
            judge=at_most(12),
        ),
        Row(
            "connections held",
            "held",
            "{:,.0f}",
            compare=False,
            target="{conns:,}",
            judge=at_least_field("conns"),
        ),
        Row("server RSS held, MiB", "rssHeldKiB", "{:.1f}", scale=1024),
        Row("connect+join rate, conns/s", "connectsPerS", "{:,.0f}"),
        Row("connect+join, server CPU per conn, µs", "setupCpuUsPerConn", "{:.0f}"),
        Row(
            "connect+join, server CPU, % of its core",
            "window.serverCpuPct",
            "{:.0f}",
            compare=False,
        ),
        Row(
            "connect+join, load generator CPU, % of its core",
            "window.loadgenCpuPct",
            "{:.0f}",
            compare=False,
        ),
        Row("then busy until idle, s", "settledS", "{:.1f}", compare=False),
    ),
    fields=fields,
    # The window is the connect phase (the rate's): a saturated load generator
    # or a busy machine there makes the rate doubtful.
    notes=run_and_window_notes,
)

FLOOR_HEADER: Final = (
    "scenario",
    "metric",
    "triochat",
    "bare trio-websocket",
    "websockets peer",
    "triochat - bare",
)
FLOOR_ROWS: Final = (
    Row("RSS per idle joined conn, KiB", "kibPerConn", "{:.1f}"),
    Row("connections held", "held", "{:,.0f}", compare=False),
    Row("server RSS held, MiB", "rssHeldKiB", "{:.1f}", scale=1024),
    Row("server RSS at baseline, MiB", "rssBaseKiB", "{:.1f}", scale=1024),
    Row("connect+join rate, conns/s", "connectsPerS", "{:,.0f}", compare=False),
)


def floor_table(results: Result) -> Table | None:
    """triochat, bare trio-websocket and the peer side by side, with how far
    triochat is above the floor; and its notes (None if the floor did not run)."""
    fl = results.get("floor", {})
    if not fl:
        return None
    notes: list[str] = []
    if not fl.get("ok"):
        notes.append(f"memory/floor: FAILED: {fl.get('error')}")
    problems = fl.get("problems") or {}
    if problems.get("count"):
        notes.append(
            f"memory/floor: {problems['count']} client problems {problems['kinds']}; "
            f"e.g. {problems['examples'][:2]}"
        )
    runs = [results.get("triochat", {}), fl, results.get("peer", {})]
    rows = side_by_side("memory", FLOOR_HEADER, FLOOR_ROWS, runs, tail=difference(0, 1))
    floor_kib = get(fl, "kibPerConn")
    if floor_kib is not None and not is_nan(floor_kib):
        verdict = "above" if floor_kib > 12 else "below"
        notes.append(
            f"memory: bare trio-websocket (floor_trio_websocket.py) needs {floor_kib:.1f} KiB "
            f"per idle joined connection, {verdict} the 12 KiB target"
        )
    return Table(FLOOR_HEADER, rows, notes)


def describe(bench: Bench) -> list[str]:
    return [f"memory floor: {describe_argv(s, in_repo=True)}" for s in compared(bench, ("floor",))]


def deadline(params: Params) -> float:
    n = seconds(params)
    return n["settleS"] + n["holdS"] + 240 + n["conns"] / 20


MEMORY = Scenario(
    name="memory",
    full={"conns": 10_000, "roomSize": 100, "settleS": 3, "holdS": 10},
    quick={"conns": 1000, "roomSize": 100, "settleS": 1, "holdS": 1},
    deadline=deadline,
    run=each_server(("triochat", "peer", "floor")),
    comparison=COMPARISON,
    tables=(floor_table,),
    describe=describe,
)
