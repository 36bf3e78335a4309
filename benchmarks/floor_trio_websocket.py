"""The floor under triochat's memory: the benchmarks' protocol on bare trio-websocket.

The smallest honest chat server on trio + trio-websocket, written the way
trio-websocket's docs show: `serve_websocket`, one handler per connection
that loops on ``await ws.get_message()``, and a broadcast that is one
``await ws.send_message()`` per member, from the sender's handler. What an
idle joined connection costs here is what trio-websocket (its reader task
and handler task, wsproto, h11, trio's socket) costs before any
application state; `benchmarks/run.py` runs it in the memory scenario only.

It speaks what `peer_websockets.py` speaks, with the same answers
(`subset.py`).

The same 64 KiB message limit and, as trio-websocket has no keepalive of
its own, the peer's pings (every 20 s, 20 s for the pong) from the handler
itself: no extra task. ``--ping-interval 0`` turns them off.

Run: ``python benchmarks/floor_trio_websocket.py --port 8191``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import signal

import trio
from subset import Chat, Session
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

CHAT: Chat[WebSocketConnection] = Chat()


async def handler(ping_interval: float, request: WebSocketRequest) -> None:
    """Serve one connection until it closes."""
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return  # gone during the handshake
    session = Session()
    try:
        while True:
            if ping_interval:
                with trio.move_on_after(ping_interval) as idle:
                    raw = await ws.get_message()
                if idle.cancelled_caught:
                    with trio.move_on_after(ping_interval) as late:
                        await ws.ping()
                    if late.cancelled_caught:
                        await ws.aclose(1011, "no pong")
                        return
                    continue
            else:
                raw = await ws.get_message()
            if isinstance(raw, bytes):
                await ws.aclose(1003, "binary frames are not accepted")
                return
            # A function of its own, so the last frame is not kept while idle.
            await _answer(ws, raw, session)
            del raw
    except ConnectionClosed:
        pass
    finally:
        CHAT.leave_all(ws, session)


async def _answer(ws: WebSocketConnection, raw: str, session: Session) -> None:
    """Send what one text frame asks for; a broadcast is one send per member."""
    for members, text in CHAT.handle(ws, raw, session):
        if members is None:
            await ws.send_message(text)
            continue
        for member in list(members):
            with contextlib.suppress(ConnectionClosed):
                await member.send_message(text)


async def main(host: str, port: int, ping_interval: float, message_queue_size: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_websocket,
                functools.partial(handler, ping_interval),
                host,
                port,
                ssl_context=None,
                max_message_size=65536,
                message_queue_size=message_queue_size,
            )
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8191)
    parser.add_argument(
        "--ping-interval", type=float, default=20.0, help="seconds (also the pong timeout); 0: off"
    )
    parser.add_argument(
        "--message-queue-size",
        type=int,
        default=1,
        help="trio-websocket's message_queue_size (its default: 1)",
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(main, args.host, args.port, args.ping_interval, args.message_queue_size)


if __name__ == "__main__":
    cli()
