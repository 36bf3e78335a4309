"""An echo endpoint for the Autobahn|Testsuite, built from triochat's own connection code.

Only the conformance run starts it (``conformance/run.sh``). Every piece a
chat connection goes through is the real one: the h11 front
(`triochat.http.handle_http`), the chat's `run_websocket` (the
`ReplayStream` wrapper: write gate, frame size guard, lingering close;
the 101 and the established connection of `accept_websocket`, in the
connection's own task), and `triochat.connection.Connection` itself: its read loop (which is
trio-websocket's reader too: pongs, close replies) and keepalive, and its
`Outbound` (the outbox, the direct writes, the
writer task, the slow-consumer rule and the close sequence, a failure's
close frame included). Compression is on, as ``--compression on``: the
same permessage-deflate negotiation, bounded inflating and compress-once
framing (`OutFrame.wsz`) as a chat connection. Only the chat logic is
swapped for an echo (`EchoApp`, the `App` a connection talks to): each
message comes back as one frame of the same type, written at once.

::

    serve                          root nursery
    └── serve_tcp handlers         one per TCP connection: handle_http, then
        └── EchoFront.serve_websocket   connection nursery
            ├── Connection.run     read loop (pongs, close replies too)
            │                      -> EchoApp.receive -> deliver
            └── Outbound._write    started when the socket does not take it at once

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
from typing import Final, cast

import trio

from triochat.api import ChatApi
from triochat.chatrun import peer_name, run_websocket
from triochat.config import Config
from triochat.connection import Connection
from triochat.frames import OutFrame
from triochat.http import SseOpen, StaticFiles, Upgrade, handle_http
from triochat.metrics import Stats
from triochat.outbound import Outbound
from triochat.outbox import FlushSchedule
from triochat.transports import Transport

__all__ = ["EchoApp", "EchoFront", "main", "serve"]

LOGGER = logging.getLogger("triochat.conformance")

# Autobahn's largest case (9.1.6 / 9.2.6) is one 16 MiB message.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


class EchoFront:
    """The `triochat.http.FrontContext` of the echo app: no limits, no draining."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.app = EchoApp()

    @property
    def draining(self) -> bool:
        return False

    def ready(self) -> bool:
        return True

    @property
    def api(self) -> ChatApi | None:
        """No server API here: /api/ is 404."""
        return None

    def metrics(self) -> bytes:
        return b""

    def take_ip_slot(self, ip: str) -> bool:
        return True

    def release_ip_slot(self, ip: str) -> None:
        pass

    async def refuse_sse(self, stream: trio.abc.Stream, opened: SseOpen) -> None:
        """No SSE here: the conformance run only speaks WebSocket."""
        self.release_ip_slot(opened.ip)
        body = b"no SSE on the echo endpoint\n"
        head = (
            f"HTTP/1.1 404 Not Found\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head.encode() + body)

    async def post_sse(self, session_id: str, body: bytes) -> tuple[int, str, str]:
        return 404, "not_found", "no SSE on the echo endpoint"

    async def serve_websocket(self, stream: trio.abc.Stream, upgrade: Upgrade) -> None:
        """Echo every message of one vetted WebSocket connection until it ends:
        the chat's own `run_websocket`, with `EchoApp` in place of the hub."""

        async def run(transport: Transport, nursery: trio.Nursery) -> None:
            await Connection(transport, self.app, self.config, self.stats).run(nursery)

        await run_websocket(stream, upgrade, self.config, run, peer=peer_name(stream))


class EchoApp:
    """The `triochat.connection.App` of the echo: each message comes straight back."""

    def __init__(self) -> None:
        # Nothing to coalesce: each echo is written as it is delivered
        # (each `receive` is a step of its own).
        self.schedule = FlushSchedule(write_through=True)

    def connect(self, peer: Outbound, *, listener: bool, address: str = "") -> object:
        return peer

    def disconnect(self, client: object) -> None:
        pass

    async def receive(self, client: object, message: str | bytes) -> None:
        if isinstance(message, str):
            frame = OutFrame(message.encode(), binary=False)
        else:
            frame = OutFrame(message, binary=True)
        cast("Outbound", client).deliver(frame)
        self.schedule.end_step(trio.current_time())
        await trio.lowlevel.checkpoint()


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
        # Groups 12 and 13 of the suite: permessage-deflate, as --compression on.
        compression=True,
        max_conns_per_ip=0,
        # Autobahn's cases echo messages of up to 16 MiB: a backlog bound that
        # holds a few of them (the chat's default is 1 MiB).
        outbox_bytes=4 * MAX_MESSAGE_BYTES,
    )
    front = EchoFront(config)
    static = StaticFiles()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            start = await handle_http(stream, front, static)
            if isinstance(start, Upgrade):
                await front.serve_websocket(stream, start)
            elif start is not None:
                await front.refuse_sse(stream, start)
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
