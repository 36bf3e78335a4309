"""Where an idle joined WebSocket connection's memory goes: a tracemalloc breakdown.

    python benchmarks/memprofile.py triochat [--conns 1000] [--top 25] [--nframes 40]
    python benchmarks/memprofile.py floor    [--conns 1000]

The server runs in this process, under `tracemalloc`: ``triochat`` (in memory,
no rate limit, no per-IP limit, as ``run.py`` starts it) or ``floor``, the bare
trio-websocket server of ``floor_trio_websocket.py`` (its `handler` with its
default 20 s pings, the protocol of ``subset.py``). The clients run in a
separate process, so their memory is not counted: this script in ``client``
mode, asyncio `websockets` without compression or pings; connection ``i``
joins room ``r{i // 100}`` and keeps reading.

As in the memory scenario of ``run.py`` (``loadgen.mjs``): 10 warm-up
connections join and leave, and 7 s later (triochat's 5 s presence grace has
run out) comes the baseline snapshot; then ``--conns`` connections join, and
once every one has its ``joined`` and the server has been idle for 3 s, the
second snapshot. Both follow a ``gc.collect()``. Their difference divided by
``--conns`` is the heap of one idle joined connection. It prints, per
connection, as markdown tables:

- by group of the allocating file: trio's core, the rest of trio, trio's
  sockets, trio-websocket, wsproto, h11, the application (triochat, or the
  floor: ``floor_trio_websocket.py`` and ``subset.py``), other;
- by allocating file (20 bytes or more);
- the ``--top`` lines that allocated most;
- the application line that caused it: the innermost triochat or floor
  frame of each allocation's traceback (``--nframes`` deep), wherever the
  allocation itself happened;
- the gc-tracked objects by type (count and shallow `sys.getsizeof`).

The first line is the RSS growth, which tracemalloc's own bookkeeping
inflates; ``run.py --only memory`` measures RSS without it. Needs the dev
venv (trio, trio-websocket, websockets and triochat importable). Not part of
the test suite; everything is on 127.0.0.1, every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import linecache
import logging
import re
import resource
import subprocess
import sys
import sysconfig
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import floor_trio_websocket
import trio
from trio_websocket import WebSocketServer, serve_websocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import triochat
from triochat.config import Config
from triochat.server import Server

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"
ROOM_SIZE = 100
WARM_UP_CONNS = 10
WARM_UP_SETTLE = 7.0  # s: past triochat's presence grace (5 s), the warm-up users are gone
IDLE = 3.0  # s with every connection joined, before the second snapshot
JOIN_TIMEOUT = 300.0  # s for a client process to join all its connections
CLOSE_TIMEOUT = 30.0  # s for a client process to close them and exit
FLOOR_PING_INTERVAL = 20.0  # floor_trio_websocket.py's default
MIN_BYTES = 20  # per connection: smaller rows are left out of the file and site tables
SITES = 20  # rows of the application-line table
TYPES = 30  # rows of the gc-tracked objects table

# --- the client process ---------------------------------------------------------


async def run_clients(url: str, conns: int, tag: str) -> None:
    """Open and join ``conns`` connections, say so, hold them until stdin closes."""
    opening = asyncio.Semaphore(100)
    connections: list[ClientConnection] = []
    readers: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        async with opening:
            ws = await connect(url, compression=None, max_size=None, ping_interval=None)
            await join(ws, f"{tag}r{i // ROOM_SIZE}", f"{tag}m{i}")
        connections.append(ws)
        readers.append(asyncio.create_task(keep_reading(ws)))

    await asyncio.gather(*(one(i) for i in range(conns)))
    print(f"joined {len(connections)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    print("closed", flush=True)


async def join(ws: ClientConnection, room: str, name: str) -> None:
    await ws.send(json.dumps({"type": "join", "room": room, "name": name}))
    while json.loads(await ws.recv())["type"] != "joined":
        pass


async def keep_reading(ws: ClientConnection) -> None:
    """Read and drop whatever comes, so nothing piles up in the server."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


# --- the server side ------------------------------------------------------------


async def start_server(kind: str, nursery: trio.Nursery) -> int:
    """Start the server (``triochat`` or ``floor``) in this process; return its port."""
    if kind == "triochat":
        config = Config(
            host=LOOPBACK,
            port=0,
            memory=True,
            rate=0.0,
            max_conns_per_ip=0,
            max_pending_per_ip=0,  # as run.py: 100 clients connect at once from one address
            log_level="WARNING",
        )
        server: Server = await nursery.start(Server(config).run)
        return server.port
    ws_server: WebSocketServer = await nursery.start(
        functools.partial(
            serve_websocket,
            functools.partial(floor_trio_websocket.handler, FLOOR_PING_INTERVAL),
            LOOPBACK,
            0,
            ssl_context=None,
            max_message_size=65536,  # as floor_trio_websocket.main
            message_queue_size=1,
        )
    )
    return ws_server.port


async def open_clients(url: str, conns: int, tag: str) -> trio.Process:
    """Start a client process; return once all its ``conns`` connections have joined."""
    command = [sys.executable, str(SCRIPT), "client", "--url", url]
    command += ["--conns", str(conns), "--tag", tag]
    proc = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = b""
    try:
        with trio.fail_after(JOIN_TIMEOUT):
            while b"joined" not in out:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"the client process exited: {out!r}")
                out += chunk
    except BaseException:
        await close_clients(proc)
        raise
    return proc


async def close_clients(proc: trio.Process) -> None:
    """Close the client process's stdin: it closes its connections and exits."""
    assert proc.stdin is not None
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_TIMEOUT):
            await proc.stdin.aclose()
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@dataclass
class Objects:
    """gc-tracked objects by type: how many, and their shallow size in bytes."""

    counts: Counter[str]
    sizes: Counter[str]

    @classmethod
    def now(cls) -> Objects:
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for obj in gc.get_objects():
            kind = type(obj)
            key = f"{kind.__module__}.{kind.__qualname__}"
            counts[key] += 1
            sizes[key] += sys.getsizeof(obj)
        return cls(counts, sizes)

    def __sub__(self, other: Objects) -> Objects:
        return Objects(self.counts - other.counts, self.sizes - other.sizes)


@dataclass
class State:
    """The server process at one moment: heap snapshot, objects, RSS."""

    snapshot: tracemalloc.Snapshot
    objects: Objects
    rss_kib: int


@dataclass
class Measurement:
    kind: str
    conns: int
    before: State
    after: State


def rss_kib() -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


async def measure(kind: str, conns: int, nframes: int) -> Measurement:
    """The server with no connection, then with ``conns`` idle joined ones."""
    async with trio.open_nursery() as nursery:
        port = await start_server(kind, nursery)
        url = f"ws://{LOOPBACK}:{port}/ws"
        await close_clients(await open_clients(url, WARM_UP_CONNS, "w"))
        await trio.sleep(WARM_UP_SETTLE)
        gc.collect()
        objects, rss = Objects.now(), rss_kib()
        tracemalloc.start(nframes)
        try:
            before = State(tracemalloc.take_snapshot(), objects, rss)
            clients = await open_clients(url, conns, "m")
            try:
                await trio.sleep(IDLE)
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
                tracemalloc.stop()
                after = State(snapshot, Objects.now(), rss_kib())
            finally:
                await close_clients(clients)
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    return Measurement(kind, conns, before, after)


# --- grouping -------------------------------------------------------------------

TRIOCHAT_DIR = Path(triochat.__file__).resolve().parent
FLOOR_FILES = (HERE / "floor_trio_websocket.py", HERE / "subset.py")
FLOOR_GROUP = "floor (floor_trio_websocket.py, subset.py)"
OTHER_GROUP = "other (stdlib, msgspec, ...)"
TRIO_OTHER = "trio other (channels, sync, timeouts, ...)"
#: Library groups by the allocating file's name, the first match wins.
LIBRARY_GROUPS = (
    (
        "trio core (_core: tasks, scopes, nurseries, epoll, parking lots)",
        re.compile(r"/trio/_core/|<attrs generated methods trio\._core\."),
    ),
    (TRIO_OTHER, re.compile(r"<attrs generated methods trio\.")),
    (
        "trio socket (_socket, _highlevel_socket)",
        re.compile(r"/trio/_(socket|highlevel_socket)\.py$"),
    ),
    (TRIO_OTHER, re.compile(r"/trio/")),
    ("trio-websocket", re.compile(r"/trio_websocket/")),
    ("wsproto", re.compile(r"/wsproto/")),
    ("h11", re.compile(r"/h11/")),
    ("stdlib socket.py", re.compile(r"/socket\.py$")),
)
APPLICATION_GROUPS = ("triochat", FLOOR_GROUP)
#: Where `short` cuts a file name: the repository's and the libraries' roots.
PREFIXES = tuple(
    f"{path}/"
    for path in (
        REPO / "src",
        HERE,
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        sysconfig.get_paths()["stdlib"],
    )
)


@functools.cache
def group_of(filename: str) -> str:
    """The group of the code in ``filename`` (as tracemalloc names it)."""
    if not filename.startswith("<"):
        path = Path(filename).resolve()
        if path.is_relative_to(TRIOCHAT_DIR):
            return "triochat"
        if path in FLOOR_FILES:
            return FLOOR_GROUP
    for name, pattern in LIBRARY_GROUPS:
        if pattern.search(filename):
            return name
    return OTHER_GROUP


def short(filename: str) -> str:
    """``filename`` from its package (``trio/_core/_run.py``) or the stdlib's root."""
    for prefix in PREFIXES:
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    _, found, rest = filename.partition("-packages/")  # another site- or dist-packages
    return rest if found else filename


def source(frame: tracemalloc.Frame) -> str:
    """The frame's source line, shortened, escaped for a markdown table."""
    line = linecache.getline(frame.filename, frame.lineno).strip()[:70]
    return line.replace("|", "\\|")


def application_frame(traceback: tracemalloc.Traceback) -> tracemalloc.Frame | None:
    """The innermost frame of triochat or the floor in ``traceback`` (oldest first)."""
    for frame in reversed(traceback):
        if group_of(frame.filename) in APPLICATION_GROUPS:
            return frame
    return None


# --- the report -----------------------------------------------------------------


def kib(size: int, n: int) -> str:
    return f"{size / 1024 / n:.2f}"


def report(m: Measurement, top: int) -> None:
    before, after, n = m.before, m.after, m.conns
    rss_growth = (after.rss_kib - before.rss_kib) / n
    print(
        f"\n# {m.kind}: RSS {before.rss_kib} -> {after.rss_kib} KiB: {rss_growth:.2f} KiB/conn "
        "(RSS under tracemalloc, which adds its own overhead)"
    )
    by_file = after.snapshot.compare_to(before.snapshot, "filename")
    total = sum(s.size_diff for s in by_file)
    blocks = sum(s.count_diff for s in by_file)
    print(f"\n## {m.kind}: tracemalloc diff, {n} idle joined connections")
    print(f"total {kib(total, n)} KiB/conn, {blocks / n:.1f} blocks/conn")
    print_groups(by_file, n)
    print_files(by_file, n)
    print_top_lines(after.snapshot.compare_to(before.snapshot, "lineno"), n, top)
    print_application_lines(after.snapshot.compare_to(before.snapshot, "traceback"), n)
    print_objects(after.objects - before.objects, n)


def print_groups(by_file: list[tracemalloc.StatisticDiff], n: int) -> None:
    sizes: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for stat in by_file:
        group = group_of(stat.traceback[0].filename)
        sizes[group] += stat.size_diff
        blocks[group] += stat.count_diff
    print("\n| group (allocating file) | KiB/conn | blocks/conn |")
    print("|---|---:|---:|")
    for group, size in sizes.most_common():
        print(f"| {group} | {kib(size, n)} | {blocks[group] / n:.1f} |")
    total, total_blocks = sizes.total(), blocks.total()
    print(f"| **total** | **{kib(total, n)}** | {total_blocks / n:.1f} |")


def print_files(by_file: list[tracemalloc.StatisticDiff], n: int) -> None:
    print("\n| file | KiB/conn | blocks/conn |")
    print("|---|---:|---:|")
    for stat in sorted(by_file, key=lambda s: -s.size_diff):
        if stat.size_diff / n < MIN_BYTES:
            break
        name = short(stat.traceback[0].filename)
        print(f"| {name} | {kib(stat.size_diff, n)} | {stat.count_diff / n:.1f} |")


def print_top_lines(by_line: list[tracemalloc.StatisticDiff], n: int, top: int) -> None:
    print(f"\n| top {top} lines | KiB/conn | blocks/conn | source |")
    print("|---|---:|---:|---|")
    for stat in sorted(by_line, key=lambda s: -s.size_diff)[:top]:
        frame = stat.traceback[0]
        print(
            f"| {short(frame.filename)}:{frame.lineno} | {kib(stat.size_diff, n)} "
            f"| {stat.count_diff / n:.1f} | `{source(frame)}` |"
        )


def print_application_lines(by_traceback: list[tracemalloc.StatisticDiff], n: int) -> None:
    sizes: Counter[tracemalloc.Frame | None] = Counter()
    for stat in by_traceback:
        sizes[application_frame(stat.traceback)] += stat.size_diff
    print("\n| application line that caused it (innermost app frame) | KiB/conn |")
    print("|---|---:|")
    for frame, size in sizes.most_common(SITES):
        if size / n < MIN_BYTES:
            break
        if frame is None:
            site = "(no application frame)"
        else:
            site = f"{short(frame.filename)}:{frame.lineno} `{source(frame)}`"
        print(f"| {site} | {kib(size, n)} |")


def print_objects(grown: Objects, n: int) -> None:
    print("\n| gc-tracked objects per connection (type) | count/conn | shallow KiB/conn |")
    print("|---|---:|---:|")
    for name, size in grown.sizes.most_common(TYPES):
        if grown.counts[name] / n < 0.5:
            continue
        print(f"| {name} | {grown.counts[name] / n:.1f} | {kib(size, n)} |")


# --- main -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "kind",
        choices=("triochat", "floor", "client"),
        help="the server to profile (client: the client process this script starts)",
    )
    parser.add_argument("--conns", type=int, default=1000, help="idle joined connections")
    parser.add_argument("--top", type=int, default=25, help="rows of the top lines table")
    parser.add_argument(
        "--nframes", type=int, default=40, help="frames of each allocation's traceback to keep"
    )
    parser.add_argument("--url", help="client: the server's WebSocket URL")
    parser.add_argument("--tag", default="m", help="client: prefix of its rooms and names")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client process inherits
    if args.kind == "client":
        if not args.url:
            parser.error("client needs --url")
        asyncio.run(run_clients(args.url, args.conns, args.tag))
        return
    logging.basicConfig(level=logging.WARNING)
    measurement = trio.run(measure, args.kind, args.conns, args.nframes)
    report(measurement, args.top)


if __name__ == "__main__":
    main()
