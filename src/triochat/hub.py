"""The hub: the one task that applies client frames to the chat state.

::

    Hub.run                    hub nursery
    ├── _dispatch_loop         inbound channel -> ChatState (frames, grace timers)
    └── _store_loop            says -> History.append -> ChatState.commit (broadcast + ack)

Rules:

1. The hub never awaits a client: frames leave through ``Peer.deliver``,
   which queues without waiting (and closes a full connection with 1013).
2. Connections register and unregister with sync calls (`connect`,
   `disconnect`), so a cancelled connection can't tear the state; their
   frames come through the bounded inbound channel, in order.
3. A message is broadcast and acked only after `History.append` returned:
   nothing acked is ever lost, and every member sees the commit order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import trio

from .chat import ChatState, Client, Peer, PendingSay
from .config import Config
from .errors import ClientProtocolError, StorageError
from .history import History
from .metrics import Stats
from .protocol import ClientFrame, CloseCode, ErrorCode, Message
from .ratelimit import RateLimiter

__all__ = ["Hub"]

LOGGER = logging.getLogger("triochat.hub")

STORE_QUEUE: Final = 4096  # says accepted but not yet stored; full = `unavailable`
STORE_BATCH: Final = 512  # most says per History.append (one transaction)

Inbound = tuple[Client, ClientFrame | ClientProtocolError] | trio.Event


class Flushable(Protocol):
    def flush_nowait(self) -> None: ...


class Hub:
    """Owns the chat state; see the module docstring for its tasks."""

    def __init__(self, config: Config, history: History, stats: Stats) -> None:
        self._config = config
        self._history = history
        self._stats = stats
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[Inbound](
            config.inbound_buffer
        )
        # An Event in either channel is a barrier: set once all before it is done.
        self._store_send, self._store_recv = trio.open_memory_channel[PendingSay | trio.Event](
            STORE_QUEUE
        )
        self._chat: ChatState | None = None
        self._wait_scope: trio.CancelScope | None = None
        self._dirty: list[Flushable] = []
        # Stores that live in memory may offer a synchronous append.
        self._append_nowait: Callable[[Sequence[Message]], None] | None = getattr(
            history, "append_nowait", None
        )
        self._storage_down = False

    @property
    def chat(self) -> ChatState:
        """The chat state (available once `run` has started)."""
        if self._chat is None:
            raise RuntimeError("the hub is not running")
        return self._chat

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load history, then dispatch until `stop`; flushes the store on the way out.

        Raises:
            StorageError: the history could not be opened.
        """
        config = self._config
        snapshot = await self._history.load()
        self._chat = ChatState(
            epoch=snapshot.epoch,
            next_seq=snapshot.next_seq,
            history=snapshot.rooms,
            history_size=config.history_size,
            max_rooms=config.max_rooms,
            presence_grace=config.presence_grace,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._store_loop)
                task_status.started()
                await self._dispatch_loop()
                self._store_send.close()  # the store loop flushes, then ends
        finally:
            with trio.CancelScope(shield=True):
                await self._history.aclose()

    def stop(self) -> None:
        """End `run` once the frames already queued are applied and stored."""
        self._inbound_send.close()

    # --- called by connections (sync: never checkpoints) ----------------------

    def connect(self, peer: Peer, *, listener: bool) -> Client:
        """Register a connection; ``listener``: it hears lobby from the start."""
        limiter = RateLimiter(self._config.rate, self._config.burst, trio.current_time())
        client = Client(peer, limiter, listener=listener)
        self.chat.connect(client)
        return client

    def disconnect(self, client: Client) -> None:
        """Unregister a connection. Never awaits; safe to call from ``finally``."""
        chat = self.chat
        chat.disconnect(client, trio.current_time())
        scope = self._wait_scope
        if scope is not None and chat.next_deadline() < scope.deadline:
            scope.deadline = chat.next_deadline()  # wake the dispatcher in time

    def mark_dirty(self, connection: Flushable) -> None:
        """``connection`` got its first frame of this step: flush it at the end."""
        self._dirty.append(connection)

    def _flush(self) -> None:
        """End of a step: hand every frame queued during it to its socket."""
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush_nowait()

    async def settle(self) -> None:
        """Return once every frame queued so far is applied and its says stored."""
        done = trio.Event()
        await self._inbound_send.send(done)
        await done.wait()

    async def submit(self, client: Client, item: ClientFrame | ClientProtocolError) -> None:
        """Queue one frame (or its decoding error) for the hub; waits when full.

        A flooding client waits here, which slows only its own reader.
        """
        await self._inbound_send.send((client, item))

    # --- the tasks ---------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        chat = self.chat
        receive = self._inbound_recv
        while True:
            with trio.move_on_at(chat.next_deadline()) as scope:
                self._wait_scope = scope
                try:
                    item: Inbound | None = await receive.receive()
                except trio.EndOfChannel:
                    return
            self._wait_scope = None
            if scope.cancelled_caught:
                item = None
            now = trio.current_time()
            wall_ms = time.time_ns() // 1_000_000
            # Apply everything already queued before the next checkpoint.
            while item is not None:
                self._apply(chat, item, now, wall_ms)
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    item = None
            chat.expire(now)
            self._queue_says(chat)
            self._flush()

    def _apply(self, chat: ChatState, item: Inbound, now: float, wall_ms: int) -> None:
        if isinstance(item, trio.Event):
            self._queue_says(chat)  # says before the barrier go first
            try:
                self._store_send.send_nowait(item)
            except trio.WouldBlock:
                item.set()  # the store is overloaded: settle as far as it can
            return
        client, frame = item
        try:
            if isinstance(frame, ClientProtocolError):
                chat.refuse(client, frame.code, frame.message, frame.ref, classic=frame.classic)
            else:
                chat.handle(client, frame, now, wall_ms)
        except Exception:
            # A bug triggered by one client's frame must not take the hub (and
            # every other connection) down: answer `internal`, close with 1011.
            LOGGER.exception("bug while handling a frame; closing its connection with 1011")
            chat.refuse(client, ErrorCode.INTERNAL, "internal error", getattr(frame, "ref", None))
            client.peer.close_soon(CloseCode.INTERNAL_ERROR, "internal error")

    def _queue_says(self, chat: ChatState) -> None:
        if not chat.to_store:
            return
        pending, chat.to_store = chat.to_store, []
        append_nowait = self._append_nowait
        if append_nowait is not None:
            # An in-memory store: commit in this step, with no task hop.
            try:
                append_nowait([say.message for say in pending])
            except StorageError as exc:
                self._stored(chat, pending, exc)
            else:
                self._stored(chat, pending, None)
            return
        for index, say in enumerate(pending):
            try:
                self._store_send.send_nowait(say)
            except trio.WouldBlock:
                chat.store_failed(pending[index:], "the server is busy: try again")
                return

    async def _store_loop(self) -> None:
        chat = self.chat
        receive = self._store_recv
        barrier: trio.Event | None = None
        async for first in receive:
            if isinstance(first, trio.Event):
                first.set()
                continue
            batch = [first]
            while len(batch) < STORE_BATCH:
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(item, trio.Event):
                    barrier = item
                    break
                batch.append(item)
            await self._store(chat, batch)
            self._flush()
            if barrier is not None:
                barrier.set()
                barrier = None

    async def _store(self, chat: ChatState, batch: list[PendingSay]) -> None:
        try:
            await self._history.append([say.message for say in batch])
        except StorageError as exc:
            self._stored(chat, batch, exc)
        else:
            self._stored(chat, batch, None)

    def _stored(self, chat: ChatState, batch: list[PendingSay], exc: StorageError | None) -> None:
        """The store's verdict on a batch: broadcast and ack it, or refuse it."""
        if exc is not None:
            self._stats.storage_failures += 1
            if not self._storage_down:  # log once per outage, not per batch
                LOGGER.warning("history unavailable: %s", exc)
                self._storage_down = True
            chat.store_failed(batch, "the message could not be stored: try again")
            return
        if self._storage_down:
            LOGGER.warning("history available again")
            self._storage_down = False
        self._stats.messages_stored += len(batch)
        chat.commit(batch)
