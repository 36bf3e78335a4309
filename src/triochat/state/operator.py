"""The server API's side of the chat (docs/protocol.md §16): what an operator does.

A program holding the API key, on any node, posts as any name (a say with
no connection: the say pipeline answers it), reads a room's members (here
and on every node) and pages its history, deletes a stored message and
disconnects a user. A deletion and a disconnect act here at once and are
published (`Deletion`, `Disconnect`) for every other node to do the same
(`event`). The store is the hub's business: `delete` runs once the message
is gone from it.
"""

from __future__ import annotations

from ..events import Deletion, Disconnect
from ..protocol import DeletedFrame, ErrorCode, Message
from .log import RoomLog
from .model import Client, Refused
from .output import OutputBuffer
from .presence import Presence
from .rooms import Rooms
from .says import Says

__all__ = ["Operator"]


class Operator:
    """The operations of the server API on this node's chat state."""

    __slots__ = ("_log", "_output", "_presence", "_rooms", "_says")

    def __init__(
        self, rooms: Rooms, log: RoomLog, presence: Presence, says: Says, output: OutputBuffer
    ) -> None:
        self._rooms = rooms
        self._log = log
        self._presence = presence
        self._says = says
        self._output = output

    def publish(self, client: Client, room: str, name: str, msg: str, wall_ms: int) -> None:
        """Post ``msg`` to ``room`` as ``name``: stored, broadcast and acked as a
        say is; ``client`` (no connection: its peer takes the answer) gets the
        `ack` or the `error`."""
        self._says.submit_as(client, room, name, msg, wall_ms)

    def members(self, room: str) -> list[str]:
        """The names in ``room``, on every node (empty for a room with nobody)."""
        found = self._rooms.rooms.get(room)
        return found.member_names() if found is not None else []

    def history_page(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A `history` page of ``room`` (a room with no messages: an empty one).

        Raises:
            Refused: ``before`` is not a kept message's id.
        """
        found = self._rooms.rooms.get(room)
        if found is None:
            if before is not None:
                raise Refused(ErrorCode.BAD_FRAME, "unknown `before` id")
            return [], False
        return self._log.page(found, before, limit)

    def delete(self, room: str, message_id: str) -> bool:
        """A message was deleted from the store: forget it here, tell the room,
        and have every other node do the same. Whether it was kept here."""
        kept = self._forget_message(room, message_id)
        self._output.publish(Deletion(self._output.node, room, message_id))
        return kept

    def disconnect_user(self, user: str) -> None:
        """Close every connection of ``user`` with 4009, on every node."""
        self._presence.disconnect(user)
        self._output.publish(Disconnect(self._output.node, user))

    def event(self, event: Deletion | Disconnect) -> None:
        """Another node's `delete` or `disconnect_user`: do the same here."""
        if event.node == self._output.node:
            return  # the node that published it acted at once
        if isinstance(event, Deletion):
            self._forget_message(event.room, event.id)
        else:
            self._presence.disconnect(event.user)

    def _forget_message(self, room_name: str, message_id: str) -> bool:
        room = self._log.remove(room_name, message_id)
        if room is None:
            return False
        self._rooms.to_typed(room, DeletedFrame(room.name, message_id))
        return True
