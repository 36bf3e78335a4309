"""What a scenario is: its sizes, its watchdog, how it runs and what it reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..processes import Load
from ..report import Comparison, Table
from ..results import Params, Result
from ..runs import Bench, Runner

__all__ = ["Scenario", "seconds"]


def seconds(params: Params) -> dict[str, float]:
    """``params`` as floats, for the watchdog's arithmetic."""
    return {key: float(value) for key, value in params.items()}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario, start to end: add one to `scenarios.SCENARIOS` (and
    `loadgen.mjs`) and ``run.py --only`` knows it."""

    name: str
    full: Params
    """Its sizes in a full run: the load generator's configuration."""
    quick: Params
    """Its sizes with ``--quick``."""
    deadline: Callable[[Params], float]
    """The longest the load generator may take with these sizes, s (its watchdog)."""
    run: Runner
    comparison: Comparison | None = None
    """Its rows in the main table (triochat against the peer), if any."""
    tables: tuple[Callable[[Result], Table | None], ...] = ()
    """Tables of its own, from its results (None: nothing to show)."""
    describe: Callable[[Bench], list[str]] | None = None
    """Its lines in the header (how its extra processes are started)."""

    def load(self, params: Params) -> Load:
        return Load(self.name, params, self.deadline(params))
