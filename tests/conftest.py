"""Shared fixtures: servers on real sockets and on an in-memory network."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio

from triochat import Config, Server
from triochat.history import History

from .chatclient import ChatClient, open_client, open_memory_client
from .memnet import MemoryListener, serving


@asynccontextmanager
async def running_server(**options: Any) -> AsyncIterator[Server]:
    """A real server on 127.0.0.1 and a free port, with in-memory history."""
    config = Config(port=0, **{"memory": True, **options})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(config).run)
        yield server
        server.drain()


@dataclasses.dataclass
class MemoryServer:
    """A server on a `MemoryListener`: for tests in virtual time."""

    server: Server
    listener: MemoryListener

    @asynccontextmanager
    async def client(
        self, resource: str = "/ws", *, lockstep: bool = False, **kwargs: Any
    ) -> AsyncIterator[ChatClient]:
        stream = await self.listener.connect(lockstep=lockstep)
        async with open_memory_client(stream, resource, **kwargs) as client:
            yield client


@asynccontextmanager
async def memory_server(
    history: History | None = None, **options: Any
) -> AsyncIterator[MemoryServer]:
    """A server on an in-memory network; use with ``autojump_clock``."""
    listener = MemoryListener()
    async with serving(listener, history, **options) as server:
        yield MemoryServer(server, listener)


class TaskSteps(trio.abc.Instrument):
    """Counts the steps (runs between two task switches) of the tasks ``counted`` picks."""

    def __init__(self, counted: Callable[[trio.lowlevel.Task], bool]) -> None:
        self.counted = counted
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counted(task):
            self.steps += 1


@contextmanager
def counting_steps(counted: Callable[[trio.lowlevel.Task], bool]) -> Iterator[TaskSteps]:
    """`TaskSteps` installed in the running trio loop for the ``with`` block."""
    instrument = TaskSteps(counted)
    trio.lowlevel.add_instrument(instrument)
    try:
        yield instrument
    finally:
        trio.lowlevel.remove_instrument(instrument)


def ws_url(server: Server, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


@asynccontextmanager
async def client_of(server: Server, path: str = "/ws", **kwargs: Any) -> AsyncIterator[ChatClient]:
    async with open_client(ws_url(server, path), **kwargs) as client:
        yield client


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A real server (real sockets, real time); tests guard with fail_after."""
    with trio.fail_after(30):
        async with running_server() as srv:
            yield srv


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With TRIOCHAT_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run."""
    if os.environ.get("TRIOCHAT_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        if reporter is not None:
            reporter.write_line(
                f"TRIOCHAT_NO_SKIPS=1: {len(skipped)} test(s) skipped; nothing may skip here",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
