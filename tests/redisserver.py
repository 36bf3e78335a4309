"""A real ``redis-server`` for tests: started on a free port, killable, restartable.

Plain synchronous stdlib code, usable from sync and trio tests. Persistence is
AOF with ``appendfsync always`` (what docs/operations.md asks of a cluster that
must never lose an acked message), so a ``kill -9`` + `restart` keeps what was
written. Without ``redis-server`` on PATH the test is skipped with a reason
(and conftest turns every skip into a failure in CI).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server process on ``port`` with its data in ``directory``."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the server on the same port and data; wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while not self.answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer within 10 s:\n{self.log()}")
            time.sleep(0.02)

    def answers(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """``kill -9``: no shutdown, no save (the AOF keeps what was fsynced)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A started `RedisServer` in ``directory``, killed on exit."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip("redis-server is missing (Debian package 'redis-server')")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()
