"""Workers (triochat only): the saturation load against ``--workers 1`` and
``--workers 2``, both with ``--redis`` (each set-up a fresh ``redis-server``
of its own), on the one port: the kernel spreads the clients over the
workers (SO_REUSEPORT), the way an operator runs them.

Unlike every other scenario, triochat is not pinned to one CPU here: the
point of a second worker is a second core. redis-server and the load
generator stay pinned to the load generator's CPU, so on a 2-core machine
the second worker shares that core with them: the ratio is a lower bound
of what a second worker gives on a machine of its own. Server CPU is the
sum over every triochat process (the supervisor, nearly idle, included).
Its table's ratio is 2 workers / 1 worker. Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, cast

from ..machine import redis_version
from ..processes import LOOPBACK, Load, Server, ServerSpec, redis_ping, run_loadgen
from ..report import Row, Table, TextRow, ratios, side_by_side
from ..results import NOISY, Params, Result, num
from ..runs import Bench, announced
from ..servers import redis_spec, triochat_argv
from .base import Scenario, seconds

__all__ = ["WORKERS", "WORKERS_RUNS"]

# The scenario's runs: key, label, --workers.
WORKERS_RUNS: Final = (
    ("workers1", "--workers 1 + Redis", 1),
    ("workers2", "--workers 2 + Redis", 2),
)


@dataclasses.dataclass(frozen=True)
class _Process:
    """One triochat process as the load generator sees a server: its pid (its
    CPU is summed with the others') and the URL (the one port for all)."""

    pid: int
    url: str


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc: the supervisor's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _wait_for_workers(server: Server, workers: int, timeout: float = 30.0) -> list[int]:
    """Once the port accepts: wait until ``workers`` workers run and each has
    answered ``/healthz`` (so every one listens); their pids.

    Raises:
        RuntimeError: not within ``timeout`` s.
    """
    end = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < end:
        if not server.alive():
            raise RuntimeError(f"{server.spec.label} exited: {server.stderr_tail()}")
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            seen.add(conn.getresponse().getheader("X-Triochat-Worker") or "")
        except OSError:
            pass
        finally:
            conn.close()
        pids = _children(server.pid)
        if len(seen) == workers and len(pids) == workers:
            return pids
        time.sleep(0.05)
    raise RuntimeError(f"{server.spec.label}: {workers} workers not listening after {timeout} s")


def run_workers(bench: Bench, load: Load, key: str, workers: int) -> Result:
    """One set-up: a fresh redis-server and a fresh ``triochat --workers N``
    (not pinned), then the load generator; everything stopped (bounded)."""
    where = f"workers/{key}"
    notes = bench.notes
    redis: Server | None = None
    server: Server | None = None
    try:
        if not shutil.which(bench.servers.redis_server):
            return {"ok": False, "error": f"{bench.servers.redis_server} not found on PATH"}
        redis = Server(redis_spec(bench.servers, bench.workdir), bench.loadgen_cpu, bench.workdir)
        redis.wait_ready()
        redis_ping(redis.port)
        redis_url = f"redis://{LOOPBACK}:{redis.port}/0"

        def argv(port: int) -> list[str]:
            return [*triochat_argv(bench.servers, port, redis_url), "--workers", str(workers)]

        spec = ServerSpec(key, f"triochat --workers {workers}", argv)
        server = Server(spec, None, bench.workdir)  # None: every CPU (see the docstring)
        server.wait_ready()
        pids = [server.pid]
        if workers > 1:
            pids += _wait_for_workers(server, workers)
        url = server.url
        processes = cast("Sequence[Server]", [_Process(pid, url) for pid in pids])
        result = run_loadgen(load, processes, bench.loadgen_cpu, bench.verbose, {"redis": redis})
        result["processes"] = len(pids)
        if not server.alive():
            notes.append(f"{where}: triochat DIED during the run")
        elif any(pid not in _children(server.pid) for pid in pids[1:]):
            notes.append(f"{where}: a worker was restarted during the run")
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc)}
    finally:
        if server is not None:
            server.stop()  # the supervisor drains its workers
        if redis is not None:
            redis.stop()
    if server is not None:
        if server.exit_note:
            notes.append(f"{where}: triochat: {server.exit_note}")
        if server.stderr_lines():
            notes.append(
                f"{where}: triochat wrote {server.stderr_lines()} lines, "
                f"last: {server.stderr_tail()[:300]}"
            )
    if redis is not None and redis.exit_note:
        notes.append(f"{where}: redis-server: {redis.exit_note}")
    return result


def run_setups(bench: Bench, load: Load) -> Result:
    """Every set-up of `WORKERS_RUNS` in turn, each after a quiet machine."""
    results: Result = {}
    for key, label, workers in WORKERS_RUNS:
        with announced(bench, "workers", label, load):
            results[key] = run_workers(bench, load, key, workers)
    return results


# --- the table ----------------------------------------------------------------------

WORKERS_HEADER: Final = (
    "scenario",
    "metric",
    *(label for _key, label, _n in WORKERS_RUNS),
    "2 workers / 1 worker",
)


def _redis_cpu_us(res: Result) -> float:
    """redis-server's CPU per delivery, from its share of the window (the
    load generator reports it per delivery only with probes)."""
    return 1e4 * num(res, "window", "sideCpuPct", "redis") / num(res, "deliveredPerS")


def _total_cpu_us(res: Result) -> float:
    return num(res, "serverCpuUsPerDelivered") + _redis_cpu_us(res)


WORKERS_ROWS: Final[tuple[Row | TextRow, ...]] = (
    TextRow("triochat processes", lambda res: str(res.get("processes", "n/a"))),
    Row("delivered msgs/s", "deliveredPerS", "{:,.0f}"),
    Row("say -> ack p50, ms", "ackMs.p50", "{:.2f}"),
    Row("say -> ack p99, ms", "ackMs.p99", "{:.2f}"),
    Row("triochat CPU µs / delivered msg (all processes)", "serverCpuUsPerDelivered", "{:.2f}"),
    Row("redis-server CPU µs / delivered msg", _redis_cpu_us, "{:.2f}"),
    Row("total CPU µs / delivered msg", _total_cpu_us, "{:.2f}"),
    Row("triochat CPU, % of a core (all processes)", "window.serverCpuPct", "{:.0f}"),
    Row("redis-server CPU, % of a core", "window.sideCpuPct.redis", "{:.0f}", compare=False),
    Row("acked but not delivered", "missingDeliveries", "{:,.0f}", compare=False),
    Row("join all, until servers idle, s", "setupS", "{:.1f}"),
    Row("load generator CPU, % of a core", "window.loadgenCpuPct", "{:.0f}", compare=False),
    Row("other processes' CPU, % (noise)", "window.otherCpuPct", "{:.0f}", compare=False),
)


def _notes(key: str, label: str, res: Result) -> list[str]:
    """One set-up's notes: failed, client problems, deliveries missing, busy machine."""
    notes: list[str] = []
    if not res.get("ok"):
        return [f"workers/{key} ({label}): FAILED: {res.get('error')}"]
    problems = res.get("problems") or {}
    if problems.get("count"):
        notes.append(
            f"workers/{key}: {problems['count']} client problems {problems['kinds']}; "
            f"e.g. {problems['examples'][:2]}"
        )
    missing = res.get("missingDeliveries") or 0
    if missing:
        notes.append(f"workers/{key}: {missing:,} deliveries of acked messages MISSING")
    other = num(res, "window", "otherCpuPct")
    if other > NOISY:
        notes.append(
            f"workers/{key}: the machine was BUSY with other work ({other:.0f}% of a core) "
            "during the window: its numbers are not reliable"
        )
    return notes


def workers_table(results: Result) -> Table:
    """One column per set-up, the ratio 2 workers / 1 worker; and the notes."""
    runs = [results.get(key, {}) for key, *_ in WORKERS_RUNS]
    notes = [
        "workers: triochat is not pinned here (a second worker needs a second core), while "
        "the load generator and redis-server are pinned to the other CPU: on a 2-core "
        "machine the second worker competes with them for that core, so the 2 / 1 ratio "
        "is a lower bound"
    ]
    for (key, label, _n), res in zip(WORKERS_RUNS, runs, strict=True):
        if res:
            notes += _notes(key, label, res)
    rows = side_by_side(
        "workers", WORKERS_HEADER, WORKERS_ROWS, runs, tail=ratios((1, 0)), only_ok=True
    )
    return Table(WORKERS_HEADER, rows, notes)


def describe(bench: Bench) -> list[str]:
    """How the set-ups are started, and where they run."""
    where = (
        f"redis-server and the load generator on CPU {bench.loadgen_cpu}"
        if bench.loadgen_cpu is not None
        else "no pinning"
    )
    return [
        f"workers: redis-server {redis_version(bench.servers.redis_server)} as in the "
        f"cluster scenario; triochat as above + --redis + --workers 1 or 2, one port, "
        f"not pinned (every CPU); {where}"
    ]


# The saturation load (the same clients, senders and in-flight window).
FULL: Params = {
    "clients": 200,
    "senders": 4,
    "inflight": 32,
    "warmupS": 3,
    "durationS": 10,
    "msgChars": 40,
}


def deadline(params: Params) -> float:
    n = seconds(params)
    return n["warmupS"] + n["durationS"] + 300  # setup + up to 180 s waiting for idle


WORKERS = Scenario(
    name="workers",
    full=FULL,
    quick={**FULL, "clients": 50, "warmupS": 1, "durationS": 2},
    deadline=deadline,
    run=run_setups,
    tables=(workers_table,),
    describe=describe,
)
