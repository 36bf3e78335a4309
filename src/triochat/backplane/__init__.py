"""The backplane: what one node shares with the other nodes of a chat.

`Backplane` is the seam between the hub and the rest of the cluster. Two
implementations, one conformance suite (tests/test_backplane.py):

- `local.LocalBroker` / `local.LocalBackplane`: in-process. The default
  server is one node on a private broker (what a single triochat always did);
  tests attach several hubs to one broker to get a cluster in memory.
- `redis.RedisBackplane` (``--redis``): Redis Streams for history and ids,
  one pub/sub channel for fan-out, per-node heartbeats for presence.

What every implementation guarantees:

1. `append` gives each message its id from one sequencer for the whole chat
   (``<epoch>-<seq>``, seq increasing), stores it durably, and only then
   returns; a retried say (same name, ref, room and text) gets the first
   copy's id and is not stored twice.
2. Every node receives every stored message, once, in seq order, through
   `take_events` (its own too: a node broadcasts and acks on receipt, so all
   nodes deliver in the same order). After an outage the gap is filled from
   the stored log, or a `Reload` carries what is stored. A store that lost
   its data starts a new epoch: a `Reload` with it comes before any of its
   messages.
3. `publish` never blocks; events go to the other nodes in order. While the
   backplane is down they are dropped: on reconnect each node rewrites its
   own state, publishes it (`NodeState`) and gets everyone else's as a
   `Resync`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from ..events import Claim, Draft, Entry, Event, Received
from ..protocol import Message
from ..recent import Snapshot

__all__ = ["Backplane"]


class Backplane(Protocol):
    """What a hub needs from the rest of the cluster."""

    #: This node's id, unique in the cluster.
    node: str
    #: True when `catch_up`, `claim` and `flush` never wait (an in-process
    #: broker): the hub awaits them in its own step. False (Redis): the hub
    #: never waits for them, they run beside it (a join waits, not the node).
    immediate: bool

    async def run(self, *, task_status: trio.TaskStatus[Snapshot] = ...) -> None:
        """Connect, then keep connected until cancelled; ``started(snapshot)`` first."""
        ...

    def available(self) -> bool:
        """False while the backplane cannot store: readiness fails, says get `unavailable`."""
        ...

    @property
    def append_nowait(self) -> Callable[[Sequence[Draft]], list[str]] | None:
        """`append` without a checkpoint when the store is in memory (the hub then
        stores in its own step); None otherwise (Redis, SQLite)."""
        ...

    async def append(self, drafts: Sequence[Draft]) -> list[str]:
        """Sequence and store ``drafts`` (see the module docstring); their ids, in order.

        Raises:
            StorageError: nothing of the batch is known to be stored.
        """
        ...

    async def claim(
        self, name: str, token: str | None, *, rotate: bool = False, share: bool = False
    ) -> Claim:
        """Take ``name`` for this node (new, or with its ``token``; ``rotate``: the
        takeover gets a new token, and ``token`` stops working).

        ``share``: an authenticated user's name, claimed with the token every
        node derives from its ``sub`` (`identity.claim_token`): held elsewhere
        with that token, this node holds it too ("shared", no takeover; §15),
        and it stays held until the last node releases it.

        A name is held by its `name_key`: "Alice" and "\\u0430lice" are one name. A
        new name is also "taken" when a user on another live node holds its
        `confusable_key` (docs/protocol.md section 2.1). A takeover keeps the
        name as first bound (`Claim.name`).

        Raises:
            StorageError: the backplane is unavailable.
        """
        ...

    async def delete(self, room: str, message_id: str) -> bool:
        """Remove one stored message of ``room`` (the server API, docs/protocol.md
        §16): from the history a join or a reload reads, and from what fills
        gaps. Whether it was stored. The chat tells the nodes (`Deletion`).

        Raises:
            StorageError: the store could not be changed.
        """
        ...

    async def recent(self, room: str) -> list[Message]:
        """The newest stored messages of ``room``, oldest first (a room whose
        history is not in the node's memory: docs/protocol.md §8).

        Raises:
            StorageError: the store could not be read.
        """
        ...

    def store_stats(self) -> tuple[int, int] | None:
        """The store's bytes kept and messages trimmed by ``--max-stored-bytes``
        (metrics); None where the store is Redis, which bounds itself."""
        ...

    def release(self, name: str) -> None:
        """This node no longer holds ``name`` (never blocks): frees its keys if
        this node holds them (a takeover elsewhere has taken them already)."""
        ...

    def publish(self, event: Event) -> None:
        """Send ``event`` to the other nodes, in order (never blocks)."""
        ...

    def take_events(self) -> list[Received]:
        """Everything received since the last call, in order."""
        ...

    def on_events(
        self,
        wake: Callable[[], None],
        entries: Callable[[], list[Entry]],
        users: Callable[[], list[tuple[str, str]]],
    ) -> None:
        """Call ``wake`` (which must not block) when events are waiting.

        ``entries`` and ``users`` read this node's entries and (name, token)
        pairs, for a backplane that must rewrite them after an outage.
        """
        ...

    async def catch_up(self) -> None:
        """Return once everything the other nodes published before this call is
        available to `take_events` (a join's member list and history are then
        as fresh as the cluster's)."""
        ...

    async def flush(self) -> None:
        """Return once every event published so far has reached the other nodes
        (or the backplane is down): a client told "joined" is seen everywhere."""
        ...

    async def leave(self) -> None:
        """Stopping in order: the other nodes drop this node's users at once."""
        ...

    def node_alive(self, node: str) -> bool:
        """Whether ``node`` is (as far as this node knows) still in the cluster."""
        ...
