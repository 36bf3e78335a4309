"""The hub: the one task that applies client frames to the chat state.

::

    Hub.run                    hub nursery
    ├── Backplane.run          the rest of the cluster (or just the history)
    ├── _dispatch_loop         inbound channel -> ChatState (frames, grace timers,
    │                          what the backplane received)
    ├── _store_loop            says -> Backplane.flush, Backplane.append -> the verdict
    │                          back inbound (the dispatcher alone touches ChatState)
    └── _resolve               one per join that waits for the cluster (Redis):
                               catch-up and name claim, answer sent back inbound

Rules:

1. The hub never awaits a client: frames leave through ``Peer.deliver``,
   which may write to a socket without blocking but never waits (only a
   connection's own writer task awaits a write).
2. One task, the dispatcher, applies frames, store verdicts and what the
   backplane brings to the chat state, and flushes the connections: the store
   loop, `_resolve` and `settle` post their results inbound, so which task
   broadcasts does not depend on the storage (connections register and
   unregister themselves with sync calls, rule 4).
3. The hub never awaits the cluster either: a join that needs it (catch-up,
   a name claim) is parked and resolved beside the hub (`_resolve`), and only
   that client's later frames wait behind it; the store loop flushes what was
   published before it appends. (An in-process backplane, whose waits never
   wait, is asked inline: `Backplane.immediate`.)
4. Connections register and unregister with sync calls (`connect`,
   `disconnect`), so a cancelled connection can't tear the state; their
   frames come through the bounded inbound channel, in order.
5. A message is broadcast and acked only after `Backplane.append` returned
   and the message came back from the backplane: nothing acked is ever lost,
   and every member on every node sees the one order of the sequencer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, TypeVar, cast

import msgspec
import trio

from .auth import TokenError, TokenVerifier
from .backplane import Backplane
from .chat import ChatState, Client, Peer, PendingSay
from .config import Config
from .errors import ClientProtocolError, StorageError
from .events import Claim, Received, SsePost, SsePostResult
from .hooks import Authenticator, Refusal, SayHook, SayInfo
from .identity import Identity, TokenCheck, claim_token
from .logformat import log_context, log_fields
from .metrics import Gauge, Stats
from .outbox import FlushSchedule
from .protocol import (
    Auth,
    ClassicFrame,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Join,
    Limits,
    Message,
    Say,
    decode_client_frame,
    is_valid_room,
    normalize_name,
)
from .ratelimit import ADDRESS_SCALE, RateLimiter
from .state.model import CLASSIC_ROOM

__all__ = ["Hub"]

LOGGER = logging.getLogger("triochat.hub")

WAITING: Final = "too many frames while your join waits for the cluster: try again"
STORE_QUEUE: Final = 4096  # says accepted but not yet stored; full = `unavailable`
STORE_BATCH: Final = 512  # most says per Backplane.append (one transaction or script call)
#: Frames a client may send while its join waits for the cluster; more are
#: refused with `unavailable` (the client's reader is not held up meanwhile).
PARKED_FRAMES: Final = 64


class _Wake:
    """Inbound marker: the backplane has events waiting."""


_WAKE: Final = _Wake()
#: A frame as the chat state takes it: an `auth` frame as its verdict.
ChatFrame = ClientFrame | TokenCheck
ClientItem = ChatFrame | ClientProtocolError


class _Resolved:
    """Inbound: the cluster's answer for a parked frame (`Hub._resolve`)."""

    __slots__ = ("claimed", "client", "frame")

    def __init__(
        self, client: Client, frame: ChatFrame, claimed: tuple[str, Claim] | None
    ) -> None:
        self.client = client
        self.frame = frame
        #: The name asked for and the answer, if the frame binds a name.
        self.claimed = claimed


class _Stored:
    """Inbound: the store's verdict on a batch of says (`Hub._store_loop`)."""

    __slots__ = ("batch", "result")

    def __init__(self, batch: list[PendingSay], result: list[str] | StorageError) -> None:
        self.batch = batch
        self.result = result


T = TypeVar("T")


class _Call(Generic[T]):
    """Inbound: a function of the chat state for the dispatcher to run (`Hub.call`)."""

    __slots__ = ("done", "error", "function", "result")

    def __init__(self, function: Callable[[ChatState, float, int], T]) -> None:
        self.function = function
        self.done = trio.Event()
        self.result: T | None = None
        self.error: Exception | None = None

    def run(self, chat: ChatState, now: float, wall_ms: int) -> None:
        try:
            self.result = self.function(chat, now, wall_ms)
        except Exception as exc:  # the caller's to handle, never the hub's
            self.error = exc
        self.done.set()


class _StepDone:
    """Inbound: set ``done`` once the step that takes this has pumped and flushed."""

    __slots__ = ("done",)

    def __init__(self, done: trio.Event) -> None:
        self.done = done


Inbound = (
    tuple[Client, ClientItem] | trio.Event | _Wake | _Resolved | _Stored | _StepDone | _Call[Any]
)
#: Where SSE POSTs routed between nodes go (the server's business).
RelayHandler = Callable[[SsePost | SsePostResult], None]


class _AddressBudget:
    """The rate budget one client address's connections share (`Hub.connect`)."""

    __slots__ = ("connections", "limiter")

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.connections = 0


class Hub:
    """Owns the chat state; see the module docstring for its tasks."""

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
        #: The host program's authenticator (`hooks`): it decides instead of a key.
        self._authenticate = authenticate
        #: The host program's say hook (`hooks`); None: says go in as sent.
        self._on_say = on_say
        #: Whether connections must authenticate (docs/protocol.md §15).
        self.authenticating = config.authenticating or authenticate is not None
        #: Checks connection tokens (docs/protocol.md §15); None: tokens are off
        #: or an authenticator decides.
        self._verifier = (
            TokenVerifier(
                secret=config.jwt_secret,
                public_key=config.jwt_public_key,
                audience=config.jwt_audience,
                issuer=config.jwt_issuer,
            )
            if config.authenticating and authenticate is None
            else None
        )
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[Inbound](
            config.inbound_buffer
        )
        # An Event in either channel is a barrier: set once all before it is done.
        self._store_send, self._store_recv = trio.open_memory_channel[PendingSay | trio.Event](
            STORE_QUEUE
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
        #: Each client address's shared budget and how many connections use it.
        self._addresses: dict[str, _AddressBudget] = {}
        self._address_of: dict[Client, str] = {}
        #: Each connection's log fields (id, peer, transport), for the lines the
        #: dispatcher logs about it outside the connection's task.
        self._log_fields: dict[Client, Mapping[str, object]] = {}
        # A backplane over an in-memory store may offer a synchronous append.
        self._append_nowait = backplane.append_nowait
        self._storage_down = False
        self._wake_sent = False
        self._quiet = False  # our own synchronous append: no wake-up needed
        #: Clients whose join waits for the cluster (`_park`), and their frames
        #: that came after it, in order.
        self._parked: dict[Client, list[ClientItem]] = {}
        #: Where `_resolve` tasks run (set while `run` runs).
        self._nursery: trio.Nursery | None = None
        #: Clients of this step whose frames wait for the publish (`_release_when_published`).
        self._held: list[Client] = []
        #: What the chat state gave back (`_take_output`) and the hub acts on later
        #: in the step: says to store (`_queue_says`), acked says to time (`_observe_step`).
        self._to_store: list[PendingSay] = []
        self._acked: list[PendingSay] = []
        #: Set at the end of this step (`_StepDone`): barriers of `settle`.
        self._step_done: list[trio.Event] = []
        #: Receives SSE POSTs relayed from other nodes (set by the server).
        self.relay: RelayHandler | None = None

    @property
    def chat(self) -> ChatState:
        """The chat state (available once `run` has started)."""
        if self._chat is None:
            raise RuntimeError("the hub is not running")
        return self._chat

    @property
    def backplane(self) -> Backplane:
        return self._backplane

    def available(self) -> bool:
        """False while says cannot be stored (readiness)."""
        return self._backplane.available()

    def gauges(self) -> dict[str, Gauge]:
        """The hub's gauges for /metrics, read at each scrape."""
        return {
            "rooms": ("Rooms that have members or history.", lambda: len(self.chat.rooms)),
            "users": (
                "Names held: connected, or within their presence grace.",
                lambda: len(self.chat.users),
            ),
            "backplane_available": (
                "1 while says can be stored (history, or Redis, reachable), else 0.",
                self.available,
            ),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the backplane, then dispatch until `stop`; flushes the store on the way out.

        Raises:
            StorageError: the history could not be opened.
        """
        config = self._config
        backplane = self._backplane
        async with trio.open_nursery() as outer:
            snapshot = await outer.start(backplane.run)
            self._chat = ChatState(
                epoch=snapshot.epoch,
                next_seq=snapshot.next_seq,
                history=snapshot.rooms,
                history_size=config.history_size,
                max_rooms=config.max_rooms,
                presence_grace=config.presence_grace,
                node=backplane.node,
                remote_timeout=config.backplane_timeout,
                limits=Limits(config.max_msg_chars, config.max_frame_bytes, config.max_rooms),
                authenticating=self.authenticating,
                handshake_timeout=config.handshake_timeout,
            )
            backplane.on_events(self._wake, self._chat.own_entries, self._chat.own_users)
            self._pump(self._chat)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._store_loop)
                task_status.started()
                await self._dispatch_loop()
                self._store_send.close()  # the store loop flushes, then ends
            await backplane.leave()
            outer.cancel_scope.cancel()

    def stop(self) -> None:
        """End `run` once the frames already queued are applied and stored."""
        self._inbound_send.close()

    # --- called by connections (sync: never checkpoints) ----------------------

    def connect(self, peer: Peer, *, listener: bool, address: str = "") -> Client:
        """Register a connection; ``listener``: it hears lobby from the start.

        ``address``: the client's address (after a trusted proxy): its
        connections share one budget on top of their own (`ADDRESS_SCALE`).
        """
        config, now = self._config, trio.current_time()
        shared = None
        if address:
            budget = self._addresses.get(address)
            if budget is None:
                shared = RateLimiter(config.rate, config.burst, now, scale=ADDRESS_SCALE)
                budget = self._addresses[address] = _AddressBudget(shared)
            budget.connections += 1
            shared = budget.limiter
        limiter = RateLimiter(config.rate, config.burst, now, shared=shared)
        client = Client(peer, limiter, listener=listener)
        self.chat.connect(client, now)
        self._wake_in_time()
        if address:
            self._address_of[client] = address
        self._log_fields[client] = log_fields()  # (connect runs in the connection's task)
        return client

    def disconnect(self, client: object) -> None:
        """Unregister a connection (``client``: what `connect` gave it). Never awaits;
        safe to call from ``finally``."""
        chat = self.chat
        address = self._address_of.pop(cast("Client", client), None)
        self._log_fields.pop(cast("Client", client), None)
        if address is not None:
            budget = self._addresses[address]
            budget.connections -= 1
            if not budget.connections:
                del self._addresses[address]  # (a new connection starts a full one)
        chat.disconnect(cast("Client", client), trio.current_time())
        self._wake_in_time()

    def _wake_in_time(self) -> None:
        """A new deadline of the chat state (a grace period, a connection's time
        to authenticate): the waiting dispatcher wakes for it."""
        scope = self._wait_scope
        deadline = self.chat.next_deadline()
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def call(self, function: Callable[[ChatState, float, int], T]) -> T:
        """Run ``function(chat, now, wall_ms)`` in a step of the dispatcher (the one
        task that changes the chat state) and return its result; what it raises
        is raised here. For the server API (docs/protocol.md §16).

        Raises:
            trio.ClosedResourceError: the hub has stopped.
        """
        call = _Call(function)
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
        await self._inbound_send.send(_StepDone(applied))
        await applied.wait()
        with trio.move_on_after(self._config.backplane_timeout):
            await self._backplane.flush()

    def _wake(self) -> None:
        """The backplane has events: make the dispatcher take them (never blocks)."""
        if self._wake_sent or self._quiet:
            return
        try:
            self._inbound_send.send_nowait(_WAKE)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return  # the dispatcher is busy (it pumps every step) or gone
        self._wake_sent = True

    def _pump(self, chat: ChatState) -> bool:
        """Apply what the backplane received, then send what the chat publishes.

        Returns whether anything was published.
        """
        backplane = self._backplane
        received = backplane.take_events()
        if received:
            now = trio.current_time()
            # A lone message (light load) goes to each member's socket as it is
            # delivered: the first members need not wait for the whole fan-out
            # to be queued. Several are queued and flushed at the end of the
            # step, one write per connection (coalescing, under load).
            schedule = self.schedule
            schedule.write_through = sum(isinstance(item, Message) for item in received) == 1
            try:
                for item in received:
                    self._receive(chat, item, now)
            finally:
                schedule.write_through = False
        return self._take_output(chat)

    def _take_output(self, chat: ChatState) -> bool:
        """Act on what the chat state gave back (`ChatState.take_output`): publish
        its events and release its names now; its says wait for `_queue_says`, its
        acks for `_observe_step`. Returns whether anything was published."""
        output = chat.take_output()
        if output.says:
            self._to_store.extend(output.says)
        if output.acked:
            self._acked.extend(output.acked)
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

    async def receive(self, client: object, message: str | bytes) -> None:
        """One message of a connection (``client``: what `connect` gave it).

        Runs in the connection's task: the frame is decoded there, then queued
        for the hub, waiting while the queue is full (a flooding client slows
        only its own reader). A binary message closes the connection with 1003
        (docs/protocol.md section 2).
        """
        chat_client = cast("Client", client)
        if isinstance(message, bytes):
            chat_client.peer.close_soon(
                CloseCode.UNSUPPORTED_DATA, "binary frames are not accepted"
            )
            return
        item: ClientItem
        try:
            item = decode_client_frame(message, max_msg_chars=self._config.max_msg_chars)
        except ClientProtocolError as exc:
            item = exc
        # Tokens and hooks run here, in the connection's task: a signature
        # check (RSA, EdDSA) or a slow hook holds up only this client.
        if isinstance(item, Auth):
            if self._authenticate is not None:
                item = await self._run_authenticator(item, chat_client)
            elif self._verifier is not None:
                item = self._check_token(item)
        elif isinstance(item, Say | ClassicFrame) and self._on_say is not None:
            item = await self._run_say_hook(item, chat_client, self._on_say)
        await self._inbound_send.send((chat_client, item))

    async def _run_authenticator(self, frame: Auth, client: Client) -> TokenCheck:
        assert self._authenticate is not None
        try:
            identity = await self._authenticate(frame.token, self._address_of.get(client, ""))
        except Refusal as exc:
            return TokenCheck(None, exc.message, frame.ref)
        except Exception:
            LOGGER.exception(
                "the authenticator failed; the connection is refused", extra=_chat_fields(client)
            )
            return TokenCheck(None, "the token could not be checked", frame.ref)
        name = normalize_name(identity.name) if isinstance(identity, Identity) else None
        if name is None:
            LOGGER.error(
                "the authenticator returned %r: not an Identity with a valid name",
                identity,
                extra=_chat_fields(client),
            )
            return TokenCheck(None, "the token could not be checked", frame.ref)
        return TokenCheck(msgspec.structs.replace(identity, name=name), "", frame.ref)

    async def _run_say_hook(
        self, frame: Say | ClassicFrame, client: Client, on_say: SayHook
    ) -> ClientItem:
        if isinstance(frame, Say):
            if client.user is None or frame.room not in client.rooms:
                return frame  # not joined: the hub answers it (not_joined)
            name, room = client.user.name, frame.room
        else:
            name, room = frame.name, CLASSIC_ROOM
        user = client.identity.sub if client.identity is not None else None
        try:
            text = await on_say(SayInfo(room=room, msg=frame.msg, name=name, user=user))
        except Refusal as exc:
            return ClientProtocolError(
                exc.code, exc.message, frame.ref, classic=isinstance(frame, ClassicFrame)
            )
        except Exception:
            LOGGER.exception(
                "the say hook failed; the message is not stored", extra=_chat_fields(client, room)
            )
            return ClientProtocolError(
                ErrorCode.INTERNAL, "the message could not be checked", frame.ref
            )
        if not isinstance(text, str) or not text or len(text) > self._config.max_msg_chars:
            LOGGER.error(
                "the say hook returned %r: not a text within the limits",
                text,
                extra=_chat_fields(client, room),
            )
            return ClientProtocolError(
                ErrorCode.INTERNAL, "the message could not be checked", frame.ref
            )
        return msgspec.structs.replace(frame, msg=text)

    def _check_token(self, frame: Auth) -> TokenCheck:
        assert self._verifier is not None
        try:
            identity = self._verifier.verify(frame.token, now=time.time())
        except TokenError as exc:
            return TokenCheck(None, str(exc), frame.ref)
        return TokenCheck(identity, "", frame.ref)

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
            started = self._step_started = trio.current_time()
            self._pump(chat)
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
            self._pump(chat)
            self._queue_says(chat)
            self._pump(chat)  # (an in-memory append hands its messages back at once)
            self.schedule.end_step()
            self._observe_step(started)
            if self._step_done:
                done, self._step_done = self._step_done, []
                for event in done:
                    event.set()
            if self._held:
                held, self._held = self._held, []
                assert self._nursery is not None
                self._nursery.start_soon(self._release_when_published, held)

    def _observe_step(self, started: float) -> None:
        """Time the step that just flushed, and the says acked in it (their acks
        are in the sockets now). Per step and per ack, never per delivery."""
        ended = trio.current_time()
        stats = self._stats
        stats.hub_step.observe(ended - started)
        if self._acked:
            acked, self._acked = self._acked, []
            say_ack = stats.say_ack
            for say in acked:
                say_ack.observe(ended - say.taken)

    async def _take(self, chat: ChatState, item: Inbound, now: float, wall_ms: int) -> None:
        """Apply one inbound item; a frame that needs the cluster first is parked.

        Awaits only on a backplane that never waits (`Backplane.immediate`).
        """
        if isinstance(item, _Resolved):
            # Its answer (`joined`) is written once the cluster has seen the join:
            # a client told "joined" can be reached from every node.
            client = item.client
            client.peer.hold()
            self._apply_frame(chat, client, item.frame, now, wall_ms, item.claimed)
            self._unpark(chat, client, now, wall_ms)
            self._held.append(client)
        elif isinstance(item, tuple):
            client, frame = item
            parked = self._parked.get(client)
            if parked is not None:  # behind its join, in order
                if len(parked) < PARKED_FRAMES:
                    parked.append(frame)
                elif not isinstance(frame, ClientProtocolError):
                    chat.refuse(client, ErrorCode.UNAVAILABLE, WAITING, frame.ref)
            elif isinstance(frame, ClientProtocolError) or not self._needs_cluster(
                chat, client, frame
            ):
                self._apply_frame(chat, client, frame, now, wall_ms, None)
            elif self._backplane.immediate:
                claimed = await self._ask_cluster(chat, client, frame)
                self._pump(chat)  # what the catch-up brought comes first
                self._apply_frame(chat, client, frame, now, wall_ms, claimed)
            else:
                self._park(chat, client, frame)
        elif isinstance(item, _Stored):
            self._stored(chat, item.batch, item.result)
        elif isinstance(item, _StepDone):
            self._step_done.append(item.done)
        elif isinstance(item, _Call):
            item.run(chat, now, wall_ms)
        else:
            self._apply_marker(chat, item)

    def _needs_cluster(self, chat: ChatState, client: Client, frame: ChatFrame) -> bool:
        """A join catches up with the cluster first (so its member list and its
        `since` recovery include everything published before it), and a first
        join asks for its name (`Backplane.claim`)."""
        return isinstance(frame, Join) or chat.needs_claim(client, frame) is not None

    def _park(self, chat: ChatState, client: Client, frame: ChatFrame) -> None:
        """Ask the cluster beside the hub; ``client``'s later frames wait behind ``frame``."""
        self._parked[client] = []
        assert self._nursery is not None
        self._nursery.start_soon(self._resolve, chat, client, frame)

    def _unpark(self, chat: ChatState, client: Client, now: float, wall_ms: int) -> None:
        """Apply the frames that waited behind a resolved one, until one needs the cluster."""
        waiting = self._parked.pop(client, [])
        for index, frame in enumerate(waiting):
            if not isinstance(frame, ClientProtocolError) and self._needs_cluster(
                chat, client, frame
            ):
                self._park(chat, client, frame)
                self._parked[client].extend(waiting[index + 1 :])
                return
            self._apply_frame(chat, client, frame, now, wall_ms, None)

    async def _release_when_published(self, held: list[Client]) -> None:
        """Write the held clients' frames once what was published so far is out."""
        try:
            with trio.move_on_after(self._config.backplane_timeout):
                await self._backplane.flush()
        finally:
            for client in held:
                client.peer.release()

    async def _resolve(self, chat: ChatState, client: Client, frame: ChatFrame) -> None:
        """A parked frame's cluster requests, beside the hub; the answer goes back inbound."""
        claimed = await self._ask_cluster(chat, client, frame)
        with contextlib.suppress(trio.ClosedResourceError):  # the hub is stopping
            await self._inbound_send.send(_Resolved(client, frame, claimed))

    async def _ask_cluster(
        self, chat: ChatState, client: Client, frame: ChatFrame
    ) -> tuple[str, Claim] | None:
        """Catch up (for a join), then claim the name ``frame`` binds, if any."""
        if isinstance(frame, Join):
            with trio.move_on_after(self._config.backplane_timeout):
                await self._backplane.catch_up()
        name = chat.needs_claim(client, frame)
        if name is None:
            return None
        token = frame.token if isinstance(frame, Join) else None
        rotate = isinstance(frame, Join) and frame.rotate
        share = client.identity is not None
        if client.identity is not None:
            # Every node claims an authenticated user's name with the same
            # token: one more connection shares it (docs/protocol.md §15).
            token, rotate = claim_token(client.identity.sub), False
        try:
            return name, await self._backplane.claim(name, token, rotate=rotate, share=share)
        except StorageError:
            return name, Claim("unavailable")

    def _apply_marker(self, chat: ChatState, item: trio.Event | _Wake) -> None:
        if isinstance(item, trio.Event):
            self._queue_says(chat)  # says before the barrier go first
            try:
                self._store_send.send_nowait(item)
            except trio.WouldBlock:
                item.set()  # the store is overloaded: settle as far as it can
        else:
            self._wake_sent = False  # the pump runs at the end of this step

    def _apply_frame(
        self,
        chat: ChatState,
        client: Client,
        frame: ClientItem,
        now: float,
        wall_ms: int,
        claimed: tuple[str, Claim] | None,
    ) -> None:
        claim = claimed[1] if claimed is not None else None
        try:
            if isinstance(frame, ClientProtocolError):
                chat.refuse(
                    client, frame.code, frame.message, frame.ref, classic=frame.classic, now=now
                )
            elif claim is not None and claim.status == "unavailable":
                chat.refuse(
                    client, ErrorCode.UNAVAILABLE, "the chat is unavailable: try again", frame.ref
                )
            else:
                chat.handle(client, frame, now, wall_ms, claim)
                if claimed is not None and claimed[1].status != "taken":
                    self._release_unused(client, claimed[0])
        except Exception:
            # A bug triggered by one client's frame must not take the hub (and
            # every other connection) down: answer `internal`, close with 1011.
            # In the dispatcher's task: the connection's fields are restored.
            room = (
                CLASSIC_ROOM if isinstance(frame, ClassicFrame) else getattr(frame, "room", None)
            )
            with log_context(**self._log_fields.get(client, {})):
                LOGGER.exception(
                    "bug while handling a frame; closing its connection with 1011",
                    extra=_chat_fields(client, room),
                )
            chat.refuse(client, ErrorCode.INTERNAL, "internal error", getattr(frame, "ref", None))
            client.peer.close_soon(CloseCode.INTERNAL_ERROR, "internal error")

    def _release_unused(self, client: Client, name: str) -> None:
        """A claimed name the frame did not end up binding goes back."""
        if not client.holds(name):  # (by key: a takeover may bind another form of it)
            self._backplane.release(name)

    def _queue_says(self, chat: ChatState) -> None:
        self._take_output(chat)  # (what the step published so far goes first)
        if not self._to_store:
            return
        pending, self._to_store = self._to_store, []
        taken = self._step_started
        for say in pending:
            say.taken = taken
        append_nowait = self._append_nowait
        if append_nowait is not None:
            # An in-memory store: commit in this step, with no task hop (and
            # no wake-up: the pump at the end of this step applies them).
            self._quiet = True
            try:
                result: list[str] | StorageError
                began = trio.current_time()
                try:
                    result = append_nowait([say.draft for say in pending])
                except StorageError as exc:
                    result = exc
                self._stats.store_commit.observe(trio.current_time() - began)
                self._stored(chat, pending, result)
            finally:
                self._quiet = False
            return
        for index, say in enumerate(pending):
            try:
                self._store_send.send_nowait(say)
            except trio.WouldBlock:
                chat.store_failed(pending[index:], "the server is busy: try again")
                return

    async def _store_loop(self) -> None:
        """Store the says the dispatcher queued, a batch at a time; the verdicts go
        back inbound, so the dispatcher alone applies them (acks, refusals)."""
        receive = self._store_recv
        barrier: trio.Event | None = None
        async for first in receive:
            if isinstance(first, trio.Event):
                await self._post(_StepDone(first))
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
            # Everything the hub published before these says (their senders'
            # joins) reaches the other nodes first.
            with trio.move_on_after(self._config.backplane_timeout):
                await self._backplane.flush()
            result: list[str] | StorageError
            began = trio.current_time()
            try:
                result = await self._backplane.append([say.draft for say in batch])
            except StorageError as exc:
                result = exc
            self._stats.store_commit.observe(trio.current_time() - began)
            await self._post(_Stored(batch, result))
            if barrier is not None:
                await self._post(_StepDone(barrier))
                barrier = None

    async def _post(self, item: _Stored | _StepDone) -> None:
        """Hand a store result to the dispatcher (or, once it has stopped, apply it here)."""
        try:
            await self._inbound_send.send(item)
        except trio.ClosedResourceError:
            # Stopping: the dispatcher has returned, so nothing else applies to
            # the chat state; store what is left as before (no one waits for acks).
            if isinstance(item, _Stored):
                self._stored(self.chat, item.batch, item.result)
            else:
                item.done.set()

    def _stored(
        self, chat: ChatState, batch: list[PendingSay], result: list[str] | StorageError
    ) -> None:
        """The store's verdict on a batch: ack each when it comes back, or refuse it."""
        if isinstance(result, StorageError):
            self._stats.storage_failures += 1
            if not self._storage_down:  # log once per outage, not per batch
                LOGGER.warning("history unavailable: %s", result)
                self._storage_down = True
            chat.store_failed(batch, "the message could not be stored: try again")
            return
        if self._storage_down:
            LOGGER.warning("history available again")
            self._storage_down = False
        self._stats.messages_stored += len(batch)
        chat.stored(batch, result)


def _chat_fields(client: Client, room: str | None = None) -> dict[str, object]:
    """``extra=`` of a log line about ``client``: the name it chats under and
    the room at hand, where known (a room only if valid: a frame's text never
    reaches a log field raw)."""
    fields: dict[str, object] = {}
    if client.name is not None:
        fields["user"] = client.name
    if room is not None and is_valid_room(room):
        fields["room"] = room
    return fields
