"""Reference peer for the benchmarks: the triochat protocol subset on `websockets`.

A deliberately minimal chat server written the way the `websockets` docs
recommend for fan-out: asyncio, one handler per connection, and
`websockets.asyncio.server.broadcast()` with the frame JSON-encoded once.
It speaks only what the benchmarks use:

- ``{"type":"join","room","name"}`` -> ``{"type":"joined","room","name",
  "members":[...],"history":[],"recovered":true}``
- ``{"type":"say","room","msg","ref"}`` -> ``message`` to every member
  (``broadcast()``), then ``{"type":"ack","ref","id"}`` to the sender
- ``{"type":"leave","room"}`` -> ``{"type":"left","room"}``

No history, presence, rate limits, tokens or validation beyond the types it
reads. It is the yardstick in `benchmarks/run.py`, not a product.

Run: ``python benchmarks/peer_websockets.py --port 8190``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import time

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Room:
    """Members of one room (connection -> name) and its id counter."""

    __slots__ = ("members", "next_id")

    def __init__(self) -> None:
        self.members: dict[ServerConnection, str] = {}
        self.next_id = 1


ROOMS: dict[str, Room] = {}


def _error(code: str, message: str, ref: object = None) -> str:
    frame: dict[str, object] = {"type": "error", "code": code, "message": message}
    if isinstance(ref, str):
        frame["ref"] = ref
    return _dumps(frame)


async def handler(ws: ServerConnection) -> None:
    """Serve one connection until it closes."""
    name: str | None = None
    joined: set[str] = set()
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                await ws.close(1003, "binary frames are not accepted")
                return
            try:
                frame = json.loads(raw)
            except ValueError:
                await ws.send(_error("bad_json", "not JSON"))
                continue
            if not isinstance(frame, dict):
                await ws.send(_error("bad_frame", "not an object"))
                continue
            kind = frame.get("type")
            room_name = frame.get("room")
            if kind == "say":
                msg = frame.get("msg")
                ref = frame.get("ref")
                room = ROOMS.get(room_name) if isinstance(room_name, str) else None
                if room is None or ws not in room.members:
                    await ws.send(_error("not_joined", "join the room first", ref))
                    continue
                if not isinstance(msg, str) or not msg:
                    await ws.send(_error("bad_frame", "msg must be a string", ref))
                    continue
                message_id = str(room.next_id)
                room.next_id += 1
                text = _dumps(
                    {
                        "type": "message",
                        "room": room_name,
                        "id": message_id,
                        "name": name,
                        "msg": msg,
                        "ts": time.time_ns() // 1_000_000,
                    }
                )
                broadcast(room.members, text)  # encoded once, pushed to every member
                if isinstance(ref, str):
                    await ws.send(_dumps({"type": "ack", "ref": ref, "id": message_id}))
            elif kind == "join":
                given = frame.get("name")
                if not isinstance(room_name, str) or not room_name:
                    await ws.send(_error("bad_room", "bad room"))
                    continue
                if name is None:
                    if not isinstance(given, str) or not given.strip():
                        await ws.send(_error("bad_name", "a name is required"))
                        continue
                    name = given.strip()
                room = ROOMS.get(room_name)
                if room is None:
                    room = ROOMS[room_name] = Room()
                room.members[ws] = name
                joined.add(room_name)
                await ws.send(
                    _dumps(
                        {
                            "type": "joined",
                            "room": room_name,
                            "name": name,
                            "members": sorted(set(room.members.values())),
                            "history": [],
                            "recovered": True,
                        }
                    )
                )
            elif kind == "leave":
                if isinstance(room_name, str) and room_name in joined:
                    _leave(ws, room_name)
                    joined.discard(room_name)
                    await ws.send(_dumps({"type": "left", "room": room_name}))
                else:
                    await ws.send(_error("not_joined", "not in that room"))
            else:
                await ws.send(_error("bad_frame", "unknown type", frame.get("ref")))
    except ConnectionClosed:
        pass
    finally:
        for room_name in joined:
            _leave(ws, room_name)


def _leave(ws: ServerConnection, room_name: str) -> None:
    room = ROOMS.get(room_name)
    if room is None:
        return
    room.members.pop(ws, None)
    if not room.members:
        del ROOMS[room_name]


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
