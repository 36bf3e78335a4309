"""What a Redis node has received and its hub has not taken yet.

The session (`redis_session`), gap filling (`redis_sync`) and liveness
(`redis_liveness`) deliver here; the hub takes everything at once
(`RedisBackplane.take_events`) after ``wake``. The channel's reader waits
while the hub is far behind, so memory stays bounded and nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from ..events import Received

__all__ = ["MAX_RECEIVED", "Inbox"]

MAX_RECEIVED: Final = 10_000  # received but not yet taken by the hub: the reader waits


class Inbox:
    """Received events and messages, in order, until the hub takes them."""

    __slots__ = ("_barrier_pending", "_received", "_room_for_more", "wake")

    def __init__(self, barrier_pending: Callable[[], bool]) -> None:
        #: Whether the hub waits for a `catch_up` barrier (`Barriers.pending`).
        self._barrier_pending = barrier_pending
        self._received: list[Received] = []
        self._room_for_more = trio.Event()
        #: The hub's wake-up (`RedisBackplane.on_events`); must not block.
        self.wake: Callable[[], None] | None = None

    def take(self) -> list[Received]:
        """Everything received since the last call, in order."""
        received, self._received = self._received, []
        self._room_for_more.set()
        return received

    def deliver(self, received: Received) -> None:
        self._received.append(received)
        if self.wake is not None:
            self.wake()

    async def deliver_waiting(self, received: Received) -> None:
        """`deliver`, but wait while the hub is far behind (bounded, never dropped).

        Not while the hub waits for a `catch_up` barrier: it takes nothing until
        the barrier's marker, further down the channel, has come back.
        """
        while len(self._received) >= MAX_RECEIVED and not self._barrier_pending():
            self._room_for_more = trio.Event()
            await self._room_for_more.wait()
        self.deliver(received)
