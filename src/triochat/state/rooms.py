"""Rooms, their subscribers and members, and the fan-out of room frames.

A connection hears a room as a subscriber: typed connections get every
frame of the room (``Room.typed``), classic ones only its `message` frames
(``Room.classic``; docs/protocol.md §7), and so do lobby listeners: `/`
connections whose first frame has not come, in lobby's. A member is
a user, live or held (§6); members on other nodes are ``Room.remote``, kept
by `state.cluster`. A presence frame is shown only when a name comes or goes
from the room as a whole (here or on another node).
"""

from __future__ import annotations

from ..frames import OutFrame
from ..protocol import DeletedFrame, PresenceFrame, TypingFrame
from .model import CLASSIC_ROOM, Client, Room, User
from .output import OutputBuffer

__all__ = ["Rooms"]


class Rooms:
    """Every room this node knows of: with members here or elsewhere, subscribers
    or kept history (a room with none of these is forgotten)."""

    __slots__ = ("_output", "rooms")

    def __init__(self, output: OutputBuffer) -> None:
        self._output = output
        #: The rooms by name.
        self.rooms: dict[str, Room] = {}

    def room(self, name: str) -> Room:
        """The room called ``name``, made if it does not exist yet."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room

    def forget_if_empty(self, room: Room) -> None:
        if not (room.members or room.remote or room.typed or room.classic or room.messages):
            del self.rooms[room.name]

    # --- subscribers ---------------------------------------------------------------

    def subscribe(self, room: Room, client: Client) -> None:
        if client.classic:
            room.classic[client] = None
        else:
            room.typed[client] = None

    def unsubscribe(self, room: Room, client: Client) -> None:
        room.typed.pop(client, None)
        room.classic.pop(client, None)

    def listen_to_lobby(self, client: Client) -> None:
        """A `/` connection hears lobby until its first frame decides (§7)."""
        self.room(CLASSIC_ROOM).classic[client] = None

    def stop_listening_to_lobby(self, client: Client) -> None:
        room = self.rooms.get(CLASSIC_ROOM)
        if room is not None and room.classic.pop(client, 0) is None:
            self.forget_if_empty(room)

    def drop(self, client: Client) -> None:
        """``client`` is gone (closed or replaced): it hears no room any more.

        Its user's memberships stay (`state.presence` holds or ends them).
        """
        client.gone = True
        for room_name in client.rooms:
            self.unsubscribe(self.rooms[room_name], client)
        client.rooms = set()
        self.stop_listening_to_lobby(client)

    # --- members --------------------------------------------------------------------

    def add_member(self, user: User, room: Room, skip: Client | None = None) -> None:
        room.members[user.name] = user
        user.rooms.add(room.name)
        self._output.changed(add=(room.name, user.name))
        if user.name not in room.remote:
            self.to_typed(room, PresenceFrame(room.name, "join", user.name), skip=skip)

    def remove_member(self, user: User, room: Room) -> None:
        if room.members.get(user.name) is user:
            del room.members[user.name]
            user.rooms.discard(room.name)
            self._output.changed(remove=(room.name, user.name))
            if user.name not in room.remote:
                self.to_typed(room, PresenceFrame(room.name, "leave", user.name))
        self.forget_if_empty(room)

    # --- fan-out ----------------------------------------------------------------------

    def to_typed(
        self,
        room: Room,
        frame: PresenceFrame | TypingFrame | DeletedFrame,
        skip: Client | None = None,
    ) -> None:
        """``frame`` to the room's typed subscribers (classic ones never get it)."""
        out = OutFrame.of(frame)
        for member in room.typed:
            if member is not skip:
                member.peer.deliver(out)

    @staticmethod
    def broadcast(room: Room, out: OutFrame) -> None:
        """A `message` frame to every subscriber of ``room``: the hot path, one
        encoded frame for all, and nothing per delivery beyond the call."""
        for member in room.typed:
            member.peer.deliver(out)
        for member in room.classic:
            member.peer.deliver(out)
