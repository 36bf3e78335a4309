"""Each room's log: the node's one copy of recent history, and `since` recovery.

A room keeps its newest ``history_size`` stored messages (``Room.messages``,
with their seqs beside them for bisect), in the chat's one order: messages
come in from the backplane only, by seq (docs/protocol.md §8 and §14).
From them come a join's replay (`replay`, with ``since``: §6) and `history`
pages (`page`). Ids are ``<epoch>-<seq>``; a message of another epoch, or one
already here, is not kept again.

Only rooms in memory keep messages (`state.rooms` evicts idle ones). A room
whose history is not here (``Room.loaded`` false) is read from the store
before a join or a `history` request is applied (`to_load`): the hub asks
the backplane beside its step, and brings the answer to `end_load`, which
merges it with what arrived meanwhile (`begin_load` made the room keep that).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Final, NamedTuple

import msgspec

from ..protocol import (
    ClassicFrame,
    ClientFrame,
    ErrorCode,
    HistoryRequest,
    Join,
    Message,
    encode,
    encode_history,
    is_valid_room,
    seq_of,
)
from ..recent import Snapshot, cached_bytes
from .model import CLASSIC_ROOM, Client, RecentJson, Refused, Room
from .rooms import Rooms

__all__ = ["JOIN_HISTORY", "MAX_RECOVERY", "RoomCacheStats", "RoomLog", "page_before"]

JOIN_HISTORY: Final = 100  # newest messages in a `joined` without `since`
MAX_RECOVERY: Final = 200  # most missed messages a `since` replays exactly
#: What a kept JSON part costs beside its bytes (a bytes object's header and
#: its slot in the list), about: `RecentJson.size`.
PART_OVERHEAD: Final = 41


def page_before(messages: list[Message], end: int, limit: int) -> tuple[list[Message], bool]:
    """A `history` page of ``messages`` (oldest first): up to ``limit`` of them
    before index ``end``, and whether older ones are left."""
    start = max(0, end - limit)
    return messages[start:end], start > 0


class RoomCacheStats(NamedTuple):
    """The room cache's figures (metrics, docs/operations.md)."""

    #: Rooms held only for their kept history.
    idle: int
    #: What the history kept in memory costs, about (`recent.cached_bytes`).
    bytes: int
    #: Idle rooms forgotten to stay within the cache's bounds, since start.
    evicted: int
    #: Rooms whose history was read from the store, since start.
    loads: int


class RoomLog:
    """The kept messages of every room, and where the chat's one order stands.

    Args:
        epoch: the stored history's epoch (ids are ``<epoch>-<seq>``).
        next_seq: one more than the newest stored message's seq: messages up
            to it are known (a message that comes again is ignored).
        history_size: messages kept per room.
    """

    __slots__ = ("_rooms", "_size", "epoch", "last_seq", "loads")

    def __init__(self, rooms: Rooms, *, epoch: str, next_seq: int, history_size: int) -> None:
        self._rooms = rooms
        self._size = history_size
        self.epoch = epoch
        #: The newest seq this node has kept (or knows to be stored).
        self.last_seq = next_seq - 1
        #: Rooms whose history was read from the store (`end_load`), since start.
        self.loads = 0

    def load(self, snapshot: Snapshot) -> None:
        """Keep what the store held at start (each room's messages oldest first)."""
        rooms = self._rooms
        rooms.history_complete = snapshot.complete
        for room_name, messages in snapshot.rooms.items():
            room = rooms.room(room_name)
            room.loaded = True
            self._merge(room, messages)
            self.last_seq = max(self.last_seq, room.seqs[-1] if room.seqs else 0)
            rooms.forget_if_empty(room)
        self.last_seq = max(self.last_seq, snapshot.next_seq - 1)

    def seq_of(self, message_id: str) -> int | None:
        """The seq of one of this epoch's ids; None for any other id."""
        return seq_of(self.epoch, message_id)

    def new_seq(self, message: Message) -> int | None:
        """``message``'s seq if it is of this epoch and not here yet (it is known
        from now); else None."""
        seq = seq_of(self.epoch, message.id)
        if seq is None:
            return None  # another epoch's: a backplane sends a `Reload` before those
        if seq <= self.last_seq:
            return None  # already here (a gap fill and a live copy may overlap)
        self.last_seq = seq
        return seq

    def keep(self, message: Message, seq: int) -> Room | None:
        """Keep a new message (its seq from `new_seq`) in its room: the room, or
        None if it is not in memory (the store has the message; the room is read
        when joined)."""
        rooms = self._rooms
        room = rooms.rooms.get(message.room)
        if room is None:
            if not rooms.history_complete:
                return None
            room = rooms.room(message.room)  # a room that was empty: now it has history
        if room.loaded or room.loading:
            room.messages.append(message)
            room.seqs.append(seq)
            room.bytes += (cost := cached_bytes(message))
            rooms.cached_bytes += cost
            self._trim(room)
        rooms.forget_if_empty(room)  # (an idle room is the newest in the cache again)
        rooms.evict()
        return room

    def remove(self, room_name: str, message_id: str) -> Room | None:
        """Forget a deleted message (docs/protocol.md §16): its room, or None if
        no room here keeps it. A `since` of its id then recovers nothing."""
        room = self._rooms.rooms.get(room_name)
        index = self.index_of(room, message_id) if room is not None else None
        if room is None or index is None:
            return None
        cost = cached_bytes(room.messages[index])
        room.bytes -= cost
        self._rooms.cached_bytes -= cost
        del room.messages[index]
        del room.seqs[index]
        return room

    def _trim(self, room: Room) -> None:
        """Keep the room's newest ``history_size`` messages."""
        over = len(room.messages) - self._size
        if over > 0:
            cost = sum(cached_bytes(m) for m in room.messages[:over])
            room.bytes -= cost
            self._rooms.cached_bytes -= cost
            del room.messages[:over]
            del room.seqs[:over]

    # --- rooms read from the store ------------------------------------------------------

    def to_load(self, client: Client, frame: ClientFrame) -> str | None:
        """The room whose history must be read before ``frame`` is applied, if any:
        a join's (a classic frame's first is a join of lobby), or a member's
        `history` request's, when that room's history is not in memory."""
        if isinstance(frame, Join):
            name = frame.room
        elif isinstance(frame, ClassicFrame):
            if CLASSIC_ROOM in client.rooms:
                return None
            name = CLASSIC_ROOM
        elif isinstance(frame, HistoryRequest) and frame.room in client.rooms:
            name = frame.room
        else:
            return None
        if not is_valid_room(name):
            return None  # refused by its checks: nothing to read
        return None if self.in_memory(name) else name

    def in_memory(self, room_name: str) -> bool:
        """Whether the room's history is here, whole (else the store has it)."""
        room = self._rooms.rooms.get(room_name)
        if room is None:
            return self._rooms.history_complete
        return room.loaded

    def begin_load(self, room_name: str) -> None:
        """A read of the room's history begins: the room stays, and keeps what arrives."""
        self._rooms.room(room_name).loading += 1

    def end_load(self, room_name: str, stored: list[Message] | None) -> None:
        """The read ended with ``stored`` (the room's newest messages, oldest first),
        or None if it failed. Merged with what arrived meanwhile; messages newer
        than this node has seen are left for the backplane to bring, in order."""
        room = self._rooms.room(room_name)
        room.loading -= 1
        if stored is not None and not room.loaded:
            last = self.last_seq
            seen = [m for m in stored if (self.seq_of(m.id) or last + 1) <= last]
            self._merge(room, seen)
            room.loaded = True
            self.loads += 1
        self._rooms.forget_if_empty(room)

    def _merge(self, room: Room, stored: list[Message]) -> None:
        """Add ``stored`` (of this epoch) to the room's messages, by seq, once each."""
        by_seq = {seq: message for seq, message in zip(room.seqs, room.messages, strict=True)}
        for message in stored:
            seq = self.seq_of(message.id)
            if seq is not None:
                by_seq.setdefault(seq, message)
        seqs = sorted(by_seq)[-self._size :]
        room.seqs = seqs
        room.messages = [by_seq[seq] for seq in seqs]
        room.recent = None  # (its cost is in room.bytes, replaced just below)
        cost = sum(cached_bytes(m) for m in room.messages)
        self._rooms.cached_bytes += cost - room.bytes
        room.bytes = cost

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

    def replay(self, room: Room, since: str | None) -> tuple[msgspec.Raw, bool]:
        """`joined.history` (as JSON) and `recovered` for a join with ``since`` (§6)."""
        messages = room.messages
        if since is None:
            return self._newest(room), True
        index = self.index_of(room, since)
        if index is None or len(messages) - index - 1 > MAX_RECOVERY:
            return self._newest(room), False
        return encode_history(messages[index + 1 :]), True

    def _newest(self, room: Room) -> msgspec.Raw:
        """The JSON array of the room's newest `JOIN_HISTORY` messages, from its
        kept JSON (`Room.recent`), brought in step first: the messages kept since
        it was read are encoded once each; after any other change (a delete, a
        merge, a new epoch, a trim into it) it is encoded again whole."""
        messages = room.messages
        keep = min(len(messages), JOIN_HISTORY)
        if keep == 0:
            self._set_recent(room, None)
            return msgspec.Raw(b"[]")
        recent = room.recent
        start = self._after(room, recent) if recent is not None else None
        if recent is None or start is None:
            parts = [encode(m) for m in messages[-keep:]]
        else:
            parts = recent.parts
            # (Past the newest `keep`, nothing older is encoded: it would go.)
            parts.extend(encode(m) for m in messages[max(start, len(messages) - keep) :])
            del parts[:-keep]
        self._set_recent(room, RecentJson(parts, messages[-keep].id, messages[-1].id))
        return msgspec.Raw(b"[" + b",".join(parts) + b"]")

    def _after(self, room: Room, recent: RecentJson) -> int | None:
        """Where the messages ``recent`` lacks begin in ``room.messages``; None if
        it is not their unbroken run any more."""
        last = self.index_of(room, recent.last_id)
        if last is None:
            return None
        first = last - len(recent.parts) + 1
        if first < 0 or room.messages[first].id != recent.first_id:
            return None
        return last + 1

    def _set_recent(self, room: Room, recent: RecentJson | None) -> None:
        """Keep ``recent`` as the room's, its memory counted in ``Room.bytes``."""
        old = room.recent.size if room.recent is not None else 0
        if recent is not None:
            recent.size = sum(map(len, recent.parts)) + PART_OVERHEAD * len(recent.parts)
        new = recent.size if recent is not None else 0
        room.recent = recent
        room.bytes += new - old
        self._rooms.cached_bytes += new - old

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
        return page_before(room.messages, end, limit)

    # --- a reload -------------------------------------------------------------------------

    def start_epoch(self, epoch: str) -> bool:
        """Whether ``epoch`` is a new one; if so every kept message is forgotten:
        the store lost them, and their ids mean nothing any more."""
        if epoch == self.epoch:
            return False
        self.epoch = epoch
        self.last_seq = 0
        rooms = self._rooms
        for room in list(rooms.rooms.values()):
            rooms.cached_bytes -= room.bytes
            room.messages, room.seqs, room.bytes, room.recent = [], [], 0, None
            rooms.forget_if_empty(room)
        return True

    def unseen(self, snapshot: Snapshot) -> Iterable[Message]:
        """The snapshot's messages in seq order (`keep` skips those already here)."""
        fresh = [m for kept in snapshot.rooms.values() for m in kept]
        fresh.sort(key=lambda message: self.seq_of(message.id) or 0)
        return fresh

    def caught_up(self, next_seq: int) -> None:
        """Everything before ``next_seq`` is stored: known here, or lost to a gap."""
        self.last_seq = max(self.last_seq, next_seq - 1)
