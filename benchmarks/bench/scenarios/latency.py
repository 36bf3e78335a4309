"""Latency: 1000 clients in one room, one sending 50 says/s on a fixed schedule.

Every receiver computes the delay from the sender's timestamp; percentiles
are over every expected delivery, one not arrived ``drainS`` after the window
counting as infinitely late. One window per server is within this machine's
noise, so the servers run alternately ``--latency-rounds`` times (triochat,
peer, triochat, ...), each fresh: the main table has the median of each
metric over the rounds (the highest "not delivered"), and a table of its own
shows every round. Target: p99 no later than the peer's.
"""

from __future__ import annotations

import math
from typing import Final

from ..processes import Load
from ..report import (
    Comparison,
    Fields,
    Row,
    Table,
    failed_rounds_notes,
    no_later_than_peer,
    rounds_notes,
    run_notes,
    show_ratio,
    sides,
    window_notes,
)
from ..results import Params, Result, get, median_of, median_result
from ..runs import Bench, alternate
from .base import Scenario, seconds
from .saturation import loadgen_rows

__all__ = ["LATENCY", "latency_medians"]

#: The metric of a latency run summed up over the rounds by its maximum, not
#: its median: "not delivered".
LATENCY_WORST: Final = frozenset({"lossPct"})


def latency_medians(runs: list[Result]) -> Result:
    """One server's latency rounds as one result: each metric's median over the
    rounds that did not fail, "not delivered" (``lossPct``) its highest
    (`median_result`)."""
    return median_result(runs, LATENCY_WORST)


def run_rounds(bench: Bench, load: Load) -> Result:
    """The servers alternately, ``--latency-rounds`` times. Returns each
    server's medians (`latency_medians`) and, under "rounds", every round's
    raw results."""
    return alternate(bench, load, bench.latency_rounds, latency_medians)


# --- the main table ---------------------------------------------------------------


def fields(tr: Result, pr: Result) -> Fields:
    """``of``/``worst``: how many rounds the medians/maxima are of; ``drain``."""
    count = int(tr.get("medianOf") or pr.get("medianOf") or 1)
    return {
        "count": count,
        "of": f" (median of {count})" if count > 1 else "",
        "worst": f" (max of {count})" if count > 1 else "",
        "drain": get(tr, "drainS") or get(pr, "drainS"),
    }


def notes(where: str, results: Result) -> list[str]:
    """Every round's notes (`rounds_notes`); results without rounds (not from
    `run_rounds`) as one run each."""
    if results.get("rounds") is not None:
        return rounds_notes(where, results)
    runs = sides(results)
    return run_notes(where, runs) + failed_rounds_notes(where, results) + window_notes(where, runs)


COMPARISON = Comparison(
    rows=(
        Row("p50 latency, ms{of}", "p50Ms", "{:.2f}"),
        Row(
            "p99 latency, ms{of}",
            "p99Ms",
            "{:.2f}",
            target="<= peer",
            judge=no_later_than_peer,
            target_if_judged=True,
        ),
        Row("max latency, ms{of}", "maxMs", "{:.2f}"),
        Row("not delivered within {drain:g} s, %{worst}", "lossPct", "{:.2f}", compare=False),
        Row("server CPU µs / delivered msg{of}", "serverCpuUsPerDelivered", "{:.2f}"),
        Row("join all, until server idle, s{of}", "setupS", "{:.2f}"),
        Row("join all, server CPU, s{of}", "setupCpuS", "{:.2f}"),
        Row("server CPU, % of its core{of}", "window.serverCpuPct", "{:.0f}", compare=False),
        *loadgen_rows("{of}"),
    ),
    fields=fields,
    notes=notes,
)

# --- the rounds table -------------------------------------------------------------

ROUNDS_HEADER: Final = (
    "scenario",
    "round",
    "triochat p50, ms",
    "triochat p99, ms",
    "triochat max, ms",
    "peer p50, ms",
    "peer p99, ms",
    "peer max, ms",
    "p99 ratio",
    "noise, % (triochat)",
    "noise, % (peer)",
)
MS_COLUMNS: Final = ("p50Ms", "p99Ms", "maxMs")


def p99_ratio(pair: dict[str, Result]) -> float:
    """triochat's p99 latency / the peer's in one round: infinite if triochat's
    is (not delivered), NaN if either failed or the peer's is infinite."""
    tr, pr = pair.get("triochat", {}), pair.get("peer", {})
    t = get(tr, "p99Ms") if tr.get("ok") else math.nan
    p = get(pr, "p99Ms") if pr.get("ok") else math.nan
    if p is None or math.isnan(p) or p == 0 or (t is not None and math.isnan(t)):
        return math.nan
    return math.inf if t is None else t / p


def _show(res: Result, path: tuple[str, ...], fmt: str) -> str:
    value = get(res, *path) if res.get("ok") else math.nan
    if value is None:
        return "∞"
    return "n/a" if math.isnan(value) else fmt.format(value)


def rounds_table(results: Result) -> Table | None:
    """Every round (with more than one): p50, p99 and max of both servers,
    that round's p99 ratio and the noise of each window; its note has every
    round's p99 ratio and their median."""
    rounds: list[dict[str, Result]] = results.get("rounds") or []
    if len(rounds) <= 1:
        return None
    rows: list[list[str]] = []
    ratios = [p99_ratio(pair) for pair in rounds]
    for index, (pair, ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        tr, pr = pair.get("triochat", {}), pair.get("peer", {})
        rows.append(
            [
                "latency",
                f"{index} of {len(rounds)}",
                *(_show(res, (key,), "{:.2f}") for res in (tr, pr) for key in MS_COLUMNS),
                show_ratio(ratio),
                *(_show(res, ("window", "otherCpuPct"), "{:.0f}") for res in (tr, pr)),
            ]
        )
    middle = median_of([r for r in ratios if not math.isnan(r)])
    note = (
        "latency: p99 ratio (triochat / peer) per round: "
        f"{', '.join(show_ratio(r) for r in ratios)} "
        f"(median {show_ratio(math.inf if middle is None else middle)})"
    )
    return Table(ROUNDS_HEADER, rows, [note])


def deadline(params: Params) -> float:
    n = seconds(params)
    return n["warmupS"] + n["durationS"] + n["drainS"] + 360


FULL: Params = {
    "clients": 1000,
    "rate": 50,
    "warmupS": 2,
    "durationS": 20,
    "drainS": 5,
    "msgChars": 40,
}

LATENCY = Scenario(
    name="latency",
    full=FULL,
    quick={**FULL, "clients": 100, "warmupS": 1, "durationS": 3, "drainS": 2},
    deadline=deadline,
    run=run_rounds,
    comparison=COMPARISON,
    tables=(rounds_table,),
)
