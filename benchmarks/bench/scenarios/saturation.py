"""Saturation: 200 clients in one room, 4 senders keeping 32 says in flight.

After the warm-up, the window counts ``message`` frames received by every
client: delivered messages per second, and server CPU per delivery. Target:
throughput at least 1.5x the peer's, or CPU per message at most 0.67x.
"""

from __future__ import annotations

from ..report import Comparison, Row, Verdict, ratio_at_least, ratio_at_most
from ..results import Params
from ..runs import each_server
from .base import Scenario, seconds

__all__ = ["SATURATION", "loadgen_rows"]


def loadgen_rows(suffix: str = "") -> tuple[Row, Row]:
    """The load generator's CPU and the noise in the window (suffix: a label's end)."""
    return (
        Row(
            f"load generator CPU, % of a core{suffix}",
            "window.loadgenCpuPct",
            "{:.0f}",
            compare=False,
        ),
        Row(
            f"other processes' CPU, % (noise){suffix}",
            "window.otherCpuPct",
            "{:.0f}",
            compare=False,
        ),
    )


def deadline(params: Params) -> float:
    n = seconds(params)
    return n["warmupS"] + n["durationS"] + 300  # setup + up to 180 s waiting for idle


FULL: Params = {
    "clients": 200,
    "senders": 4,
    "inflight": 32,
    "warmupS": 3,
    "durationS": 10,
    "msgChars": 40,
}

SATURATION = Scenario(
    name="saturation",
    full=FULL,
    quick={**FULL, "clients": 50, "warmupS": 1, "durationS": 2},
    deadline=deadline,
    run=each_server(),
    comparison=Comparison(
        rows=(
            Row(
                "delivered msgs/s",
                "deliveredPerS",
                "{:,.0f}",
                target=">= 1.5x",
                judge=ratio_at_least(1.5),
            ),
            Row(
                "server CPU µs / delivered msg",
                "serverCpuUsPerDelivered",
                "{:.2f}",
                target="<= 0.67x",
                judge=ratio_at_most(0.67),
            ),
            Verdict(
                "target (either of the two)", ("delivered msgs/s", "server CPU µs / delivered msg")
            ),
            Row("server CPU, % of its core", "window.serverCpuPct", "{:.0f}", compare=False),
            Row("join all, until server idle, s", "setupS", "{:.1f}"),
            Row("acked but not delivered", "missingDeliveries", "{:.0f}", compare=False),
            *loadgen_rows(),
        )
    ),
)
