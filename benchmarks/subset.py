"""The protocol subset the benchmarks' reference servers speak, sans-I/O.

`peer_websockets.py` (asyncio, `websockets`) and `floor_trio_websocket.py`
(trio, trio-websocket) answer the same frames the same way; only how they
send differs. `Chat.handle` takes one text frame and returns what to send,
in order: ``(None, text)`` to the connection itself, ``(members, text)`` to
every member of a room (the frame encoded once).

- ``{"type":"join","room","name"}`` -> ``{"type":"joined","room","name",
  "members":[...],"history":[],"recovered":true}``
- ``{"type":"say","room","msg","ref"}`` -> ``message`` to every member, then
  ``{"type":"ack","ref","id"}`` to the sender
- ``{"type":"leave","room"}`` -> ``{"type":"left","room"}``

No history, presence, rate limits, tokens or validation beyond the types it
reads: a yardstick, not a product.
"""

from __future__ import annotations

import json
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

Conn = TypeVar("Conn", bound=Hashable)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Room(Generic[Conn]):
    """Members of one room (connection -> name) and its id counter."""

    __slots__ = ("members", "next_id")

    def __init__(self) -> None:
        self.members: dict[Conn, str] = {}
        self.next_id = 1


class Session:
    """One connection's name (set by its first join) and the rooms it joined."""

    __slots__ = ("joined", "name")

    def __init__(self) -> None:
        self.name: str | None = None
        self.joined: set[str] = set()


#: What to send: to the connection itself (None) or to these members.
Out = tuple[dict[Conn, str] | None, str]


def error(code: str, message: str, ref: object = None) -> str:
    frame: dict[str, object] = {"type": "error", "code": code, "message": message}
    if isinstance(ref, str):
        frame["ref"] = ref
    return _dumps(frame)


class Chat(Generic[Conn]):
    """Every room of one server."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room[Conn]] = {}

    def handle(self, conn: Conn, raw: str, session: Session) -> list[Out[Conn]]:
        """Answer one text frame from ``conn``."""
        try:
            frame = json.loads(raw)
        except ValueError:
            return [(None, error("bad_json", "not JSON"))]
        if not isinstance(frame, dict):
            return [(None, error("bad_frame", "not an object"))]
        kind = frame.get("type")
        room_name = frame.get("room")
        if kind == "say":
            return self._say(conn, session, room_name, frame.get("msg"), frame.get("ref"))
        if kind == "join":
            return self._join(conn, session, room_name, frame.get("name"))
        if kind == "leave":
            if isinstance(room_name, str) and room_name in session.joined:
                self.leave(conn, room_name)
                session.joined.discard(room_name)
                return [(None, _dumps({"type": "left", "room": room_name}))]
            return [(None, error("not_joined", "not in that room"))]
        return [(None, error("bad_frame", "unknown type", frame.get("ref")))]

    def _say(
        self, conn: Conn, session: Session, room_name: object, msg: object, ref: object
    ) -> list[Out[Conn]]:
        room = self.rooms.get(room_name) if isinstance(room_name, str) else None
        if room is None or conn not in room.members:
            return [(None, error("not_joined", "join the room first", ref))]
        if not isinstance(msg, str) or not msg:
            return [(None, error("bad_frame", "msg must be a string", ref))]
        message_id = str(room.next_id)
        room.next_id += 1
        message = {
            "type": "message",
            "room": room_name,
            "id": message_id,
            "name": session.name,
            "msg": msg,
            "ts": time.time_ns() // 1_000_000,
        }
        out: list[Out[Conn]] = [(room.members, _dumps(message))]
        if isinstance(ref, str):
            out.append((None, _dumps({"type": "ack", "ref": ref, "id": message_id})))
        return out

    def _join(
        self, conn: Conn, session: Session, room_name: object, given: object
    ) -> list[Out[Conn]]:
        if not isinstance(room_name, str) or not room_name:
            return [(None, error("bad_room", "bad room"))]
        if session.name is None:
            if not isinstance(given, str) or not given.strip():
                return [(None, error("bad_name", "a name is required"))]
            session.name = given.strip()
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room()
        room.members[conn] = session.name
        session.joined.add(room_name)
        joined = {
            "type": "joined",
            "room": room_name,
            "name": session.name,
            "members": sorted(set(room.members.values())),
            "history": [],
            "recovered": True,
        }
        return [(None, _dumps(joined))]

    def leave(self, conn: Conn, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            return
        room.members.pop(conn, None)
        if not room.members:
            del self.rooms[room_name]

    def leave_all(self, conn: Conn, session: Session) -> None:
        """The connection is gone: out of every room it joined."""
        for room_name in session.joined:
            self.leave(conn, room_name)
