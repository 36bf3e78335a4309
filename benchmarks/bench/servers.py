"""The servers under test and beside them: their command lines.

triochat (in memory, every limit off), the reference peer on `websockets`
(`peer_websockets.py`), the bare trio-websocket floor
(`floor_trio_websocket.py`) and, for the cluster scenario, redis-server.
How they are started and stopped is `processes`' business.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Final

from .processes import BENCHMARKS, LOOPBACK, REPO, ServerSpec

__all__ = [
    "REDIS_OPTIONS",
    "SERVER_KEYS",
    "ServerOptions",
    "describe_argv",
    "redis_spec",
    "server_specs",
    "triochat_argv",
]

SERVER_KEYS: Final = ("triochat", "peer", "floor")
"""What ``--servers`` may name, in the order they run."""

# redis-server as the cluster runs it: no RDB snapshots, an append-only file
# fsynced once a second (Redis' usual durable setting; PUBLISH is not written
# to it, whatever the cluster stores is).
REDIS_OPTIONS: Final = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The command-line options that change how the servers are started."""

    outbox_frames: int | None = None
    """triochat ``--outbox-frames`` (None: its own default)."""
    triochat_args: tuple[str, ...] = ()
    floor_args: tuple[str, ...] = ()
    redis_server: str = "redis-server"


def triochat_argv(options: ServerOptions, port: int, redis_url: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "triochat", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--memory", "--rate", "0", "--max-conns-per-ip", "0", "--max-pending-per-ip", "0"]
    argv += ["--log-level", "WARNING"]
    if options.outbox_frames:
        argv += ["--outbox-frames", str(options.outbox_frames)]
    if redis_url:
        argv += ["--redis", redis_url]
    return argv + list(options.triochat_args)


def server_specs(options: ServerOptions) -> list[ServerSpec]:
    """triochat, the peer and the floor, in the order of `SERVER_KEYS`."""

    def triochat(port: int) -> list[str]:
        return triochat_argv(options, port)

    def peer(port: int) -> list[str]:
        return [sys.executable, str(BENCHMARKS / "peer_websockets.py"), "--port", str(port)]

    def floor(port: int) -> list[str]:
        argv = [sys.executable, str(BENCHMARKS / "floor_trio_websocket.py"), "--port", str(port)]
        return argv + list(options.floor_args)

    return [
        ServerSpec("triochat", "triochat", triochat),
        ServerSpec("peer", "websockets peer", peer),
        ServerSpec("floor", "bare trio-websocket floor", floor),
    ]


def redis_spec(options: ServerOptions, workdir: Path) -> ServerSpec:
    """redis-server with `REDIS_OPTIONS`, its data in a folder of ``workdir``."""

    def argv(port: int) -> list[str]:
        data = workdir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        return [
            options.redis_server,
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


def describe_argv(spec: ServerSpec, *, in_repo: bool = False) -> str:
    """``spec``'s command line as the header shows it: ``python ...`` with
    ``<free>`` for the port and, if ``in_repo``, paths relative to the repository."""
    argv = " ".join(spec.argv(0)[1:])
    if in_repo:
        argv = argv.replace(str(REPO) + "/", "")
    return f"python {argv.replace('--port 0', '--port <free>')}"
