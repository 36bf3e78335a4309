"""The Redis node's sessions: subscribe, reconcile, read the channel; reconnect.

A session subscribes to the channel, then reconciles (`Sync.reconcile`:
nothing published in between is missed), marks Redis available and reads
until the connection fails. `Session.run` then backs off (jittered, doubling
up to `BACKOFF`) and starts another. The end of a subscription (coredis can
end one quietly when Redis restarts) is treated the same way.

What the channel carries, by its first byte: ``m`` a stored batch of says
(one JSON per line, in ``seq`` order: `Sync.on_message`), ``s`` a barrier's
marker (`Barriers.arrived`), ``e`` an event from a node (`Inbox`; this
node's own state events are not delivered back to it).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Final

import coredis.retry
import msgspec
import trio

from ..events import Event, Handover, MemberState, NodeGone, NodeState
from ..protocol import Message
from .redis_inbox import Inbox
from .redis_link import BACKOFF, CHANNEL, FAILURES, LOGGER, Reconnect, RedisLink
from .redis_publish import Barriers
from .redis_sync import Sync

__all__ = ["Session"]

_EVENTS: Final = msgspec.json.Decoder(Event)
_MESSAGE: Final = msgspec.json.Decoder(Message)


class Session:
    """The session loop: one subscription at a time, for as long as the node runs."""

    __slots__ = ("_barriers", "_inbox", "_link", "_sync")

    def __init__(self, link: RedisLink, sync: Sync, barriers: Barriers, inbox: Inbox) -> None:
        self._link = link
        self._sync = sync
        self._barriers = barriers
        self._inbox = inbox

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Subscribe and read; on any failure (or a quiet end) back off and again."""
        link = self._link
        backoff = 0.0
        pending: list[trio.TaskStatus[None]] = [task_status]  # until the first session is up

        def ready() -> None:
            if pending:
                pending.pop().started()

        while True:
            with trio.CancelScope() as scope:
                link.session_scope = scope
                try:
                    await self._session(ready)
                except* FAILURES as group:
                    link.failed(group.exceptions[0])
                except* Reconnect as group:
                    link.failed(group.exceptions[0])
            link.available = False
            backoff = min(max(backoff * 2, BACKOFF[0]), BACKOFF[1])
            await trio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 2000))
            if link.available:
                backoff = 0.0

    async def _session(self, ready: Callable[[], None]) -> None:
        link = self._link
        policy = coredis.retry.NoRetryPolicy()
        async with link.client.pubsub(channels=[CHANNEL], retry_policy=policy) as pubsub:
            # Subscribed first, then reconciled: nothing published in between is missed.
            with trio.fail_after(link.config.backplane_timeout):
                await self._sync.reconcile()
            if link.down_logged:
                LOGGER.warning("Redis is back: node %s reconciled", link.node)
                link.down_logged = False
            link.available = True
            ready()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    if not pubsub.subscribed:
                        raise Reconnect("the subscription ended")
                    continue
                if message["type"] != "message":
                    continue
                data = message["data"]
                if isinstance(data, bytes):
                    try:
                        await self._on_channel(data)
                    except (msgspec.DecodeError, ValueError):
                        LOGGER.exception("ignored a foreign publish on %s", CHANNEL)

    async def _on_channel(self, data: bytes) -> None:
        if data[:1] == b"m":
            # A stored batch: messages in seq order, one JSON per line.
            for line in data[1:].split(b"\n"):
                await self._sync.on_message(_MESSAGE.decode(line))
        elif data[:1] == b"s":
            self._barriers.arrived(data[1:])
        elif data[:1] == b"e":
            event = _EVENTS.decode(data[1:])
            own = MemberState | NodeState | Handover | NodeGone
            if event.node != self._link.node or not isinstance(event, own):
                await self._inbox.deliver_waiting(event)
