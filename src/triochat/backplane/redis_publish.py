"""This node's changes on their way to Redis, in order, and the barrier on them.

`PublishQueue` turns what the hub publishes and releases into `OPS` steps
(`redis_lua`): membership changes of this node's ``state:<node>`` set, names
let go, and events for the channel. `PublishQueue.run` sends what is
queued, one script call per batch, so the other nodes see this node's
changes in order; `PublishQueue.flush` waits until what was queued has gone.
While Redis is down nothing is queued: the session's reconcile rewrites this
node's state after the outage.

`Barriers` is `catch_up`: a marker ``s<node> <number>`` published behind
everything queued, waited for until the session reads it back from the
channel (so whatever the other nodes published before it has been read too).
"""

from __future__ import annotations

import itertools
from typing import Final

import msgspec
import trio

from ..events import Event, Handover, MemberState
from ..protocol import confusable_key, name_key
from .redis_link import COMMAND_TIMEOUT, FAILURES, RedisLink, entry_key
from .redis_lua import Scripts

__all__ = ["Barriers", "PublishQueue"]

_ENCODER: Final = msgspec.json.Encoder()


class PublishQueue:
    """This node's changes waiting for `run`: (op, argument) pairs of `OPS`."""

    __slots__ = ("_link", "_ops", "_progress", "_queued", "_scripts", "_sent", "_waiting")

    def __init__(self, link: RedisLink, scripts: Scripts) -> None:
        self._link = link
        self._scripts = scripts
        self._ops: list[tuple[str, str]] = []
        self._waiting = trio.Event()
        self._queued = 0  # ops ever queued / ever sent (or dropped): for `flush`
        self._sent = 0
        self._progress = trio.Event()

    def publish(self, event: Event) -> None:
        """`Backplane.publish`: this node's own entries change with its events."""
        node = self._link.node
        if isinstance(event, MemberState) and event.node == node:
            for entry in event.remove:
                self.queue("-", entry_key(entry))
            for entry in event.add:
                self.queue("+", entry_key(entry))
        elif isinstance(event, Handover) and event.node == node:
            for room in ["", *event.rooms]:
                self.queue("-", entry_key((room, event.name)))
        self.queue("p", "e" + _ENCODER.encode(event).decode())

    def release(self, name: str) -> None:
        """`Backplane.release`: let ``name`` and its skeleton go."""
        self.queue("r", f"{name_key(name)}\0{confusable_key(name)}")

    def queue(self, op: str, argument: str) -> None:
        if not self._link.available:
            return  # dropped: `Sync.reconcile` rewrites this node's state after the outage
        self._ops.append((op, argument))
        self._queued += 1
        self._waiting.set()

    async def flush(self) -> None:
        """`Backplane.flush`: until everything queued so far is sent (or Redis is down)."""
        target = self._queued
        while self._link.available and self._sent < target:
            await self._progress.wait()

    async def run(self) -> None:
        """Send what is queued, a batch per script call, for as long as the node runs."""
        link = self._link
        while True:
            await self._waiting.wait()
            self._waiting = trio.Event()
            ops, self._ops = self._ops, []
            try:
                if link.available:  # else `Sync.reconcile` rewrites it all after the outage
                    with trio.fail_after(COMMAND_TIMEOUT):
                        await self._scripts.apply_ops(ops)
            except FAILURES as exc:
                link.failed(exc)
            finally:
                self._sent += len(ops)
                self._progress.set()
                self._progress = trio.Event()


class Barriers:
    """The `catch_up` markers this node has published and waits for."""

    __slots__ = ("_ids", "_link", "_queue", "_waiting")

    def __init__(self, link: RedisLink, queue: PublishQueue) -> None:
        self._link = link
        self._queue = queue
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.Event] = {}

    def pending(self) -> bool:
        """Whether a `catch_up` waits (the hub takes nothing until it returns)."""
        return bool(self._waiting)

    async def catch_up(self) -> None:
        """A barrier: publish a marker and wait until it comes back on the channel."""
        if not self._link.available:
            return
        number = next(self._ids)
        done = self._waiting[number] = trio.Event()
        try:
            self._queue.queue("p", f"s{self._link.node} {number}")
            with trio.move_on_after(COMMAND_TIMEOUT):
                await done.wait()
        finally:
            del self._waiting[number]

    def arrived(self, marker: bytes) -> None:
        """A marker (``<node> <number>``) came back on the channel: its barrier is done."""
        node, _, number = marker.decode().partition(" ")
        barrier = self._waiting.get(int(number)) if node == self._link.node else None
        if barrier is not None:
            barrier.set()
