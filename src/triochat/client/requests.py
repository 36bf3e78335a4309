"""The requests awaiting answers: refs, slots, and what a reconnect settles.

Rule 2: every request that has an answer carries a fresh ``ref``, and answers
are matched by ``ref`` alone: the server may answer a ``history`` sent right
after a ``say`` first (docs/protocol.md §2). `RequestBook` keeps them by
``ref`` in the order they were made (the order `outgoing` sends them in).

Rule 4: a say keeps its ``ref`` for life. After a lost connection it is sent
again with the same ``ref`` and the server answers with the first copy's id
(it remembers a user's refs while it holds the user). A say whose message
already showed up (live, or in the rejoin's replay after ``since``, which also
covers a server restart that forgot the refs) is answered with that
message's id and not sent again. So nothing acked is lost and nothing is
stored twice. `RequestBook.attach` and `RequestBook.detach` settle a new and a
lost connection; `incoming` notes which message is whose say.

Nothing here awaits except `RequestBook.call`, the caller's side.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from typing import Any, Generic, Literal, TypeVar, cast

import trio

from .connection import Connection
from .errors import DeliveryUnknown
from .events import Joined
from .state import ClientState, RoomState

__all__ = ["Kind", "Request", "RequestBook"]

T = TypeVar("T")

Kind = Literal["join", "say", "leave", "history", "whisper", "auth"]


class Request(Generic[T]):
    """One request with an answer; lives in a `RequestBook` until answered."""

    __slots__ = (
        "before",
        "bound_id",
        "done",
        "error",
        "hold_until",
        "internal",
        "kind",
        "limit",
        "msg",
        "name",
        "ref",
        "room",
        "sent_on",
        "slot",
        "to",
        "token",
        "tries",
        "value",
        "with_token",
    )

    def __init__(self, kind: Kind, ref: str, *, room: str | None = None) -> None:
        self.kind = kind
        self.ref = ref
        self.room = room
        self.msg: str | None = None
        self.to: str | None = None
        self.name: str | None = None
        self.before: str | None = None
        self.limit: int | None = None
        self.token: str | None = None
        #: The generation of the connection it was last sent on (0: none yet).
        self.sent_on = 0
        self.tries = 0
        #: A say whose message we saw: its id, should the ack not come.
        self.bound_id: str | None = None
        #: Not to be sent before this time (after a retryable refusal).
        self.hold_until = 0.0
        #: Made by the client itself (a rejoin, the connection's auth).
        self.internal = False
        #: Holds one of the `max_pending` slots.
        self.slot = False
        #: A join that carried the resume token (last time it was sent).
        self.with_token = False
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def resolve(self, value: T) -> None:
        if not self.done.is_set():
            self.value = value
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return cast("T", self.value)


class RequestBook:
    """The pending requests by ``ref``, in the order they were made (Rules 2, 3)."""

    def __init__(self, state: ClientState, max_pending: int) -> None:
        self._state = state
        self._ref_prefix = secrets.token_hex(4)  # refs never repeat across clients
        self._ref_seq = itertools.count(1)
        # Any: each holds its own answer type; the public methods give it back typed.
        self._pending: dict[str, Request[Any]] = {}
        self._slots = trio.Semaphore(max_pending)
        #: Set when the writer should look again; the writer replaces it.
        self.wake = trio.Event()

    def __iter__(self) -> Iterator[Request[Any]]:
        """The pending requests in order (copy with `list` to settle some)."""
        return iter(self._pending.values())

    def get(self, ref: object) -> Request[Any] | None:
        """The pending request ``ref`` names, if any."""
        return self._pending.get(ref) if isinstance(ref, str) else None

    def next_ref(self) -> str:
        return f"{self._ref_prefix}-{next(self._ref_seq)}"

    async def call(self, request: Request[T]) -> T:
        """Submit ``request`` and wait for its answer (see `ChatClient` on cancellation)."""
        # Submitted without a checkpoint when a slot is free, so requests go
        # out in the order the calls were made (Rule 3).
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        request.slot = True
        if self._state.ended is not None or self._state.closed:
            self._slots.release()
            self._state.check_usable()
        self._pending[request.ref] = request
        self.kick()
        try:
            await request.done.wait()
        except BaseException:
            if not request.done.is_set():
                self._abandon(request)
            raise
        return request.outcome()

    def track(self, request: Request[Any]) -> None:
        """Hold a request of the client's own (no slot), e.g. a connection's auth."""
        self._pending[request.ref] = request

    def _abandon(self, request: Request[Any]) -> None:
        """The caller stopped waiting (cancelled). Never awaits."""
        if request.tries and request.kind in ("say", "join", "leave", "whisper"):
            return  # sent: keep following it through (`ChatClient`'s docstring)
        self.retire(request)
        room = request.room
        rooms = self._state.rooms
        state = rooms.get(room) if room is not None else None
        if (
            request.kind == "join"
            and state is not None
            and not state.ever_joined
            and not any(r.kind == "join" and r.room == room for r in self._pending.values())
        ):
            del rooms[cast("str", room)]

    def retire(self, request: Request[Any]) -> None:
        """Forget ``request`` (answered, failed or abandoned). Never awaits."""
        if self._pending.pop(request.ref, None) is not None and request.slot:
            request.slot = False
            self._slots.release()

    def answer(self, request: Request[Any], value: object) -> None:
        self.retire(request)
        request.resolve(value)

    def refuse(self, request: Request[Any], error: BaseException) -> None:
        self.retire(request)
        request.fail(error)

    def kick(self) -> None:
        """Have the writer look again."""
        self.wake.set()

    def fail_all(self, error: BaseException) -> None:
        """Fail every pending request with ``error`` (the client stopped)."""
        for request in list(self._pending.values()):
            self.refuse(request, error)
        self.kick()

    def attach(self, conn: Connection) -> None:
        """``conn`` is usable: queue the rejoins (first) and settle what the old
        connection left. Never awaits."""
        self._state.conn = conn
        rooms = self._state.rooms
        joining = {r.room for r in self._pending.values() if r.kind == "join"}
        rejoins: dict[str, Request[Any]] = {}
        for room, state in list(rooms.items()):
            if state.leaving:
                continue
            if room not in joining and state.ever_joined:
                request: Request[Joined] = Request("join", self.next_ref(), room=room)
                request.internal = True
                rejoins[request.ref] = request
        for request in list(self._pending.values()):
            if request.kind == "leave":
                # The new connection does not rejoin a room being left.
                room_state: RoomState | None = rooms.get(cast("str", request.room))
                if room_state is not None and room_state.leaving:
                    del rooms[cast("str", request.room)]
                self.answer(request, None)
            elif request.kind == "auth" and conn.authed is not None:
                self.answer(request, conn.authed)  # the reconnect used the newest token
        self._pending = {**rejoins, **self._pending}
        self.kick()

    def detach(self, conn: Connection) -> None:
        """``conn`` is gone: settle what it had sent. Never awaits."""
        self._state.conn = None
        for request in list(self._pending.values()):
            if request.sent_on != conn.generation:
                continue
            if request.kind == "say" and request.bound_id is not None:
                self.answer(request, request.bound_id)  # stored; only the ack was lost
            elif request.kind == "whisper":
                self.refuse(
                    request,
                    DeliveryUnknown(
                        f"connection lost before the whisper to {request.to} was acked"
                    ),
                )
            # Everything else is sent again on the next connection.
