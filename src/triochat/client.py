"""A Python client for triochat, on trio-websocket (docs/python-client.md).

::

    async with triochat.client.connect("ws://127.0.0.1:8181/ws") as chat:
        await chat.join("lobby", name="bot")
        msg_id = await chat.say("lobby", "hello")
        async for event in chat:
            ...

Written against the wire protocol (docs/protocol.md), not against the
server's code. The rules the code keeps:

Rule 1: one reader task per connection takes every frame off the socket at
once and handles it without awaiting. trio-websocket's own reader stops (pongs
and close frames included) while its small queue is full, so nothing may make
ours wait (a full queue stalls the connection's pongs). Events for the application go to a
bounded buffer that drops its oldest entry when full and says so
(`EventsDropped`).

Rule 2: every request that has an answer carries a fresh ``ref``, and answers
are matched by ``ref`` alone: the server may answer a ``history`` sent right
after a ``say`` first (docs/protocol.md §2).

Rule 3: one writer task per connection sends requests in the order they were
made. A request for a room waits, unsent, until that room is joined on the
current connection, so after a reconnect nothing overtakes the rejoin.

Rule 4: a say keeps its ``ref`` for life. After a lost connection it is sent
again with the same ``ref`` and the server answers with the first copy's id
(it remembers a user's refs while it holds the user). A say whose message
already showed up (live, or in the rejoin's replay after ``since``, which also
covers a server restart that forgot the refs) is answered with that
message's id and not sent again. So nothing acked is lost and nothing is
stored twice.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import random
import secrets
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Generic, Literal, TypeVar, cast

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import LocalProtocolError

from .errors import TriochatError

__all__ = [
    "Ack",
    "Authed",
    "AuthenticationFailed",
    "Backoff",
    "ChatClient",
    "ClientError",
    "ConnectFailed",
    "ConnectionEnded",
    "Deleted",
    "DeliveryUnknown",
    "Disconnected",
    "DisconnectedByOperator",
    "Event",
    "EventsDropped",
    "HistoryPage",
    "Joined",
    "Left",
    "Message",
    "PolicyViolation",
    "Presence",
    "RejoinFailed",
    "Rejoined",
    "Replaced",
    "ServerError",
    "Typing",
    "Whisper",
    "connect",
]

LOGGER = logging.getLogger("triochat.client")

T = TypeVar("T")

#: trio-websocket's queue between its reader and ours. Ours drains it at
#: once (Rule 1), so a few frames suffice; its default of 1 is the gap.
LIBRARY_QUEUE: Final = 4
#: Largest server frame accepted, in characters (a `joined` or `history` of
#: 200 messages of 2000 characters is about 0.45 M).
MAX_MESSAGE_CHARS: Final = 4 << 20
#: Message ids remembered per room, to pass each message on once.
SEEN_PER_ROOM: Final = 5000
#: The most a `history` request may ask for (docs/protocol.md §3).
MAX_HISTORY_LIMIT: Final = 200
#: Error codes after which nothing was stored or done: the request is sent
#: again (same ``ref``) after ``retry_delay``. A whisper is not sent again
#: after ``unavailable``: that one may have been delivered (§3).
_RETRYABLE: Final = {
    "say": frozenset({"rate_limited", "unavailable"}),
    "join": frozenset({"rate_limited", "unavailable"}),
    "history": frozenset({"rate_limited"}),
    "whisper": frozenset({"rate_limited"}),
    "leave": frozenset({"rate_limited"}),
}
#: Frames the server's rate limit counts: paced by the client's own bucket.
_PACED: Final = frozenset({"say", "whisper"})
#: For answers matched by ``ref``: the request kind each one answers.
_ANSWERS: Final[dict[type, str]] = {}  # filled in below the frame classes
#: HTTP answers to a handshake that another attempt will not change.
_FINAL_STATUSES: Final = frozenset({400, 401, 403, 404, 405, 421, 426})
_CLOSE_NORMAL: Final = 1000
_CLOSE_ABNORMAL: Final = 1006  # no close frame: the TCP connection was lost


# --- errors -----------------------------------------------------------------
#
#   TriochatError
#   ├── ClientError            the server answered a request with `error`
#   ├── DeliveryUnknown        a whisper was sent, then the connection was lost
#   └── ConnectionEnded        the client is over; it will not reconnect
#       ├── ConnectFailed          the first connection could not be made
#       ├── Replaced               4001: a newer connection took the name over
#       ├── AuthenticationFailed   4003 / `unauthorized`: the token was refused
#       ├── DisconnectedByOperator 4009
#       └── PolicyViolation        1008: too many refused frames


class ClientError(TriochatError):
    """The server answered a request with an ``error`` frame.

    Attributes:
        code: the error code (docs/protocol.md §5), e.g. ``not_joined``.
        message: the server's human-readable text; don't match on it.
        ref: the request's ``ref``.
    """

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


class DeliveryUnknown(TriochatError):
    """A whisper went out but the connection was lost before its ``ack``.

    Whispers are not stored, so the client does not send it again (that could
    deliver it twice): the caller decides.
    """


class ConnectionEnded(TriochatError):
    """The client has ended for good and will not reconnect.

    Raised by every call once it happens, pending ones included, and by the
    event iterator after the events buffered before it.

    Attributes:
        code: the WebSocket close code, or None (no close frame, no connection).
        reason: what happened, in words.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})" if code is not None else reason)
        self.code = code
        self.reason = reason


class ConnectFailed(ConnectionEnded):
    """The first connection could not be opened (refused, timed out, HTTP error)."""


class Replaced(ConnectionEnded):
    """Closed with 4001: a newer connection took the name over with its resume token."""


class AuthenticationFailed(ConnectionEnded):
    """The token was refused (``unauthorized``) or expired (close 4003)."""


class DisconnectedByOperator(ConnectionEnded):
    """Closed with 4009 by an operator (the server API): do not come back by yourself."""


class PolicyViolation(ConnectionEnded):
    """Closed with 1008: too many refused frames (docs/protocol.md §9)."""


_NO_RECONNECT: Final[dict[int, type[ConnectionEnded]]] = {
    4001: Replaced,
    4003: AuthenticationFailed,
    4009: DisconnectedByOperator,
    1008: PolicyViolation,
}


# --- frames and events --------------------------------------------------------
# Server frames (docs/protocol.md §4) as frozen msgspec structs. Unknown fields
# are ignored and unknown frame types skipped, for forward compatibility.


class Message(msgspec.Struct, frozen=True, tag="message", tag_field="type"):
    """A message in a room (also an item of `Joined.history` and `HistoryPage`)."""

    room: str
    id: str
    name: str
    msg: str
    ts: int


class Joined(msgspec.Struct, frozen=True, tag="joined", tag_field="type"):
    """The answer to `ChatClient.join`."""

    room: str
    name: str
    token: str | None = None
    members: tuple[str, ...] = ()
    history: tuple[Message, ...] = ()
    recovered: bool = True
    ref: str | None = None


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    ref: str
    id: str


class Presence(msgspec.Struct, frozen=True, tag="presence", tag_field="type"):
    """Somebody else joined or left a room (``event`` is ``join`` or ``leave``)."""

    room: str
    event: str
    name: str


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    """Somebody else is typing in a room."""

    room: str
    name: str


class Whisper(
    msgspec.Struct, frozen=True, tag="whisper", tag_field="type", rename={"from_": "from"}
):
    """A direct message, to us or (the sender's copy) from us."""

    id: str
    from_: str
    to: str
    msg: str
    ts: int


class Left(msgspec.Struct, frozen=True, tag="left", tag_field="type"):
    room: str
    ref: str | None = None


class HistoryPage(msgspec.Struct, frozen=True, tag="history", tag_field="type"):
    """The answer to `ChatClient.history`: ``messages`` oldest first; ``more``
    is true when the server keeps older ones."""

    room: str
    messages: tuple[Message, ...] = ()
    more: bool = False
    ref: str | None = None


class ServerError(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """An ``error`` frame that answers none of our pending requests."""

    code: str
    message: str = ""
    ref: str | None = None


class Authed(msgspec.Struct, frozen=True, tag="authed", tag_field="type"):
    """The answer to ``auth`` (docs/protocol.md §15): who the token says we are."""

    user: str
    name: str
    exp: int
    ref: str | None = None


class Deleted(msgspec.Struct, frozen=True, tag="deleted", tag_field="type"):
    """An operator deleted message ``id`` of ``room``."""

    room: str
    id: str


# Events made by the client itself, not by the server.


class Disconnected(msgspec.Struct, frozen=True):
    """The connection was lost (or an attempt failed); the next attempt is in ``delay`` s."""

    code: int | None
    reason: str
    delay: float
    attempt: int


class Rejoined(msgspec.Struct, frozen=True):
    """A room was joined again after a reconnect.

    The replayed messages not seen before follow as `Message` events. With
    ``joined.recovered`` false the gap could not be filled: page back with
    `ChatClient.history_pages` if it matters.
    """

    joined: Joined


class RejoinFailed(msgspec.Struct, frozen=True):
    """A room could not be joined again after a reconnect; it is dropped."""

    room: str
    code: str
    message: str


class EventsDropped(msgspec.Struct, frozen=True):
    """The event buffer was full: the ``count`` oldest events were dropped here."""

    count: int


_ANSWERS.update({HistoryPage: "history", Left: "leave", Authed: "auth"})

#: What iterating over a `ChatClient` yields.
Event = (
    Message
    | Presence
    | Typing
    | Whisper
    | Deleted
    | ServerError
    | Disconnected
    | Rejoined
    | RejoinFailed
    | EventsDropped
)

_ServerFrame = (
    Message
    | Joined
    | Ack
    | Presence
    | Typing
    | Whisper
    | Left
    | HistoryPage
    | ServerError
    | Authed
) | Deleted
_decoder: Final = msgspec.json.Decoder(_ServerFrame)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


# --- policy objects -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backoff:
    """How long to wait before each reconnect attempt.

    Attempt ``n`` (0 for the first after a loss) waits a random time below
    ``min(maximum, initial * factor ** n)``: with ``jitter`` 1 (the default,
    "full jitter") anywhere from 0 to that ceiling, with ``jitter`` 0 exactly
    the ceiling; never less than ``floor``. The count starts again once a
    connection has joined a room.

    Attributes:
        initial: the first ceiling, in seconds.
        maximum: the largest ceiling, in seconds.
        factor: growth per failed attempt.
        jitter: the fraction of the ceiling that is random (0-1).
        floor: the shortest wait, in seconds.
        max_attempts: attempts in a row before giving up (`ConnectionEnded`);
            None tries for ever.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    floor: float = 0.05
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 <= floor <= initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("Backoff needs factor >= 1 and 0 <= jitter <= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("Backoff.max_attempts must be at least 1 (or None)")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (0-based)."""
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, rand: float) -> float:
        """The wait before attempt ``attempt``, for ``rand`` uniform in [0, 1)."""
        ceiling = self.ceiling(attempt)
        return max(self.floor, ceiling * (1 - self.jitter * rand))


class _Bucket:
    """The client's own token bucket, kept under the server's (10/s, burst 20),
    so a busy bot is paced instead of refused (refusals add up to 1008)."""

    def __init__(self, rate: float | None, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at: float | None = None

    def _refill(self, now: float) -> None:
        if self.rate and self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def delay(self, now: float) -> float:
        """Seconds until a token is free (0: now)."""
        if not self.rate:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        if self.rate:
            self._refill(now)
            self.tokens -= 1


# --- internal state ---------------------------------------------------------------

_Kind = Literal["join", "say", "leave", "history", "whisper", "auth"]


class _Request(Generic[T]):
    """One request with an answer; lives in `ChatClient._requests` until answered."""

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

    def __init__(self, kind: _Kind, ref: str, *, room: str | None = None) -> None:
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


class _Room:
    """What the client keeps about a room it is in (or joining)."""

    __slots__ = ("ever_joined", "joined_on", "last_id", "leaving", "seen")

    def __init__(self, since: str | None) -> None:
        #: The last message id seen: the ``since`` of the next rejoin.
        self.last_id = since
        #: The generation of the connection it is joined on (0: none).
        self.joined_on = 0
        self.ever_joined = False
        self.leaving = False
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def remember(self, message_id: str) -> bool:
        """Note ``message_id`` as seen; False if it was seen already."""
        if message_id in self.seen:
            return False
        self.seen[message_id] = None
        if len(self.seen) > SEEN_PER_ROOM:
            self.seen.popitem(last=False)
        return True


@dataclasses.dataclass
class _End:
    """How one connection ended."""

    code: int | None
    reason: str
    error: ConnectionEnded | None = None
    status: int | None = None  # the HTTP status of a refused handshake
    authed: bool = False  # it had authenticated (a 4003 then means "expired")


class _Connection:
    """One WebSocket connection; its tasks live in the nursery ``scope`` cancels."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.ws: WebSocketConnection | None = None
        self.scope = trio.CancelScope()
        self.end: _End | None = None
        #: A join succeeded on it, so the server bound our name to it.
        self.named = False
        self.authed: Authed | None = None

    def finish(
        self,
        code: int | None,
        reason: str,
        *,
        error: ConnectionEnded | None = None,
        status: int | None = None,
        cancel: bool = True,
    ) -> None:
        """Record the end (the first one counts) and stop the connection's tasks."""
        if self.end is None:
            self.end = _End(code, reason, error, status, self.authed is not None)
        if cancel:
            self.scope.cancel()


TokenSource = str | Callable[[], Awaitable[str]]


# --- the client -------------------------------------------------------------------


class ChatClient:
    """A chat connection that survives reconnects. Made by `connect`.

    Every request method may be called from several tasks at once; answers
    are matched by ``ref``. While the connection is down, requests wait and
    go out once it is back and their room is joined again.

    Cancellation (every request method): cancelled before its frame went out,
    nothing is sent. Cancelled after, the request is still followed through:
    a say is still sent again after a reconnect until it is acked (so it is
    stored exactly once), its answer is just not returned to anyone.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None = None,
        resume_token: str | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        send_rate: float | None = 8.0,
        send_burst: int = 10,
        retries: int = 5,
        retry_delay: float = 1.5,
        event_buffer: int = 1000,
        max_pending: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if event_buffer < 1 or max_pending < 1:
            raise ValueError("event_buffer and max_pending must be at least 1")
        self.url = url
        self._host = parts.hostname
        self._tls = parts.scheme == "wss"
        self._port = parts.port or (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = 443 if self._tls else 80
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        # An empty path means the chat endpoint, not the lobby-listening "/".
        self._resource = (parts.path or "/ws") + (f"?{parts.query}" if parts.query else "")
        self._ssl_context = ssl_context
        self._open_stream = open_stream
        self._token = token
        self._reconnect = reconnect
        self._backoff = backoff if backoff is not None else Backoff()
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._retries = retries
        self._retry_delay = retry_delay
        self._bucket = _Bucket(send_rate, send_burst)
        self._random = random.Random()

        self._ref_prefix = secrets.token_hex(4)  # refs never repeat across clients
        self._ref_seq = itertools.count(1)
        # Requests awaiting answers, by ref, in the order they were made (Rule 3).
        # Any: each holds its own answer type; the public methods give it back typed.
        self._requests: dict[str, _Request[Any]] = {}
        self._slots = trio.Semaphore(max_pending)
        self._rooms: dict[str, _Room] = {}
        self._conn: _Connection | None = None
        self._generation = 0
        self._attempt = 0
        self._wake = trio.Event()  # the writer looks again when this is set

        self._name: str | None = None
        self._wanted_name: str | None = None
        self._resume_token = resume_token
        self._user: str | None = None
        self._authed: Authed | None = None

        self._events: collections.deque[Event] = collections.deque(maxlen=event_buffer)
        self._dropped = 0
        self._event_lot = trio.lowlevel.ParkingLot()
        self._terminal: ConnectionEnded | None = None
        self._closed = False
        self._stopped = trio.Event()

    # --- what the application reads -----------------------------------------------

    @property
    def name(self) -> str | None:
        """The name the server bound (from the last `Joined` or `Authed`)."""
        return self._name

    @property
    def user(self) -> str | None:
        """The token's ``sub`` once authenticated; None when anonymous."""
        return self._user

    @property
    def authed(self) -> Authed | None:
        """The server's latest ``authed`` answer (``user``, ``name``, ``exp``): from
        the current connection's ``auth`` or a later `authenticate`; None when
        anonymous. ``exp`` says when to refresh."""
        return self._authed

    @property
    def resume_token(self) -> str | None:
        """The latest resume token (rotated on every reconnect)."""
        return self._resume_token

    @property
    def last_ids(self) -> dict[str, str | None]:
        """Per room, the last message id seen: what the next rejoin sends as ``since``."""
        return {room: state.last_id for room, state in self._rooms.items()}

    @property
    def rooms(self) -> tuple[str, ...]:
        """The rooms joined (or being joined again)."""
        return tuple(room for room, state in self._rooms.items() if not state.leaving)

    @property
    def connected(self) -> bool:
        """True while a connection is open (and authenticated, with a token)."""
        return self._conn is not None and not self._closed and self._terminal is None

    @property
    def ended(self) -> ConnectionEnded | None:
        """Why the client ended for good, or None while it runs."""
        return self._terminal

    # --- requests -----------------------------------------------------------------

    async def join(
        self, room: str, *, name: str | None = None, since: str | None = None
    ) -> Joined:
        """Join ``room`` (again: catch up) and return the server's `Joined`.

        Args:
            room: the room.
            name: the name to claim; needed on the first join unless authenticated.
            since: the last message id seen in this room (e.g. saved by an earlier
                run): the server replays what came after it into `Joined.history`.

        Raises:
            ClientError: ``name_taken``, ``bad_name``, ``bad_room``, ``forbidden``, ...
            ConnectionEnded: the client ended.
        """
        self._check_usable()
        if name is not None and self._name is None:
            self._wanted_name = name
        state = self._rooms.get(room)
        if state is None or state.leaving:
            state = self._rooms[room] = _Room(since)
        elif since is not None:
            state.last_id = since
        request: _Request[Joined] = _Request("join", self._next_ref(), room=room)
        request.name = name
        return await self._call(request)

    async def say(self, room: str, msg: str) -> str:
        """Say ``msg`` in ``room``; return its id once the server stored it (the ack).

        Survives reconnects: sent again with the same ``ref`` until acked, never
        stored twice (module docstring, Rule 4). Our own `Message` also arrives
        as an event, like everybody's.

        Raises:
            ClientError: ``not_joined``, ``too_long``, or ``rate_limited`` /
                ``unavailable`` after ``retries`` attempts.
            ConnectionEnded: the client ended before the ack.
        """
        self._check_usable()
        request: _Request[str] = _Request("say", self._next_ref(), room=room)
        request.msg = msg
        return await self._call(request)

    async def whisper(self, to: str, msg: str) -> str:
        """Whisper ``msg`` to the user ``to``; return the whisper's id (the ack).

        Raises:
            ClientError: ``no_such_user``, ``not_joined`` (no name yet), ...
            DeliveryUnknown: the connection was lost after it was sent and before
                the ack; it is not sent again (whispers are not stored).
            ConnectionEnded: the client ended.
        """
        self._check_usable()
        request: _Request[str] = _Request("whisper", self._next_ref())
        request.to = to
        request.msg = msg
        return await self._call(request)

    async def leave(self, room: str) -> None:
        """Leave ``room``; returns once the server confirmed (or a reconnect dropped it).

        Raises:
            ClientError: ``not_joined``.
            ConnectionEnded: the client ended.
        """
        self._check_usable()
        state = self._rooms.get(room)
        if state is not None:
            state.leaving = True
        request: _Request[None] = _Request("leave", self._next_ref(), room=room)
        await self._call(request)

    async def history(
        self, room: str, *, before: str | None = None, limit: int = 50
    ) -> HistoryPage:
        """Up to ``limit`` (1-200) messages of ``room`` older than ``before``
        (or the newest), oldest first. The room must be joined.

        Raises:
            ClientError: ``not_joined``, ``bad_frame`` (an unknown ``before``), ...
            ConnectionEnded: the client ended.
        """
        self._check_usable()
        request: _Request[HistoryPage] = _Request("history", self._next_ref(), room=room)
        request.before = before
        request.limit = limit
        return await self._call(request)

    async def history_pages(
        self, room: str, *, before: str | None = None, limit: int = MAX_HISTORY_LIMIT
    ) -> AsyncIterator[HistoryPage]:
        """Every page older than ``before`` (or from the newest), newest page first.

        Each page's messages are oldest first; the iteration stops after the
        oldest message the server keeps. Holds no resources between pages.
        """
        while True:
            page = await self.history(room, before=before, limit=limit)
            if page.messages:
                yield page
            if not page.more or not page.messages:
                return
            before = page.messages[0].id

    async def typing(self, room: str) -> bool:
        """Tell ``room`` we are typing: a hint, sent only if the connection is up,
        the room joined on it and the send bucket has a token.

        Returns:
            Whether the frame was sent.
        """
        self._check_usable()
        await trio.lowlevel.checkpoint()
        conn = self._conn
        state = self._rooms.get(room)
        now = trio.current_time()
        if (
            conn is None
            or conn.ws is None
            or state is None
            or state.joined_on != conn.generation
            or self._bucket.delay(now) > 0
        ):
            return False
        self._bucket.take(now)
        try:
            await conn.ws.send_message(_encode({"type": "typing", "room": room}))
        except ConnectionClosed:
            return False
        return True

    async def authenticate(self, token: str) -> Authed:
        """Send a fresh ``token`` for the same user before the old one expires.

        It is also the token of every later reconnect (unless `connect` was
        given a function, which is then asked each time).

        Raises:
            AuthenticationFailed: the server refused it (and closes with 4003).
            ValueError: `connect` was given no token: a connection cannot start
                authenticating later (docs/protocol.md §15).
        """
        self._check_usable()
        if self._token is None:
            raise ValueError("this client connected without a token")
        if isinstance(self._token, str):
            self._token = token
        request: _Request[Authed] = _Request("auth", self._next_ref())
        request.token = token
        return await self._call(request)

    # --- events ----------------------------------------------------------------------

    async def receive(self) -> Event:
        """The next event (messages, presence, typing, whispers, unsolicited errors,
        and the client's own `Disconnected`, `Rejoined`, `RejoinFailed`,
        `EventsDropped`).

        Raises:
            ConnectionEnded: the client ended (after the events buffered before it).
            trio.EndOfChannel: the client was closed by `aclose` (or the end of
                `connect`'s block).
        """
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                await self._event_lot.park()

    def receive_nowait(self) -> Event:
        """The next event if one is buffered already, without waiting.

        The reader buffers events in the order their frames arrived, so, for
        example, our own `Message` is here by the time `say` returns (the
        server sends it before the ``ack``).

        Raises:
            trio.WouldBlock: no event is buffered.
            ConnectionEnded: the client ended (after the events buffered before it).
            trio.EndOfChannel: the client was closed by `aclose`.
        """
        if self._dropped:
            count, self._dropped = self._dropped, 0
            return EventsDropped(count)
        if self._events:
            return self._events.popleft()
        if self._terminal is not None:
            raise self._terminal
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def __aiter__(self) -> ChatClient:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    # --- closing ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (code 1000) and end the client; idempotent.

        Requests still waiting fail with `trio.ClosedResourceError` (says not
        acked by then are not sent again). The close handshake gets at most
        ``close_timeout`` seconds, shielded from cancellation.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._stop(trio.ClosedResourceError("the chat client was closed"))
        conn = self._conn
        if conn is not None and conn.ws is not None:
            with trio.move_on_after(self._close_timeout, shield=True):
                await conn.ws.aclose(_CLOSE_NORMAL, "bye")
        else:
            await trio.lowlevel.checkpoint()
        self._stopped.set()

    # --- internals: requests ---------------------------------------------------------

    def _next_ref(self) -> str:
        return f"{self._ref_prefix}-{next(self._ref_seq)}"

    def _check_usable(self) -> None:
        if self._terminal is not None:
            raise self._terminal
        if self._closed:
            raise trio.ClosedResourceError("the chat client was closed")

    async def _call(self, request: _Request[T]) -> T:
        # Submitted without a checkpoint when a slot is free, so requests go
        # out in the order the calls were made (Rule 3).
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        request.slot = True
        if self._terminal is not None or self._closed:
            self._slots.release()
            self._check_usable()
        self._requests[request.ref] = request
        self._kick()
        try:
            await request.done.wait()
        except BaseException:
            if not request.done.is_set():
                self._abandon(request)
            raise
        return request.outcome()

    def _abandon(self, request: _Request[Any]) -> None:
        """The caller stopped waiting (cancelled). Never awaits."""
        if request.tries and request.kind in ("say", "join", "leave", "whisper"):
            return  # sent: keep following it through (class docstring)
        self._retire(request)
        room = request.room
        state = self._rooms.get(room) if room is not None else None
        if (
            request.kind == "join"
            and state is not None
            and not state.ever_joined
            and not any(r.kind == "join" and r.room == room for r in self._requests.values())
        ):
            del self._rooms[cast("str", room)]

    def _retire(self, request: _Request[Any]) -> None:
        """Forget ``request`` (answered, failed or abandoned). Never awaits."""
        if self._requests.pop(request.ref, None) is not None and request.slot:
            request.slot = False
            self._slots.release()

    def _answer(self, request: _Request[Any], value: object) -> None:
        self._retire(request)
        request.resolve(value)

    def _refuse(self, request: _Request[Any], error: BaseException) -> None:
        self._retire(request)
        request.fail(error)

    def _kick(self) -> None:
        self._wake.set()

    def _emit(self, event: Event) -> None:
        """Buffer an event for `receive`; never blocks (Rule 1)."""
        if len(self._events) == self._events.maxlen:
            self._dropped += 1  # the deque drops its oldest entry
        self._events.append(event)
        self._event_lot.unpark_all()

    def _stop(self, error: BaseException) -> None:
        """Fail every pending request with ``error`` and wake every waiter."""
        for request in list(self._requests.values()):
            self._refuse(request, error)
        self._event_lot.unpark_all()
        self._kick()

    def _terminate(self, error: ConnectionEnded) -> None:
        if self._terminal is None and not self._closed:
            self._terminal = error
            LOGGER.info("chat client ended: %s", error)
            self._stop(error)
        self._stopped.set()

    # --- internals: the connection loop ----------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect after each loss until told not to.

        Reports started once the first connection is open (and authenticated);
        a failure before that is raised (`ConnectFailed`, `AuthenticationFailed`).
        """
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            end = await self._session(ready)
            if self._closed:
                return
            error = self._final_error(end, started)
            attempts = self._backoff.max_attempts
            if error is None and attempts is not None and self._attempt >= attempts:
                error = ConnectionEnded(
                    end.code, f"{end.reason}; gave up after {attempts} attempts"
                )
            if error is not None:
                self._terminate(error)
                if not started:
                    raise error
                return
            delay = self._backoff.delay(self._attempt, self._random.random())
            self._attempt += 1
            LOGGER.info(
                "chat connection lost (%s, code %s); reconnecting in %.2f s",
                end.reason,
                end.code,
                delay,
            )
            self._emit(Disconnected(end.code, end.reason, delay, self._attempt))
            await trio.sleep(delay)

    def _final_error(self, end: _End, started: bool) -> ConnectionEnded | None:
        """The error that ends the client after ``end``, or None to reconnect."""
        if end.error is not None:
            return end.error
        code = end.code
        if code is not None and code in _NO_RECONNECT:
            if code == 4003 and end.authed and callable(self._token):
                return None  # expired: the token function gives a fresh one
            return _NO_RECONNECT[code](code, end.reason)
        if not started:
            return ConnectFailed(code, f"could not connect to {self.url}: {end.reason}")
        if end.status in _FINAL_STATUSES:
            return ConnectFailed(code, f"could not reconnect to {self.url}: {end.reason}")
        if not self._reconnect:
            return ConnectionEnded(code, end.reason)
        return None

    async def _connect_stream(self) -> trio.abc.Stream:
        if self._open_stream is not None:
            return await self._open_stream()
        if self._tls:
            context = self._ssl_context or ssl.create_default_context()
            return await trio.open_ssl_over_tcp_stream(
                self._host, self._port, ssl_context=context, https_compatible=True
            )
        return await trio.open_tcp_stream(self._host, self._port)

    async def _session(self, ready: Callable[[], None]) -> _End:
        """One connection, from connecting to its end; returns how it ended."""
        self._generation += 1
        conn = _Connection(self._generation)
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(self._connect_timeout):
            try:
                stream = await self._connect_stream()
            except OSError as exc:
                return _End(None, f"cannot connect ({exc.strerror or exc})")
        if stream is None:
            return _End(None, f"no connection within {self._connect_timeout} s")
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                await self._drive(conn, stream, nursery, ready)
        except* ConnectionRejected as group:
            status = cast("ConnectionRejected", group.exceptions[0]).status_code
            conn.finish(None, f"handshake refused with HTTP {status}", status=status)
        except* LocalProtocolError:
            # trio-websocket's closing race (its reader answers a ping after the
            # close went out); the connection was ending anyway.
            conn.finish(_CLOSE_ABNORMAL, "connection closed")
        finally:
            if self._conn is conn:
                self._detach(conn)
            await trio.aclose_forcefully(stream)
        return conn.end or _End(None, "connection ended")

    async def _drive(
        self,
        conn: _Connection,
        stream: trio.abc.Stream,
        nursery: trio.Nursery,
        ready: Callable[[], None],
    ) -> None:
        with trio.move_on_after(self._connect_timeout) as handshake:
            # Any Stream works; trio-websocket's annotation is narrower than its use.
            conn.ws = await wrap_client_stream(
                nursery,
                cast("trio.SocketStream", stream),
                self._host_header,
                self._resource,
                message_queue_size=LIBRARY_QUEUE,
                max_message_size=MAX_MESSAGE_CHARS,
            )
        if handshake.cancelled_caught:
            conn.finish(None, f"no handshake within {self._connect_timeout} s")
            return
        nursery.start_soon(self._reader, conn)
        nursery.start_soon(self._keepalive, conn)
        if self._token is not None and not await self._authenticate(conn):
            return
        self._attach(conn)
        ready()
        nursery.start_soon(self._writer, conn)

    async def _authenticate(self, conn: _Connection) -> bool:
        """Send ``auth`` first and wait for ``authed`` (docs/protocol.md §15)."""
        assert conn.ws is not None
        source = self._token
        if isinstance(source, str) or source is None:
            token = source
        else:
            try:
                token = await source()
            except Exception as exc:  # the application's function: end, don't crash
                LOGGER.warning("the token function failed", exc_info=True)
                error = AuthenticationFailed(None, f"the token function failed: {exc!r}")
                conn.finish(None, str(error), error=error)
                return False
        request: _Request[Authed] = _Request("auth", self._next_ref())
        request.internal = True
        request.token = token
        request.sent_on = conn.generation
        self._requests[request.ref] = request
        try:
            await conn.ws.send_message(
                _encode({"type": "auth", "token": token, "ref": request.ref})
            )
            with trio.move_on_after(self._connect_timeout):
                await request.done.wait()
        except ConnectionClosed:
            return False  # the reader records how
        finally:
            self._retire(request)
        if not request.done.is_set():
            conn.finish(None, f"no answer to auth within {self._connect_timeout} s")
            return False
        if request.error is not None:
            conn.finish(4003, str(request.error), error=cast("ConnectionEnded", request.error))
            return False
        conn.authed = self._authed = request.outcome()
        self._user = conn.authed.user
        self._name = conn.authed.name
        return True

    def _attach(self, conn: _Connection) -> None:
        """The connection is usable: queue the rejoins (first) and settle what
        the old connection left. Never awaits."""
        self._conn = conn
        joining = {r.room for r in self._requests.values() if r.kind == "join"}
        rejoins: dict[str, _Request[Any]] = {}
        for room, state in list(self._rooms.items()):
            if state.leaving:
                continue
            if room not in joining and state.ever_joined:
                request: _Request[Joined] = _Request("join", self._next_ref(), room=room)
                request.internal = True
                rejoins[request.ref] = request
        for request in list(self._requests.values()):
            if request.kind == "leave":
                # The new connection does not rejoin a room being left.
                room_state = self._rooms.get(cast("str", request.room))
                if room_state is not None and room_state.leaving:
                    del self._rooms[cast("str", request.room)]
                self._answer(request, None)
            elif request.kind == "auth" and conn.authed is not None:
                self._answer(request, conn.authed)  # the reconnect used the newest token
        self._requests = {**rejoins, **self._requests}
        self._kick()

    def _detach(self, conn: _Connection) -> None:
        """The connection is gone: settle what it had sent. Never awaits."""
        self._conn = None
        for request in list(self._requests.values()):
            if request.sent_on != conn.generation:
                continue
            if request.kind == "say" and request.bound_id is not None:
                self._answer(request, request.bound_id)  # stored; only the ack was lost
            elif request.kind == "whisper":
                self._refuse(
                    request,
                    DeliveryUnknown(
                        f"connection lost before the whisper to {request.to} was acked"
                    ),
                )
            # Everything else is sent again on the next connection.

    async def _reader(self, conn: _Connection) -> None:
        """Drain the socket at once, for ever (Rule 1)."""
        assert conn.ws is not None
        while True:
            try:
                text = await conn.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                if reason is None:
                    conn.finish(None, "connection closed", cancel=not self._closed)
                else:
                    words = reason.reason or reason.name
                    # During our own close the library's reader must live on
                    # to take the server's close frame: no cancel then.
                    conn.finish(reason.code, words, cancel=not self._closed)
                return
            if isinstance(text, str):
                self._dispatch(conn, text)

    async def _keepalive(self, conn: _Connection) -> None:
        """Ping every ``ping_interval`` s; no pong within ``ping_timeout`` ends the
        connection (trio-websocket's ``ping`` would wait for ever)."""
        assert conn.ws is not None
        if self._ping_interval is None:
            return
        while True:
            await trio.sleep(self._ping_interval)
            with trio.move_on_after(self._ping_timeout) as waiting:
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return  # the reader records how
            if waiting.cancelled_caught:
                conn.finish(_CLOSE_ABNORMAL, f"no pong within {self._ping_timeout} s")
                return

    async def _writer(self, conn: _Connection) -> None:
        """Send requests in order, each when it may go (Rule 3)."""
        assert conn.ws is not None
        while True:
            wake = self._wake = trio.Event()
            now = trio.current_time()
            request, wait = self._next_to_send(conn, now)
            if request is None:
                with trio.move_on_after(wait):
                    await wake.wait()
                continue
            text = self._frame(request, conn)
            request.sent_on = conn.generation
            request.tries += 1
            if request.kind in _PACED:
                self._bucket.take(now)
            try:
                await conn.ws.send_message(text)
            except ConnectionClosed:
                return  # the reader records how

    def _next_to_send(self, conn: _Connection, now: float) -> tuple[_Request[Any] | None, float]:
        """The first request that may go now, else how long until one may."""
        wait = math.inf
        paced_blocked = False  # paced frames keep their order among themselves
        for request in self._requests.values():
            # (The connection's own auth is marked sent on it by `_authenticate`.)
            if request.sent_on == conn.generation or request.done.is_set():
                continue
            paced = request.kind in _PACED
            if request.hold_until > now:
                wait = min(wait, request.hold_until - now)
                paced_blocked = paced_blocked or paced
                continue
            if not self._may_send(request, conn):
                continue
            if paced:
                if paced_blocked:
                    continue
                delay = self._bucket.delay(now)
                if delay > 0:
                    wait = min(wait, delay)
                    paced_blocked = True
                    continue
            return request, 0.0
        return None, wait

    def _may_send(self, request: _Request[Any], conn: _Connection) -> bool:
        if request.kind == "join":
            return True
        if request.kind == "auth":
            return conn.authed is not None
        if request.kind == "whisper":
            return conn.named or not self._rooms
        state = self._rooms.get(cast("str", request.room))
        # Not a room of ours: send it, and the server says what is wrong.
        return state is None or state.joined_on == conn.generation

    def _frame(self, request: _Request[Any], conn: _Connection) -> str:
        """The request's frame, made when it is sent (``since``, name and token
        are the latest then)."""
        frame: dict[str, object] = {"type": request.kind, "ref": request.ref}
        if request.kind == "join":
            room = cast("str", request.room)
            frame["room"] = room
            anonymous = conn.authed is None
            name = request.name or (self._name if anonymous else None) or self._wanted_name
            if name is not None:
                frame["name"] = name
            state = self._rooms.get(room)
            if state is not None and state.last_id is not None:
                frame["since"] = state.last_id
            if anonymous and self._resume_token is not None and not conn.named:
                # A takeover: ask for a new token, so the one used (which may
                # have leaked) stops working (docs/protocol.md §6).
                frame["token"] = self._resume_token
                frame["rotate"] = True
            request.with_token = "token" in frame
        elif request.kind == "say":
            frame.update(room=request.room, msg=request.msg)
        elif request.kind == "whisper":
            frame.update(to=request.to, msg=request.msg)
        elif request.kind == "leave":
            frame["room"] = request.room
        elif request.kind == "history":
            frame.update(room=request.room, limit=request.limit)
            if request.before is not None:
                frame["before"] = request.before
        else:  # auth
            frame["token"] = request.token
        return _encode(frame)

    # --- internals: incoming frames (never await: Rule 1) ---------------------------

    def _dispatch(self, conn: _Connection, text: str) -> None:
        try:
            frame = _decoder.decode(text)
        except msgspec.ValidationError as exc:
            self._undecodable(text, exc)
            return
        except msgspec.DecodeError:
            LOGGER.debug("skipped a server frame that is not JSON: %.80r", text)
            return
        if isinstance(frame, Message):
            self._on_message(conn, frame)
        elif isinstance(frame, Joined):
            self._on_joined(conn, frame)
        elif isinstance(frame, Ack):
            self._on_ack(frame)
        elif isinstance(frame, ServerError):
            self._on_error(conn, frame)
        elif isinstance(frame, HistoryPage | Left | Authed):
            request = self._requests.get(frame.ref) if frame.ref is not None else None
            if request is None or request.kind != _ANSWERS[type(frame)]:
                LOGGER.debug("skipped an answer to no pending request: %.80r", text)
                return
            if isinstance(frame, Left):
                state = self._rooms.get(frame.room)
                if state is not None and state.leaving:
                    del self._rooms[frame.room]
                self._answer(request, None)
            else:
                if isinstance(frame, Authed):
                    conn.authed = self._authed = frame  # a refresh: its exp applies now
                self._answer(request, frame)
        else:  # Presence, Typing, Whisper, Deleted
            if isinstance(frame, Deleted):
                self._on_deleted(frame)
            self._emit(frame)

    def _undecodable(self, text: str, exc: msgspec.ValidationError) -> None:
        """A frame of an unknown type (skipped) or a known one of the wrong shape
        (its request, if any, fails)."""
        try:
            raw = _any_decoder.decode(text)
        except msgspec.DecodeError:  # pragma: no cover - it decoded once already
            return
        ref = raw.get("ref") if isinstance(raw, dict) else None
        request = self._requests.get(ref) if isinstance(ref, str) else None
        if request is None or request.internal:
            LOGGER.debug("skipped a server frame the client does not know (%s): %.80r", exc, text)
            return
        self._refuse(
            request, ClientError("bad_answer", f"the server's answer did not decode: {exc}")
        )

    def _on_message(self, conn: _Connection, message: Message) -> None:
        state = self._rooms.get(message.room)
        if state is not None:
            state.last_id = message.id
            if not state.remember(message.id):
                return  # seen already (a replay)
        if message.name == self._name and self._user is None:
            # Anonymous: one connection per name, so our name is this connection.
            self._bind(message, conn.generation)
        self._emit(message)

    def _on_deleted(self, deleted: Deleted) -> None:
        """A deleted message's id is no ``since`` any more: the server forgot it and
        would answer the next rejoin ``recovered: false`` (docs/protocol.md §16).
        Step back to the newest message seen before it."""
        state = self._rooms.get(deleted.room)
        if state is None:
            return
        state.seen.pop(deleted.id, None)
        if state.last_id == deleted.id and state.seen:
            state.last_id = next(reversed(state.seen))

    def _bind(self, message: Message, generation: int | None = None) -> None:
        """Note ``message`` as the stored copy of our oldest pending say like it."""
        for request in self._requests.values():
            if (
                request.kind == "say"
                and request.tries
                and request.bound_id is None
                and request.room == message.room
                and request.msg == message.msg
                and (generation is None or request.sent_on == generation)
            ):
                request.bound_id = message.id
                return

    def _on_joined(self, conn: _Connection, joined: Joined) -> None:
        request = self._requests.get(joined.ref) if joined.ref is not None else None
        if request is None or request.kind != "join":
            LOGGER.debug("skipped a joined that answers no pending join (%s)", joined.room)
            return
        conn.named = True
        self._name = joined.name
        if joined.token is not None:
            self._resume_token = joined.token
        self._attempt = 0  # a working connection: the backoff starts afresh
        state = self._rooms.get(joined.room)
        if state is None:  # left while joining (the leave will follow)
            state = _Room(None)
        state.joined_on = conn.generation
        state.ever_joined = True
        if request.internal:
            self._emit(Rejoined(joined))
        for message in joined.history:
            if message.name == self._name:
                self._bind(message)
            if state.remember(message.id) and request.internal:
                self._emit(message)
        if joined.history:
            state.last_id = joined.history[-1].id
        elif not joined.recovered:
            state.last_id = None  # the old one means nothing to this server
        # A replay may have shown says that were stored but never acked.
        for pending in list(self._requests.values()):
            if (
                pending.kind == "say"
                and pending.bound_id is not None
                and pending.sent_on != conn.generation
            ):
                self._answer(pending, pending.bound_id)
        self._answer(request, joined)
        self._kick()

    def _on_ack(self, ack: Ack) -> None:
        request = self._requests.get(ack.ref)
        if request is None or request.kind not in ("say", "whisper"):
            LOGGER.debug("skipped an ack of no pending request (%s)", ack.ref)
            return
        self._answer(request, ack.id)

    def _on_error(self, conn: _Connection, error: ServerError) -> None:
        request = self._requests.get(error.ref) if error.ref is not None else None
        if request is None:
            self._emit(error)
            return
        if request.kind == "auth":
            self._refuse(request, AuthenticationFailed(4003, f"{error.code}: {error.message}"))
            return
        retryable = _RETRYABLE.get(request.kind, frozenset())
        if request.kind == "join" and request.with_token:
            # The resume token may be dead (rotated by a takeover whose answer
            # was lost): then our own lost connection holds the name until its
            # grace period ends, and it is free again after that.
            retryable = retryable | {"name_taken"}
        if error.code in retryable and request.tries <= self._retries:
            request.sent_on = 0
            request.hold_until = trio.current_time() + self._retry_delay
            self._kick()
            return
        self._refuse(request, ClientError(error.code, error.message, error.ref))
        room = request.room
        if request.kind == "leave" and room is not None:
            state = self._rooms.get(room)
            if state is not None and state.leaving:
                del self._rooms[room]  # not in it, by the server's word
        if request.kind == "join" and room is not None:
            state = self._rooms.get(room)
            if state is not None and (request.internal or not state.ever_joined):
                del self._rooms[room]
            if request.internal:
                self._emit(RejoinFailed(room, error.code, error.message))
        self._kick()


def _encode(frame: dict[str, object]) -> str:
    return _encoder.encode(frame).decode()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: TokenSource | None = None,
    resume_token: str | None = None,
    reconnect: bool = True,
    backoff: Backoff | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 20.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 5.0,
    send_rate: float | None = 8.0,
    send_burst: int = 10,
    retries: int = 5,
    retry_delay: float = 1.5,
    event_buffer: int = 1000,
    max_pending: int = 1000,
    ssl_context: ssl.SSLContext | None = None,
    open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
) -> AsyncIterator[ChatClient]:
    """Open a `ChatClient` to ``url`` (``ws://host:port/ws`` or ``wss://…``).

    Args:
        url: the server's WebSocket URL; an empty path means ``/ws``.
        token: a JWT (docs/protocol.md §15), or an async function returning one, asked
            before every connection (so a reconnect gets a fresh token, and a
            4003 "expired" reconnects instead of ending).
        resume_token: a resume token from an earlier run (`ChatClient.resume_token`):
            the first join takes the name back from that run's connection.
        reconnect: reconnect after a lost connection (with ``backoff``).
        backoff: the waits between attempts (`Backoff`).
        ping_interval: seconds between pings (None: no pings).
        ping_timeout: a pong not back within this many seconds ends the connection.
        connect_timeout: seconds for TCP, the handshake, and the ``authed`` answer.
        close_timeout: seconds the closing handshake may take at the end.
        send_rate: says and whispers per second the client sends at most (None:
            no pacing); ``send_burst`` more at once. Below the server's default
            (10/s, burst 20) so a busy bot is slowed down, not refused.
        retries: times a say, join or history refused with ``rate_limited`` (say and
            join: or ``unavailable``) is sent again, ``retry_delay`` s apart.
        event_buffer: events kept for `ChatClient.receive`; when full the oldest
            are dropped (`EventsDropped` marks the place).
        max_pending: requests that may await answers at once; more wait for room.
        ssl_context: for ``wss://`` (default: the system's trust store).
        open_stream: connect through this instead of TCP (a Unix socket, a
            tunnel, an in-memory server in tests); the URL still gives the
            ``Host`` header and the path.

    Raises:
        ConnectFailed: the first connection failed (no retry for that one).
        AuthenticationFailed: the token was refused.

    Resource handling: the block owns the client's tasks; leaving it closes
    the connection (1000, bounded by ``close_timeout``). The block is not
    cancelled when the client ends for good: calls raise `ConnectionEnded`.
    """
    client = ChatClient(
        url,
        token=token,
        resume_token=resume_token,
        reconnect=reconnect,
        backoff=backoff,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        send_rate=send_rate,
        send_burst=send_burst,
        retries=retries,
        retry_delay=retry_delay,
        event_buffer=event_buffer,
        max_pending=max_pending,
        ssl_context=ssl_context,
        open_stream=open_stream,
    )
    # Errors are caught inside the nursery and raised after it, so the caller
    # gets them as they are, never wrapped in an ExceptionGroup (STYLE.md §4).
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._run)
        except ConnectionEnded as exc:
            failure = exc
        if failure is None:
            try:
                yield client
            except BaseException as exc:
                failure = exc
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
