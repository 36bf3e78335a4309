"""Which request goes out next on a connection, and the frame it goes out as.

Rule 3: one writer task per connection (`session`) sends requests in the
order they were made. A request for a room waits, unsent, until that room is
joined on the current connection, so after a reconnect nothing overtakes the
rejoin. Says and whispers are also paced by the client's own `SendBucket`,
keeping their order among themselves.

Sans-I/O: the writer asks `OutgoingFrames.next_to_send` with the time, and
sends what it is given.
"""

from __future__ import annotations

import math
from typing import Any, Final, cast

from .connection import Connection
from .events import encode
from .pacing import SendBucket
from .requests import Request, RequestBook
from .state import ClientState

__all__ = ["PACED", "OutgoingFrames"]

#: Frames the server's rate limit counts: paced by the client's own bucket.
PACED: Final = frozenset({"say", "whisper"})


class OutgoingFrames:
    """Picks the next request a connection may send, and frames it (Rule 3)."""

    def __init__(self, state: ClientState, book: RequestBook, bucket: SendBucket) -> None:
        self._state = state
        self._book = book
        self._bucket = bucket

    def next_to_send(self, conn: Connection, now: float) -> tuple[Request[Any] | None, float]:
        """The first request that may go now, else how long until one may."""
        wait = math.inf
        paced_blocked = False  # paced frames keep their order among themselves
        for request in self._book:
            # (The connection's own auth is marked sent on it by `session`.)
            if request.sent_on == conn.generation or request.done.is_set():
                continue
            paced = request.kind in PACED
            if request.hold_until > now:
                wait = min(wait, request.hold_until - now)
                paced_blocked = paced_blocked or paced
                continue
            if not self._may_send(request, conn):
                continue
            if paced:
                if paced_blocked:
                    continue
                delay = self._bucket.delay(now)
                if delay > 0:
                    wait = min(wait, delay)
                    paced_blocked = True
                    continue
            return request, 0.0
        return None, wait

    def sending(self, request: Request[Any], conn: Connection, now: float) -> str:
        """The frame of ``request``, noted as sent on ``conn`` at ``now``."""
        text = self._frame(request, conn)
        request.sent_on = conn.generation
        request.tries += 1
        if request.kind in PACED:
            self._bucket.take(now)
        return text

    def typing_frame(self, room: str, conn: Connection, now: float) -> str | None:
        """A ``typing`` frame for ``room`` if it may go now (joined on ``conn``, a
        token in the bucket, taken), else None: typing is only a hint."""
        state = self._state.rooms.get(room)
        if state is None or state.joined_on != conn.generation or self._bucket.delay(now) > 0:
            return None
        self._bucket.take(now)
        return encode({"type": "typing", "room": room})

    def _may_send(self, request: Request[Any], conn: Connection) -> bool:
        if request.kind == "join":
            return True
        if request.kind == "auth":
            return conn.authed is not None
        if request.kind == "whisper":
            return conn.named or not self._state.rooms
        state = self._state.rooms.get(cast("str", request.room))
        # Not a room of ours: send it, and the server says what is wrong.
        return state is None or state.joined_on == conn.generation

    def _frame(self, request: Request[Any], conn: Connection) -> str:
        """The request's frame, made when it is sent (``since``, name and token
        are the latest then)."""
        state = self._state
        frame: dict[str, object] = {"type": request.kind, "ref": request.ref}
        if request.kind == "join":
            room = cast("str", request.room)
            frame["room"] = room
            anonymous = conn.authed is None
            name = request.name or (state.name if anonymous else None) or state.wanted_name
            if name is not None:
                frame["name"] = name
            room_state = state.rooms.get(room)
            if room_state is not None and room_state.last_id is not None:
                frame["since"] = room_state.last_id
            if anonymous and state.resume_token is not None and not conn.named:
                # A takeover: ask for a new token, so the one used (which may
                # have leaked) stops working (docs/protocol.md §6).
                frame["token"] = state.resume_token
                frame["rotate"] = True
            request.with_token = "token" in frame
        elif request.kind == "say":
            frame.update(room=request.room, msg=request.msg)
        elif request.kind == "whisper":
            frame.update(to=request.to, msg=request.msg)
        elif request.kind == "leave":
            frame["room"] = request.room
        elif request.kind == "history":
            frame.update(room=request.room, limit=request.limit)
            if request.before is not None:
                frame["before"] = request.before
        else:  # auth
            frame["token"] = request.token
        return encode(frame)
