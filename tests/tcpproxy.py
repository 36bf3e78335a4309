"""A TCP proxy on loopback that tests control, to make a network misbehave.

``127.0.0.1:<proxy.port>`` forwards to a target port. The test can cut every
current connection (both sides closed at once, as a broken network would),
refuse new connections for a while (each is accepted and closed at once, so
the client sees its connection fail), accept them again, and hold the
target's replies back (bytes from the target are not delivered until
released). It runs an asyncio loop in a daemon thread and is driven from
synchronous tests (Playwright's sync API).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any, Self


class _Link:
    """One proxied connection: the client's and the target's writers and the two pipes."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.client.transport.abort()
        self.target.transport.abort()


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``host:target_port``; use as a context manager."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = 0
        self.accepted = 0  # connections forwarded so far
        self.refused = 0  # connections closed at once while refusing
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcpproxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._flowing: asyncio.Event | None = None
        self._changed = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self._cut()
        # Cut links end their handlers; one still connecting to the target is cancelled.
        handlers = [task for task in self._handlers if not task.done()]
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=2)
            for task in late:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- controls (call from the test's thread) -------------------------------------

    def cut(self) -> None:
        """Close every current connection on both sides, now."""
        self._run(self._call(self._cut))

    def refuse(self) -> None:
        """From now on, close each new connection as soon as it is accepted."""
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    def hold_replies(self) -> None:
        """Stop delivering the target's bytes to clients (they wait in the proxy)."""
        self._run(self._call(self._set_flowing, False))

    def release_replies(self) -> None:
        """Deliver the target's bytes again (what was held goes first)."""
        self._run(self._call(self._set_flowing, True))

    def wait_accepted(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` connections were forwarded in all; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.accepted < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{self.accepted} connection(s) forwarded, {count} expected"
                self._changed.wait(left)

    # --- in the loop ------------------------------------------------------------------

    @staticmethod
    async def _call(func: Any, *args: Any) -> None:
        func(*args)

    def _cut(self) -> None:
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            # Cancelled only when the proxy closes: end quietly (asyncio would log it).
            with contextlib.suppress(asyncio.CancelledError):
                await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, target_writer)
        self._links.add(link)
        with self._changed:
            self.accepted += 1
            self._changed.notify_all()
        link.tasks = [
            asyncio.create_task(self._pipe(reader, target_writer, None)),
            asyncio.create_task(self._pipe(target_reader, writer, self._flowing)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.abort()

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None
    ) -> None:
        try:
            while data := await src.read(65536):
                if gate is not None:
                    await gate.wait()
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                with contextlib.suppress(OSError):
                    dst.write_eof()
        except OSError:
            dst.transport.abort()
