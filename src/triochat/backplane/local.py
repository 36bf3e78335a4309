"""The in-process backplane: one `LocalBroker`, any number of attached nodes.

A single triochat is one `LocalBackplane` on a private broker over its
`History` (SQLite, or memory with ``--memory``). Tests attach several hubs to
one broker to run a cluster in memory, in virtual time, through the same code
path the Redis backplane feeds.

The broker keeps no recent history of its own: a node's one copy is its chat
state's (`state.log`), and a node that attaches reads the store (`History.load`),
as a Redis node reads Redis. Only tests' clusters attach a node later, and
their store is in memory, so the read costs nothing; a single server would
otherwise hold every room's recent history twice for a second node that never
comes.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Callable, Sequence
from typing import Final

import trio

from ..events import (
    Claim,
    Draft,
    Entry,
    Event,
    Handover,
    MemberState,
    NodeGone,
    Received,
    Resync,
)
from ..history import History
from ..protocol import Message, confusable_key, make_id, name_key
from ..recent import Snapshot

__all__ = ["LocalBackplane", "LocalBroker"]

MAX_REFS: Final = 10_000  # (name, ref) pairs remembered for retried says


class LocalBroker:
    """The sequencer, store and fan-out that `LocalBackplane` nodes share."""

    def __init__(self, history: History, history_size: int) -> None:
        # The store keeps the newest messages, the broker none: ``history_size``
        # stays only because the server passes it.
        del history_size
        self._history = history
        self._nodes: dict[str, LocalBackplane] = {}
        self._snapshot_lock = trio.Lock()
        self._loaded = False
        self._epoch = ""
        self._next_seq = 1
        #: name key -> (nodes, token, name as bound); confusable key -> (node, name
        #: key): names are claimed by their keys (docs/protocol.md section 2.1).
        #: Several nodes hold a name only for an authenticated user (§15).
        self._claims: dict[str, tuple[tuple[str, ...], str, str]] = {}
        self._skeletons: dict[str, tuple[str, str]] = {}
        self._refs: collections.OrderedDict[tuple[str, str], Message] = collections.OrderedDict()
        self._states: dict[str, set[Entry]] = {}
        # An in-memory history lets a single node commit without a task hop.
        self._store_nowait = history.append_nowait

    @property
    def can_append_nowait(self) -> bool:
        """Whether `append_nowait` may be used (the history is in memory)."""
        return self._store_nowait is not None

    async def attach(self, node: LocalBackplane) -> Snapshot:
        """Add ``node``; what the store holds (the first attach opens it).

        Raises:
            StorageError: the store could not be opened or read.
        """
        async with self._snapshot_lock:
            # Attached before the store is read: a message stored meanwhile
            # reaches the node too, and its chat state skips what it has.
            self._nodes[node.node] = node
            self._states[node.node] = set()
            try:
                snapshot = await self._history.load()
            except BaseException:
                del self._nodes[node.node], self._states[node.node]
                raise
            if not self._loaded:
                self._epoch, self._next_seq = snapshot.epoch, snapshot.next_seq
                self._loaded = True
        others = {n: sorted(s) for n, s in self._states.items() if n != node.node}
        node.receive(Resync(others))
        return snapshot

    async def detach(self, node: str) -> None:
        """``node`` is gone: its entries go; with the last node the history closes."""
        if self._nodes.pop(node, None) is None:
            return
        self._states.pop(node, None)
        self.fan_out(NodeGone(node), exclude=node)
        if not self._nodes:
            await self._history.aclose()

    def alive(self, node: str) -> bool:
        return node in self._nodes

    def available(self) -> bool:
        """Whether appends can be stored: in process, always (a failing store
        answers its append with `StorageError`; tests/faults.py's `FaultyBroker`
        overrides this to play a backplane that is down)."""
        return True

    # --- the sequencer ---------------------------------------------------------

    def sequence(self, drafts: Sequence[Draft]) -> tuple[list[str], list[tuple[Message, Draft]]]:
        """Ids for ``drafts``, and the new messages to store (a retry gets the old id)."""
        ids: list[str] = []
        fresh: list[tuple[Message, Draft]] = []
        for draft in drafts:
            key = (draft.name, draft.ref) if draft.ref is not None else None
            earlier = self._refs.get(key) if key is not None else None
            if earlier is not None and (earlier.room, earlier.msg) == (draft.room, draft.msg):
                ids.append(earlier.id)
                continue
            message_id = make_id(self._epoch, self._next_seq)
            self._next_seq += 1
            ids.append(message_id)
            fresh.append((Message(draft.room, message_id, draft.name, draft.msg, draft.ts), draft))
        return ids, fresh

    def stored(self, fresh: Sequence[tuple[Message, Draft]]) -> None:
        """``fresh`` is durable: remember it, then hand it to every node, in order."""
        messages = [message for message, _ in fresh]
        # A node remembers its own users' refs (ChatState); the broker needs
        # them only for a retry that moves to another node.
        shared = len(self._nodes) > 1
        for message, draft in fresh:
            if shared and draft.ref is not None:
                self._refs[(draft.name, draft.ref)] = message
                if len(self._refs) > MAX_REFS:
                    self._refs.popitem(last=False)
        for node in self._nodes.values():
            node.receive_many(messages)

    async def append(self, drafts: Sequence[Draft]) -> list[str]:
        ids, fresh = self.sequence(drafts)
        if fresh:
            await self._history.append([message for message, _ in fresh])
            self.stored(fresh)
        return ids

    def append_nowait(self, drafts: Sequence[Draft]) -> list[str]:
        """`append` without a checkpoint (check `can_append_nowait` first)."""
        ids, fresh = self.sequence(drafts)
        if fresh:
            assert self._store_nowait is not None
            self._store_nowait([message for message, _ in fresh])
            self.stored(fresh)
        return ids

    # --- names -------------------------------------------------------------------

    def claim(
        self, node: str, name: str, token: str | None, rotate: bool = False, share: bool = False
    ) -> Claim:
        """The same rules as the Redis backplane's `CLAIM` script."""
        key, skeleton = name_key(name), confusable_key(name)
        held = self._claims.get(key)
        if held is not None:
            owners, owner_token, owner_name = held
            others = [owner for owner in owners if owner in self._nodes and owner != node]
            if token is not None and secrets.compare_digest(token, owner_token):
                if share:
                    # One more node of an authenticated user: it shares the name.
                    self._claims[key] = ((*others, node), owner_token, owner_name)
                    return Claim("shared", owner_token, "", owner_name)
                # A takeover keeps the name as first bound (and its skeleton);
                # asked to rotate, with a new token: the one used stops working.
                new_token = secrets.token_urlsafe(24) if rotate else owner_token
                self._claims[key] = ((node,), new_token, owner_name)
                self._skeletons[confusable_key(owner_name)] = (node, key)
                return Claim("takeover", new_token, others[0] if others else "", owner_name)
            if others:
                return Claim("taken")
        look_alike = self._skeletons.get(skeleton)
        free = True
        if look_alike is not None and look_alike[1] != key:
            if look_alike[0] in self._nodes and look_alike[0] != node:
                return Claim("taken")
            # This node's own users are checked by its ChatState: leave theirs be.
            free = look_alike[0] != node
        new_token = token if share and token else secrets.token_urlsafe(24)
        self._claims[key] = ((node,), new_token, name)
        if free:
            self._skeletons[skeleton] = (node, key)
        return Claim("new", new_token, "", name)

    async def delete(self, room: str, message_id: str) -> bool:
        """Remove a stored message (the broker keeps none: the history has it)."""
        return await self._history.delete(room, message_id)

    async def recent(self, room: str) -> list[Message]:
        return await self._history.recent(room)

    def store_stats(self) -> tuple[int, int]:
        """The store's bytes kept and messages trimmed by its bound (metrics)."""
        return self._history.stored_bytes, self._history.trimmed

    def release(self, node: str, name: str) -> None:
        key, skeleton = name_key(name), confusable_key(name)
        held = self._claims.get(key)
        if held is not None and node in held[0]:
            left = tuple(owner for owner in held[0] if owner != node)
            if left:
                # Still held on another node (an authenticated user): it keeps it.
                self._claims[key] = (left, held[1], held[2])
                if self._skeletons.get(skeleton) == (node, key):
                    self._skeletons[skeleton] = (left[0], key)
            else:
                del self._claims[key]
        if self._skeletons.get(skeleton) == (node, key):
            del self._skeletons[skeleton]

    # --- fan-out -----------------------------------------------------------------

    def fan_out(self, event: Event, *, exclude: str) -> None:
        state = self._states.get(event.node)
        if isinstance(event, MemberState) and state is not None:
            state.difference_update(event.remove)
            state.update(event.add)
        elif isinstance(event, Handover) and state is not None:
            state.difference_update((room, event.name) for room in ["", *event.rooms])
        for name, node in self._nodes.items():
            if name != exclude:
                node.receive(event)


class LocalBackplane:
    """One node on a `LocalBroker`."""

    immediate = True  # the broker answers in the same step: nothing to wait for

    def __init__(self, broker: LocalBroker, node: str | None = None) -> None:
        self.node = node or secrets.token_hex(4)
        self._broker = broker
        self._received: list[Received] = []
        self._wake: Callable[[], None] | None = None
        self._attached = False
        #: Set when the broker's history is in memory: `append` without a checkpoint.
        self.append_nowait: Callable[[Sequence[Draft]], list[str]] | None = (
            broker.append_nowait if broker.can_append_nowait else None
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Snapshot] = trio.TASK_STATUS_IGNORED
    ) -> None:
        snapshot = await self._broker.attach(self)
        self._attached = True
        try:
            task_status.started(snapshot)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.leave()  # (a no-op when the hub already left)

    def available(self) -> bool:
        return self._broker.available()

    async def append(self, drafts: Sequence[Draft]) -> list[str]:
        return await self._broker.append(drafts)

    async def claim(
        self, name: str, token: str | None, *, rotate: bool = False, share: bool = False
    ) -> Claim:
        return self._broker.claim(self.node, name, token, rotate, share)

    def release(self, name: str) -> None:
        self._broker.release(self.node, name)

    async def delete(self, room: str, message_id: str) -> bool:
        return await self._broker.delete(room, message_id)

    async def recent(self, room: str) -> list[Message]:
        return await self._broker.recent(room)

    def store_stats(self) -> tuple[int, int] | None:
        return self._broker.store_stats()

    def publish(self, event: Event) -> None:
        if self._attached:
            self._broker.fan_out(event, exclude=self.node)

    def take_events(self) -> list[Received]:
        received, self._received = self._received, []
        return received

    def on_events(
        self,
        wake: Callable[[], None],
        entries: Callable[[], list[Entry]],
        users: Callable[[], list[tuple[str, str]]],
    ) -> None:
        del entries, users  # the broker never loses them
        self._wake = wake

    async def catch_up(self) -> None:
        pass  # the broker hands everything over as it is published

    async def flush(self) -> None:
        pass

    async def leave(self) -> None:
        self._attached = False
        await self._broker.detach(self.node)

    def node_alive(self, node: str) -> bool:
        return self._broker.alive(node)

    # --- called by the broker ----------------------------------------------------

    def receive(self, event: Received) -> None:
        self._received.append(event)
        if self._wake is not None:
            self._wake()

    def receive_many(self, messages: Sequence[Message]) -> None:
        self._received.extend(messages)
        if self._wake is not None:
            self._wake()
