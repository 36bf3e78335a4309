"""What a run's result is and how to read numbers out of it.

A result is the load generator's JSON object for one run (`loadgen.mjs`),
plus what the runner added (``rssAtEndKiB``; for the latency scenario the
medians of its rounds). Reading a number never raises: a missing key (a
failed run) reads as NaN, shown "n/a"; a JSON ``null`` reads as None, which
the latency metrics use for "infinitely late" (not delivered).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "NOISY",
    "Params",
    "Path",
    "Result",
    "Value",
    "get",
    "is_nan",
    "max_of",
    "median_of",
    "median_result",
    "num",
]

# Any: both are JSON objects of the load generator's making (loadgen.mjs).
Result = dict[str, Any]
"""One run's JSON result, or a scenario's results by server (or run) key."""
Params = dict[str, Any]
"""A scenario's sizes: the load generator's configuration for it."""
Value = float | None
"""A number read from a result: NaN if missing, None if infinitely late."""
Path = tuple[str, ...]
"""Keys leading to a number in a result, e.g. ``("window", "serverCpuPct")``."""

NOISY: Final = 10  # % of a core used by other processes during a window: flagged


def get(result: Result | None, *path: str) -> Value:
    """The number at ``path`` in ``result``: NaN if it is missing, None if null."""
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    if value is None:
        return None
    return float(value)


def num(result: Result, *path: str) -> float:
    """The number at ``path`` in a run that did not fail, else NaN (null too)."""
    value = get(result, *path) if result.get("ok") else math.nan
    return math.nan if value is None else value


def is_nan(value: Value) -> bool:
    """Whether ``value`` is a number that is not known (None is not NaN)."""
    return value is not None and math.isnan(value)


def _ranked(values: Sequence[Value]) -> list[float]:
    """``values`` without NaN (a failed run), None (infinitely late) as infinity."""
    return [math.inf if v is None else v for v in values if v is None or not math.isnan(v)]


def median_of(values: Sequence[Value]) -> Value:
    """The median of ``values`` (None: infinitely late; NaN if none is known)."""
    ranked = _ranked(values)
    if not ranked:
        return math.nan
    middle = statistics.median(ranked)
    return None if math.isinf(middle) else middle


def max_of(values: Sequence[Value]) -> Value:
    """The highest of ``values`` (None: infinitely late; NaN if none is known)."""
    ranked = _ranked(values)
    if not ranked:
        return math.nan
    return None if math.isinf(max(ranked)) else max(ranked)


def median_result(runs: Sequence[Result], worst: frozenset[str] = frozenset()) -> Result:
    """Several runs of one server as one result: each number (at any depth) the
    median over the runs that did not fail, those named in ``worst`` their
    highest; anything else as the first such run has it. ``medianOf`` is the
    number of runs, ``roundsOk`` how many of them count."""
    done = [r for r in runs if r.get("ok")]
    result: Result = {"ok": bool(done), "medianOf": len(runs), "roundsOk": len(done)}
    if not done:
        result["error"] = "every round failed"
        return result

    def merge(values: list[Any], key: str) -> Any:
        first = values[0]
        if isinstance(first, bool) or first is None:
            return first
        if isinstance(first, int | float):
            numbers = [v for v in values if isinstance(v, int | float) or v is None]
            return max_of(numbers) if key in worst else median_of(numbers)
        if isinstance(first, dict):
            return {
                k: merge([v[k] for v in values if isinstance(v, dict) and k in v], k)
                for k in first
            }
        return first

    for key in done[0]:
        if key not in ("ok", "medianOf", "roundsOk"):
            result[key] = merge([r[key] for r in done if key in r], key)
    return result
