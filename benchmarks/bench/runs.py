"""Runs: one server, fresh, under the load generator, and what every run shares.

A scenario's runner (`Runner`) gets the `Bench` and the `Load` and returns
the scenario's results, keyed by server (or, for the cluster, by set-up).
`each_server` is the usual runner: every compared server once, one after
the other. The latency and cluster scenarios bring runners of their own,
built from `run_server` and `processes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .processes import Load, Server, ServerSpec, run_loadgen, server_rss_kib, wait_for_quiet
from .results import Result
from .servers import ServerOptions

__all__ = [
    "Bench",
    "Runner",
    "alternate",
    "announced",
    "compared",
    "each_server",
    "round_name",
    "run_server",
]


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every run needs: the servers, the CPUs, and where to note trouble."""

    specs: tuple[ServerSpec, ...]
    """The servers ``--servers`` chose, in the order they run (triochat first)."""
    servers: ServerOptions
    server_cpu: int | None
    """The CPU the servers are pinned to (None: not pinned)."""
    loadgen_cpu: int | None
    """The CPU of the load generator, this script and redis-server."""
    wait_quiet: float
    """Before each run, wait up to this many seconds for an idle machine."""
    latency_rounds: int
    churn_rounds: int
    verbose: bool
    workdir: Path
    """A temporary folder: the servers' output, redis-server's data."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """The servers' exits and output, printed after the tables."""


Runner = Callable[[Bench, Load], Result]
"""How a scenario runs: its results by server (or set-up) key."""


@contextlib.contextmanager
def announced(bench: Bench, where: str, label: str, load: Load) -> Iterator[None]:
    """Around a run: wait for a quiet machine, print its progress line, and
    once it has returned, how long it took (nothing if it raised)."""
    wait_for_quiet(bench.wait_quiet)
    t0 = time.monotonic()
    print(f"... {where} / {label}: {json.dumps(load.params)}", file=sys.stderr)
    yield
    print(f"    done in {time.monotonic() - t0:.1f} s", file=sys.stderr)


def run_server(bench: Bench, load: Load, spec: ServerSpec, where: str) -> Result:
    """One run: a quiet machine, a fresh ``spec`` server, the load generator
    against it, the server stopped (bounded). ``where`` names the run in the
    progress line and in the notes (the server's exit and output)."""
    with announced(bench, where, spec.label, load):
        return _run_server(bench, load, spec, where)


def _run_server(bench: Bench, load: Load, spec: ServerSpec, where: str) -> Result:
    server = Server(spec, bench.server_cpu, bench.workdir)
    try:
        server.wait_ready()
        result = run_loadgen(load, [server], bench.loadgen_cpu, bench.verbose)
        if server.alive():
            result["rssAtEndKiB"] = server_rss_kib(server.pid)
        else:
            bench.notes.append(f"{where}/{spec.key}: the server DIED during the run")
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc)}
    finally:
        server.stop()
    if server.exit_note:
        bench.notes.append(f"{where}/{spec.key}: {server.exit_note}")
    if server.stderr_lines():
        bench.notes.append(
            f"{where}/{spec.key}: server wrote {server.stderr_lines()} lines, "
            f"last: {server.stderr_tail()[:300]}"
        )
    return result


def compared(bench: Bench, keys: Sequence[str]) -> list[ServerSpec]:
    """The servers of ``keys`` that ``--servers`` chose, in their running order."""
    return [spec for spec in bench.specs if spec.key in keys]


def each_server(keys: Sequence[str] = ("triochat", "peer")) -> Runner:
    """The runner that runs each server of ``keys`` once (those ``--servers`` chose)."""

    def run(bench: Bench, load: Load) -> Result:
        return {
            spec.key: run_server(bench, load, spec, load.scenario)
            for spec in compared(bench, keys)
        }

    return run


def round_name(scenario: str, index: int, count: int) -> str:
    """How progress lines and notes name round ``index`` (from 1) of ``count``."""
    return f"{scenario} round {index}" if count > 1 else scenario


def alternate(
    bench: Bench, load: Load, count: int, summarize: Callable[[list[Result]], Result]
) -> Result:
    """triochat and the peer (those ``--servers`` chose) alternately, ``count``
    times, each fresh: each server's rounds summed up by ``summarize`` and,
    under "rounds", every round's raw results by server."""
    specs = compared(bench, ("triochat", "peer"))
    rounds = [
        {s.key: run_server(bench, load, s, round_name(load.scenario, index, count)) for s in specs}
        for index in range(1, count + 1)
    ]
    summed = {s.key: summarize([pair[s.key] for pair in rounds]) for s in specs}
    return {**summed, "rounds": rounds}
