"""The checks a client frame passes before it changes anything.

They run in docs/protocol.md §5's order: name, room, rate, state; each
raises `Refused` with the error to answer. Checks change nothing but the
rate buckets they draw on (and the count of frames they refused).
"""

from __future__ import annotations

from ..protocol import ErrorCode, is_valid_room, name_key, normalize_name
from .model import Client, Refused, Room
from .rooms import Rooms

__all__ = ["Checks"]


class Checks:
    """The checks of one chat state, and how many frames the rate limits refused."""

    __slots__ = ("_max_rooms", "_rooms", "rate_limited")

    def __init__(self, rooms: Rooms, *, max_rooms: int) -> None:
        self._rooms = rooms
        self._max_rooms = max_rooms
        #: Frames dropped by the rate limit (a metric).
        self.rate_limited = 0

    def name(self, client: Client, requested: str | None) -> str:
        """The name a frame binds: ``requested``, normalised, or the connection's own."""
        if requested is None:
            if client.name is None:
                raise Refused(ErrorCode.BAD_NAME, "a first join needs a `name`")
            return client.name
        name = normalize_name(requested)
        if name is None:
            raise Refused(
                ErrorCode.BAD_NAME,
                "a name is 1-32 visible characters, with no control, format or invisible"
                " characters, and not a reserved name",
            )
        # "The same name" is the same name key (§2.1): a takeover binds the name
        # as first bound, which may differ from the one typed in case or form.
        if client.name is not None and name_key(name) != name_key(client.name):
            raise Refused(ErrorCode.BAD_NAME, f"this connection is already named {client.name}")
        return name

    def room(self, client: Client, room: str, *, joining: bool = False) -> None:
        if not is_valid_room(room):
            raise Refused(ErrorCode.BAD_ROOM, "a room name matches [a-z0-9][a-z0-9_-]{0,63}")
        if joining and room not in client.rooms and len(client.rooms) >= self._max_rooms:
            raise Refused(ErrorCode.BAD_ROOM, f"at most {self._max_rooms} rooms per connection")

    def rate(self, client: Client, now: float) -> None:
        if client.limiter.allow(now):
            return
        self.rate_limited += 1
        raise Refused(ErrorCode.RATE_LIMITED, "slow down: too many messages")

    def reply_budget(self, client: Client, now: float) -> None:
        """Replies that copy history (`history`, a join's replay) draw their size on
        a bucket of their own (docs/protocol.md §9); one in debt refuses the next."""
        if client.classic or client.limiter.allow_reply(now):
            return
        self.rate_limited += 1
        raise Refused(ErrorCode.RATE_LIMITED, "slow down: too much history asked for")

    def membership_rate(self, client: Client, now: float) -> None:
        """Joins and leaves that change a membership draw on a bucket of their own."""
        if client.limiter.allow_membership(now):
            return
        self.rate_limited += 1
        raise Refused(ErrorCode.RATE_LIMITED, "slow down: too many joins and leaves")

    def joined(self, client: Client, room: str) -> Room:
        """The room ``client`` has joined, by name."""
        if room not in client.rooms:
            raise Refused(ErrorCode.NOT_JOINED, f"join {room} first")
        return self._rooms.rooms[room]
