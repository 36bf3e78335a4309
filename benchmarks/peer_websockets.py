"""Reference peer for the benchmarks: the triochat protocol subset on `websockets`.

A deliberately minimal chat server written the way the `websockets` docs
recommend for fan-out: asyncio, one handler per connection, and
`websockets.asyncio.server.broadcast()` with the frame JSON-encoded once.
It speaks only what the benchmarks use (`subset.py`: join, say -> message to
every member with ``broadcast()`` then ack, leave). It is the yardstick in
`benchmarks/run.py`, not a product.

Run: ``python benchmarks/peer_websockets.py --port 8190``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal

from subset import Chat, Session
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

CHAT: Chat[ServerConnection] = Chat()


async def handler(ws: ServerConnection) -> None:
    """Serve one connection until it closes."""
    session = Session()
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                await ws.close(1003, "binary frames are not accepted")
                return
            for members, text in CHAT.handle(ws, raw, session):
                if members is None:
                    await ws.send(text)
                else:
                    broadcast(members, text)  # encoded once, pushed to every member
    except ConnectionClosed:
        pass
    finally:
        CHAT.leave_all(ws, session)


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    async with serve(
        handler,
        host,
        port,
        compression=None,  # triochat does not negotiate permessage-deflate either
        max_size=65536,
        ping_interval=20,
        ping_timeout=20,
        backlog=4096,  # like trio's default (somaxconn), so connection storms compare
    ):
        await stop


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8190)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(args.host, args.port))


if __name__ == "__main__":
    cli()
