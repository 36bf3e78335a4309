"""`Pump`: what passes between the chat state and the backplane, in the dispatcher's step.

In: the events the backplane received (messages, other nodes' members,
typing, whispers, kicks), applied to the chat state (`ChatState.apply`);
SSE POSTs relayed between nodes go to the server instead (`relay`).
Out: what the chat state gave back (`ChatState.take_output`): its events
published, its names released, its says and acks handed to the store
pipeline (`StorePipeline.pending`, `acked`).

Rules:

1. Called only by the dispatcher, and never awaits: publishing queues, the
   backplane sends beside the hub.
2. A lone message in a pump (light load) is written to each member's socket
   as it is delivered (`FlushSchedule.write_through`): the first members need
   not wait for the whole fan-out to be queued. Several are queued and
   flushed at the end of the step, one write per connection (coalescing,
   under load).
3. A bug in applying one event is logged and the event dropped: it must not
   take the hub (and every connection) down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from .backplane import Backplane
from .chat import ChatState
from .events import Received, SsePost, SsePostResult
from .outbox import FlushSchedule
from .protocol import Message
from .store import StorePipeline

__all__ = ["Pump", "RelayHandler"]

# The hub's logger: operators know these lines by it (docs/operations.md).
LOGGER: Final = logging.getLogger("triochat.hub")

#: Where SSE POSTs routed between nodes go (the server's business).
RelayHandler = Callable[[SsePost | SsePostResult], None]


class Pump:
    """Applies the backplane's events to the chat state and publishes its output."""

    __slots__ = ("_backplane", "_schedule", "_store", "relay")

    def __init__(
        self, backplane: Backplane, schedule: FlushSchedule, store: StorePipeline
    ) -> None:
        self._backplane = backplane
        self._schedule = schedule
        self._store = store
        #: Receives SSE POSTs relayed from other nodes (set by the server).
        self.relay: RelayHandler | None = None

    def pump(self, chat: ChatState) -> bool:
        """Apply what the backplane received, then send what the chat publishes.

        Returns whether anything was published.
        """
        received = self._backplane.take_events()
        if received:
            now = trio.current_time()
            schedule = self._schedule
            schedule.write_through = sum(isinstance(item, Message) for item in received) == 1
            try:
                for item in received:
                    self._receive(chat, item, now)
            finally:
                schedule.write_through = False
        return self.take_output(chat)

    def take_output(self, chat: ChatState) -> bool:
        """Act on what the chat state gave back (`ChatState.take_output`): publish
        its events and release its names now; its says and acks go to the store
        pipeline, for `StorePipeline.queue` and `observe_acks`. Returns whether
        anything was published."""
        output = chat.take_output()
        if output.says:
            self._store.pending.extend(output.says)
        if output.acked:
            self._store.acked.extend(output.acked)
        backplane = self._backplane
        for event in output.events:
            backplane.publish(event)
        for name in output.released:
            backplane.release(name)
        return bool(output.events)

    def _receive(self, chat: ChatState, item: Received, now: float) -> None:
        if isinstance(item, SsePost | SsePostResult):
            if item.node == self._backplane.node and self.relay is not None:
                self.relay(item)
            return
        try:
            chat.apply(item, now)
        except Exception:
            LOGGER.exception("bug while applying %s from the backplane", type(item).__name__)
