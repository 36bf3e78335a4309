"""Message history stores: where acked messages live.

`History` is the seam; `memory.MemoryHistory` (``--memory``, also the test
fake) and `sqlite.SqliteHistory` (the default) implement it, and one
conformance suite (tests/test_history.py) runs over both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from ..protocol import Message

__all__ = ["History", "Snapshot"]


class Snapshot(msgspec.Struct, frozen=True):
    """What a store holds when the server starts."""

    #: Unique to this store's lifetime: a store that lost its data gets a new
    #: one, so ids handed out before can never be reused.
    epoch: str
    #: The next sequence number to hand out (greater than every stored one).
    next_seq: int
    #: The newest ``history_size`` messages of every room, oldest first.
    rooms: dict[str, list[Message]]


class History(Protocol):
    """A durable (or not) log of room messages, trimmed per room."""

    async def load(self) -> Snapshot:
        """Open the store and read what it holds."""
        ...

    async def append(self, batch: Sequence[Message]) -> None:
        """Store every message of ``batch`` atomically, then trim.

        Raises:
            StorageError: nothing of the batch was stored.
        """
        ...

    @property
    def append_nowait(self) -> Callable[[Sequence[Message]], None] | None:
        """`append` without a checkpoint, for a store in memory (the hub then
        commits in its own step, with no task hop); None for a store on disk."""
        ...

    async def aclose(self) -> None:
        """Flush and close; safe to call twice."""
        ...
