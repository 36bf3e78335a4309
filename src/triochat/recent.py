"""Recent history, sans-I/O: the newest messages of each room.

How big a message counts for the stores' and the cache's bounds
(`message_bytes`, `cached_bytes`) and the form a store hands rooms over in
(`Snapshot`). It stands below both the chat core (`events`,
`state.log`) and the stores (`history`, `backplane`), so the core never
imports storage (docs/protocol.md section 8).
"""

from __future__ import annotations

from typing import Final

import msgspec

from .protocol import Message

__all__ = ["MESSAGE_OVERHEAD", "Snapshot", "cached_bytes", "message_bytes"]

#: What a kept message costs in memory beyond its text (the struct and its
#: strings' headers), about: the cache bound counts it (docs/protocol.md §8).
MESSAGE_OVERHEAD: Final = 256


def message_bytes(message: Message) -> int:
    """A message's size as stored: the UTF-8 bytes of its room, id, name and text
    (the measure of ``--max-stored-bytes``, docs/protocol.md §8)."""
    return (
        len(message.room.encode())
        + len(message.id)
        + len(message.name.encode())
        + len(message.msg.encode())
    )


def cached_bytes(message: Message) -> int:
    """What keeping ``message`` in a node's memory costs, about."""
    return message_bytes(message) + MESSAGE_OVERHEAD


class Snapshot(msgspec.Struct, frozen=True):
    """What a store holds when a node starts (or reloads)."""

    #: Unique to this store's lifetime: a store that lost its data gets a new
    #: one, so ids handed out before can never be reused.
    epoch: str
    #: The next sequence number to hand out (greater than every stored one).
    next_seq: int
    #: The newest ``history_size`` messages of every room it names, oldest first.
    rooms: dict[str, list[Message]]
    #: Whether ``rooms`` names every room the store has history of (a store
    #: hands over only the most recently written rooms at start: the others
    #: are read when they are joined, docs/protocol.md §8).
    complete: bool = True
