"""The floor under triochat's memory: the benchmarks' protocol on bare trio-websocket.

The smallest honest chat server on trio + trio-websocket, written the way
trio-websocket's docs show: `serve_websocket`, one handler per connection
that loops on ``await ws.get_message()``, and a broadcast that is one
``await ws.send_message()`` per member, from the sender's handler. What an
idle joined connection costs here is what trio-websocket (its reader task
and handler task, wsproto, h11, trio's socket) costs before any
application state; `benchmarks/run.py` runs it in the memory scenario only.

It speaks what `peer_websockets.py` speaks, with the same answers:

- ``{"type":"join","room","name"}`` -> ``{"type":"joined","room","name",
  "members":[...],"history":[],"recovered":true}``
- ``{"type":"say","room","msg","ref"}`` -> ``message`` to every member,
  then ``{"type":"ack","ref","id"}`` to the sender
- ``{"type":"leave","room"}`` -> ``{"type":"left","room"}``

The same 64 KiB message limit and, as trio-websocket has no keepalive of
its own, the peer's pings (every 20 s, 20 s for the pong) from the handler
itself: no extra task. ``--ping-interval 0`` turns them off.

Run: ``python benchmarks/floor_trio_websocket.py --port 8191``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import signal
import time

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Room:
    """Members of one room (connection -> name) and its id counter."""

    __slots__ = ("members", "next_id")

    def __init__(self) -> None:
        self.members: dict[WebSocketConnection, str] = {}
        self.next_id = 1


ROOMS: dict[str, Room] = {}


def _error(code: str, message: str, ref: object = None) -> str:
    frame: dict[str, object] = {"type": "error", "code": code, "message": message}
    if isinstance(ref, str):
        frame["ref"] = ref
    return _dumps(frame)


async def handler(ping_interval: float, request: WebSocketRequest) -> None:
    """Serve one connection until it closes."""
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return  # gone during the handshake
    name: str | None = None
    joined: set[str] = set()
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
            name = await _handle(ws, raw, name, joined)
    except ConnectionClosed:
        pass
    finally:
        for room_name in joined:
            _leave(ws, room_name)


async def _handle(
    ws: WebSocketConnection, raw: str, name: str | None, joined: set[str]
) -> str | None:
    """Answer one text frame; returns the connection's name (set by its first join)."""
    try:
        frame = json.loads(raw)
    except ValueError:
        await ws.send_message(_error("bad_json", "not JSON"))
        return name
    if not isinstance(frame, dict):
        await ws.send_message(_error("bad_frame", "not an object"))
        return name
    kind = frame.get("type")
    room_name = frame.get("room")
    if kind == "say":
        msg, ref = frame.get("msg"), frame.get("ref")
        room = ROOMS.get(room_name) if isinstance(room_name, str) else None
        if room is None or ws not in room.members:
            await ws.send_message(_error("not_joined", "join the room first", ref))
        elif not isinstance(msg, str) or not msg:
            await ws.send_message(_error("bad_frame", "msg must be a string", ref))
        else:
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
            for member in list(room.members):
                with contextlib.suppress(ConnectionClosed):
                    await member.send_message(text)
            if isinstance(ref, str):
                await ws.send_message(_dumps({"type": "ack", "ref": ref, "id": message_id}))
    elif kind == "join":
        given = frame.get("name")
        if not isinstance(room_name, str) or not room_name:
            await ws.send_message(_error("bad_room", "bad room"))
            return name
        if name is None:
            if not isinstance(given, str) or not given.strip():
                await ws.send_message(_error("bad_name", "a name is required"))
                return name
            name = given.strip()
        room = ROOMS.get(room_name)
        if room is None:
            room = ROOMS[room_name] = Room()
        room.members[ws] = name
        joined.add(room_name)
        members = sorted(set(room.members.values()))
        await ws.send_message(
            _dumps(
                {
                    "type": "joined",
                    "room": room_name,
                    "name": name,
                    "members": members,
                    "history": [],
                    "recovered": True,
                }
            )
        )
    elif kind == "leave":
        if isinstance(room_name, str) and room_name in joined:
            _leave(ws, room_name)
            joined.discard(room_name)
            await ws.send_message(_dumps({"type": "left", "room": room_name}))
        else:
            await ws.send_message(_error("not_joined", "not in that room"))
    else:
        await ws.send_message(_error("bad_frame", "unknown type", frame.get("ref")))
    return name


def _leave(ws: WebSocketConnection, room_name: str) -> None:
    room = ROOMS.get(room_name)
    if room is None:
        return
    room.members.pop(ws, None)
    if not room.members:
        del ROOMS[room_name]


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
