"""An echo endpoint for the Autobahn|Testsuite, built from triochat's own transport.

Only the conformance run starts it (``conformance/run.sh``). Every piece a
chat connection goes through is the real one: the h11 front
(`triochat.http.handle_http`), the `ReplayStream` wrapper with its write
lock, trio-websocket's handshake via `accept_websocket`, and the coalescing
writes of `triochat.connection` (an `Outbox` of pre-built `OutFrame`s, written
at once when the socket takes them, else by a writer task with one write of
everything queued). Only the chat
logic is swapped for an echo: each message comes back as one frame of the
same type.

::

    serve                          root nursery
    └── serve_tcp handlers         one per TCP connection: handle_http, then
        └── EchoFront.serve_websocket   connection nursery
            ├── trio-websocket's reader (pongs, close replies)
            ├── _read_loop         receive_message -> OutFrame -> outbox
            └── _write_loop        outbox -> take_all -> one send; after the
                                   reader ends, flushes (close_timeout)

Run it with ``python conformance/echo_server.py --port 9001``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Final

import trio

from triochat.config import Config
from triochat.connection import TransportClosed
from triochat.frames import OutFrame
from triochat.http import StaticFiles, Upgrade, handle_http
from triochat.metrics import Stats
from triochat.outbox import Outbox
from triochat.transports.websocket import (
    ClosingRace,
    ReplayStream,
    WebSocketTransport,
    accept_websocket,
)

__all__ = ["EchoFront", "main", "serve"]

LOGGER = logging.getLogger("triochat.conformance")

# Autobahn's largest case (9.1.6 / 9.2.6) is one 16 MiB message.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
OUTBOX_FRAMES: Final = 256  # the chat's default; the reader waits when it is full


class EchoFront:
    """The `triochat.http.FrontContext` of the echo app: no limits, no draining."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()

    @property
    def draining(self) -> bool:
        return False

    def ready(self) -> bool:
        return True

    def metrics(self) -> bytes:
        return b""

    def take_ip_slot(self, ip: str) -> bool:
        return True

    def release_ip_slot(self, ip: str) -> None:
        pass

    async def serve_sse(self, stream: trio.abc.Stream) -> None:
        """No SSE here: the conformance run only speaks WebSocket."""
        body = b"no SSE on the echo endpoint\n"
        head = (
            f"HTTP/1.1 404 Not Found\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head.encode() + body)

    async def post_sse(self, session_id: str, body: bytes) -> tuple[int, str, str]:
        return 404, "not_found", "no SSE on the echo endpoint"

    async def serve_websocket(self, stream: trio.abc.Stream, upgrade: Upgrade) -> None:
        """Echo every message of one vetted WebSocket connection until it ends."""
        replay = ReplayStream(
            stream,
            upgrade.prefix,
            head_size=upgrade.head_size,
            max_message_bytes=self.config.max_frame_bytes,
        )
        try:
            async with trio.open_nursery() as nursery:  # owns trio-websocket's reader
                try:
                    transport = await accept_websocket(nursery, replay, self.config)
                except TransportClosed as exc:
                    LOGGER.info("handshake failed: %s", exc.reason)
                    nursery.cancel_scope.cancel()
                    return
                try:
                    await _EchoConnection(transport, self.config.close_timeout).run()
                finally:
                    nursery.cancel_scope.cancel()
                    # Bounded: after a close frame the stream lingers for the peer's FIN.
                    linger = trio.current_time() + self.config.close_timeout
                    with trio.CancelScope(shield=True, deadline=linger):
                        await transport.abort()
        except* ClosingRace:
            pass  # a ping that arrived after our close frame: closing anyway


class _EchoConnection:
    """A reader and the chat's coalescing writer around one `Outbox`.

    One difference from the chat's `Connection`: when the reader ends (the
    peer closed, or trio-websocket failed the connection on a protocol
    error), the writer still sends what is queued, bounded by
    ``close_timeout``, since an echo owes the peer every message received
    before the end. Whether those bytes can still go out is the stream
    wrapper's decision (see docs/reliability.md).
    """

    def __init__(self, transport: WebSocketTransport, close_timeout: float) -> None:
        self._transport = transport
        self._close_timeout = close_timeout
        self._outbox = Outbox()
        #: Set by the writer whenever it empties the outbox (the reader's backpressure).
        self._room = trio.Event()
        #: The reader has ended: the writer returns once the outbox is empty.
        self._reader_done = False
        #: The tail of a partial direct write; the writer finishes it first.
        self._unsent = b""
        #: Set to have the writer look again (replaced each time it does).
        self._wakeup = trio.Event()

    async def run(self) -> None:
        """Until the peer is gone (trio-websocket answers its close itself)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            try:
                await self._read_loop()
            except TransportClosed as exc:
                LOGGER.debug("reader ended: %s", exc.reason)
            self._reader_done = True
            self._wakeup.set()
            nursery.cancel_scope.deadline = trio.current_time() + self._close_timeout

    async def _read_loop(self) -> None:
        while True:
            message = await self._transport.receive_message()
            if isinstance(message, str):
                frame = OutFrame(message.encode(), binary=False)
            else:
                frame = OutFrame(message, binary=True)
            while len(self._outbox) >= OUTBOX_FRAMES:
                # Full: wait for the writer rather than drop (an echo loses nothing).
                self._wakeup.set()
                self._room = trio.Event()
                await self._room.wait()
            self._outbox.put(frame)
            self._flush_nowait()

    def _flush_nowait(self) -> None:
        """The chat's hot path (`Connection.flush_nowait`): write now if the
        socket takes it, else (busy, full, or a partial write) wake the writer."""
        if self._unsent:
            self._wakeup.set()
            return
        frames = self._outbox.peek()
        try:
            rest = self._transport.send_nowait(frames)
        except TransportClosed:
            self._reader_done = True
            self._wakeup.set()
            return
        if rest is None:  # another write is in progress: the writer does it
            self._wakeup.set()
            return
        self._outbox.clear()
        self._room.set()
        if rest:
            self._unsent = rest
            self._wakeup.set()

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        """The chat's writer: everything queued goes out with one write."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self._unsent:
                    rest, self._unsent = self._unsent, b""
                    await self._transport.send_rest(rest)
                frames = self._outbox.take_all()
                self._room.set()
                if frames:
                    await self._transport.send(frames)
                    self._wakeup.set()  # more may have been queued meanwhile
                if self._reader_done and not self._outbox and not self._unsent:
                    break
        except TransportClosed as exc:
            LOGGER.debug("writer ended: %s", exc.reason)
        scope.cancel()


async def serve(
    port: int,
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo endpoint on 127.0.0.1:``port`` (0: any free port) forever.

    ``task_status.started(port)`` with the bound port once listening; the
    port is also written to ``ready_file`` when one is given.
    """
    config = Config(
        port=port,
        memory=True,
        allow_origins=("*",),
        max_frame_bytes=MAX_MESSAGE_BYTES,
        max_conns_per_ip=0,
    )
    front = EchoFront(config)
    static = StaticFiles()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            upgrade = await handle_http(stream, front, static)
            if upgrade is not None:
                await front.serve_websocket(stream, upgrade)
        except Exception:
            LOGGER.exception("bug in the echo app")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
        bound = int(listeners[0].socket.getsockname()[1])
        LOGGER.warning("echo server listening on ws://127.0.0.1:%d", bound)
        if ready_file is not None:
            await trio.Path(ready_file).write_text(f"{bound}\n")
        task_status.started(bound)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=9001, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--ready-file", type=Path, help="write the bound port here when ready")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        trio.run(lambda: serve(args.port, ready_file=args.ready_file))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
