"""History that lives only in the process (``--memory``); the reference store of
the conformance suite (tests/test_history.py). tests/faults.py subclasses it
into a store that fails on request (`FaultyMemoryHistory`)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..protocol import Message, seq_of
from ..recent import Snapshot, message_bytes

__all__ = ["MemoryHistory"]


class MemoryHistory:
    """Keeps the newest ``history_size`` messages per room in memory.

    A new epoch per instance: after a restart no old id is known, and none is
    reused. `load` may be called again at any time: it copies what is kept
    (every room: the store is in memory anyway).

    Args:
        max_bytes: bytes kept in all (`recent.message_bytes`); past it, the
            oldest messages of any room go (0: no bound).
    """

    def __init__(self, history_size: int, *, max_bytes: int = 0) -> None:
        self._size = history_size
        self._max_bytes = max_bytes
        self._epoch = secrets.token_hex(4)
        self._rooms: dict[str, list[Message]] = {}
        self._next_seq = 1
        #: What the kept messages add up to (`recent.message_bytes`).
        self.stored_bytes = 0
        #: Messages dropped to stay within ``max_bytes``, since start.
        self.trimmed = 0

    async def load(self) -> Snapshot:
        rooms = {room: list(messages) for room, messages in self._rooms.items() if messages}
        return Snapshot(epoch=self._epoch, next_seq=self._next_seq, rooms=rooms)

    async def recent(self, room: str) -> list[Message]:
        return list(self._rooms.get(room, ()))

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
            self.stored_bytes += message_bytes(message)
            over = len(kept) - self._size
            if over > 0:
                self.stored_bytes -= sum(message_bytes(m) for m in kept[:over])
                del kept[:over]
        while self._max_bytes and self.stored_bytes > self._max_bytes:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Drop the oldest message of any room (the lowest seq: rooms are in order)."""
        oldest = min((kept for kept in self._rooms.values() if kept), key=self._first_seq)
        self.stored_bytes -= message_bytes(oldest.pop(0))
        self.trimmed += 1
        if not oldest:
            self._rooms = {room: kept for room, kept in self._rooms.items() if kept}

    def _first_seq(self, kept: list[Message]) -> int:
        return seq_of(self._epoch, kept[0].id) or 0

    async def delete(self, room: str, message_id: str) -> bool:
        kept = self._rooms.get(room, [])
        for index, message in enumerate(kept):
            if message.id == message_id:
                self.stored_bytes -= message_bytes(message)
                del kept[index]
                return True
        return False

    async def aclose(self) -> None:
        pass
