"""Each room's log: the node's one copy of recent history, and `since` recovery.

A room keeps its newest ``history_size`` stored messages (``Room.messages``,
with their seqs beside them for bisect), in the chat's one order: messages
come in from the backplane only, by seq (docs/protocol.md §8 and §14).
From them come a join's replay (`replay`, with ``since``: §6) and `history`
pages (`page`). Ids are ``<epoch>-<seq>``; a message of another epoch, or one
already here, is not kept again.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Final

from ..protocol import ErrorCode, Message, seq_of
from ..recent import Snapshot, keep_newest
from .model import Refused, Room
from .rooms import Rooms

__all__ = ["JOIN_HISTORY", "MAX_RECOVERY", "RoomLog"]

JOIN_HISTORY: Final = 100  # newest messages in a `joined` without `since`
MAX_RECOVERY: Final = 200  # most missed messages a `since` replays exactly


class RoomLog:
    """The kept messages of every room, and where the chat's one order stands.

    Args:
        epoch: the stored history's epoch (ids are ``<epoch>-<seq>``).
        next_seq: one more than the newest stored message's seq: messages up
            to it are known (a message that comes again is ignored).
        history_size: messages kept per room.
    """

    __slots__ = ("_rooms", "_size", "epoch", "last_seq")

    def __init__(self, rooms: Rooms, *, epoch: str, next_seq: int, history_size: int) -> None:
        self._rooms = rooms
        self._size = history_size
        self.epoch = epoch
        #: The newest seq this node has kept (or knows to be stored).
        self.last_seq = next_seq - 1

    def load(self, history: dict[str, list[Message]]) -> None:
        """Keep what the store held at start (each room's messages oldest first)."""
        size = self._size
        for room_name, messages in history.items():
            room = self._rooms.room(room_name)
            kept = list(messages)
            keep_newest(kept, size)
            room.messages = kept
            room.seqs = [self.seq_of(m.id) or 0 for m in kept]
            self.last_seq = max(self.last_seq, room.seqs[-1] if room.seqs else 0)

    def seq_of(self, message_id: str) -> int | None:
        """The seq of one of this epoch's ids; None for any other id."""
        return seq_of(self.epoch, message_id)

    def keep(self, message: Message) -> Room | None:
        """Keep a stored message in its room; the room, or None if it is not new here."""
        seq = seq_of(self.epoch, message.id)
        if seq is None:
            return None  # another epoch's: a backplane sends a `Reload` before those
        if seq <= self.last_seq:
            return None  # already here (a gap fill and a live copy may overlap)
        self.last_seq = seq
        room = self._rooms.room(message.room)
        room.messages.append(message)
        room.seqs.append(seq)
        keep_newest(room.messages, self._size)
        keep_newest(room.seqs, self._size)
        return room

    def remove(self, room_name: str, message_id: str) -> Room | None:
        """Forget a deleted message (docs/protocol.md §16): its room, or None if
        no room here keeps it. A `since` of its id then recovers nothing."""
        room = self._rooms.rooms.get(room_name)
        index = self.index_of(room, message_id) if room is not None else None
        if room is None or index is None:
            return None
        del room.messages[index]
        del room.seqs[index]
        return room

    # --- reading ------------------------------------------------------------------------

    def index_of(self, room: Room, message_id: str) -> int | None:
        """Where ``message_id`` stands in the room's kept history, if it does."""
        seq = self.seq_of(message_id)
        if seq is None:
            return None
        index = bisect.bisect_left(room.seqs, seq)
        if index < len(room.seqs) and room.messages[index].id == message_id:
            return index
        return None

    def replay(self, room: Room, since: str | None) -> tuple[list[Message], bool]:
        """`joined.history` and `recovered` for a join with ``since`` (§6)."""
        messages = room.messages
        if since is None:
            return messages[-JOIN_HISTORY:], True
        index = self.index_of(room, since)
        if index is None or len(messages) - index - 1 > MAX_RECOVERY:
            return messages[-JOIN_HISTORY:], False
        return messages[index + 1 :], True

    def page(self, room: Room, before: str | None, limit: int) -> tuple[list[Message], bool]:
        """A `history` page: up to ``limit`` messages before ``before``, and
        whether older ones are kept.

        Raises:
            Refused: ``before`` is not a kept message's id.
        """
        end = len(room.messages)
        if before is not None:
            index = self.index_of(room, before)
            if index is None:
                raise Refused(ErrorCode.BAD_FRAME, "unknown `before` id")
            end = index
        start = max(0, end - limit)
        return room.messages[start:end], start > 0

    # --- a reload -------------------------------------------------------------------------

    def start_epoch(self, epoch: str) -> bool:
        """Whether ``epoch`` is a new one; if so every kept message is forgotten:
        the store lost them, and their ids mean nothing any more."""
        if epoch == self.epoch:
            return False
        self.epoch = epoch
        self.last_seq = 0
        for room in list(self._rooms.rooms.values()):
            room.messages = []
            room.seqs = []
            self._rooms.forget_if_empty(room)
        return True

    def unseen(self, snapshot: Snapshot) -> Iterable[Message]:
        """The snapshot's messages in seq order (`keep` skips those already here)."""
        fresh = [m for kept in snapshot.rooms.values() for m in kept]
        fresh.sort(key=lambda message: self.seq_of(message.id) or 0)
        return fresh

    def caught_up(self, next_seq: int) -> None:
        """Everything before ``next_seq`` is stored: known here, or lost to a gap."""
        self.last_seq = max(self.last_seq, next_seq - 1)
