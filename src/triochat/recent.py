"""Recent history, sans-I/O: the newest messages of each room.

The one rule for keeping them (`keep_newest`) and the form a store hands
them over in (`Snapshot`). It stands below both the chat core (`events`,
`state.log`) and the stores (`history`, `backplane`), so the core never
imports storage (docs/protocol.md section 8).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from .protocol import Message

__all__ = ["Snapshot", "keep_newest"]

T = TypeVar("T")


def keep_newest(kept: list[T], size: int) -> None:
    """Trim ``kept`` (oldest first) to its newest ``size`` items, in place."""
    if len(kept) > size:
        del kept[:-size]


class Snapshot(msgspec.Struct, frozen=True):
    """What a store holds when a node starts (or reloads)."""

    #: Unique to this store's lifetime: a store that lost its data gets a new
    #: one, so ids handed out before can never be reused.
    epoch: str
    #: The next sequence number to hand out (greater than every stored one).
    next_seq: int
    #: The newest ``history_size`` messages of every room, oldest first.
    rooms: dict[str, list[Message]]
