"""An in-memory network: a Listener whose connections are memory streams.

With it a whole server runs under Trio's MockClock (`autojump_clock`), so
timeouts, pings and grace periods pass in virtual time, deterministically.
"""

from __future__ import annotations

import trio
import trio.testing


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the server one end of each `connect`'s stream pair."""

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

    async def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """The client end of a new connection (like a TCP connect).

        ``lockstep``: no buffer at all, so a client that stops reading blocks
        the server's writes at once (like a full socket buffer). Otherwise the
        buffers are unbounded.
        """
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client
