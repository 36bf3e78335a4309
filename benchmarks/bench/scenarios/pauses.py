"""Pauses: 19,000 connections held, broadcasts among them, and the longest stall (#16 goal 4).

As many connections as one server process may hold (its file limit is
20,000): one room of 100 receivers, the first of them the sender, and the
rest idle in rooms of 100. Once every join is out, the sender says 50
messages/s for 60 s and every receiver computes each one's delivery latency
(as the latency scenario does): a stall of the server, a GC pause included,
shows in the highest percentiles and the maximum, for both servers alike.
triochat also tells its own (src/triochat/pauses.py), read from its /metrics
after the joins and at both ends of the window: the longest loop stall and
GC pause of the last minute (the window is that minute), the stalls over
20 ms and the full collections in the window, the histograms' differences.
Target (issue #16): no stall over 20 ms.
"""

from __future__ import annotations

import math
import re
import resource
from collections.abc import Mapping
from typing import Final

from ..processes import Load
from ..report import Comparison, Fields, Row, at_least_field, at_most, equals
from ..results import Params, Result, get
from ..runs import Bench, compared, run_server
from .base import Scenario, seconds
from .saturation import loadgen_rows

__all__ = ["PAUSES", "hub_figures"]

LIMIT_S: Final = 0.02  # the target: no stall over 20 ms
#: Descriptors a server or the load generator needs besides its connections
#: (listeners, epoll, pipes, the /metrics scrape), with room to spare.
FD_SPARE: Final = 500
_SAMPLE: Final = re.compile(r"(\w+)(?:\{(.*)\})?$")
_LABEL: Final = re.compile(r'(\w+)="([^"]*)"')

Samples = Mapping[str, float]
"""One scrape: ``name{labels}`` -> value, as the load generator read them."""


def _series(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """The cumulative buckets of histogram ``name`` whose labels include
    ``labels``: upper bound (inf for +Inf) -> count."""
    buckets: dict[float, float] = {}
    for key, value in samples.items():
        match = _SAMPLE.match(key)
        if not match or match[1] != f"{name}_bucket":
            continue
        found = dict(_LABEL.findall(match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            bound = float(found["le"])  # "+Inf" reads as inf
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def _in_window(start: Samples, end: Samples, name: str, **labels: str) -> dict[float, float]:
    """Observations of histogram ``name`` between two scrapes, per bucket
    (not cumulative): upper bound -> count."""
    a, b = _series(start, name, **labels), _series(end, name, **labels)
    counts: dict[float, float] = {}
    below_a = below_b = 0.0
    for bound in sorted(b):
        counts[bound] = (b[bound] - below_b) - (a.get(bound, 0.0) - below_a)
        below_a, below_b = a.get(bound, 0.0), b[bound]
    return counts


def _over(counts: dict[float, float], limit: float) -> float:
    """How many observations of ``counts`` were over ``limit`` (a bucket bound)."""
    return sum(n for bound, n in counts.items() if bound > limit)


def _highest(counts: dict[float, float]) -> tuple[float, float]:
    """The bounds (lower, upper) of the highest bucket with an observation
    ((0, 0): none)."""
    bounds = sorted(counts)
    seen = [i for i, bound in enumerate(bounds) if counts[bound] > 0]
    if not seen:
        return 0.0, 0.0
    return (bounds[seen[-1] - 1] if seen[-1] else 0.0), bounds[seen[-1]]


def hub_figures(metrics: Mapping[str, Samples | None]) -> Result:
    """What triochat's /metrics said about its pauses (ms and counts), from the
    load generator's three scrapes: after the joins, at the window's start and
    at its end. Empty if a scrape failed."""
    joins, start, end = (metrics.get(k) for k in ("afterJoins", "atStart", "atEnd"))
    if not joins or not start or not end:
        return {}
    stall = _in_window(start, end, "triochat_loop_stall_seconds")
    gc_all = _in_window(start, end, "triochat_gc_pause_seconds")
    full = _in_window(start, end, "triochat_gc_pause_seconds", generation="2")
    stall_max = end.get("triochat_loop_stall_max_seconds", math.nan)
    gc_max = end.get("triochat_gc_pause_max_seconds", math.nan)
    longest = max(stall_max, gc_max)
    low, high = _highest(stall)
    if low > longest:
        # The gauges cover the last minute, the histograms exactly the
        # window: a stall the gauges no longer cover counts as its bucket's bound.
        longest = high
    return {
        "stallMaxMs": 1000 * longest,
        "loopStallMaxMs": 1000 * stall_max,
        "stallsOverLimit": _over(stall, LIMIT_S),
        "gcMaxMs": 1000 * gc_max,
        "gcOverLimit": _over(gc_all, LIMIT_S),
        "gcPauses": sum(gc_all.values()),
        "fullCollections": sum(full.values()),
        "joinsGcMaxMs": 1000 * joins.get("triochat_gc_pause_max_seconds", math.nan),
        "joinsStallMaxMs": 1000 * joins.get("triochat_loop_stall_max_seconds", math.nan),
        "joinsFullCollections": _series(joins, "triochat_gc_pause_seconds", generation="2").get(
            math.inf, 0.0
        ),
    }


def run(bench: Bench, load: Load) -> Result:
    """triochat, then the peer, once each; triochat's run reads its /metrics.

    The servers and the load generator inherit this script's file limit
    (`machine.raise_file_limit`): with fewer than ``conns`` + `FD_SPARE`
    descriptors, fewer connections are held, and a note says so.
    """
    params = dict(load.params)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if params["conns"] + FD_SPARE > limit:
        params["conns"] = max(FD_SPARE, limit - FD_SPARE)
        bench.notes.append(
            f"pauses: RLIMIT_NOFILE is {limit}: {params['conns']:,} connections, "
            f"not {load.params['conns']:,}"
        )
    results: Result = {}
    for spec in compared(bench, ("triochat", "peer")):
        own = Load(load.scenario, {**params, "metrics": spec.key == "triochat"}, load.deadline_s)
        result = run_server(bench, own, spec, load.scenario)
        if result.get("ok") and result.get("metrics"):
            result["hub"] = hub_figures(result["metrics"])
        results[spec.key] = result
    return results


def fields(tr: Result, pr: Result) -> Fields:
    """``conns``: connections opened; ``drain``: how long deliveries may take."""
    return {
        "conns": tr.get("conns") or pr.get("conns") or 0,
        "drain": get(tr, "drainS") or get(pr, "drainS"),
    }


COMPARISON = Comparison(
    rows=(
        Row(
            "connections held",
            "held",
            "{:,.0f}",
            compare=False,
            target="{conns:,}",
            judge=at_least_field("conns"),
        ),
        Row(
            "longest hub stall (its /metrics), ms",
            "hub.stallMaxMs",
            "{:.1f}",
            compare=False,
            target="<= 20",
            judge=at_most(LIMIT_S * 1000),
        ),
        Row(
            "loop stalls over 20 ms in the window",
            "hub.stallsOverLimit",
            "{:.0f}",
            compare=False,
            target="0",
            judge=equals(0),
        ),
        Row("longest GC pause in the window, ms", "hub.gcMaxMs", "{:.2f}", compare=False),
        Row("full collections in the window", "hub.fullCollections", "{:.0f}", compare=False),
        Row("p50 delivery latency, ms", "p50Ms", "{:.2f}"),
        Row("p99 delivery latency, ms", "p99Ms", "{:.2f}"),
        Row("p99.9 delivery latency, ms", "p999Ms", "{:.2f}"),
        Row("max delivery latency, ms", "maxMs", "{:.2f}"),
        Row("not delivered within {drain:g} s, %", "lossPct", "{:.2f}", compare=False),
        Row(
            "joins: longest GC pause (last minute), ms",
            "hub.joinsGcMaxMs",
            "{:.1f}",
            compare=False,
        ),
        Row("joins: full collections", "hub.joinsFullCollections", "{:.0f}", compare=False),
        Row("server RSS held, MiB", "rssHeldKiB", "{:.1f}", scale=1024),
        Row("connect+join rate, conns/s", "connectsPerS", "{:,.0f}"),
        Row("server CPU, % of its core", "window.serverCpuPct", "{:.0f}", compare=False),
        *loadgen_rows(),
    ),
    fields=fields,
)


def deadline(params: Params) -> float:
    n = seconds(params)
    # Joins at a few hundred per second, up to 180 s waiting for an idle
    # server, the window, and 20 s to close them all.
    return n["settleS"] + n["durationS"] + n["drainS"] + 300 + n["conns"] / 20


FULL: Params = {
    "conns": 19_000,
    "roomSize": 100,
    "receivers": 100,
    "rate": 50,
    "settleS": 5,
    "durationS": 60,
    "drainS": 5,
    "msgChars": 40,
}

PAUSES = Scenario(
    name="pauses",
    full=FULL,
    quick={**FULL, "conns": 2000, "settleS": 1, "durationS": 5, "drainS": 2},
    deadline=deadline,
    run=run,
    comparison=COMPARISON,
)
