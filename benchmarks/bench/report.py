"""The report: rows as data, the tables they make, and the notes beside them.

A `Row` says what a line of a table shows: its metric (a label, which may
name fields of its table such as ``{of}``), where each side's number is in
its result (a dotted path, or a function of the result), how to format it,
whether the sides are compared (ratio or difference), and its target and how
that is judged. A `Verdict` row combines the judgements of rows above it. A
scenario lists its rows (`Comparison`, in its module under ``scenarios/``);
this module turns them into tables:

- the main table (`comparison_table`): triochat against the peer, with
  ratio (triochat / peer), target and "met?";
- side-by-side tables of more columns (`side_by_side`): the memory floor's
  (triochat, bare trio-websocket, peer) and the cluster's set-ups.

Notes flag anything that makes a number doubtful (a failed run, client
problems, a saturated load generator, a busy machine).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Final

from .results import NOISY, Result, Value, get
from .runs import round_name

__all__ = [
    "MAIN_HEADER",
    "Comparison",
    "Fields",
    "Judge",
    "Row",
    "Table",
    "TextRow",
    "Verdict",
    "at_least_field",
    "at_most",
    "comparison_table",
    "difference",
    "equals",
    "failed_rounds_notes",
    "no_later_than_peer",
    "ratio_at_least",
    "ratio_at_most",
    "ratios",
    "render",
    "rounds_notes",
    "run_and_window_notes",
    "run_notes",
    "show_known",
    "show_ratio",
    "side_by_side",
    "sides",
    "window_notes",
]

Fields = dict[str, object]
"""What a table's metric labels and targets may name, e.g. ``{of}``."""
Judge = Callable[[Value, Value, Fields], bool | None]
"""triochat's value, the peer's and the fields -> target met? (None: cannot tell)."""
Reader = Callable[[Result, str], Value]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table: a metric, read from each side's result."""

    metric: str
    """The label; ``{name}`` is filled from the table's fields."""
    value: str | Callable[[Result], Value]
    """Where the number is: a dotted path in the result (``"window.serverCpuPct"``),
    or a function of the result."""
    fmt: str = "{:.1f}"
    scale: float = 1.0
    """Shown divided by this (1024: KiB as MiB)."""
    compare: bool = True
    """Show the comparison cells (ratio, difference)."""
    target: str = ""
    """Shown in the main table's target column; may name fields."""
    judge: Judge | None = None
    """Whether the target is met (the main table)."""
    target_if_judged: bool = False
    """Leave the target out when the judge cannot tell."""
    when: Callable[[Sequence[Result]], bool] | None = None
    """Show the row only if this holds for the sides' results."""


@dataclasses.dataclass(frozen=True)
class TextRow:
    """A line of text cells, one per side (no comparison)."""

    metric: str
    text: Callable[[Result], str]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A main-table line with only a "met?": met if any row of ``of`` is."""

    metric: str
    of: tuple[str, ...]
    """The metrics (as written in their rows) whose judgements it combines."""


@dataclasses.dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[list[str]]
    notes: list[str]


def _read(result: Result, path: str) -> Value:
    return get(result, *path.split("."))


def _value(row: Row, side: Result, read: Reader) -> Value:
    value = row.value(side) if callable(row.value) else read(side, row.value)
    if value is not None and row.scale != 1:
        value /= row.scale
    return value


# --- judges -------------------------------------------------------------------------


def _ratio_ok(t: Value, p: Value, pred: Callable[[float], bool]) -> bool | None:
    if t is None or p is None or math.isnan(t) or math.isnan(p) or p == 0:
        return None
    return pred(t / p)


def ratio_at_least(limit: float) -> Judge:
    return lambda t, p, _fields: _ratio_ok(t, p, lambda r: r >= limit)


def ratio_at_most(limit: float) -> Judge:
    return lambda t, p, _fields: _ratio_ok(t, p, lambda r: r <= limit)


def at_most(limit: float) -> Judge:
    """triochat's value is at most ``limit``."""
    return lambda t, _p, _fields: None if t is None or math.isnan(t) else t <= limit


def equals(expected: float) -> Judge:
    return lambda t, _p, _fields: None if t is None or math.isnan(t) else t == expected


def at_least_field(name: str) -> Judge:
    """triochat's value is at least the number in field ``name``."""

    def judge(t: Value, _p: Value, fields: Fields) -> bool | None:
        limit = fields[name]
        assert isinstance(limit, int | float)
        return None if t is None or math.isnan(t) else t >= limit

    return judge


def no_later_than_peer(t: Value, p: Value, _fields: Fields) -> bool | None:
    """triochat's latency is at most the peer's; never met if triochat's is
    infinite (not delivered)."""
    if t is None:
        return False
    return None if p is None or math.isnan(t) else bool(t <= p)


# --- the main table -----------------------------------------------------------------

MAIN_HEADER: Final = (
    "scenario",
    "metric",
    "triochat",
    "websockets peer",
    "ratio",
    "target",
    "met?",
)
_MET: Final = {True: "yes", False: "**NO**", None: ""}


def _no_fields(_tr: Result, _pr: Result) -> Fields:
    return {}


def sides(results: Result) -> list[tuple[str, Result]]:
    """A scenario's results as (server, result) for triochat and the peer."""
    return [(who, results.get(who, {})) for who in ("triochat", "peer")]


def run_notes(where: str, runs: Sequence[tuple[str, Result]]) -> list[str]:
    """Notes on each server's run: failed, still busy after joining, client problems."""
    notes: list[str] = []
    for who, res in runs:
        if res and not res.get("ok"):
            notes.append(f"{where}/{who}: FAILED: {res.get('error')}")
        problems = res.get("problems") or {}
        if res and res.get("ok") and res.get("idle") is False:
            notes.append(
                f"{where}/{who}: the server was still busy after joining "
                "(180 s): the window started anyway"
            )
        if problems.get("count"):
            notes.append(
                f"{where}/{who}: {problems['count']} client problems {problems['kinds']}; "
                f"e.g. {problems['examples'][:2]}"
            )
    return notes


def window_notes(where: str, runs: Sequence[tuple[str, Result]]) -> list[str]:
    """Notes on each server's measured window: load generator saturated, machine busy."""
    notes: list[str] = []
    for who, res in runs:
        value = get(res, "window", "loadgenCpuPct")
        if value is not None and not math.isnan(value) and value > 90:
            notes.append(
                f"{where}: LOAD GENERATOR SATURATED ({value:.0f}% of a core) in the "
                f"{who} run: that server's numbers are a lower bound"
            )
    for who, res in runs:
        value = get(res, "window", "otherCpuPct")
        if value is not None and not math.isnan(value) and value > NOISY:
            notes.append(
                f"{where}: the machine was BUSY with other work ({value:.0f}% of a core) "
                f"during the {who} window: its numbers are not reliable"
            )
    return notes


def rounds_notes(where: str, results: Result) -> list[str]:
    """Notes on a scenario run in rounds (`runs.alternate`): each round's run and
    window notes, then `failed_rounds_notes`."""
    rounds: list[dict[str, Result]] = results.get("rounds") or []
    out: list[str] = []
    for index, pair in enumerate(rounds, 1):
        at = round_name(where, index, len(rounds))
        runs = [(who, pair[who]) for who in ("triochat", "peer") if who in pair]
        out += run_notes(at, runs) + window_notes(at, runs)
    return out + failed_rounds_notes(where, results)


def failed_rounds_notes(where: str, results: Result) -> list[str]:
    """The servers whose medians leave failed rounds out (``roundsOk`` of ``medianOf``)."""
    out: list[str] = []
    for who, res in sides(results):
        count = int(res.get("medianOf") or 1)
        if res and res.get("roundsOk", count) < count:
            out.append(
                f"{where}/{who}: the medians are of the {res['roundsOk']} rounds of "
                f"{count} that did not fail"
            )
    return out


def run_and_window_notes(where: str, results: Result) -> list[str]:
    runs = sides(results)
    return run_notes(where, runs) + window_notes(where, runs)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A scenario's part of the main table: its rows, and how to make its notes."""

    rows: tuple[Row | Verdict, ...]
    fields: Callable[[Result, Result], Fields] = _no_fields
    """The fields of its labels and targets, from triochat's result and the peer's."""
    notes: Callable[[str, Result], list[str]] = run_and_window_notes
    """Its notes, from its name and its results (by server)."""


def _show(value: Value, fmt: str) -> str:
    if value is None:
        return "∞ (not delivered)"
    return "n/a" if math.isnan(value) else fmt.format(value)


def _ratio(t: Value, p: Value) -> str:
    if t is None or p is None or p == 0 or math.isnan(t) or math.isnan(p):
        return ""
    return f"{t / p:.2f}x"


def _comparison_rows(scenario: str, part: Comparison, tr: Result, pr: Result) -> list[list[str]]:
    fields = part.fields(tr, pr)
    judged: dict[str, bool | None] = {}
    rows: list[list[str]] = []
    for row in part.rows:
        if isinstance(row, Verdict):
            found = [judged.get(metric) for metric in row.of]
            met = None if all(m is None for m in found) else any(found)
            rows.append([scenario, row.metric, "", "", "", "", _MET[met]])
            continue
        t, p = _value(row, tr, _read), _value(row, pr, _read)
        met = row.judge(t, p, fields) if row.judge else None
        judged[row.metric] = met
        target = "" if row.target_if_judged and met is None else row.target.format(**fields)
        ratio = _ratio(t, p) if row.compare else ""
        metric = row.metric.format(**fields)
        rows.append([scenario, metric, _show(t, row.fmt), _show(p, row.fmt), ratio, target])
        rows[-1].append(_MET[met])
    return rows


def comparison_table(parts: Sequence[tuple[str, Comparison, Result]]) -> Table:
    """The main table of the scenarios ``parts`` (name, rows, results by server)
    and their notes; a scenario where neither triochat nor the peer ran is left out."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for scenario, part, results in parts:
        tr, pr = results.get("triochat", {}), results.get("peer", {})
        if not tr and not pr:
            continue  # e.g. only the floor ran: its own table
        notes += part.notes(scenario, results)
        rows += _comparison_rows(scenario, part, tr, pr)
    return Table(MAIN_HEADER, rows, notes)


# --- side-by-side tables --------------------------------------------------------------

Tail = Callable[[Row, Sequence[Value]], list[str]]
"""A compared row's last cells, from its values (one per side)."""


def show_known(value: Value, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else fmt.format(value)


def show_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return "n/a"
    return "∞" if math.isinf(ratio) else f"{ratio:.2f}x"


def difference(first: int, second: int) -> Tail:
    """One cell: side ``first`` minus side ``second``, signed, in the row's format."""

    def tail(row: Row, values: Sequence[Value]) -> list[str]:
        a, b = values[first], values[second]
        if a is None or b is None or math.isnan(a + b):
            return [""]
        diff = row.fmt.format(a - b)
        return [diff if diff.startswith("-") else f"+{diff}"]

    return tail


def ratios(*pairs: tuple[int, int]) -> Tail:
    """One cell per pair ``(a, b)``: side a / side b (empty if either is unknown)."""

    def one(a: Value, b: Value) -> str:
        if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
            return ""
        return f"{a / b:.2f}x"

    def tail(_row: Row, values: Sequence[Value]) -> list[str]:
        return [one(values[a], values[b]) for a, b in pairs]

    return tail


def side_by_side(
    scenario: str,
    header: tuple[str, ...],
    rows: Sequence[Row | TextRow],
    results: Sequence[Result],
    *,
    tail: Tail,
    fields: Fields | None = None,
    only_ok: bool = False,
) -> list[list[str]]:
    """The lines of a table with one column per result in ``results``, then
    the ``tail`` cells of compared rows. With ``only_ok``, a failed run's
    numbers are "n/a"."""
    fields = fields or {}
    blanks = len(header) - 2 - len(results)

    def read(result: Result, path: str) -> Value:
        if only_ok and not result.get("ok"):
            return math.nan
        return _read(result, path)

    lines: list[list[str]] = []
    for row in rows:
        if isinstance(row, TextRow):
            texts = [row.text(r) for r in results]
            lines.append([scenario, row.metric.format(**fields), *texts, *[""] * blanks])
            continue
        if row.when is not None and not row.when(results):
            continue
        metric = row.metric.format(**fields)
        values = [_value(row, r, read) for r in results]
        cells = [scenario, metric, *(show_known(v, row.fmt) for v in values)]
        lines.append(cells + (tail(row, values) if row.compare else [""] * blanks))
    return lines


def render(table: Table) -> str:
    """``table`` as Markdown, each column as wide as its widest cell."""
    header = list(table.header)
    lines = [header, *table.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in table.rows)])
