"""Churn: clients arrive at a fixed rate; each connects, joins, says one
message, waits for its ack, leaves and closes.

Errors, join and connect latency, CPU per connection, and RSS fresh, after a
warm-up of the same churn, at its highest during the window and after it.
Target: zero errors and RSS growth within 5 %.
"""

from __future__ import annotations

from ..report import Comparison, Row, at_most, equals
from ..results import Params
from ..runs import each_server
from .base import Scenario, seconds
from .saturation import loadgen_rows

__all__ = ["CHURN"]


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
        Row("server CPU ms / connection", "serverCpuMsPerConn", "{:.2f}"),
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
    )
)

CHURN = Scenario(
    name="churn",
    full={"rate": 200, "warmupS": 6, "durationS": 30, "settleS": 7},
    quick={"rate": 100, "warmupS": 1, "durationS": 3, "settleS": 1},
    deadline=deadline,
    run=each_server(),
    comparison=COMPARISON,
)
