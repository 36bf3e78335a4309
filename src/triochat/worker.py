"""A worker of ``--workers N`` (workers.py is its supervisor): one node of the
cluster on the shared port, and its side of the socket pair with the parent.

What the supervisor tells it comes through its environment (`worker_setup`):
its index (`INDEX_ENV`) and its end of the socket pair (`CONTROL_FD_ENV`).
Over that pair it sends one `Ready` line once it listens, then follows what
the parent says (``drain``, ``stop``); the pair's end means the parent is
gone, and the worker drains, so no orphan keeps the port (`serve_worker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Final

import trio

from .config import Config
from .errors import ConfigError, StorageError
from .server import Server, serve_until_signalled

__all__ = [
    "CONTROL_FD_ENV",
    "INDEX_ENV",
    "Ready",
    "WorkerSetup",
    "read_lines",
    "serve_worker",
    "worker_setup",
]

# The supervisor's logger: operators read a worker's life under one name.
LOGGER = logging.getLogger("triochat.workers")

#: The worker's index (0 to N-1), set by the supervisor in the worker's environment.
INDEX_ENV: Final = "TRIOCHAT_WORKER_INDEX"
#: The worker's end of its socket pair with the supervisor (a descriptor number).
CONTROL_FD_ENV: Final = "TRIOCHAT_WORKER_CONTROL_FD"
_MAX_REPORT: Final = 65536  # bytes: a `Ready` line is far smaller


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor told a worker through its environment."""

    index: int
    control_fd: int


def worker_setup(environ: Mapping[str, str]) -> WorkerSetup | None:
    """This process's `WorkerSetup`, or None when it is not a worker.

    Raises:
        ValueError: the variables are there but malformed (not from a supervisor).
    """
    index = environ.get(INDEX_ENV)
    if index is None:
        return None
    try:
        setup = WorkerSetup(int(index), int(environ.get(CONTROL_FD_ENV, "")))
    except ValueError:
        setup = WorkerSetup(-1, -1)
    if setup.index < 0 or setup.control_fd < 0:
        raise ValueError(
            f"{INDEX_ENV} is set, but {INDEX_ENV} and {CONTROL_FD_ENV} are not both "
            "numbers: they are set by a supervisor (--workers) only"
        )
    return setup


@dataclasses.dataclass(frozen=True)
class Ready:
    """A worker's report once it listens: its pid, cluster node id and URLs."""

    pid: int
    node: str
    urls: tuple[str, ...]
    metrics_urls: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Ready:
        """Raises ValueError (or KeyError, TypeError) on a line that is not one."""
        fields = json.loads(line)
        return cls(
            pid=int(fields["pid"]),
            node=str(fields["node"]),
            urls=tuple(str(url) for url in fields["urls"]),
            metrics_urls=tuple(str(url) for url in fields["metrics_urls"]),
        )


async def serve_worker(config: Config, control_fd: int) -> None:
    """A worker's whole life: a node as `serve_until_signalled` runs one
    (signals included), which tells the supervisor once it listens and then
    follows what the supervisor says on ``control_fd``.

    Raises:
        ConfigError, StorageError, OSError: as `serve_until_signalled`, at start-up.
    """
    control = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd)))
    failure: ConfigError | StorageError | OSError | None = None
    async with control, trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[Server]) -> None:
            await serve_until_signalled(config, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop following the parent

        try:
            server: Server = await nursery.start(serve)
        except (ConfigError, StorageError, OSError) as exc:
            # Raised out of the nursery's body it would come in a group: the
            # caller (cli.py) maps each to an exit status, as for one process.
            failure = exc
        else:
            await _report(control, server)
            nursery.start_soon(_follow_parent, control, server, nursery.cancel_scope)
    if failure is not None:
        raise failure


async def _report(control: trio.SocketStream, server: Server) -> None:
    """Tell the supervisor that ``server`` listens (`Ready`)."""
    report = Ready(
        pid=os.getpid(),
        node=server.hub.backplane.node,
        urls=tuple(f"{server.scheme}://{a}" for a in server.ports.addresses()),
        metrics_urls=tuple(f"http://{a}" for a in server.ports.addresses(operator=True)),
    )
    # A supervisor that is gone is no error here: _follow_parent drains.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await control.send_all(report.encode())


async def _follow_parent(
    control: trio.SocketStream, server: Server, stop: trio.CancelScope
) -> None:
    """Do what the supervisor says: ``drain``, ``stop``; its end means it is gone."""
    async for word in read_lines(control):
        if word == b"drain":
            if not server.draining:
                LOGGER.info("the supervisor asks to drain")
            server.drain()
        elif word == b"stop":
            LOGGER.warning("the supervisor asks to stop now")
            stop.cancel()
            return
    LOGGER.warning("the supervisor is gone: draining")
    server.drain()


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """The lines received until the stream ends or breaks (a lost peer is an end)."""
    buffer = b""
    while True:
        try:
            data = await stream.receive_some(_MAX_REPORT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.strip()
        if len(buffer) > _MAX_REPORT:
            return  # not our peer speaking
