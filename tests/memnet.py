"""An in-memory network: a Listener whose connections are memory streams.

With it a whole server runs under Trio's MockClock (`autojump_clock`), so
timeouts, pings and grace periods pass in virtual time, deterministically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from triochat import Config, Server
from triochat.history import History


class ListenerBase(trio.abc.Listener[trio.abc.Stream]):
    """A listener fed by `offer`: the server accepts what a test connects."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[trio.abc.Stream](100)
        #: Raised by the next accept() calls, one each (fault injection).
        self.accept_errors: list[BaseException] = []

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.accept_errors:
            raise self.accept_errors.pop(0)
        return await self._recv.receive()

    async def aclose(self) -> None:
        self._recv.close()
        await trio.lowlevel.checkpoint()

    async def offer(self, server_end: trio.abc.Stream) -> None:
        """Hand the server its end of a new connection."""
        await self._send.send(server_end)


def stream_pair(*, lockstep: bool = False) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A connected (client, server) pair of in-memory streams.

    ``lockstep``: no buffer at all, so a client that stops reading blocks
    the server's writes at once (like a full socket buffer). Otherwise the
    buffers are unbounded.
    """
    if lockstep:
        return trio.testing.lockstep_stream_pair()
    return trio.testing.memory_stream_pair()


class MemoryListener(ListenerBase):
    """Hands the server one end of each `connect`'s stream pair."""

    async def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """The client end of a new connection (like a TCP connect); see `stream_pair`."""
        client, server = stream_pair(lockstep=lockstep)
        await self.offer(server)
        return client


@asynccontextmanager
async def serving(
    listener: trio.abc.Listener[trio.abc.Stream], history: History | None, **options: Any
) -> AsyncIterator[Server]:
    """A whole server on ``listener`` (``memory=True`` unless ``history``); drained after."""
    config = Config(port=0, **{"memory": True, **options})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            Server(config, listeners=[listener], history=history).run
        )
        yield server
        server.drain()
