"""Message history stores: where acked messages live.

`History` is the seam; `memory.MemoryHistory` (``--memory``) and
`sqlite.SqliteHistory` (the default) implement it, and one conformance suite
(tests/test_history.py) runs over both. The test double that fails on request
is a subclass in tests/faults.py (`FaultyMemoryHistory`), not a switch here.
What a store hands over (`Snapshot`) is defined below the chat core, in
`triochat.recent`, so the core never imports storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..protocol import Message
from ..recent import Snapshot as Snapshot

__all__ = ["History", "Snapshot"]


class History(Protocol):
    """A durable (or not) log of room messages, trimmed per room."""

    #: What the stored messages add up to (`recent.message_bytes`), a metric.
    stored_bytes: int
    #: Messages deleted to stay within ``--max-stored-bytes``, since start.
    trimmed: int

    async def load(self) -> Snapshot:
        """Open the store and read what it holds; once open, read it again.

        The snapshot may hold only the most recently written rooms
        (``Snapshot.complete`` says); the others are read with `recent`.
        Read again when a node attaches to a `LocalBroker` that has one already
        (tests' in-memory clusters): the broker keeps no copy of its own.
        """
        ...

    async def recent(self, room: str) -> list[Message]:
        """The newest ``history_size`` messages of ``room``, oldest first.

        Raises:
            StorageError: the store could not be read.
        """
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

    async def delete(self, room: str, message_id: str) -> bool:
        """Remove one message (the server API, docs/protocol.md §16); whether
        ``room`` had it.

        Raises:
            StorageError: the store could not be changed.
        """
        ...

    async def aclose(self) -> None:
        """Flush and close; safe to call twice."""
        ...
