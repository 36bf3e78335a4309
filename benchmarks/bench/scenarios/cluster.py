"""Cluster (triochat only): the saturation load against one node, one node
with ``--redis``, and two nodes with ``--redis`` (the clients round-robin
over the nodes' ports), each set-up with a fresh ``redis-server`` of its own.

The nodes share the server's CPU; redis-server runs on the load generator's.
Its table has one column per set-up, and the ratios 2 nodes / 1 node + Redis
and 2 nodes / 1 node. Needs ``redis-server`` on PATH (``--redis-server``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..machine import redis_version
from ..processes import LOOPBACK, Load, Server, ServerSpec, redis_ping, run_loadgen, server_rss_kib
from ..report import Row, Table, TextRow, ratios, show_known, side_by_side
from ..results import NOISY, Params, Result, num
from ..runs import Bench, announced
from ..servers import REDIS_OPTIONS, redis_spec, triochat_argv
from .base import Scenario, seconds

__all__ = ["CLUSTER", "CLUSTER_RUNS"]

# The cluster scenario's runs: key, label, triochat nodes, with Redis.
CLUSTER_RUNS: Final = (
    ("single", "1 node", 1, False),
    ("redis1", "1 node + Redis", 1, True),
    ("redis2", "2 nodes + Redis", 2, True),
)


def run_cluster(bench: Bench, load: Load, key: str, nodes: int, with_redis: bool) -> Result:
    """One set-up: a fresh redis-server (if ``with_redis``) and ``nodes`` fresh
    triochat nodes, then the load generator; everything stopped (bounded)
    before returning."""
    where = f"cluster/{key}"
    notes = bench.notes
    redis: Server | None = None
    servers: list[Server] = []
    try:
        redis_url = None
        if with_redis:
            if not shutil.which(bench.servers.redis_server):
                return {"ok": False, "error": f"{bench.servers.redis_server} not found on PATH"}
            redis = Server(
                redis_spec(bench.servers, bench.workdir), bench.loadgen_cpu, bench.workdir
            )
            redis.wait_ready()
            redis_ping(redis.port)
            redis_url = f"redis://{LOOPBACK}:{redis.port}/0"
        for k in range(nodes):

            def argv(port: int, url: str | None = redis_url) -> list[str]:
                return triochat_argv(bench.servers, port, url)

            spec = ServerSpec(f"{key}-node{k + 1}", f"triochat node {k + 1}", argv)
            servers.append(Server(spec, bench.server_cpu, bench.workdir))
        for server in servers:
            server.wait_ready()
        if redis is not None and not redis.alive():
            raise RuntimeError(f"redis-server exited at start: {redis.stderr_tail()}")
        side = {"redis": redis} if redis is not None else None
        result = run_loadgen(load, servers, bench.loadgen_cpu, bench.verbose, side)
        result["rssAtEndKiB"] = [server_rss_kib(s.pid) if s.alive() else None for s in servers]
        for s in [*servers, *([redis] if redis else [])]:
            if not s.alive():
                notes.append(f"{where}: {s.spec.label} DIED during the run")
        if redis is not None and redis.alive():
            result["redisRssAtEndKiB"] = server_rss_kib(redis.pid)
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc)}
    finally:
        # Nodes first (they may talk to Redis while they drain), then Redis.
        exited = {id(s) for s in servers if not s.alive()}
        for server in servers:
            server.stop()
        if redis is not None:
            redis.stop()
    for server in servers:
        if server.exit_note and id(server) not in exited:  # else: reported as failed or died
            notes.append(f"{where}: {server.spec.label}: {server.exit_note}")
        # A node that failed to start: its stderr is in the FAILED note already.
        if server.stderr_lines() and (result.get("ok") or id(server) not in exited):
            notes.append(
                f"{where}: {server.spec.label} wrote {server.stderr_lines()} lines, "
                f"last: {server.stderr_tail()[:300]}"
            )
    if redis is not None and redis.exit_note:
        notes.append(f"{where}: redis-server: {redis.exit_note}")
    return result


def run_setups(bench: Bench, load: Load) -> Result:
    """Every set-up of `CLUSTER_RUNS` in turn, each after a quiet machine."""
    results: Result = {}
    for key, label, nodes, with_redis in CLUSTER_RUNS:
        with announced(bench, "cluster", label, load):
            results[key] = run_cluster(bench, load, key, nodes, with_redis)
    return results


# --- the table ----------------------------------------------------------------------

CLUSTER_HEADER: Final = (
    "scenario",
    "metric",
    *(label for _key, label, *_ in CLUSTER_RUNS),
    "2 nodes / 1 node + Redis",
    "2 nodes / 1 node",
)


def _clients_per_node(res: Result) -> str:
    if not res.get("ok"):
        return "n/a"
    return " + ".join(
        f"{c} ({s})"
        for c, s in zip(
            res.get("clientsByNode") or [res.get("clients", "?")],
            res.get("sendersByNode") or [res.get("senders", "?")],
            strict=False,
        )
    )


def _by_node(path: str, total: str, fmt: str) -> Callable[[Result], str]:
    """The per-node list at ``path`` as "a + b", else the ``total`` (one node)."""

    def text(res: Result) -> str:
        values: Any = res if res.get("ok") else None  # Any: JSON
        for key in path.split("."):
            values = values.get(key) if isinstance(values, dict) else None
        if isinstance(values, list) and values:
            return " + ".join(fmt.format(v) for v in values)
        return show_known(num(res, *total.split(".")), fmt)

    return text


# In the table, each set-up's result also says whether the set-up has Redis.
_WITH_REDIS: Final = "_withRedis"


def _redis(path: str) -> Callable[[Result], float]:
    """redis-server's figure at ``path``: 0 in a set-up without Redis."""

    def value(res: Result) -> float:
        if res.get("ok") and not res[_WITH_REDIS]:
            return 0.0
        return num(res, *path.split("."))

    return value


def _total_cpu_us(res: Result) -> float:
    return num(res, "serverCpuUsPerDelivered") + _redis("redisCpuUsPerDelivered")(res)


def _paced_rate(runs: Sequence[Result]) -> float:
    """The paced phase's says/s (the first run that has one), 0 if none paced."""
    return float(next((r["pacedRate"] for r in runs if r.get("ok") and r.get("pacedRate")), 0))


def _shown_if(paced: bool, cross: str | None) -> Callable[[Sequence[Result]], bool] | None:
    """A latency row's condition: if ``paced``, that the load generator paced;
    if ``cross`` (a path), that two nodes + Redis (the third set-up) has it."""
    if not paced and cross is None:
        return None

    def when(runs: Sequence[Result]) -> bool:
        if paced and not _paced_rate(runs):
            return False
        return cross is None or not math.isnan(num(runs[2], *cross.split(".")))

    return when


def _latency_rows(prefix: str, label: str, paced: bool = False) -> list[Row]:
    """p50/p99 rows of ``{prefix}Ms`` and its same-node and cross-node splits
    (the cross-node ones only when the third set-up has them; the paced
    ones only when the load generator paced)."""
    rows: list[Row] = []
    for key, name in (
        (f"{prefix}Ms", label),
        (f"{prefix}SameNodeMs", "  sender on the same node"),
        (f"{prefix}CrossNodeMs", "  sender on the other node"),
    ):
        for pct in ("p50", "p99"):
            path = f"{key}.{pct}"
            when = _shown_if(paced, path if key.endswith("CrossNodeMs") else None)
            rows.append(Row(f"{name} {pct}, ms", path, "{:.2f}", when=when))
    return rows


CLUSTER_ROWS: Final[tuple[Row | TextRow, ...]] = (
    TextRow("clients (senders) per node", _clients_per_node),
    Row("delivered msgs/s", "deliveredPerS", "{:,.0f}"),
    TextRow(
        "delivered msgs/s, by node", _by_node("deliveredPerSByNode", "deliveredPerS", "{:,.0f}")
    ),
    *_latency_rows("e2e", "end-to-end latency"),
    Row("say -> ack p50, ms", "ackMs.p50", "{:.2f}"),
    Row("say -> ack p99, ms", "ackMs.p99", "{:.2f}"),
    *_latency_rows("pacedE2e", "at {paced:g} msgs/s: end-to-end latency", paced=True),
    Row("triochat CPU µs / delivered msg (all nodes)", "serverCpuUsPerDelivered", "{:.2f}"),
    Row("redis-server CPU µs / delivered msg", _redis("redisCpuUsPerDelivered"), "{:.2f}"),
    Row("total CPU µs / delivered msg", _total_cpu_us, "{:.2f}"),
    Row("triochat CPU, % of a core (all nodes)", "window.serverCpuPct", "{:.0f}", compare=False),
    TextRow(
        "triochat CPU, % of a core, by node",
        _by_node("window.serversCpuPct", "window.serverCpuPct", "{:.0f}"),
    ),
    Row(
        "redis-server CPU, % of a core", _redis("window.sideCpuPct.redis"), "{:.0f}", compare=False
    ),
    Row("acked but not delivered", "missingDeliveries", "{:,.0f}", compare=False),
    Row("join all, until servers idle, s", "setupS", "{:.1f}"),
    Row("load generator CPU, % of a core", "window.loadgenCpuPct", "{:.0f}", compare=False),
    Row("other processes' CPU, % (noise)", "window.otherCpuPct", "{:.0f}", compare=False),
)


def _notes(key: str, label: str, res: Result) -> list[str]:
    """One set-up's notes: failed, client problems, busy after joining,
    deliveries missing, the load generator's CPU saturated, machine busy."""
    notes: list[str] = []
    problems = res.get("problems") or {}
    if not res.get("ok"):
        notes.append(f"cluster/{key} ({label}): FAILED: {res.get('error')}")
    if problems.get("count"):
        notes.append(
            f"cluster/{key}: {problems['count']} client problems {problems['kinds']}; "
            f"e.g. {problems['examples'][:2]}"
        )
    if not res.get("ok"):
        return notes
    if res.get("idle") is False:
        notes.append(
            f"cluster/{key}: the servers were still busy after joining (180 s): "
            "the window started anyway"
        )
    missing = res.get("missingDeliveries") or 0
    if missing:
        notes.append(
            f"cluster/{key}: {missing:,} deliveries of acked messages MISSING "
            f"({100 * missing / max(1, res['acked'] * res['clients']):.1f}%)"
        )
    loadgen = num(res, "window", "loadgenCpuPct")
    redis_cpu = num(res, "window", "sideCpuPct", "redis")
    shared = loadgen + (0 if math.isnan(redis_cpu) else redis_cpu)
    if shared > 90:
        notes.append(
            f"cluster/{key}: the load generator's CPU was {shared:.0f}% busy (load "
            "generator plus redis-server): the numbers may be a lower bound"
        )
    other = num(res, "window", "otherCpuPct")
    if other > NOISY:
        notes.append(
            f"cluster/{key}: the machine was BUSY with other work ({other:.0f}% of a core) "
            "during the window: its numbers are not reliable"
        )
    return notes


def cluster_table(results: Result) -> Table:
    """One column per set-up, ratios 2 nodes / 1 node; and the notes."""
    runs = [results.get(key, {}) for key, *_ in CLUSTER_RUNS]
    notes: list[str] = []
    for (key, label, _nodes, _redis), res in zip(CLUSTER_RUNS, runs, strict=True):
        if res:
            notes += _notes(key, label, res)
    columns = [
        {**res, _WITH_REDIS: with_redis}
        for (_key, _label, _nodes, with_redis), res in zip(CLUSTER_RUNS, runs, strict=True)
    ]
    rows = side_by_side(
        "cluster",
        CLUSTER_HEADER,
        CLUSTER_ROWS,
        columns,
        tail=ratios((2, 1), (2, 0)),
        fields={"paced": _paced_rate(runs)},
        only_ok=True,
    )
    return Table(CLUSTER_HEADER, rows, notes)


def describe(bench: Bench) -> list[str]:
    """How redis-server and the nodes are started, and where they are pinned."""
    redis_argv = " ".join(repr(a) if a == "" else a for a in REDIS_OPTIONS)
    lines = [
        f"cluster: redis-server {redis_version(bench.servers.redis_server)} --port <free> "
        f"--bind {LOOPBACK} {redis_argv} (fresh for each run, in a temp dir); nodes: "
        f"triochat as above + --redis redis://{LOOPBACK}:<port>/0, clients round-robin "
        "over the nodes' ports"
    ]
    if bench.server_cpu is not None:
        lines.append(
            f"cluster pinning: every triochat node on CPU {bench.server_cpu} (the same one "
            f"core for 1 and 2 nodes); redis-server and the load generator on CPU "
            f"{bench.loadgen_cpu}"
        )
    return lines


# The saturation load (same clients, senders and in-flight window), with one
# latency probe client per node; then a paced phase (pacedRate says/s in all
# for pacedS s) for latency without the closed loop's queues.
FULL: Params = {
    "clients": 200,
    "senders": 4,
    "inflight": 32,
    "warmupS": 3,
    "durationS": 10,
    "msgChars": 40,
    "pacedRate": 200,
    "pacedS": 5,
}


def deadline(params: Params) -> float:
    n = seconds(params)
    # setup + up to 180 s waiting for idle + the paced phase
    return n["warmupS"] + n["durationS"] + n["pacedS"] + 300


CLUSTER = Scenario(
    name="cluster",
    full=FULL,
    quick={**FULL, "clients": 50, "warmupS": 1, "durationS": 2, "pacedS": 2},
    deadline=deadline,
    run=run_setups,
    tables=(cluster_table,),
    describe=describe,
)
