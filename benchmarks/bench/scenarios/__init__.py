"""The scenarios, one module each, and the report of a run over them.

To add one: a module here with its `Scenario` (sizes, watchdog, runner,
rows, tables), an entry in `SCENARIOS`, and its part in ``loadgen.mjs``.
The order of `SCENARIOS` is the order of ``--only``'s default, of the
header's lines and of the tables of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ..report import Table, comparison_table
from ..results import Result
from .base import Scenario as Scenario
from .churn import CHURN
from .cluster import CLUSTER
from .latency import LATENCY
from .memory import MEMORY
from .pauses import PAUSES
from .saturation import SATURATION
from .workers import WORKERS

__all__ = ["SCENARIOS", "Scenario", "report"]

SCENARIOS: Final[Mapping[str, Scenario]] = {
    s.name: s for s in (SATURATION, LATENCY, MEMORY, CHURN, CLUSTER, WORKERS, PAUSES)
}


def report(results: Mapping[str, Result]) -> list[Table]:
    """The tables of a run's ``results`` (by scenario, in the order they ran):
    the main table of every scenario compared there, then each scenario's
    tables of its own in `SCENARIOS` order. Each carries its notes; the main
    table comes first even when it has no rows (for its notes)."""
    parts = [
        (name, comparison, result)
        for name, result in results.items()
        if (comparison := SCENARIOS[name].comparison) is not None
    ]
    tables = [comparison_table(parts)]
    for name, scenario in SCENARIOS.items():
        if name in results:
            tables += [t for make in scenario.tables if (t := make(results[name])) is not None]
    return tables
