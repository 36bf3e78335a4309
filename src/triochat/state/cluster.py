"""The cluster view: what this node knows of the others (docs/protocol.md §14).

Other nodes are known only through the events the backplane brings: their
entries, (room, name) memberships and ("", name) connected users. Members
elsewhere show in member lists and presence frames as members here do
(``Room.remote``); connected users elsewhere can be whispered to. A user
taken over by another node is kicked here and handed over (`Kick`,
`Handover`) with no leave/join flicker for anybody.
"""

from __future__ import annotations

from ..events import Entry, Handover, Kick, MemberState, TypingEvent
from ..protocol import PresenceFrame, TypingFrame, name_key
from .model import User
from .output import OutputBuffer
from .presence import Presence
from .rooms import Rooms

__all__ = ["ClusterView"]


class ClusterView:
    """The other nodes' entries, and the events that change them."""

    __slots__ = (
        "_output",
        "_presence",
        "_remote",
        "_remote_names",
        "_remote_online",
        "_rooms",
        "node",
    )

    def __init__(self, rooms: Rooms, presence: Presence, output: OutputBuffer) -> None:
        self._rooms = rooms
        self._presence = presence
        self._output = output
        #: This node's id in the cluster.
        self.node = output.node
        #: Other nodes' entries: (room, name) memberships and ("", name) users.
        self._remote: dict[str, set[Entry]] = {}
        #: Users connected on other nodes: name key -> nodes, and the name as bound.
        self._remote_online: dict[str, set[str]] = {}
        self._remote_names: dict[str, str] = {}

    def has_others(self) -> bool:
        """Whether another node ever said something (typing is published then)."""
        return bool(self._remote)

    def online(self, key: str) -> tuple[set[str], str] | None:
        """The nodes where the user with name key ``key`` is connected, and its
        name as bound there; None if it is connected on no other node."""
        nodes = self._remote_online.get(key)
        if not nodes:
            return None
        return nodes, self._remote_names.get(key, "")

    # --- what the other nodes say --------------------------------------------------

    def member_state(self, event: MemberState) -> None:
        if event.node != self.node:
            for entry in event.remove:
                self._remote_remove(event.node, entry)
            for entry in event.add:
                self._remote_add(event.node, entry)

    def typing(self, event: TypingEvent) -> None:
        room = self._rooms.rooms.get(event.room)
        if room is not None and event.node != self.node:
            self._rooms.to_typed(room, TypingFrame(room.name, event.name))

    def node_gone(self, node: str) -> None:
        if node == self.node:
            return
        for entry in sorted(self._remote.get(node, ())):
            self._remote_remove(node, entry)
        self._remote.pop(node, None)

    def resync(
        self, states: dict[str, list[Entry]], waiting: frozenset[str] = frozenset()
    ) -> None:
        """Replace what is known of the other nodes (after the backplane reconnected);
        what is known of a node in ``waiting`` stays as it is."""
        for node in list(self._remote):
            if node not in states and node not in waiting:
                self.node_gone(node)
        for node, entries in states.items():
            self.replace_node(node, entries)

    def replace_node(self, node: str, entries: list[Entry]) -> None:
        """``node`` holds exactly ``entries`` now; presence frames for what changed."""
        if node == self.node:
            return
        now_held = {(room, name) for room, name in entries}
        for entry in sorted(self._remote.get(node, set()) - now_held):
            self._remote_remove(node, entry)
        for entry in sorted(now_held):
            self._remote_add(node, entry)

    def _remote_add(self, node: str, entry: Entry) -> None:
        entries = self._remote.setdefault(node, set())
        if entry in entries:
            return
        entries.add(entry)
        room_name, name = entry
        if not room_name:
            key = name_key(name)
            self._remote_online.setdefault(key, set()).add(node)
            self._remote_names[key] = name
            return
        room = self._rooms.room(room_name)
        nodes = room.remote.get(name)
        if nodes is None:
            nodes = room.put_remote(name)
            if name not in room.members:
                self._rooms.to_typed(room, PresenceFrame(room.name, "join", name))
        nodes.add(node)

    def _remote_remove(self, node: str, entry: Entry) -> None:
        entries = self._remote.get(node)
        if entries is None or entry not in entries:
            return
        entries.discard(entry)
        room_name, name = entry
        if not room_name:
            key = name_key(name)
            online = self._remote_online.get(key)
            if online is not None:
                online.discard(node)
                if not online:
                    del self._remote_online[key]
                    self._remote_names.pop(key, None)
            return
        room = self._rooms.rooms.get(room_name)
        nodes = room.remote.get(name) if room is not None else None
        if room is None or nodes is None:
            return
        nodes.discard(node)
        if not nodes:
            room.pop_remote(name)
            if name not in room.members:
                self._rooms.to_typed(room, PresenceFrame(room.name, "leave", name))
            self._rooms.forget_if_empty(room)

    # --- a user moving between nodes ---------------------------------------------------

    def kicked(self, kick: Kick) -> None:
        """Node ``kick.by`` took ``kick.name`` over from this node: close it here
        and hand its rooms over."""
        if kick.node != self.node:
            return  # (addressed to the node that held the name)
        presence, by = self._presence, kick.by
        user = presence.users.get(name_key(kick.name))
        if user is None:
            return
        presence.forget(user)
        # The entries this node published carry the name as bound here (the
        # same name, unless a backplane could not tell the new node).
        name = user.name
        # Frees what `by`'s claim did not take over (the backplane keeps the rest).
        self._output.release(name)
        for old in list(user.clients):
            presence.replaced(old)
        user.clients = {}
        rooms = sorted(user.rooms)
        user.deadline = None
        user.rooms = set()
        for room_name in rooms:
            # The member moves to node `by` without a leave/join flicker here.
            self._remote_add(by, (room_name, name))
            room = self._rooms.rooms[room_name]
            if room.members.get(name) is user:
                room.pop_member(name)
        self._output.publish(Handover(self.node, by, name, rooms))

    def handed_over(self, handover: Handover, now: float) -> None:
        """Node ``handover.node`` hands a user's rooms to ``handover.to``: the
        others move the memberships; the new node holds them for the grace period."""
        name, old, new = handover.name, handover.node, handover.to
        if old == self.node:
            return
        if new != self.node:
            for room_name in handover.rooms:
                self._remote_add(new, (room_name, name))
            for room_name in handover.rooms:
                self._remote_remove(old, (room_name, name))
            self._remote_remove(old, ("", name))
            return
        user = self._presence.users.get(name_key(name))
        if user is None:
            return  # gone again already: the rooms go with the old node's entries
        if self._take_rooms(user, name, handover.rooms, old):
            self._presence.hold(user, now)  # the new connection takes them back by joining

    def _take_rooms(self, user: User, name: str, room_names: list[str], old: str) -> bool:
        """Make ``user`` a member of the rooms node ``old`` held as ``name``;
        whether any of them was not a membership here yet."""
        output = self._output
        held = False
        for room_name in room_names:
            room = self._rooms.room(room_name)
            if user.name not in room.members:
                room.put_member(user)
                user.rooms.add(room_name)
                output.changed(add=(room_name, user.name))
                held = True
                if user.name != name and user.name not in room.remote:
                    self._rooms.to_typed(room, PresenceFrame(room.name, "join", user.name))
            if user.name != name:
                # Bound here under another form of the name: the other nodes
                # took the old form as ours on the handover; it goes.
                output.changed(remove=(room_name, name))
            self._remote_remove(old, (room_name, name))
        self._remote_remove(old, ("", name))
        return held
