"""Churn: clients arrive at a fixed rate; each connects, joins, says one
message, waits for its ack, leaves and closes.

Errors, join and connect latency, CPU per connection, and RSS fresh, after a
warm-up of the same churn, at its highest during the window and after it.
Target: zero errors and RSS growth within 5 %.

One run per server is within this machine's noise (the same triochat took
1.53 to 2.47 ms of CPU per connection in six runs of one hour, the peer
1.02 to 1.52), so the servers run alternately ``--churn-rounds`` times
(triochat, peer, triochat, ...), each fresh: the main table has each
metric's median over the rounds (errors: the highest), and a table of its
own shows every round's CPU per connection and ratio.
"""

from __future__ import annotations

import math

from ..processes import Load
from ..report import Comparison, Row, Table, at_most, equals, rounds_notes, show_ratio
from ..results import Params, Result, get, median_of, median_result
from ..runs import Bench, alternate
from .base import Scenario, seconds
from .saturation import loadgen_rows

__all__ = ["CHURN"]

#: Numbers whose worst round is shown rather than their median.
WORST: frozenset[str] = frozenset({"errors"})


def run_rounds(bench: Bench, load: Load) -> Result:
    """The servers alternately, ``--churn-rounds`` times: each server's medians
    (`median_result`) and, under "rounds", every round's raw results."""
    return alternate(bench, load, bench.churn_rounds, lambda runs: median_result(runs, WORST))


def cpu_ratio(pair: dict[str, Result]) -> float:
    """triochat's CPU per connection / the peer's in one round (NaN if unknown)."""
    t = get(pair.get("triochat"), "serverCpuMsPerConn")
    p = get(pair.get("peer"), "serverCpuMsPerConn")
    if t is None or p is None or math.isnan(t) or math.isnan(p) or p == 0:
        return math.nan
    return t / p


def rounds_table(results: Result) -> Table | None:
    """Every round (with more than one): both servers' CPU per connection and
    their ratio; its note has every ratio and their median."""
    rounds: list[dict[str, Result]] = results.get("rounds") or []
    if len(rounds) <= 1:
        return None
    ratios = [cpu_ratio(pair) for pair in rounds]
    rows = [
        [
            "churn",
            f"{index} of {len(rounds)}",
            *(f"{get(pair.get(who), 'serverCpuMsPerConn'):.2f}" for who in ("triochat", "peer")),
            show_ratio(ratio),
        ]
        for index, (pair, ratio) in enumerate(zip(rounds, ratios, strict=True), 1)
    ]
    middle = median_of([r for r in ratios if not math.isnan(r)])
    note = (
        "churn: CPU per connection ratio (triochat / peer) per round: "
        f"{', '.join(show_ratio(r) for r in ratios)} "
        f"(median {show_ratio(math.nan if middle is None else middle)})"
    )
    header = ("scenario", "round", "triochat CPU ms / conn", "peer CPU ms / conn", "ratio")
    return Table(header, rows, [note])


def deadline(params: Params) -> float:
    n = seconds(params)
    return n["warmupS"] + n["durationS"] + 2 * n["settleS"] + 60


COMPARISON = Comparison(
    rows=(
        Row("errors", "errors", "{:.0f}", compare=False, target="0", judge=equals(0)),
        Row("lifecycles completed", "completed", "{:,.0f}", compare=False),
        Row("p99 join latency, ms", "joinMs.p99", "{:.2f}"),
        Row("p99 connect (handshake), ms", "connectMs.p99", "{:.2f}"),
        Row("most connections open at once", "maxConcurrent", "{:.0f}", compare=False),
        Row("server CPU ms / connection{of}", "serverCpuMsPerConn", "{:.2f}"),
        Row("RSS fresh, MiB", "rssStartKiB", "{:.1f}", scale=1024, compare=False),
        Row(
            "RSS before (after warm-up), MiB", "rssBeforeKiB", "{:.1f}", scale=1024, compare=False
        ),
        Row("RSS highest during, MiB", "rssMaxDuringKiB", "{:.1f}", scale=1024, compare=False),
        Row("RSS after, MiB", "rssAfterKiB", "{:.1f}", scale=1024, compare=False),
        Row(
            "RSS growth, %",
            "rssGrowthPct",
            "{:+.1f}",
            compare=False,
            target="<= +5",
            judge=at_most(5),
        ),
        *loadgen_rows(),
    ),
    fields=lambda tr, pr: {"of": f" (median of {n})" if (n := tr.get("medianOf", 1)) > 1 else ""},
    notes=rounds_notes,
)

CHURN = Scenario(
    name="churn",
    full={"rate": 200, "warmupS": 6, "durationS": 30, "settleS": 7},
    quick={"rate": 100, "warmupS": 1, "durationS": 3, "settleS": 1},
    deadline=deadline,
    run=run_rounds,
    comparison=COMPARISON,
    tables=(rounds_table,),
)
