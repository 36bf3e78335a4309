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
from ..waiting import WaitingRun
from .model import CLASSIC_ROOM, Client, Room, User
from .output import OutputBuffer

__all__ = ["Rooms"]


class Rooms:
    """Every room this node holds in memory: with members here or elsewhere,
    subscribers, a load of its history under way, or kept history.

    A room with nothing but kept history is idle; the idle ones form a cache
    (docs/protocol.md §8): past ``cache_rooms`` of them, or past ``cache_bytes``
    of kept history in all, the least recently used idle room is forgotten
    (evicted), and its history is read from the store again when it is joined.
    A room with none of these is forgotten at once.
    """

    __slots__ = (
        "_cache_bytes",
        "_cache_rooms",
        "_idle",
        "_output",
        "cached_bytes",
        "evicted",
        "history_complete",
        "rooms",
    )

    def __init__(
        self, output: OutputBuffer, *, cache_rooms: int = 1000, cache_bytes: int = 1 << 26
    ) -> None:
        self._output = output
        self._cache_rooms = cache_rooms
        self._cache_bytes = cache_bytes
        #: The rooms by name.
        self.rooms: dict[str, Room] = {}
        #: The idle rooms, least recently used first.
        self._idle: dict[str, None] = {}
        #: What the kept history of every room here costs (`Room.bytes`).
        self.cached_bytes = 0
        #: Idle rooms forgotten to stay within the cache's bounds, since start.
        self.evicted = 0
        #: No room outside memory has stored history (none was evicted, and the
        #: store's snapshot had them all): a room made now is known to be empty,
        #: so its joins need no load (`RoomLog.to_load`).
        self.history_complete = True

    @property
    def idle(self) -> int:
        """Rooms held only for their kept history."""
        return len(self._idle)

    def room(self, name: str) -> Room:
        """The room called ``name``, made if it does not exist yet; no longer idle."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, loaded=self.history_complete)
        elif self._idle:
            self._idle.pop(name, None)
        return room

    def forget_if_empty(self, room: Room) -> None:
        """A room with nothing but its (loaded) history becomes idle, the newest
        in the cache; one with nothing at all is forgotten."""
        if room.members or room.remote or room.typed or room.classic or room.loading:
            return
        if room.messages and room.loaded:
            room.waiting = None  # (nobody shares it now: an idle room keeps no run)
            self._idle.pop(room.name, None)
            self._idle[room.name] = None
            self.evict()
        elif self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self.cached_bytes -= room.bytes

    def evict(self) -> None:
        """Forget the least recently used idle rooms while the cache is over a bound."""
        idle = self._idle
        while idle and (len(idle) > self._cache_rooms or self.cached_bytes > self._cache_bytes):
            name = next(iter(idle))
            del idle[name]
            room = self.rooms.pop(name)
            self.cached_bytes -= room.bytes
            self.evicted += 1
            self.history_complete = False

    # --- subscribers ---------------------------------------------------------------

    def subscribe(self, room: Room, client: Client) -> None:
        if client.classic:
            room.classic[client] = None
        else:
            room.typed[client] = None
            waiting = room.waiting
            if waiting is not None and waiting.open:
                client.peer.share(waiting)  # what the room adds from now on

    def unsubscribe(self, room: Room, client: Client) -> None:
        if room.typed.pop(client, 0) is None:
            waiting = room.waiting
            if waiting is not None and waiting.open:
                client.peer.unshare(waiting)
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
        room.put_member(user)
        user.rooms.add(room.name)
        self._output.changed(add=(room.name, user.name))
        if user.name not in room.remote:
            self.to_typed(room, PresenceFrame(room.name, "join", user.name), skip=skip)

    def remove_member(self, user: User, room: Room) -> None:
        if room.members.get(user.name) is user:
            room.pop_member(user.name)
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
        """``frame`` to the room's typed subscribers (classic ones never get it).

        These frames may wait a little to be written (docs/protocol.md §6): a
        crowd joining a room then costs each member a few writes, not one per
        join. They are added once to the room's run of this round, which every
        typed subscriber shares (`waiting`), not delivered once per member.
        """
        waiting = room.waiting
        if waiting is None or not waiting.open:
            waiting = WaitingRun()
            for member in room.typed:
                member.peer.share(waiting)
            if not waiting.filed:
                return  # nobody takes it (no typed subscriber, or all closing)
            room.waiting = waiting
        out = OutFrame.of(frame)
        if skip is not None and skip in room.typed:
            skip.peer.unshare(waiting)
            waiting.add(out)
            skip.peer.share(waiting)
        else:
            waiting.add(out)

    @staticmethod
    def broadcast(room: Room, out: OutFrame) -> None:
        """A `message` frame to every subscriber of ``room``: the hot path, one
        encoded frame for all, and nothing per delivery beyond the call (and,
        for a member with new frames shared that wait, taking them first)."""
        for member in room.typed:
            member.peer.deliver(out)
        for member in room.classic:
            member.peer.deliver(out)
