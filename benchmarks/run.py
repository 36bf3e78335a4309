"""Benchmarks: triochat against a reference `websockets` server, in one run.

    python benchmarks/run.py                 # every scenario, full size (about 9-10 min)
    python benchmarks/run.py --quick         # every scenario, small numbers (about a minute)
    python benchmarks/run.py --only saturation,latency
    python benchmarks/run.py --only latency --latency-rounds 5
    python benchmarks/run.py --json /tmp/bench.json --profile /tmp/profile
    python benchmarks/run.py --only cluster  # one node vs two nodes + Redis

For each scenario, each server (triochat, then `peer_websockets.py`) is
started fresh on a free loopback port, pinned to CPU 0; the load generator
(`loadgen.mjs`: Node, many `rawws.mjs` clients, one separate process) runs pinned
to CPU 1 and reads the server's CPU time and RSS from ``/proc/<pid>`` at the
edges of its measured window. Then the server is stopped (SIGTERM, then
SIGKILL) and the next one starts. The table compares the two: ratio is
triochat / peer. Needs Python with triochat and websockets importable (the
dev venv) and Node.js 18+ (no npm packages).

The latency scenario runs the servers alternately ``--latency-rounds`` times
(default 5, 1 with --quick): triochat, peer, triochat, peer, ..., each fresh
and each after the usual wait for a quiet machine, because one sample per
server is within the noise. Its rows in the main table are, per server and
metric, the median over the rounds (for "not delivered" the highest), and
the ratio and target are computed on those medians. A "latency rounds" table
shows every round (p50, p99 and max of both servers, that round's p99 ratio
and the other-CPU noise of each window), and --json keeps every round's raw
result under results.latency.rounds, next to the medians.

The memory scenario also runs a third server, `floor_trio_websocket.py`: the
same protocol subset on bare trio + trio-websocket, the least an idle joined
connection can cost with trio-websocket underneath. Its figures get a small
table of their own (triochat, bare trio-websocket, peer; triochat - bare).

The cluster scenario is triochat only: the saturation load against one node,
one node with ``--redis``, and two nodes with ``--redis`` (the same clients,
half on each node's port), each with a fresh ``redis-server`` of its own
(needs ``redis-server`` on PATH). The nodes share CPU 0; redis-server runs
on CPU 1 with the load generator. Its table's ratios are two nodes / one.

Not part of the test suite. Every child process is killed at the end,
every wait is bounded, everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
SCENARIOS = ("saturation", "latency", "memory", "churn", "cluster")
NOFILE = 65536
NOISY = 10  # % of a core used by other processes during a window: flagged
MEMORY_ONLY = frozenset({"floor"})  # servers that run in the memory scenario only

# --- scenario sizes -------------------------------------------------------------

FULL: dict[str, dict[str, Any]] = {
    "saturation": {
        "clients": 200,
        "senders": 4,
        "inflight": 32,
        "warmupS": 3,
        "durationS": 10,
        "msgChars": 40,
    },
    "latency": {
        "clients": 1000,
        "rate": 50,
        "warmupS": 2,
        "durationS": 20,
        "drainS": 5,
        "msgChars": 40,
    },
    "memory": {"conns": 10_000, "roomSize": 100, "settleS": 3, "holdS": 10},
    "churn": {"rate": 200, "warmupS": 6, "durationS": 30, "settleS": 7},
    # The saturation load (same clients, senders and in-flight window), with
    # one latency probe client per node; then a paced phase (pacedRate says/s
    # in all for pacedS s) for latency without the closed loop's queues.
    "cluster": {
        "clients": 200,
        "senders": 4,
        "inflight": 32,
        "warmupS": 3,
        "durationS": 10,
        "msgChars": 40,
        "pacedRate": 200,
        "pacedS": 5,
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "saturation": {**FULL["saturation"], "clients": 50, "warmupS": 1, "durationS": 2},
    "latency": {**FULL["latency"], "clients": 100, "warmupS": 1, "durationS": 3, "drainS": 2},
    "memory": {"conns": 1000, "roomSize": 100, "settleS": 1, "holdS": 1},
    "churn": {"rate": 100, "warmupS": 1, "durationS": 3, "settleS": 1},
    "cluster": {**FULL["cluster"], "clients": 50, "warmupS": 1, "durationS": 2, "pacedS": 2},
}

# The cluster scenario's runs: key, label, triochat nodes, with Redis.
CLUSTER_RUNS = (
    ("single", "1 node", 1, False),
    ("redis1", "1 node + Redis", 1, True),
    ("redis2", "2 nodes + Redis", 2, True),
)
# redis-server as the cluster runs it: no RDB snapshots, an append-only file
# fsynced once a second (Redis' usual durable setting; PUBLISH is not written
# to it, whatever the cluster stores is).
REDIS_OPTIONS = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")


def deadline_s(scenario: str, p: dict[str, Any]) -> float:
    """Longest the load generator may take for ``scenario`` (its watchdog)."""
    n = {key: float(value) for key, value in p.items()}
    if scenario in ("saturation", "cluster"):
        # setup + up to 180 s waiting for idle (+ the cluster's paced phase)
        return n["warmupS"] + n["durationS"] + n.get("pacedS", 0) + 300
    if scenario == "latency":
        return n["warmupS"] + n["durationS"] + n["drainS"] + 360
    if scenario == "memory":
        return n["settleS"] + n["holdS"] + 240 + n["conns"] / 20
    return n["warmupS"] + n["durationS"] + 2 * n["settleS"] + 60


# --- processes --------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _kill_children() -> None:
    """Kill every process group this script started (each child leads its own)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _on_signal(signum: int, _frame: object) -> None:
    _kill_children()
    sys.exit(128 + signum)


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on ``cpu`` only (taskset, so every thread inherits the mask)."""
    if cpu is None:
        return argv
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *argv] if taskset else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class ServerSpec:
    key: str
    label: str
    argv: Callable[[int], list[str]]


def triochat_argv(args: argparse.Namespace, port: int, redis_url: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "triochat", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--memory", "--rate", "0", "--max-conns-per-ip", "0", "--max-pending-per-ip", "0"]
    argv += ["--log-level", "WARNING"]
    if args.outbox_frames:
        argv += ["--outbox-frames", str(args.outbox_frames)]
    if redis_url:
        argv += ["--redis", redis_url]
    return argv + list(args.triochat_arg)


def server_specs(args: argparse.Namespace) -> list[ServerSpec]:
    def triochat(port: int) -> list[str]:
        return triochat_argv(args, port)

    def peer(port: int) -> list[str]:
        return [sys.executable, str(HERE / "peer_websockets.py"), "--port", str(port)]

    def floor(port: int) -> list[str]:
        argv = [sys.executable, str(HERE / "floor_trio_websocket.py"), "--port", str(port)]
        return argv + list(args.floor_arg)

    return [
        ServerSpec("triochat", "triochat", triochat),
        ServerSpec("peer", "websockets peer", peer),
        ServerSpec("floor", "bare trio-websocket floor", floor),
    ]


class Server:
    """A server subprocess on a fresh port; `stop` ends it (bounded)."""

    def __init__(self, spec: ServerSpec, cpu: int | None, workdir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.stderr_path = workdir / f"{spec.key}-{self.port}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            pinned(spec.argv(self.port), cpu),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
        _CHILDREN.append(self.proc)
        self.exit_note = ""

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the server: same pid

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.label} exited at start (status {self.proc.returncode}): "
                    f"{self.stderr_tail()}"
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.spec.label} not listening after {timeout} s")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
                self.exit_note = f"did not exit within {timeout:g} s of SIGTERM: killed"
        if not self.exit_note and self.proc.returncode not in (0, -signal.SIGTERM):
            self.exit_note = f"exit status {self.proc.returncode} after SIGTERM"
        self._stderr.close()

    def stderr_tail(self, lines: int = 3) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stderr_lines(self) -> int:
        return len(self.stderr_path.read_text(errors="replace").strip().splitlines())


def server_rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def run_loadgen(
    scenario: str,
    params: dict[str, Any],
    server: Server | list[Server],
    cpu: int | None,
    verbose: bool,
    side: dict[str, Server] | None = None,
) -> dict[str, Any]:
    """Run the load generator against ``server`` (or several: clients spread
    over them round-robin, their CPU summed); ``side`` processes' CPU is
    measured separately."""
    servers = server if isinstance(server, list) else [server]
    cfg = {
        "scenario": scenario,
        "url": servers[0].url,
        "serverPid": servers[0].pid,
        "clkTck": os.sysconf("SC_CLK_TCK"),
        "deadlineS": deadline_s(scenario, params),
        "verbose": verbose,
        **params,
    }
    if len(servers) > 1:
        cfg["urls"] = [s.url for s in servers]
        cfg["serverPids"] = [s.pid for s in servers]
    if side:
        cfg["sidePids"] = {name: s.pid for name, s in side.items()}
    argv = pinned(["node", str(HERE / "loadgen.mjs"), json.dumps(cfg)], cpu)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        cwd=HERE,
        start_new_session=True,
    )
    _CHILDREN.append(proc)
    try:
        out, err = proc.communicate(timeout=cfg["deadlineS"] + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        return {"ok": False, "error": "load generator timed out (killed)"}
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (err or b"").decode(errors="replace").strip()[-500:]
        return {"ok": False, "error": f"load generator exit {proc.returncode}: {tail}"}
    return result


def quiet_first(args: argparse.Namespace) -> None:
    """Wait (at most ``--wait-quiet`` s) for the machine to be idle before a run."""
    if args.wait_quiet > 0:
        busy = wait_quiet(args.wait_quiet)
        if busy >= NOISY:
            print(f"    machine still busy ({busy:.0f}% of a core)", file=sys.stderr)


def run_server(
    args: argparse.Namespace,
    scenario: str,
    params: dict[str, Any],
    spec: ServerSpec,
    workdir: Path,
    where: str,
    notes: list[str],
) -> dict[str, Any]:
    """One run: a quiet machine, a fresh ``spec`` server, the load generator
    against it, the server stopped (bounded). ``where`` names the run in the
    progress line and in ``notes`` (the server's exit and output)."""
    quiet_first(args)
    t0 = time.monotonic()
    print(f"... {where} / {spec.label}: {json.dumps(params)}", file=sys.stderr)
    server = Server(spec, args.server_cpu, workdir)
    try:
        server.wait_ready()
        result = run_loadgen(scenario, params, server, args.loadgen_cpu, args.verbose)
        if server.proc.poll() is None:
            result["rssAtEndKiB"] = server_rss_kib(server.pid)
        else:
            notes.append(f"{where}/{spec.key}: the server DIED during the run")
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc)}
    finally:
        server.stop()
    if server.exit_note:
        notes.append(f"{where}/{spec.key}: {server.exit_note}")
    if server.stderr_lines():
        notes.append(
            f"{where}/{spec.key}: server wrote {server.stderr_lines()} lines, "
            f"last: {server.stderr_tail()[:300]}"
        )
    print(f"    done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return result


def run_latency(
    args: argparse.Namespace,
    params: dict[str, Any],
    specs: list[ServerSpec],
    workdir: Path,
    notes: list[str],
) -> dict[str, Any]:
    """The latency scenario: the servers alternately, ``--latency-rounds`` times.
    Returns each server's medians (`latency_medians`) and, under "rounds",
    every round's raw results."""
    specs = [s for s in specs if s.key not in MEMORY_ONLY]
    count = args.latency_rounds
    rounds: list[dict[str, dict[str, Any]]] = []
    for index in range(1, count + 1):
        where = round_where(index, count)
        rounds.append(
            {s.key: run_server(args, "latency", params, s, workdir, where, notes) for s in specs}
        )
    medians = {s.key: latency_medians([pair[s.key] for pair in rounds]) for s in specs}
    return {**medians, "rounds": rounds}


# --- setup ----------------------------------------------------------------------


def source_fingerprint() -> str:
    """Changes whenever a file under src/ changes (the server under test)."""
    digest = hashlib.sha256()
    for path in sorted((HERE.parent / "src").rglob("*")):
        if path.is_file() and "egg-info" not in str(path):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def machine_busy_s() -> float:
    """CPU seconds used so far by the whole machine (all CPUs, all processes)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))  # all but idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, limit_pct: float = NOISY) -> float:
    """Wait (at most ``max_wait`` s) for a second in which the machine is nearly
    idle; returns the last second's CPU use in % of a core."""
    end = time.monotonic() + max_wait
    while True:
        before = machine_busy_s()
        time.sleep(1.0)
        pct = 100 * (machine_busy_s() - before)
        if pct < limit_pct or time.monotonic() >= end:
            return pct


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(NOFILE, hard), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
    return soft


def ensure_node() -> str:
    """The version of Node.js on PATH (18 or newer), or exit."""
    node = shutil.which("node")
    if not node:
        sys.exit("benchmarks need Node.js 18+ (node) for the load generator")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.match(r"v(\d+)", out.strip())
    if not match or int(match.group(1)) < 18:
        sys.exit(f"benchmarks need Node.js 18+, found {out.strip()!r}")
    return out.strip()


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(node_version: str) -> list[str]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    repo = HERE.parent
    git = shutil.which("git")
    commit = "?"
    if git:
        head = subprocess.run(
            [git, "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            [git, "-C", str(repo), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = head.stdout.strip() or "?"
        if dirty.stdout.strip():
            commit += " + uncommitted changes in src/"
    libs = ", ".join(
        f"{name} {version_of(name)}"
        for name in ("triochat", "trio", "trio-websocket", "wsproto", "msgspec", "websockets")
    )
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {os.cpu_count()} CPUs ({cpu_model}), {platform.system()} "
        f"{platform.release()}, {platform.freedesktop_os_release().get('PRETTY_NAME', '?')}",
        f"python {platform.python_version()}: {libs}",
        f"triochat source: git {commit}",
        f"load generator: node {node_version}, benchmarks/rawws.mjs client",
    ]


# --- the table ------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    scenario: str
    metric: str
    trio: float | None
    peer: float | None
    fmt: str = "{:.1f}"
    target: str = ""
    met: bool | None = None
    ratio: bool = True
    summary: bool = False  # a verdict row: no values

    def cells(self) -> list[str]:
        def show(value: float | None) -> str:
            if self.summary:
                return ""
            if value is None:
                return "∞ (not delivered)"
            if isinstance(value, float) and math.isnan(value):
                return "n/a"
            return self.fmt.format(value)

        ratio = ""
        if (
            self.ratio
            and self.trio is not None
            and self.peer is not None
            and self.peer != 0
            and not math.isnan(self.trio)
            and not math.isnan(self.peer)
        ):
            ratio = f"{self.trio / self.peer:.2f}x"
        met = {True: "yes", False: "**NO**", None: ""}[self.met]
        return [
            self.scenario,
            self.metric,
            show(self.trio),
            show(self.peer),
            ratio,
            self.target,
            met,
        ]


def get(result: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    if value is None:
        return None
    return float(value)


def ratio_ok(trio: float | None, peer: float | None, pred: Callable[[float], bool]) -> bool | None:
    if trio is None or peer is None or math.isnan(trio) or math.isnan(peer) or peer == 0:
        return None
    return pred(trio / peer)


def run_notes(where: str, runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
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


def window_notes(where: str, runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
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


# --- the latency rounds -----------------------------------------------------------

# Metrics of a latency run summed up over the rounds by their median (top
# level, then under "window"); "lossPct" by its maximum.
LATENCY_MEDIANS = ("p50Ms", "p99Ms", "maxMs", "serverCpuUsPerDelivered", "setupS")
LATENCY_WINDOW_MEDIANS = ("serverCpuPct", "loadgenCpuPct", "otherCpuPct")


def _ranked(values: list[float | None]) -> list[float]:
    """``values`` without NaN (a failed run), None (infinitely late) as infinity."""
    return [math.inf if v is None else v for v in values if v is None or not math.isnan(v)]


def median_of(values: list[float | None]) -> float | None:
    """The median of ``values`` (None: infinitely late; NaN if none is known)."""
    ranked = _ranked(values)
    if not ranked:
        return math.nan
    middle = statistics.median(ranked)
    return None if math.isinf(middle) else middle


def max_of(values: list[float | None]) -> float | None:
    """The highest of ``values`` (None: infinitely late; NaN if none is known)."""
    ranked = _ranked(values)
    if not ranked:
        return math.nan
    return None if math.isinf(max(ranked)) else max(ranked)


def latency_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's latency rounds as one result: each metric's median over the
    rounds that did not fail (the highest "not delivered"); ``medianOf`` is the
    number of rounds, ``roundsOk`` how many of them count."""
    done = [r for r in runs if r.get("ok")]
    result: dict[str, Any] = {"ok": bool(done), "medianOf": len(runs), "roundsOk": len(done)}
    if not done:
        result["error"] = "every round failed"
        return result
    result["drainS"] = done[0].get("drainS")
    for key in LATENCY_MEDIANS:
        result[key] = median_of([get(r, key) for r in done])
    result["lossPct"] = max_of([get(r, "lossPct") for r in done])
    result["window"] = {
        key: median_of([get(r, "window", key) for r in done]) for key in LATENCY_WINDOW_MEDIANS
    }
    return result


def round_where(index: int, rounds: int) -> str:
    """How notes and progress lines name latency round ``index`` (from 1) of ``rounds``."""
    return f"latency round {index}" if rounds > 1 else "latency"


def latency_round_notes(rounds: list[dict[str, dict[str, Any]]]) -> list[str]:
    """The notes of every latency round (failed, client problems, load generator
    saturated, machine busy), each round's of its own."""
    notes: list[str] = []
    for index, pair in enumerate(rounds, 1):
        where = round_where(index, len(rounds))
        runs = [(who, pair[who]) for who in ("triochat", "peer") if who in pair]
        notes += run_notes(where, runs) + window_notes(where, runs)
    return notes


def p99_ratio(pair: dict[str, dict[str, Any]]) -> float:
    """triochat's p99 latency / the peer's in one round: infinite if triochat's
    is (not delivered), NaN if either failed or the peer's is infinite."""
    tr, pr = pair.get("triochat", {}), pair.get("peer", {})
    t = get(tr, "p99Ms") if tr.get("ok") else math.nan
    p = get(pr, "p99Ms") if pr.get("ok") else math.nan
    if p is None or math.isnan(p) or p == 0 or (t is not None and math.isnan(t)):
        return math.nan
    return math.inf if t is None else t / p


def show_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return "n/a"
    return "∞" if math.isinf(ratio) else f"{ratio:.2f}x"


LATENCY_ROUNDS_HEADER = [
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
]


def build_latency_round_rows(
    rounds: list[dict[str, dict[str, Any]]],
) -> tuple[list[list[str]], list[str]]:
    """The latency rounds table (one row per round) and its note: the p99 ratio
    of each round and their median."""

    def show(res: dict[str, Any], *path: str, fmt: str = "{:.2f}") -> str:
        value = get(res, *path) if res.get("ok") else math.nan
        if value is None:
            return "∞"
        return "n/a" if math.isnan(value) else fmt.format(value)

    rows: list[list[str]] = []
    ratios = [p99_ratio(pair) for pair in rounds]
    for index, (pair, ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        tr, pr = pair.get("triochat", {}), pair.get("peer", {})
        rows.append(
            [
                "latency",
                f"{index} of {len(rounds)}",
                *(show(res, key) for res in (tr, pr) for key in ("p50Ms", "p99Ms", "maxMs")),
                show_ratio(ratio),
                show(tr, "window", "otherCpuPct", fmt="{:.0f}"),
                show(pr, "window", "otherCpuPct", fmt="{:.0f}"),
            ]
        )
    middle = median_of([r for r in ratios if not math.isnan(r)])
    note = (
        "latency: p99 ratio (triochat / peer) per round: "
        f"{', '.join(show_ratio(r) for r in ratios)} "
        f"(median {show_ratio(math.inf if middle is None else middle)})"
    )
    return rows, [note]


def build_floor_rows(memory: dict[str, dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """The memory floor table: triochat, bare trio-websocket and the peer side
    by side, with how far triochat is above the floor; and its notes."""
    rows: list[list[str]] = []
    notes: list[str] = []
    fl = memory.get("floor", {})
    if not fl:
        return rows, notes
    tr, pr = memory.get("triochat", {}), memory.get("peer", {})
    if not fl.get("ok"):
        notes.append(f"memory/floor: FAILED: {fl.get('error')}")
    problems = fl.get("problems") or {}
    if problems.get("count"):
        notes.append(
            f"memory/floor: {problems['count']} client problems {problems['kinds']}; "
            f"e.g. {problems['examples'][:2]}"
        )

    def show(value: float | None, fmt: str) -> str:
        return "n/a" if value is None or math.isnan(value) else fmt.format(value)

    def row(metric: str, key: str, fmt: str, scale: float = 1.0, above: bool = True) -> None:
        t, f, p = (get(res, key) for res in (tr, fl, pr))
        t, f, p = (None if v is None else v / scale for v in (t, f, p))
        diff = ""
        if above and t is not None and f is not None and not math.isnan(t + f):
            diff = fmt.format(t - f)
            diff = diff if diff.startswith("-") else f"+{diff}"
        rows.append(["memory", metric, show(t, fmt), show(f, fmt), show(p, fmt), diff])

    row("RSS per idle joined conn, KiB", "kibPerConn", "{:.1f}")
    row("connections held", "held", "{:,.0f}", above=False)
    row("server RSS held, MiB", "rssHeldKiB", "{:.1f}", scale=1024)
    row("server RSS at baseline, MiB", "rssBaseKiB", "{:.1f}", scale=1024)
    row("connect+join rate, conns/s", "connectsPerS", "{:,.0f}", above=False)
    floor_kib = get(fl, "kibPerConn")
    if floor_kib is not None and not math.isnan(floor_kib):
        verdict = "above" if floor_kib > 12 else "below"
        notes.append(
            f"memory: bare trio-websocket (floor_trio_websocket.py) needs {floor_kib:.1f} KiB "
            f"per idle joined connection, {verdict} the 12 KiB target"
        )
    return rows, notes


def build_rows(results: dict[str, dict[str, Any]]) -> tuple[list[Row], list[str]]:
    """The main table and its notes. A scenario with ``rounds`` (latency) has
    their medians as its "triochat" and "peer" results, and each round's notes."""
    rows: list[Row] = []
    notes: list[str] = []

    def loadgen_row(
        scenario: str, tr: dict[str, Any], pr: dict[str, Any], suffix: str = ""
    ) -> None:
        t, p = get(tr, "window", "loadgenCpuPct"), get(pr, "window", "loadgenCpuPct")
        rows.append(
            Row(scenario, f"load generator CPU, % of a core{suffix}", t, p, "{:.0f}", ratio=False)
        )
        t, p = get(tr, "window", "otherCpuPct"), get(pr, "window", "otherCpuPct")
        rows.append(
            Row(scenario, f"other processes' CPU, % (noise){suffix}", t, p, "{:.0f}", ratio=False)
        )

    for scenario, pair in results.items():
        tr, pr = pair.get("triochat", {}), pair.get("peer", {})
        if not tr and not pr:
            continue  # only the floor ran: its own table
        rounds = pair.get("rounds")
        runs = [("triochat", tr), ("peer", pr)]
        if rounds is None:
            notes += run_notes(scenario, runs)
        else:
            notes += latency_round_notes(rounds)
        if scenario == "saturation":
            t, p = get(tr, "deliveredPerS"), get(pr, "deliveredPerS")
            tput = ratio_ok(t, p, lambda r: r >= 1.5)
            rows.append(Row(scenario, "delivered msgs/s", t, p, "{:,.0f}", ">= 1.5x", tput))
            t, p = get(tr, "serverCpuUsPerDelivered"), get(pr, "serverCpuUsPerDelivered")
            cpu = ratio_ok(t, p, lambda r: r <= 0.67)
            rows.append(
                Row(scenario, "server CPU µs / delivered msg", t, p, "{:.2f}", "<= 0.67x", cpu)
            )
            either = None if tput is None and cpu is None else bool(tput or cpu)
            rows.append(Row(scenario, "target (either of the two)", None, None, met=either))
            rows[-1].summary = True
            t, p = get(tr, "window", "serverCpuPct"), get(pr, "window", "serverCpuPct")
            rows.append(Row(scenario, "server CPU, % of its core", t, p, "{:.0f}", ratio=False))
            t, p = get(tr, "setupS"), get(pr, "setupS")
            rows.append(Row(scenario, "join all, until server idle, s", t, p, "{:.1f}"))
            t, p = get(tr, "missingDeliveries"), get(pr, "missingDeliveries")
            rows.append(Row(scenario, "acked but not delivered", t, p, "{:.0f}", ratio=False))
            loadgen_row(scenario, tr, pr)
        elif scenario == "latency":
            count = int(tr.get("medianOf") or pr.get("medianOf") or 1)
            of = f" (median of {count})" if count > 1 else ""
            for who, res in runs:
                if res and res.get("roundsOk", count) < count:
                    notes.append(
                        f"latency/{who}: the medians are of the {res['roundsOk']} rounds of "
                        f"{count} that did not fail"
                    )
            for key, label in (("p50Ms", "p50 latency, ms"), ("p99Ms", "p99 latency, ms")):
                t, p = get(tr, key), get(pr, key)
                met = None
                if key == "p99Ms":
                    met = (
                        False
                        if t is None
                        else (None if p is None or math.isnan(t) else bool(t <= p))
                    )
                rows.append(
                    Row(
                        scenario,
                        label + of,
                        t,
                        p,
                        "{:.2f}",
                        "<= peer" if met is not None else "",
                        met,
                    )
                )
            t, p = get(tr, "maxMs"), get(pr, "maxMs")
            rows.append(Row(scenario, f"max latency, ms{of}", t, p, "{:.2f}"))
            drain = get(tr, "drainS") or get(pr, "drainS")
            t, p = get(tr, "lossPct"), get(pr, "lossPct")
            worst = f" (max of {count})" if count > 1 else ""
            rows.append(
                Row(
                    scenario,
                    f"not delivered within {drain:g} s, %{worst}",
                    t,
                    p,
                    "{:.2f}",
                    ratio=False,
                )
            )
            t, p = get(tr, "serverCpuUsPerDelivered"), get(pr, "serverCpuUsPerDelivered")
            rows.append(Row(scenario, f"server CPU µs / delivered msg{of}", t, p, "{:.2f}"))
            t, p = get(tr, "setupS"), get(pr, "setupS")
            rows.append(Row(scenario, f"join all, until server idle, s{of}", t, p, "{:.1f}"))
            t, p = get(tr, "window", "serverCpuPct"), get(pr, "window", "serverCpuPct")
            rows.append(
                Row(scenario, f"server CPU, % of its core{of}", t, p, "{:.0f}", ratio=False)
            )
            loadgen_row(scenario, tr, pr, of)
        elif scenario == "memory":
            t, p = get(tr, "kibPerConn"), get(pr, "kibPerConn")
            met = None if t is None or math.isnan(t) else t <= 12
            rows.append(
                Row(scenario, "RSS per idle joined conn, KiB", t, p, "{:.1f}", "<= 12", met)
            )
            conns = tr.get("conns") or pr.get("conns") or 0
            t, p = get(tr, "held"), get(pr, "held")
            met = None if t is None or math.isnan(t) else t >= conns
            rows.append(
                Row(scenario, "connections held", t, p, "{:,.0f}", f"{conns:,}", met, ratio=False)
            )
            t, p = get(tr, "rssHeldKiB"), get(pr, "rssHeldKiB")
            rows.append(
                Row(scenario, "server RSS held, MiB", _mib(t), _mib(p), "{:.1f}", ratio=True)
            )
            t, p = get(tr, "connectsPerS"), get(pr, "connectsPerS")
            rows.append(Row(scenario, "connect+join rate, conns/s", t, p, "{:,.0f}"))
            t, p = get(tr, "settledS"), get(pr, "settledS")
            rows.append(Row(scenario, "then busy until idle, s", t, p, "{:.1f}", ratio=False))
        elif scenario == "churn":
            t, p = get(tr, "errors"), get(pr, "errors")
            met = None if t is None or math.isnan(t) else t == 0
            rows.append(Row(scenario, "errors", t, p, "{:.0f}", "0", met, ratio=False))
            t, p = get(tr, "completed"), get(pr, "completed")
            rows.append(Row(scenario, "lifecycles completed", t, p, "{:,.0f}", ratio=False))
            t, p = get(tr, "joinMs", "p99"), get(pr, "joinMs", "p99")
            rows.append(Row(scenario, "p99 join latency, ms", t, p, "{:.2f}"))
            t, p = get(tr, "connectMs", "p99"), get(pr, "connectMs", "p99")
            rows.append(Row(scenario, "p99 connect (handshake), ms", t, p, "{:.2f}"))
            t, p = get(tr, "maxConcurrent"), get(pr, "maxConcurrent")
            rows.append(
                Row(scenario, "most connections open at once", t, p, "{:.0f}", ratio=False)
            )
            t, p = get(tr, "serverCpuMsPerConn"), get(pr, "serverCpuMsPerConn")
            rows.append(Row(scenario, "server CPU ms / connection", t, p, "{:.2f}"))
            for key, label in (
                ("rssStartKiB", "RSS fresh, MiB"),
                ("rssBeforeKiB", "RSS before (after warm-up), MiB"),
                ("rssMaxDuringKiB", "RSS highest during, MiB"),
                ("rssAfterKiB", "RSS after, MiB"),
            ):
                t, p = get(tr, key), get(pr, key)
                rows.append(Row(scenario, label, _mib(t), _mib(p), "{:.1f}", ratio=False))
            t, p = get(tr, "rssGrowthPct"), get(pr, "rssGrowthPct")
            met = None if t is None or math.isnan(t) else t <= 5
            rows.append(Row(scenario, "RSS growth, %", t, p, "{:+.1f}", "<= +5", met, ratio=False))
            loadgen_row(scenario, tr, pr)
        if rounds is None and scenario != "memory":  # the latency rounds: noted above
            notes += window_notes(scenario, runs)
    return rows, notes


# --- the cluster scenario ---------------------------------------------------------


def redis_spec(args: argparse.Namespace, workdir: Path) -> ServerSpec:
    def argv(port: int) -> list[str]:
        data = workdir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        return [
            args.redis_server,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(data),
            *REDIS_OPTIONS,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]

    return ServerSpec("redis", "redis-server", argv)


def redis_ping(port: int, timeout: float = 10.0) -> None:
    """Wait until redis-server on ``port`` answers PING (bounded)."""
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                last = sock.recv(64).decode(errors="replace").strip()
                if last == "+PONG":
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"redis-server does not answer PING within {timeout:g} s: {last}")


def redis_version(redis_server: str) -> str:
    path = shutil.which(redis_server)
    if not path:
        return "not found"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def run_cluster(
    args: argparse.Namespace,
    params: dict[str, Any],
    workdir: Path,
    key: str,
    nodes: int,
    with_redis: bool,
    notes: list[str],
) -> dict[str, Any]:
    """One run of the cluster scenario: a fresh redis-server (if ``with_redis``)
    and ``nodes`` fresh triochat nodes, then the load generator; everything
    stopped (bounded) before returning."""
    where = f"cluster/{key}"
    redis: Server | None = None
    servers: list[Server] = []
    try:
        redis_url = None
        if with_redis:
            if not shutil.which(args.redis_server):
                return {"ok": False, "error": f"{args.redis_server} not found on PATH"}
            redis = Server(redis_spec(args, workdir), args.loadgen_cpu, workdir)
            redis.wait_ready()
            redis_ping(redis.port)
            redis_url = f"redis://{LOOPBACK}:{redis.port}/0"
        for k in range(nodes):

            def argv(port: int, url: str | None = redis_url) -> list[str]:
                return triochat_argv(args, port, url)

            spec = ServerSpec(f"{key}-node{k + 1}", f"triochat node {k + 1}", argv)
            servers.append(Server(spec, args.server_cpu, workdir))
        for server in servers:
            server.wait_ready()
        if redis is not None and redis.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited at start: {redis.stderr_tail()}")
        side = {"redis": redis} if redis is not None else None
        result = run_loadgen("cluster", params, servers, args.loadgen_cpu, args.verbose, side)
        result["rssAtEndKiB"] = [
            server_rss_kib(s.pid) if s.proc.poll() is None else None for s in servers
        ]
        for s in [*servers, *([redis] if redis else [])]:
            if s.proc.poll() is not None:
                notes.append(f"{where}: {s.spec.label} DIED during the run")
        if redis is not None and redis.proc.poll() is None:
            result["redisRssAtEndKiB"] = server_rss_kib(redis.pid)
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc)}
    finally:
        # Nodes first (they may talk to Redis while they drain), then Redis.
        exited = {id(s) for s in servers if s.proc.poll() is not None}
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


def build_cluster_rows(
    results: dict[str, dict[str, Any]],
) -> tuple[list[list[str]], list[str]]:
    """The cluster table (one column per run, ratios 2 nodes / 1 node) and notes."""
    rows: list[list[str]] = []
    notes: list[str] = []
    runs = [results.get(key, {}) for key, *_ in CLUSTER_RUNS]

    def num(res: dict[str, Any], *path: str) -> float:
        value = get(res, *path) if res.get("ok") else math.nan
        return math.nan if value is None else value

    def show(value: float, fmt: str) -> str:
        return "n/a" if math.isnan(value) else fmt.format(value)

    def ratio(a: float, b: float) -> str:
        if math.isnan(a) or math.isnan(b) or b == 0:
            return ""
        return f"{a / b:.2f}x"

    def row(metric: str, values: list[float], fmt: str, with_ratio: bool = True) -> None:
        cells = ["cluster", metric, *(show(v, fmt) for v in values)]
        if with_ratio:
            cells += [ratio(values[2], values[1]), ratio(values[2], values[0])]
        else:
            cells += ["", ""]
        rows.append(cells)

    def by_node(res: dict[str, Any], path: tuple[str, ...], fmt: str, one: float) -> str:
        """The per-node list at ``path`` as "a + b", else ``one`` (a single node)."""
        values: Any = res if res.get("ok") else None
        for key in path:
            values = values.get(key) if isinstance(values, dict) else None
        if isinstance(values, list) and values:
            return " + ".join(fmt.format(v) for v in values)
        return show(one, fmt)

    def text_row(metric: str, cells: list[str]) -> None:
        rows.append(["cluster", metric, *cells, "", ""])

    def latency_rows(prefix: str, label: str) -> None:
        """p50/p99 rows of ``{prefix}Ms`` and its same-node and cross-node splits
        (the cross-node ones only when the third run has them)."""
        for key, name in (
            (f"{prefix}Ms", label),
            (f"{prefix}SameNodeMs", "  sender on the same node"),
            (f"{prefix}CrossNodeMs", "  sender on the other node"),
        ):
            for pct in ("p50", "p99"):
                values = [num(r, key, pct) for r in runs]
                if key == f"{prefix}CrossNodeMs" and math.isnan(values[2]):
                    continue
                row(f"{name} {pct}, ms", values, "{:.2f}")

    for (key, label, _nodes, _redis), res in zip(CLUSTER_RUNS, runs, strict=True):
        if not res:
            continue
        problems = res.get("problems") or {}
        if not res.get("ok"):
            notes.append(f"cluster/{key} ({label}): FAILED: {res.get('error')}")
        if problems.get("count"):
            notes.append(
                f"cluster/{key}: {problems['count']} client problems {problems['kinds']}; "
                f"e.g. {problems['examples'][:2]}"
            )
        if not res.get("ok"):
            continue
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

    text_row(
        "clients (senders) per node",
        [
            " + ".join(
                f"{c} ({s})"
                for c, s in zip(
                    res.get("clientsByNode") or [res.get("clients", "?")],
                    res.get("sendersByNode") or [res.get("senders", "?")],
                    strict=False,
                )
            )
            if res.get("ok")
            else "n/a"
            for res in runs
        ],
    )
    row("delivered msgs/s", [num(r, "deliveredPerS") for r in runs], "{:,.0f}")
    text_row(
        "delivered msgs/s, by node",
        [by_node(r, ("deliveredPerSByNode",), "{:,.0f}", num(r, "deliveredPerS")) for r in runs],
    )
    latency_rows("e2e", "end-to-end latency")
    for pct in ("p50", "p99"):
        row(f"say -> ack {pct}, ms", [num(r, "ackMs", pct) for r in runs], "{:.2f}")
    paced = next((r.get("pacedRate") for r in runs if r.get("ok") and r.get("pacedRate")), 0)
    if paced:
        latency_rows("pacedE2e", f"at {paced:g} msgs/s: end-to-end latency")
    triochat_us = [num(r, "serverCpuUsPerDelivered") for r in runs]
    redis_us = [num(r, "redisCpuUsPerDelivered") for r in runs]
    redis_us[0] = 0.0 if runs[0].get("ok") else math.nan
    row("triochat CPU µs / delivered msg (all nodes)", triochat_us, "{:.2f}")
    row("redis-server CPU µs / delivered msg", redis_us, "{:.2f}")
    row(
        "total CPU µs / delivered msg",
        [t + r for t, r in zip(triochat_us, redis_us, strict=True)],
        "{:.2f}",
    )
    row(
        "triochat CPU, % of a core (all nodes)",
        [num(r, "window", "serverCpuPct") for r in runs],
        "{:.0f}",
        with_ratio=False,
    )
    text_row(
        "triochat CPU, % of a core, by node",
        [
            by_node(r, ("window", "serversCpuPct"), "{:.0f}", num(r, "window", "serverCpuPct"))
            for r in runs
        ],
    )
    redis_pct = [num(r, "window", "sideCpuPct", "redis") for r in runs]
    redis_pct[0] = 0.0 if runs[0].get("ok") else math.nan
    row("redis-server CPU, % of a core", redis_pct, "{:.0f}", with_ratio=False)
    row(
        "acked but not delivered",
        [num(r, "missingDeliveries") for r in runs],
        "{:,.0f}",
        with_ratio=False,
    )
    row("join all, until servers idle, s", [num(r, "setupS") for r in runs], "{:.1f}")
    row(
        "load generator CPU, % of a core",
        [num(r, "window", "loadgenCpuPct") for r in runs],
        "{:.0f}",
        with_ratio=False,
    )
    row(
        "other processes' CPU, % (noise)",
        [num(r, "window", "otherCpuPct") for r in runs],
        "{:.0f}",
        with_ratio=False,
    )
    return rows, notes


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


MAIN_HEADER = ["scenario", "metric", "triochat", "websockets peer", "ratio", "target", "met?"]
FLOOR_HEADER = [
    "scenario",
    "metric",
    "triochat",
    "bare trio-websocket",
    "websockets peer",
    "triochat - bare",
]
CLUSTER_HEADER = [
    "scenario",
    "metric",
    *(label for _key, label, *_ in CLUSTER_RUNS),
    "2 nodes / 1 node + Redis",
    "2 nodes / 1 node",
]


def render(rows: list[Row] | list[list[str]], header: list[str] = MAIN_HEADER) -> str:
    table = [header, *(row.cells() if isinstance(row, Row) else row for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in table[1:])])


# --- profiling (optional) --------------------------------------------------------


def profile_saturation(args: argparse.Namespace, spec: ServerSpec, workdir: Path) -> None:
    """An extra triochat saturation run under py-spy; prints the top functions."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(args.sizes["saturation"])
    params["durationS"] = max(params["durationS"], 10)
    server = Server(spec, args.server_cpu, workdir)
    try:
        server.wait_ready()
        raw = out_dir / "triochat-saturation.txt"
        svg = out_dir / "triochat-saturation.svg"
        record = [pyspy, "record", "--pid", str(server.pid), "--rate", "100", "--nonblocking"]
        record += ["--duration", str(int(params["warmupS"] + params["durationS"]))]
        spies = []
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            cmd = pinned([*record, "--format", fmt, "-o", str(path)], args.loadgen_cpu)
            spy = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            _CHILDREN.append(spy)
            spies.append(spy)
        run_loadgen("saturation", params, server, args.loadgen_cpu, args.verbose)
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        server.stop()
    print(f"\npy-spy profile of triochat in saturation: {raw}, {svg}")
    print_top(raw)


def print_top(raw: Path, top: int = 10) -> None:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        print("(no samples)")
        return
    print(f"top {top} by own time ({samples} samples):")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")
    print(f"top {top} by total time (callees included; entry points left out):")
    entry = re.compile(r"<frozen runpy>|triochat/(cli|__main__)\.py|^(run|unrolled_run) \(trio/")
    ranked = [(f, c) for f, c in total.most_common() if not entry.search(f)]
    for frame, count in ranked[:top]:
        print(f"  {100 * count / samples:5.1f}%  {frame}")


# --- main ------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, about a minute")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument(
        "--servers",
        default="triochat,peer,floor",
        help="any of triochat, peer, floor (bare trio-websocket: the memory scenario only)",
    )
    parser.add_argument("--saturation-seconds", type=float, help="measured window")
    parser.add_argument(
        "--inflight", type=int, help="says in flight per sender (default 32; saturation, cluster)"
    )
    parser.add_argument("--latency-seconds", type=float, help="measured window")
    parser.add_argument(
        "--latency-rounds",
        type=int,
        metavar="N",
        help="run the latency scenario's servers alternately N times (triochat, peer, "
        "triochat, ...) and show the medians, and every round in a table of its own "
        "(default 5, 1 with --quick)",
    )
    parser.add_argument("--memory-conns", type=int, help="idle connections (default 10000)")
    parser.add_argument("--churn-seconds", type=float, help="measured window")
    parser.add_argument("--cluster-seconds", type=float, help="measured window")
    parser.add_argument(
        "--redis-server", default="redis-server", help="redis-server binary (cluster scenario)"
    )
    parser.add_argument(
        "--outbox-frames", type=int, help="triochat --outbox-frames (default: its own)"
    )
    parser.add_argument(
        "--triochat-arg", action="append", default=[], help="extra triochat option"
    )
    parser.add_argument(
        "--floor-arg",
        action="append",
        default=[],
        help="extra floor_trio_websocket.py option (e.g. --floor-arg=--message-queue-size=4)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs 0 and 1")
    parser.add_argument("--json", help="write every raw result to this file")
    parser.add_argument("--profile", metavar="DIR", help="then profile triochat (py-spy) in DIR")
    parser.add_argument(
        "--verbose", action="store_true", help="show the load generator's progress"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="before each run, wait up to this many seconds for the machine to be idle "
        "(default 30, 0 with --quick)",
    )
    args = parser.parse_args()
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.server_keys = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_keys) - {"triochat", "peer", "floor"}
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    sizes = {name: dict(p) for name, p in (QUICK if args.quick else FULL).items()}
    overrides = (
        ("saturation", "durationS", args.saturation_seconds),
        ("saturation", "inflight", args.inflight),
        ("cluster", "inflight", args.inflight),
        ("cluster", "durationS", args.cluster_seconds),
        ("latency", "durationS", args.latency_seconds),
        ("memory", "conns", args.memory_conns),
        ("churn", "durationS", args.churn_seconds),
    )
    for scenario, key, value in overrides:
        if value is not None:
            sizes[scenario][key] = value
    args.sizes = sizes
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 30.0
    if args.latency_rounds is None:
        args.latency_rounds = 1 if args.quick else 5
    if args.latency_rounds < 1:
        parser.error("--latency-rounds must be 1 or more")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    args.server_cpu = 0 if pin else None
    args.loadgen_cpu = 1 if pin else None
    return args


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _kill_children()
        for s, handler in old.items():
            signal.signal(s, handler)


def main() -> int:
    args = parse_args()
    for module in ("triochat", "websockets"):
        try:
            __import__(module)
        except ImportError:
            sys.exit(f"{sys.executable} cannot import {module}: run with the dev venv's python")
    node_version = ensure_node()
    nofile = raise_file_limit()
    if args.loadgen_cpu is not None:
        os.sched_setaffinity(0, {args.loadgen_cpu})  # this script stays off the server's CPU
    specs = [s for s in server_specs(args) if s.key in args.server_keys]
    info = machine_info(node_version)
    pinning = (
        f"server on CPU {args.server_cpu}, load generator on CPU {args.loadgen_cpu}"
        if args.server_cpu is not None
        else "no CPU pinning"
    )
    info.append(f"{pinning}; RLIMIT_NOFILE {nofile}; {'quick' if args.quick else 'full'} run")
    triochat_argv = " ".join(specs[0].argv(0)[1:]) if specs and specs[0].key == "triochat" else ""
    if triochat_argv:
        info.append(f"triochat: python {triochat_argv.replace('--port 0', '--port <free>')}")
    floor = next((s for s in specs if s.key == "floor"), None)
    if floor is not None and "memory" in args.scenarios:
        floor_argv = " ".join(floor.argv(0)[1:]).replace(str(HERE.parent) + "/", "")
        info.append(f"memory floor: python {floor_argv.replace('--port 0', '--port <free>')}")
    if "cluster" in args.scenarios:
        redis_argv = " ".join(repr(a) if a == "" else a for a in REDIS_OPTIONS)
        info.append(
            f"cluster: redis-server {redis_version(args.redis_server)} --port <free> "
            f"--bind {LOOPBACK} {redis_argv} (fresh for each run, in a temp dir); nodes: "
            f"triochat as above + --redis redis://{LOOPBACK}:<port>/0, clients round-robin "
            "over the nodes' ports"
        )
        if args.server_cpu is not None:
            info.append(
                f"cluster pinning: every triochat node on CPU {args.server_cpu} (the same one "
                f"core for 1 and 2 nodes); redis-server and the load generator on CPU "
                f"{args.loadgen_cpu}"
            )
    for line in info:
        print(line)
    results: dict[str, dict[str, Any]] = {}
    server_notes: list[str] = []
    source = source_fingerprint()
    started = time.monotonic()
    with cleanup(), tempfile.TemporaryDirectory(prefix="triochat-bench-") as tmp:
        workdir = Path(tmp)
        for scenario in args.scenarios:
            params = args.sizes[scenario]
            results[scenario] = {}
            if scenario == "cluster":
                for key, label, nodes, with_redis in CLUSTER_RUNS:
                    quiet_first(args)
                    t0 = time.monotonic()
                    print(f"... cluster / {label}: {json.dumps(params)}", file=sys.stderr)
                    results[scenario][key] = run_cluster(
                        args, params, workdir, key, nodes, with_redis, server_notes
                    )
                    print(f"    done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                continue
            if scenario == "latency":
                results[scenario] = run_latency(args, params, specs, workdir, server_notes)
                continue
            for spec in specs:
                if spec.key in MEMORY_ONLY and scenario != "memory":
                    continue
                results[scenario][spec.key] = run_server(
                    args, scenario, params, spec, workdir, scenario, server_notes
                )
        profile_pending = bool(args.profile and specs and specs[0].key == "triochat")
        if source_fingerprint() != source:
            server_notes.append(
                "triochat's source (src/) CHANGED during the run: the rows may mix versions"
            )
        rows, notes = build_rows({k: v for k, v in results.items() if k != "cluster"})
        if rows:
            print()
            print(render(rows))
        latency_rounds = results.get("latency", {}).get("rounds") or []
        if len(latency_rounds) > 1:
            round_rows, round_notes = build_latency_round_rows(latency_rounds)
            notes += round_notes
            print()
            print(render(round_rows, LATENCY_ROUNDS_HEADER))
        floor_rows, floor_notes = build_floor_rows(results.get("memory", {}))
        notes += floor_notes
        if floor_rows:
            print()
            print(render(floor_rows, FLOOR_HEADER))
        if "cluster" in results:
            cluster_rows, cluster_notes = build_cluster_rows(results["cluster"])
            notes += cluster_notes
            print()
            print(render(cluster_rows, CLUSTER_HEADER))
        print()
        for note in [*notes, *server_notes]:
            print(f"note: {note}")
        print(f"total time {time.monotonic() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"info": info, "sizes": args.sizes, "results": results}, indent=2)
            )
        if profile_pending:
            profile_saturation(args, specs[0], workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
