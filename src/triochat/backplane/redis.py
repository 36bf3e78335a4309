"""The Redis backplane (``--redis``): one chat over any number of nodes.

`RedisBackplane` is the facade: the `Backplane` protocol over parts that
each own one concern::

    redis_link      RedisLink: the client, availability, failures; key names
    redis_inbox     Inbox: received, waiting for the hub (bounded)
    redis_lua       Scripts: the Lua scripts SAY, CLAIM, DELETE, OPS and their calls
    redis_publish   PublishQueue: this node's changes, in order; Barriers: catch_up
    redis_liveness  Liveness: heartbeats, dead nodes, goodbye
    redis_sync      Sync: snapshot, gap filling, epochs, reconcile
    redis_session   Session: subscribe, reconcile, read the channel; reconnect

The tasks::

    RedisBackplane.run             backplane nursery (inside the hub's)
    ├── Session.run                connect, subscribe, reconcile, then read
    │                              the channel until the connection fails;
    │                              back off, and again
    ├── Liveness.run               this node's key; finds dead nodes
    └── PublishQueue.run           this node's events and state, in order

Redis keys (prefix ``triochat:``)::

    epoch, seq                   the sequencer: ids are <epoch>-<seq>, seq global
    log                          stream of every message (gap filling), entry id <seq>-0
    room:<room>                  stream of one room's messages, trimmed to --history-size
    rooms                        set of room names
    users                        hash name key -> "<nodes> <token> <skeleton>\\0<name>":
                                 who holds a name (`name_key`, docs/protocol.md §2.1);
                                 several nodes only for an authenticated user (§15)
    skeletons                    hash confusable key -> "<node> <name key>": no two
                                 users share a TR39 skeleton either
    ref:<name>\\0<ref>            the id a say with that ref got (retries), 10 min
    node:<node>                  heartbeat, expires after 2/3 of --node-timeout
    nodes                        set of node ids
    state:<node>                 set of "<room>\\0<name>" entries of that node

Every message is stored and published by one Lua script (`SAY`), so the
order on the channel is the order of ``seq``, and a node that sees a gap
fills it from ``log`` before going on.

Outage: commands fail fast (no retries in coredis); says and first joins
get `unavailable`; `/readyz` is 503. The session loop reconnects with
backoff, resubscribes, fills the gap, rewrites this node's state and
reads every other node's (`Resync`). The end of a subscription (coredis can
end one quietly when Redis restarts) is treated the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import coredis
import coredis.retry
import trio

from ..config import Config
from ..events import Claim, Draft, Entry, Event, Received
from ..protocol import Message
from ..recent import Snapshot
from .redis_inbox import Inbox
from .redis_link import COMMAND_TIMEOUT, RedisLink
from .redis_liveness import Liveness
from .redis_lua import Scripts
from .redis_publish import Barriers, PublishQueue
from .redis_session import Session
from .redis_sync import Sync

__all__ = ["RedisBackplane"]


class RedisBackplane:
    """One node of a chat whose shared state lives in Redis."""

    immediate = False  # every claim and catch-up is a round trip to Redis
    append_nowait = None  # every append is a script call to Redis

    def __init__(self, config: Config, node: str | None = None) -> None:
        self._link = link = RedisLink(config, node)
        self.node = link.node
        self._scripts = Scripts(link)
        self._queue = PublishQueue(link, self._scripts)
        self._barriers = Barriers(link, self._queue)
        self._inbox = Inbox(self._barriers.pending)
        self._liveness = Liveness(link, self._inbox)
        self._sync = Sync(link, self._scripts, self._liveness, self._inbox)
        self._session = Session(link, self._sync, self._barriers, self._inbox)

    # --- Backplane -------------------------------------------------------------

    def available(self) -> bool:
        return self._link.available

    def on_events(
        self,
        wake: Callable[[], None],
        entries: Callable[[], list[Entry]],
        users: Callable[[], list[tuple[str, str]]],
    ) -> None:
        self._inbox.wake = wake
        self._sync.own_entries = entries
        self._sync.own_users = users

    def node_alive(self, node: str) -> bool:
        return self._liveness.node_alive(node)

    def take_events(self) -> list[Received]:
        return self._inbox.take()

    async def append(self, drafts: Sequence[Draft]) -> list[str]:
        return await self._scripts.say(drafts)

    async def claim(
        self, name: str, token: str | None, *, rotate: bool = False, share: bool = False
    ) -> Claim:
        return await self._scripts.claim(name, token, rotate=rotate, share=share)

    async def delete(self, room: str, message_id: str) -> bool:
        return await self._scripts.delete(room, message_id)

    async def recent(self, room: str) -> list[Message]:
        return await self._sync.recent(room)

    def store_stats(self) -> None:
        return None  # Redis bounds itself (maxmemory: docs/operations.md)

    def release(self, name: str) -> None:
        self._queue.release(name)

    def publish(self, event: Event) -> None:
        self._queue.publish(event)

    async def catch_up(self) -> None:
        """A barrier: publish a marker and wait until it comes back on the channel."""
        await self._barriers.catch_up()

    async def flush(self) -> None:
        await self._queue.flush()

    async def leave(self) -> None:
        self._link.stopping = True
        with trio.move_on_after(COMMAND_TIMEOUT):
            await self.flush()
            await self._liveness.goodbye()

    # --- running -----------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Snapshot] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect (or fail with StorageError within the handshake timeout), then serve."""
        link = self._link
        policy = coredis.retry.NoRetryPolicy()
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(
            link.url,
            retry_policy=policy,
            connect_timeout=COMMAND_TIMEOUT,
            stream_timeout=COMMAND_TIMEOUT,
        )
        link.redis = redis
        self._scripts.register(redis)
        try:
            async with redis:
                snapshot = await self._sync.first_snapshot()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._liveness.run)
                    nursery.start_soon(self._queue.run)
                    await nursery.start(self._session.run)
                    task_status.started(snapshot)
        finally:
            link.available = False
