"""History that lives only in the process (``--memory``); the reference store of
the conformance suite (tests/test_history.py). tests/faults.py subclasses it
into a store that fails on request (`FaultyMemoryHistory`)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..protocol import Message, seq_of
from ..recent import Snapshot, keep_newest

__all__ = ["MemoryHistory"]


class MemoryHistory:
    """Keeps the newest ``history_size`` messages per room in memory.

    A new epoch per instance: after a restart no old id is known, and none is
    reused. `load` may be called again at any time: it copies what is kept.
    """

    def __init__(self, history_size: int) -> None:
        self._size = history_size
        self._epoch = secrets.token_hex(4)
        self._rooms: dict[str, list[Message]] = {}
        self._next_seq = 1

    async def load(self) -> Snapshot:
        rooms = {room: list(messages) for room, messages in self._rooms.items()}
        return Snapshot(epoch=self._epoch, next_seq=self._next_seq, rooms=rooms)

    async def append(self, batch: Sequence[Message]) -> None:
        self.append_nowait(batch)

    def append_nowait(self, batch: Sequence[Message]) -> None:
        """`append` without a checkpoint: the hub commits in the same step."""
        for message in batch:
            seq = seq_of(self._epoch, message.id)
            if seq is not None:
                self._next_seq = max(self._next_seq, seq + 1)
            kept = self._rooms.setdefault(message.room, [])
            kept.append(message)
            keep_newest(kept, self._size)

    async def delete(self, room: str, message_id: str) -> bool:
        kept = self._rooms.get(room, [])
        for index, message in enumerate(kept):
            if message.id == message_id:
                del kept[index]
                return True
        return False

    async def aclose(self) -> None:
        pass
