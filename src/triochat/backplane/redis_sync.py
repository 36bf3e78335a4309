"""Keeping a Redis node in step with what Redis holds: snapshot, gaps, reconcile.

Every stored message has an id ``<epoch>-<seq>`` with one ``seq`` for the
whole chat, and reaches the channel in ``seq`` order (`SAY`). `Sync` tracks
the epoch and the last ``seq`` delivered: a message after a gap is delivered
only once the gap is filled from ``log``; a log trimmed past what was seen,
or a new epoch (Redis lost its data), is a `Reload` of the rooms as stored.

`Sync.reconcile` runs after every (re)subscription: fill the gap, rewrite
this node's state (its users, its ``state:<node>`` set, a `NodeState` for
the nodes already subscribed) and read every other live node's (`Resync`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Final

import coredis
import msgspec
import trio

from ..config import redact_url
from ..errors import StorageError
from ..events import Entry, NodeState, Reload, Resync
from ..protocol import Message, confusable_key, name_key
from ..recent import Snapshot
from .redis_inbox import Inbox
from .redis_link import FAILURES, LOGGER, PREFIX, Reconnect, RedisLink, entry_key, entry_of
from .redis_liveness import Liveness
from .redis_lua import Scripts

__all__ = ["Sync"]

_MESSAGE: Final = msgspec.json.Decoder(Message)
_ENCODER: Final = msgspec.json.Encoder()


def _seq_of(message_id: str) -> int:
    return int(message_id.rpartition("-")[2])


class Sync:
    """The epoch and the last ``seq`` this node delivered, and how it catches up."""

    __slots__ = (
        "_epoch",
        "_inbox",
        "_last_seq",
        "_link",
        "_liveness",
        "_scripts",
        "own_entries",
        "own_users",
    )

    def __init__(
        self, link: RedisLink, scripts: Scripts, liveness: Liveness, inbox: Inbox
    ) -> None:
        self._link = link
        self._scripts = scripts
        self._liveness = liveness
        self._inbox = inbox
        self._epoch = ""
        self._last_seq = 0
        #: This node's entries and (name, token) pairs (`RedisBackplane.on_events`).
        self.own_entries: Callable[[], list[Entry]] = list
        self.own_users: Callable[[], list[tuple[str, str]]] = list

    async def first_snapshot(self) -> Snapshot:
        """What Redis holds at start-up; StorageError within the handshake timeout."""
        link = self._link
        try:
            with trio.fail_after(link.config.backplane_timeout):
                epoch = await self._ensure_epoch()
                snapshot = await self._load_snapshot(epoch)
        except (*FAILURES, trio.TooSlowError) as exc:
            # Never the password: the URL as the start-up line shows it.
            raise StorageError(f"cannot reach Redis at {redact_url(link.url)}: {exc}") from exc
        self._epoch = snapshot.epoch
        self._last_seq = snapshot.next_seq - 1
        LOGGER.info("node %s joined the chat on %s", link.node, redact_url(link.url))
        return snapshot

    async def _ensure_epoch(self) -> str:
        redis = self._link.client
        await redis.set(PREFIX + "epoch", secrets.token_hex(4), condition=coredis.PureToken.NX)
        epoch = await redis.get(PREFIX + "epoch")
        return (epoch or b"").decode()

    async def _load_snapshot(self, epoch: str) -> Snapshot:
        redis = self._link.client
        history_size = self._link.config.history_size
        seq = int(await redis.get(PREFIX + "seq") or 0)
        rooms: dict[str, list[Message]] = {}
        # Messages stored after `seq` was read come through the gap fill, in order.
        for room_bytes in sorted(await redis.smembers(PREFIX + "rooms")):
            room = room_bytes.decode()
            entries = await redis.xrevrange(PREFIX + "room:" + room, "+", "-", count=history_size)
            kept = [_MESSAGE.decode(e.field_values[b"m"]) for e in reversed(entries)]
            kept = [m for m in kept if _seq_of(m.id) <= seq]
            if kept:
                rooms[room] = kept
        return Snapshot(epoch=epoch, next_seq=seq + 1, rooms=rooms)

    async def recent(self, room: str) -> list[Message]:
        """The newest messages of ``room`` in Redis, oldest first (a join of a
        room not in the node's memory); StorageError within the backplane timeout."""
        link = self._link
        try:
            with trio.fail_after(link.config.backplane_timeout):
                entries = await link.client.xrevrange(
                    PREFIX + "room:" + room, "+", "-", count=link.config.history_size
                )
        except (*FAILURES, trio.TooSlowError) as exc:
            raise StorageError(f"cannot read the history of {room} from Redis: {exc}") from exc
        return [_MESSAGE.decode(e.field_values[b"m"]) for e in reversed(entries)]

    async def reconcile(self) -> None:
        """After (re)subscribing: fill the gap, rewrite our state, read everyone else's."""
        redis = self._link.client
        node = self._link.node
        self._liveness.subscribed()
        await self._scripts.load()
        epoch = await self._ensure_epoch()
        if epoch != self._epoch:
            # Redis lost the history (a new epoch): start again from what it has.
            snapshot = await self._load_snapshot(epoch)
            self._epoch, self._last_seq = epoch, snapshot.next_seq - 1
            self._inbox.deliver(Reload(snapshot))
        else:
            await self._fill_gap(None)
        await self._liveness.beat()
        entries = self.own_entries()
        ops: list[tuple[str, str]] = [
            ("u", f"{name_key(name)}\0{confusable_key(name)}\0{token}\0{name}")
            for name, token in self.own_users()
        ]
        ops += [("+", entry_key(entry)) for entry in entries]
        # Tell the nodes already subscribed; those that reconcile later read the set.
        ops.append(("p", "e" + _ENCODER.encode(NodeState(node, entries)).decode()))
        await redis.delete([PREFIX + "state:" + node])
        await self._scripts.apply_ops(ops)
        states: dict[str, list[Entry]] = {}
        alive, waited = await self._liveness.live_nodes()
        for other in alive - {node}:
            members = await redis.smembers(PREFIX + "state:" + other)
            states[other] = sorted(entry_of(m) for m in members)
        self._inbox.deliver(Resync(states, frozenset(waited)))

    async def on_message(self, message: Message) -> None:
        """A stored message from the channel: delivered in ``seq`` order, once."""
        epoch, _, digits = message.id.rpartition("-")
        if epoch != self._epoch:
            raise Reconnect("the history has a new epoch")
        seq = int(digits)
        if seq <= self._last_seq:
            return
        if seq > self._last_seq + 1:
            await self._fill_gap(seq)
        self._last_seq = seq
        await self._inbox.deliver_waiting(message)

    async def _fill_gap(self, before: int | None) -> None:
        """Deliver the stored messages after the last one seen (and before ``before``)."""
        redis = self._link.client
        start = self._last_seq + 1
        end = f"{before - 1}-0" if before is not None else "+"
        if before is not None and before - 1 < start:
            return
        entries = await redis.xrange(PREFIX + "log", f"{start}-0", end)
        messages = [_MESSAGE.decode(entry.field_values[b"m"]) for entry in entries]
        if messages and _seq_of(messages[0].id) > start:
            # The log was trimmed past what we saw: reload the rooms as stored.
            snapshot = await self._load_snapshot(self._epoch)
            self._last_seq = snapshot.next_seq - 1
            self._inbox.deliver(Reload(snapshot))
            return
        for message in messages:
            seq = _seq_of(message.id)
            if seq > self._last_seq:
                self._last_seq = seq
                self._inbox.deliver(message)
