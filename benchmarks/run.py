"""Benchmarks: triochat against a reference `websockets` server, in one run.

    python benchmarks/run.py                 # every scenario, full size (about 16 min)
    python benchmarks/run.py --quick         # every scenario, small numbers (about a minute)
    python benchmarks/run.py --only saturation,latency
    python benchmarks/run.py --only latency --latency-rounds 5
    python benchmarks/run.py --only churn --churn-rounds 5
    python benchmarks/run.py --json /tmp/bench.json --profile /tmp/profile
    python benchmarks/run.py --only cluster  # one node vs two nodes + Redis
    python benchmarks/run.py --only workers --servers triochat  # --workers 1 vs 2
    python benchmarks/run.py --only pauses   # 19,000 connections: the longest stall

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

The churn scenario runs its servers alternately too, ``--churn-rounds``
times (default 3, 1 with --quick): its rows are the medians (errors: the
highest), and a "churn rounds" table shows each round's CPU per connection.

The memory scenario also runs a third server, `floor_trio_websocket.py`: the
same protocol subset on bare trio + trio-websocket, the least an idle joined
connection can cost with trio-websocket underneath. Its figures get a small
table of their own (triochat, bare trio-websocket, peer; triochat - bare).

The cluster scenario is triochat only: the saturation load against one node,
one node with ``--redis``, and two nodes with ``--redis`` (the same clients,
half on each node's port), each with a fresh ``redis-server`` of its own
(needs ``redis-server`` on PATH). The nodes share CPU 0; redis-server runs
on CPU 1 with the load generator. Its table's ratios are two nodes / one.

The workers scenario is triochat only too: the saturation load against
``--workers 1`` and ``--workers 2``, both with ``--redis`` (a fresh
``redis-server`` each), on the one port. triochat is not pinned there (a
second worker needs a second core); redis-server and the load generator
stay on CPU 1, so the second worker competes with them for it. Its table's
ratio is two workers / one.

The pauses scenario holds 19,000 connections (all this machine lets one
process hold) while one room of 100 hears 50 messages/s for 60 s: delivery
latency to p99.9 and the maximum for both servers, and triochat's own
longest loop stall and GC pause, read from its /metrics (#16 goal 4).

Not part of the test suite. Every child process is killed at the end,
every wait is bounded, everything is on 127.0.0.1.

This file only reads the options and calls the package next to it,
``bench/``: ``processes`` (starting and stopping servers and the load
generator, RSS, the quiet-machine wait), ``servers`` (their command lines),
``runs`` (one run of a fresh server), ``scenarios/`` (one module per
scenario: sizes, runner, rows, tables of its own), ``report`` (rows as data,
the tables and their notes), ``machine`` (the header, Node, the file limit)
and ``profile`` (--profile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import (
    ensure_node,
    machine_info,
    raise_file_limit,
    source_fingerprint,
)
from bench.processes import cleanup
from bench.profile import profile_saturation
from bench.report import render
from bench.results import Result
from bench.runs import Bench
from bench.scenarios import SCENARIOS, report
from bench.servers import SERVER_KEYS, ServerOptions, describe_argv, server_specs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, about a minute")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument(
        "--servers",
        default=",".join(SERVER_KEYS),
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
    parser.add_argument(
        "--pauses-conns", type=int, help="connections held in the pauses scenario (default 19000)"
    )
    parser.add_argument("--churn-seconds", type=float, help="measured window")
    parser.add_argument(
        "--churn-rounds",
        type=int,
        metavar="N",
        help="run the churn scenario's servers alternately N times and show the medians, "
        "and every round's CPU per connection in a table of its own (default 3, 1 with --quick)",
    )
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
    unknown = set(args.server_keys) - set(SERVER_KEYS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    sizes = {name: dict(s.quick if args.quick else s.full) for name, s in SCENARIOS.items()}
    overrides = (
        ("saturation", "durationS", args.saturation_seconds),
        ("saturation", "inflight", args.inflight),
        ("cluster", "inflight", args.inflight),
        ("cluster", "durationS", args.cluster_seconds),
        ("latency", "durationS", args.latency_seconds),
        ("memory", "conns", args.memory_conns),
        ("pauses", "conns", args.pauses_conns),
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
    if args.churn_rounds is None:
        args.churn_rounds = 1 if args.quick else 3
    if args.churn_rounds < 1:
        parser.error("--churn-rounds must be 1 or more")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    args.server_cpu = 0 if pin else None
    args.loadgen_cpu = 1 if pin else None
    return args


def header(args: argparse.Namespace, bench: Bench, node_version: str, nofile: int) -> list[str]:
    """The lines printed before the tables (and kept in --json as "info")."""
    info = machine_info(node_version)
    pinning = (
        f"server on CPU {bench.server_cpu}, load generator on CPU {bench.loadgen_cpu}"
        if bench.server_cpu is not None
        else "no CPU pinning"
    )
    info.append(f"{pinning}; RLIMIT_NOFILE {nofile}; {'quick' if args.quick else 'full'} run")
    if bench.specs and bench.specs[0].key == "triochat":
        info.append(f"triochat: {describe_argv(bench.specs[0])}")
    for name, scenario in SCENARIOS.items():
        if name in args.scenarios and scenario.describe is not None:
            info += scenario.describe(bench)
    return info


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
    options = ServerOptions(
        outbox_frames=args.outbox_frames,
        triochat_args=tuple(args.triochat_arg),
        floor_args=tuple(args.floor_arg),
        redis_server=args.redis_server,
    )
    with cleanup(), tempfile.TemporaryDirectory(prefix="triochat-bench-") as tmp:
        bench = Bench(
            specs=tuple(s for s in server_specs(options) if s.key in args.server_keys),
            servers=options,
            server_cpu=args.server_cpu,
            loadgen_cpu=args.loadgen_cpu,
            wait_quiet=args.wait_quiet,
            latency_rounds=args.latency_rounds,
            churn_rounds=args.churn_rounds,
            verbose=args.verbose,
            workdir=Path(tmp),
        )
        info = header(args, bench, node_version, nofile)
        for line in info:
            print(line)
        results: dict[str, Result] = {}
        source = source_fingerprint()
        started = time.monotonic()
        for name in args.scenarios:
            scenario = SCENARIOS[name]
            results[name] = scenario.run(bench, scenario.load(args.sizes[name]))
        if source_fingerprint() != source:
            bench.notes.append(
                "triochat's source (src/) CHANGED during the run: the rows may mix versions"
            )
        notes: list[str] = []
        for table in report(results):
            notes += table.notes
            if table.rows:
                print()
                print(render(table))
        print()
        for note in [*notes, *bench.notes]:
            print(f"note: {note}")
        print(f"total time {time.monotonic() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"info": info, "sizes": args.sizes, "results": results}, indent=2)
            )
        if args.profile and bench.specs and bench.specs[0].key == "triochat":
            profile_saturation(bench, bench.specs[0], args.sizes["saturation"], Path(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
