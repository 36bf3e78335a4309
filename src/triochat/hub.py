"""The hub: the one task that applies client frames to the chat state.

::

    Hub.run                    hub nursery
    ├── Backplane.run          the rest of the cluster (or just the history)
    ├── _dispatch_loop         inbound channel -> ChatState (frames, grace timers,
    │                          what the backplane received)
    ├── StorePipeline.run      says -> Backplane.flush, Backplane.append -> the verdict
    │                          back inbound (the dispatcher alone touches ChatState)
    └── JoinResolver._resolve  one per join that waits for the cluster (Redis):
                               catch-up and name claim, answer sent back inbound

`Hub` owns the chat state and dispatches; each seam around it is a
collaborator in a module of its own:

- `intake.Intake`: a connection's messages, in the connection's task:
  decoding, token checks, the embedding hooks (`Hub.receive` is its
  `receive`);
- `budgets.AddressBudgets`: the rate budget each client address shares;
- `joins.JoinResolver`: client frames applied, and the joins that wait for
  the cluster parked and resolved beside the hub (name claims included);
- `store.StorePipeline`: says on their way into the store, the store loop,
  the verdicts, the say-to-ack timing;
- `pump.Pump`: the backplane's events in, the chat state's output out;
- `inbound`: what the dispatcher takes from its inbound channel.

Rules (each collaborator states its own; a message is acked only once
stored and back from the backplane: `store`, rule 1):

1. The hub never awaits a client: frames leave through ``Peer.deliver``,
   which may write to a socket without blocking but never waits (only a
   connection's own writer task awaits a write).
2. One task, the dispatcher, applies frames, store verdicts and what the
   backplane brings to the chat state, and flushes the connections: the store
   loop, the join resolver's tasks and `settle` post their results inbound
   (`inbound`), so which task broadcasts does not depend on the storage
   (connections register and unregister themselves with sync calls, rule 4).
3. The hub never awaits the cluster either: a join that needs it (catch-up,
   a name claim) is parked and resolved beside the hub (`joins`, rule 1),
   and the store loop flushes what was published before it appends
   (`store`, rule 3). (An in-process backplane, whose waits never wait, is
   asked inline: `Backplane.immediate`.)
4. Connections register and unregister with sync calls (`connect`,
   `disconnect`), so a cancelled connection can't tear the state; their
   frames come through the bounded inbound channel, in order (`intake`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, cast

import trio

from .backplane import Backplane
from .budgets import AddressBudgets
from .chat import ChatState, Client, Peer
from .chatgauges import chat_gauges
from .clientlog import ConnectionFields
from .config import Config
from .errors import ClientProtocolError
from .hooks import Authenticator, SayHook
from .inbound import WAKE, Call, Inbound, Resolved, StepDone, Stored
from .intake import Intake
from .joins import JoinResolver, needs_cluster
from .metrics import Gauge, Stats
from .outbox import FlushSchedule
from .protocol import Limits
from .pump import Pump, RelayHandler
from .store import STORE_BATCH, StorePipeline

# STORE_BATCH: the tests size their bursts by it (it lives in `store`).
__all__ = ["STORE_BATCH", "Hub"]

T = TypeVar("T")


class Hub:
    """Owns the chat state and dispatches to it; see the module docstring."""

    def __init__(
        self,
        config: Config,
        backplane: Backplane,
        stats: Stats,
        *,
        authenticate: Authenticator | None = None,
        on_say: SayHook | None = None,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._stats = stats
        #: Whether connections must authenticate (docs/protocol.md §15).
        self.authenticating = config.authenticating or authenticate is not None
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[Inbound](
            config.inbound_buffer
        )
        self._chat: ChatState | None = None
        self._wait_scope: trio.CancelScope | None = None
        #: When the current step began (`trio.current_time`): says taken in it are
        #: stamped with it, for the say-to-ack histogram.
        self._step_started = 0.0
        #: The step policy connections are given (`App.schedule`): a lone
        #: message is written as it is delivered (`write_through`); otherwise
        #: each connection that got frames is flushed at the end of the step.
        self.schedule = FlushSchedule()
        self._addresses = AddressBudgets(config)
        #: Each connection's log fields (id, peer, transport), for the lines the
        #: dispatcher logs about it outside the connection's task (read from
        #: its peer: no entry of its own per connection).
        self._log_fields: Mapping[Client, Mapping[str, object]] = ConnectionFields()
        self._store = StorePipeline(config, backplane, stats, self._inbound_send)
        self._pump = Pump(backplane, self.schedule, self._store)
        self._joins = JoinResolver(config, backplane, self._inbound_send, self._log_fields)
        # Looked up per frame: the resolver's own dict and method, without a hop.
        self._parked = self._joins.parked
        self._apply_frame = self._joins.apply_frame
        intake = Intake(
            config, self._inbound_send, self._addresses, authenticate=authenticate, on_say=on_say
        )
        #: One message of a connection, in the connection's task (`Intake.receive`):
        #: the intake's own method, so a frame takes no extra await on its way.
        self.receive: Callable[[object, str | bytes], Coroutine[Any, Any, None]] = intake.receive
        self._wake_sent = False  # a WAKE is in the inbound channel
        #: Set at the end of this step (`StepDone`): barriers of `settle`.
        self._step_done: list[trio.Event] = []

    @property
    def chat(self) -> ChatState:
        """The chat state (available once `run` has started)."""
        if self._chat is None:
            raise RuntimeError("the hub is not running")
        return self._chat

    @property
    def backplane(self) -> Backplane:
        return self._backplane

    @property
    def relay(self) -> RelayHandler | None:
        """Receives SSE POSTs relayed from other nodes (set by the server)."""
        return self._pump.relay

    @relay.setter
    def relay(self, handler: RelayHandler | None) -> None:
        self._pump.relay = handler

    def available(self) -> bool:
        """False while says cannot be stored (readiness)."""
        return self._backplane.available()

    def gauges(self) -> dict[str, Gauge]:
        """The hub's gauges for /metrics, read at each scrape (chatgauges.py)."""
        return chat_gauges(lambda: self.chat, self._backplane)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the backplane, then dispatch until `stop`; flushes the store on the way out.

        Raises:
            StorageError: the history could not be opened.
        """
        config = self._config
        backplane = self._backplane
        async with trio.open_nursery() as outer:
            snapshot = await outer.start(backplane.run)
            chat = self._chat = ChatState(
                epoch=snapshot.epoch,
                next_seq=snapshot.next_seq,
                history=snapshot.rooms,
                history_complete=snapshot.complete,
                room_cache=config.room_cache,
                room_cache_bytes=config.room_cache_bytes,
                history_size=config.history_size,
                max_rooms=config.max_rooms,
                presence_grace=config.presence_grace,
                node=backplane.node,
                remote_timeout=config.backplane_timeout,
                limits=Limits(
                    config.max_msg_chars,
                    config.max_frame_bytes,
                    config.max_rooms,
                    config.rate,
                    config.burst,
                ),
                authenticating=self.authenticating,
                handshake_timeout=config.handshake_timeout,
            )
            backplane.on_events(self._wake, chat.own_entries, chat.own_users)
            self._pump.pump(chat)
            async with trio.open_nursery() as nursery:
                self._joins.start(nursery)
                nursery.start_soon(self._store.run, chat)
                task_status.started()
                await self._dispatch_loop()
                self._store.close()  # the store loop flushes, then ends
            await backplane.leave()
            outer.cancel_scope.cancel()

    def stop(self) -> None:
        """End `run` once the frames already queued are applied and stored."""
        self._inbound_send.close()

    # --- called by connections (sync: never checkpoints) ----------------------

    def connect(self, peer: Peer, *, listener: bool, address: str = "") -> Client:
        """Register a connection; ``listener``: it hears lobby from the start.

        ``address``: the client's address (after a trusted proxy): its
        connections share one budget on top of their own (`AddressBudgets`).
        """
        now = trio.current_time()
        limiter = self._addresses.limiter(address, now)
        client = Client(peer, limiter, lobby_listener=listener)
        self.chat.connect(client, now)
        self._wake_in_time()
        self._addresses.add(client, address)
        return client

    def disconnect(self, client: object) -> None:
        """Unregister a connection (``client``: what `connect` gave it). Never awaits;
        safe to call from ``finally``."""
        chat = self.chat
        chat_client = cast("Client", client)
        self._addresses.remove(chat_client)
        chat.disconnect(chat_client, trio.current_time())
        self._wake_in_time()

    def _wake_in_time(self) -> None:
        """A new deadline of the chat state (a grace period, a connection's time
        to authenticate): the waiting dispatcher wakes for it."""
        scope = self._wait_scope
        deadline = self.chat.next_deadline()
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    # --- called by other tasks: posted inbound, applied by the dispatcher -----

    async def call(self, function: Callable[[ChatState, float, int], T]) -> T:
        """Run ``function(chat, now, wall_ms)`` in a step of the dispatcher (the one
        task that changes the chat state) and return its result; what it raises
        is raised here. For the server API (docs/protocol.md §16).

        Raises:
            trio.ClosedResourceError: the hub has stopped.
        """
        call = Call(function)
        await self._inbound_send.send(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return cast("T", call.result)

    async def settle(self) -> None:
        """Return once every frame queued so far is applied, its says stored and acked."""
        done = trio.Event()
        await self._inbound_send.send(done)
        await done.wait()
        # Stored says are acked when their message comes back from the backplane:
        # the dispatcher applies what the catch-up brought, in a step of its own.
        await self._backplane.catch_up()
        applied = trio.Event()
        await self._inbound_send.send(StepDone(applied))
        await applied.wait()
        with trio.move_on_after(self._config.backplane_timeout):
            await self._backplane.flush()

    def _wake(self) -> None:
        """The backplane has events: make the dispatcher take them (never blocks)."""
        if self._wake_sent or self._store.quiet:  # (quiet: our own append, pumped in-step)
            return
        try:
            self._inbound_send.send_nowait(WAKE)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return  # the dispatcher is busy (it pumps every step) or gone
        self._wake_sent = True

    # --- the dispatcher ------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        chat = self.chat
        receive = self._inbound_recv
        pump = self._pump
        while True:
            item: Inbound | None
            # (As trio's `receive` does: cancelled before an item is taken, never after.)
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                item = receive.receive_nowait()
            except trio.WouldBlock:
                # (Frames that wait to be written are written by a step: `soon_at`.)
                with trio.move_on_at(min(chat.next_deadline(), self.schedule.soon_at)) as scope:
                    self._wait_scope = scope
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        return
                self._wait_scope = None
                if scope.cancelled_caught:
                    item = None
            except trio.EndOfChannel:
                return
            else:
                # Queued already: no wait, and no deadline to wake by (a cancel
                # scope costs 10 µs); the connections still get their turn.
                await trio.lowlevel.cancel_shielded_checkpoint()
            started = self._step_started = trio.current_time()
            pump.pump(chat)
            chat.backplane_up = self._backplane.available()
            now = trio.current_time()
            wall_ms = time.time_ns() // 1_000_000
            # Apply everything already queued before the next checkpoint.
            while item is not None:
                await self._take(chat, item, now, wall_ms)
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    item = None
            chat.expire(now)
            # What this step changed (joins, leaves) is published before its says
            # are stored: the store loop flushes what was published before it
            # appends, so every node sees a member join before it speaks. The
            # hub itself never waits for the backplane.
            pump.pump(chat)
            pump.take_output(chat)  # (what the step published so far goes first)
            self._store.queue(chat, started)
            pump.pump(chat)  # (an in-memory append hands its messages back at once)
            self.schedule.end_step(trio.current_time())
            # Timed per step and per ack (the acks are in the sockets now),
            # never per delivery.
            ended = trio.current_time()
            self._stats.hub_step.observe(ended - started)
            self._store.observe_acks(ended)
            if self._step_done:
                done, self._step_done = self._step_done, []
                for event in done:
                    event.set()
            if self._joins.held:
                self._joins.release_held()

    async def _take(self, chat: ChatState, item: Inbound, now: float, wall_ms: int) -> None:
        """Apply one inbound item; a frame that needs the cluster first is parked.

        Awaits only on a backplane that never waits (`Backplane.immediate`).
        """
        if isinstance(item, Resolved):
            self._joins.resolved(chat, item, now, wall_ms)
        elif isinstance(item, tuple):
            client, frame = item
            parked = self._parked.get(client)
            if parked is not None:  # behind its join, in order
                self._joins.wait_behind(chat, client, parked, frame)
            elif isinstance(frame, ClientProtocolError) or not needs_cluster(chat, client, frame):
                self._apply_frame(chat, client, frame, now, wall_ms, None)
            elif self._backplane.immediate and chat.to_load(client, frame) is None:
                claimed = await self._joins.ask_cluster(chat, client, frame)
                self._pump.pump(chat)  # what the catch-up brought comes first
                self._apply_frame(chat, client, frame, now, wall_ms, claimed)
            else:
                self._joins.park(chat, client, frame)
        elif isinstance(item, Stored):
            self._store.stored(chat, item.batch, item.result)
        elif isinstance(item, StepDone):
            self._step_done.append(item.done)
        elif isinstance(item, Call):
            item.run(chat, now, wall_ms)
        elif isinstance(item, trio.Event):
            self._pump.take_output(chat)  # says before the barrier go first
            self._store.queue(chat, self._step_started)
            self._store.barrier(item)
        else:
            self._wake_sent = False  # the pump runs at the end of this step
