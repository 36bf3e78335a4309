"""Process control: the servers and the load generator as child processes.

Rule 1: every child leads a process group of its own and is registered
here as it starts (`start`), so `cleanup` can kill whatever is left when
the run ends, fails or is interrupted (SIGINT, SIGTERM).

Rule 2: every wait is bounded: a server that will not listen, will not
stop on SIGTERM, or a load generator past its watchdog is killed.

Also here: CPU pinning (taskset), a free loopback port, the server's RSS
from ``/proc``, and the wait for a quiet machine before each run. The load
generator itself samples the server's CPU time and RSS at the edges of its
measured window (`loadgen.mjs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from .results import NOISY, Params, Result

__all__ = [
    "BENCHMARKS",
    "LOOPBACK",
    "REPO",
    "Load",
    "Server",
    "ServerSpec",
    "cleanup",
    "free_port",
    "pinned",
    "redis_ping",
    "run_loadgen",
    "server_rss_kib",
    "start",
    "wait_for_quiet",
]

BENCHMARKS: Final = Path(__file__).resolve().parent.parent
"""The ``benchmarks/`` folder: the load generator and the reference servers."""
REPO: Final = BENCHMARKS.parent
LOOPBACK: Final = "127.0.0.1"

_CHILDREN: list[subprocess.Popen[bytes]] = []


def start(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new process group, killed by `cleanup`.

    Args:
        argv: the command line.
        **popen: more `subprocess.Popen` arguments (Any: they are Popen's own).
    """
    proc = subprocess.Popen(argv, start_new_session=True, **popen)
    _CHILDREN.append(proc)
    return proc


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


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    """Kill every child at the end, and on SIGINT or SIGTERM (then exit)."""
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _kill_children()
        for s, handler in old.items():
            signal.signal(s, handler)


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


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """A server to start: its key (in results and notes), label and command line."""

    key: str
    label: str
    argv: Callable[[int], list[str]]
    """The command line for a given port."""


class Server:
    """A server subprocess on a fresh port; `stop` ends it (bounded)."""

    def __init__(self, spec: ServerSpec, cpu: int | None, workdir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.stderr_path = workdir / f"{spec.key}-{self.port}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = start(
            pinned(spec.argv(self.port), cpu),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        self.exit_note = ""
        """Why the server's end was not clean ("" if it was)."""

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the server: same pid

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Return once the port accepts connections.

        Raises:
            RuntimeError: the server exited, or did not listen within ``timeout`` s.
        """
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
        """SIGTERM, then SIGKILL after ``timeout`` s; `exit_note` says if it was not clean."""
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


def redis_ping(port: int, timeout: float = 10.0) -> None:
    """Wait until redis-server on ``port`` answers PING (bounded).

    Raises:
        RuntimeError: no ``+PONG`` within ``timeout`` s.
    """
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


@dataclasses.dataclass(frozen=True)
class Load:
    """One load generator run's scenario: its name, sizes and watchdog."""

    scenario: str
    params: Params
    deadline_s: float
    """The longest the load generator may take (it stops itself after that)."""


def run_loadgen(
    load: Load,
    servers: Sequence[Server],
    cpu: int | None,
    verbose: bool,
    side: dict[str, Server] | None = None,
) -> Result:
    """Run the load generator against ``servers`` (clients spread over them
    round-robin, their CPU summed); ``side`` processes' CPU is measured
    separately. Returns its result, or ``{"ok": False, "error": ...}``."""
    cfg = {
        "scenario": load.scenario,
        "url": servers[0].url,
        "serverPid": servers[0].pid,
        "clkTck": os.sysconf("SC_CLK_TCK"),
        "deadlineS": load.deadline_s,
        "verbose": verbose,
        **load.params,
    }
    if len(servers) > 1:
        cfg["urls"] = [s.url for s in servers]
        cfg["serverPids"] = [s.pid for s in servers]
    if side:
        cfg["sidePids"] = {name: s.pid for name, s in side.items()}
    proc = start(
        pinned(["node", str(BENCHMARKS / "loadgen.mjs"), json.dumps(cfg)], cpu),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        cwd=BENCHMARKS,
    )
    try:
        out, err = proc.communicate(timeout=load.deadline_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        return {"ok": False, "error": "load generator timed out (killed)"}
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result: Result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (err or b"").decode(errors="replace").strip()[-500:]
        return {"ok": False, "error": f"load generator exit {proc.returncode}: {tail}"}
    return result


def _machine_busy_s() -> float:
    """CPU seconds used so far by the whole machine (all CPUs, all processes)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))  # all but idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _wait_quiet(max_wait: float, limit_pct: float = NOISY) -> float:
    """Wait (at most ``max_wait`` s) for a second in which the machine is nearly
    idle; returns the last second's CPU use in % of a core."""
    end = time.monotonic() + max_wait
    while True:
        before = _machine_busy_s()
        time.sleep(1.0)
        pct = 100 * (_machine_busy_s() - before)
        if pct < limit_pct or time.monotonic() >= end:
            return pct


def wait_for_quiet(max_wait: float) -> None:
    """Before a run: wait (at most ``max_wait`` s, none if 0) for an idle machine."""
    if max_wait > 0:
        busy = _wait_quiet(max_wait)
        if busy >= NOISY:
            print(f"    machine still busy ({busy:.0f}% of a core)", file=sys.stderr)
