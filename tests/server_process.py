"""Run a real triochat server as a subprocess, for tests that need one (browser tests).

Plain synchronous stdlib code: usable from sync tests under pytest-trio.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

# (Ends at a quote too: with --log-format json the line is a JSON object.)
LISTENING_RE = re.compile(r"listening on (https?://[^\s\"]+)")
START_DEADLINE = 10.0
STOP_DEADLINE = 15.0


@dataclass
class ServerProcess:
    """A running server: its URL, port, process and everything it wrote to stderr so far."""

    base_url: str
    port: int
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def output_text(self) -> str:
        return "".join(self.output)

    def kill(self) -> None:
        """SIGKILL the server (no drain, no flush) and reap it; the port is free afterwards."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_DEADLINE)


def _drain(
    stream: IO[str], lines: list[str], first_url: list[str], ready: threading.Event
) -> None:
    """Read stderr line by line until EOF, so the pipe never fills."""
    for line in iter(stream.readline, ""):
        lines.append(line)
        if not ready.is_set():
            match = LISTENING_RE.search(line)
            if match:
                first_url.append(match.group(1).rstrip("/"))
                ready.set()
    ready.set()  # EOF: wake the starter (the process died before listening)


@contextmanager
def run_server(
    *extra_args: str, env: dict[str, str] | None = None, memory: bool = True, port: int = 0
) -> Iterator[ServerProcess]:
    """Start ``python -m triochat --port <port> [--memory]`` and yield it once it listens.

    ``port`` 0 (the default) takes any free port; a given port restarts a
    server on the port of an earlier one (pass the same ``--data-dir`` too).

    Fails (with the collected output) if it does not announce
    ``listening on http://…`` within 10 s. On exit: SIGTERM, wait up to 15 s,
    then kill.
    """
    cmd = [
        sys.executable,
        "-m",
        "triochat",
        "--port",
        str(port),
        *(["--memory"] if memory else []),
        "--log-level",
        "INFO",
        *extra_args,
    ]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=full_env,
    )
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()
    assert proc.stderr is not None
    reader = threading.Thread(
        target=_drain, args=(proc.stderr, lines, url, ready), name="triochat-stderr", daemon=True
    )
    reader.start()
    try:
        ready.wait(START_DEADLINE)
        if not url:
            raise RuntimeError(
                f"triochat did not report 'listening on http://…' within {START_DEADLINE} s "
                f"(exit code {proc.poll()}); command {cmd!r}; output:\n{''.join(lines)}"
            )
        port_match = re.search(r":(\d+)$", url[0])
        assert port_match, f"no port in {url[0]!r}"
        yield ServerProcess(
            base_url=url[0], port=int(port_match.group(1)), proc=proc, output=lines
        )
    finally:
        _stop(proc)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
