"""Chat state, sans-I/O: rooms, members, per-user presence, tokens, history.

Rules of this module:

1. No trio, no awaits. Every method runs to completion, so a cancellation can
   never leave a room half-updated. Time is passed in (``now``, seconds on the
   caller's clock; ``wall_ms`` for message timestamps).
2. Frames leave through ``Peer.deliver``, which never blocks (a full outbox is
   the peer's problem: it closes itself with 1013).
3. A `say` is not broadcast here: it becomes a `PendingSay` in
   ``self.to_store``; the hub has the backplane give it an id and store it,
   then calls `stored` (or `store_failed`). Messages are broadcast when they
   come back from the backplane (`apply`), in the one order every node sees,
   and the sender's ack follows its message; nothing is seen or acked before
   it is stored.
4. Checks run in PROTOCOL.md §2's order: name, room, rate, state.
5. Other nodes (a cluster) are known only through `apply`'d events: their
   members per room and their connected users. What this node changes goes
   out through ``self.to_publish`` (and ``self.to_release``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import secrets
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from .events import (
    Claim,
    Draft,
    Entry,
    Event,
    Handover,
    Kick,
    MemberState,
    NodeGone,
    NodeState,
    Received,
    Reload,
    Resync,
    TypingEvent,
    WhisperEvent,
    WhisperResult,
)
from .frames import OutFrame
from .protocol import (
    AckFrame,
    ClassicFrame,
    ClientFrame,
    ErrorCode,
    ErrorFrame,
    HistoryFrame,
    HistoryRequest,
    Join,
    JoinedFrame,
    Leave,
    LeftFrame,
    Message,
    PresenceFrame,
    Say,
    Typing,
    TypingFrame,
    Whisper,
    WhisperFrame,
    confusable_key,
    is_valid_room,
    name_key,
    normalize_name,
    seq_of,
)
from .protocol import CloseCode as CloseCode
from .ratelimit import WHISPERS_IN_BURST, WHISPERS_IN_RATE, RateLimiter

__all__ = ["ChatState", "Client", "Peer", "PendingSay"]

MAX_REFS_PER_USER: Final = 256  # recent say refs remembered per user, for retries
JOIN_HISTORY: Final = 100  # newest messages in a `joined` without `since`
MAX_RECOVERY: Final = 200  # most missed messages a `since` replays exactly
CLASSIC_ROOM: Final = "lobby"
#: Seconds a `leave` waits before the others are told (docs/protocol.md §6):
#: a join of the same room within it shows them nothing, so leave/join churn
#: cannot flood a room with presence frames.
LEAVE_SETTLE: Final = 2.0


class Peer(Protocol):
    """What the chat state (and the hub) needs of a connection. No method blocks."""

    def deliver(self, frame: OutFrame) -> None: ...

    def close_soon(self, code: int, reason: str) -> None: ...

    def hold(self) -> None:
        """Keep delivered frames queued, unwritten, until `release` (used by the hub)."""
        ...

    def release(self) -> None: ...


class Client:
    """The chat-side state of one connection."""

    __slots__ = ("classic", "gone", "limiter", "listener", "mode", "name", "peer", "rooms", "user")

    def __init__(self, peer: Peer, limiter: RateLimiter, *, listener: bool) -> None:
        self.peer = peer
        self.limiter = limiter
        #: Connected on ``/``: hears lobby messages until its first frame decides.
        self.listener = listener
        #: None until the first frame; then "classic" or "typed".
        self.mode: str | None = None
        #: Shorthand for ``mode == "classic"``: gets only message/whisper/error.
        self.classic = False
        self.name: str | None = None
        self.user: User | None = None
        #: Rooms this connection has joined (live memberships).
        self.rooms: set[str] = set()
        #: Disconnected or replaced: its late frames are ignored.
        self.gone = False

    def holds(self, name: str) -> bool:
        """Whether this connection speaks as ``name`` (compared by `name_key`)."""
        return self.user is not None and self.user.key == name_key(name)


class User:
    """A name held by somebody: connected, or within the presence grace period."""

    __slots__ = (
        "client",
        "deadline",
        "key",
        "name",
        "refs",
        "rooms",
        "skeleton",
        "token",
        "whispers_in",
    )

    def __init__(self, name: str, client: Client, token: str | None = None) -> None:
        #: The name as bound (trimmed, as typed): shown in frames, room members
        #: and cluster entries.
        self.name = name
        #: Its identity (`name_key`) and TR39 skeleton (`confusable_key`): no
        #: other user holds either (docs/protocol.md section 2.1).
        self.key = name_key(name)
        self.skeleton = confusable_key(name)
        self.token = token or secrets.token_urlsafe(24)
        self.client: Client | None = client
        #: The bound on whispers this user receives (made on the first one).
        self.whispers_in: RateLimiter | None = None
        #: Rooms the user is a member of (live through ``client``, or held).
        self.rooms: set[str] = set()
        #: When held rooms are released; None while nothing is held.
        self.deadline: float | None = None
        #: The user's recent says by `ref`, oldest first, so a retry is never
        #: stored twice (a plain dict: an empty one costs less than an OrderedDict).
        self.refs: dict[str, PendingSay] = {}


class Room:
    """One room: its members, its subscribers and its kept history."""

    __slots__ = ("listeners", "members", "messages", "name", "remote", "seqs", "typed")

    def __init__(self, name: str) -> None:
        self.name = name
        #: Every member user (live or held), by name.
        self.members: dict[str, User] = {}
        #: Members on other nodes: name -> the nodes that hold it (usually one).
        self.remote: dict[str, set[str]] = {}
        #: Live typed member connections: get every frame of the room.
        self.typed: dict[Client, None] = {}
        #: Classic members and `/` listeners: get `message` frames only.
        self.listeners: dict[Client, None] = {}
        self.messages: list[Message] = []
        self.seqs: list[int] = []  # parallel to messages, for bisect


class _RemoteWhisper:
    """A whisper sent to the node of its user, waiting for that node's answer."""

    __slots__ = ("client", "frame", "id", "ref", "to")

    def __init__(
        self, client: Client, whisper_id: str, frame: OutFrame, ref: str | None, to: str
    ) -> None:
        self.client = client
        self.id = whisper_id
        self.frame = frame  # the sender's copy, delivered once the whisper was
        self.ref = ref
        self.to = to


class PendingSay:
    """A `say` on its way to the store; ``client`` gets the ack or the error."""

    __slots__ = ("client", "committed", "draft", "id", "ref", "taken", "user", "waiting")

    def __init__(self, client: Client, draft: Draft, user: User | None = None) -> None:
        #: None once answered: a user's remembered refs must not keep a
        #: closed connection (and all it holds) alive.
        self.client: Client | None = client
        self.draft = draft
        self.ref = draft.ref
        self.user = user
        #: The id the sequencer gave it (set by `ChatState.stored`).
        self.id = ""
        #: Acked: stored, and broadcast on this node.
        self.committed = False
        #: Connections that retried this say (same ref) while it was being stored.
        self.waiting: list[Client] = []
        #: When the hub took it (its clock; set by the hub, for the say-to-ack metric).
        self.taken = 0.0


def _error(client: Client, code: str, message: str, ref: str | None = None) -> None:
    if client.classic:
        frame = ErrorFrame(code=code, message=message, ref=ref, name="server", msg=message)
    else:
        frame = ErrorFrame(code=code, message=message, ref=ref)
    client.peer.deliver(OutFrame.of(frame))


def _may_whisper_to(user: User, now: float) -> bool:
    """Take one token of the bound on whispers ``user`` receives (docs/protocol.md §9)."""
    bucket = user.whispers_in
    if bucket is None:
        bucket = user.whispers_in = RateLimiter(WHISPERS_IN_RATE, WHISPERS_IN_BURST, now)
    return bucket.allow(now)


def _answer_to(pending: PendingSay) -> list[Client]:
    """The live connections waiting for ``pending``'s answer; forgets them all."""
    clients = [c for c in (pending.client, *pending.waiting) if c is not None and not c.gone]
    pending.client = None
    pending.waiting = []
    return clients


class _Refused(Exception):
    """Internal: a check failed; carries the error frame's fields."""

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        self.code = code
        self.message = message
        #: Close the connection after the error frame (abuse).
        self.close_code = close_code


class ChatState:
    """Every room and user of one server.

    Args:
        epoch: the stored history's epoch (ids are ``<epoch>-<seq>``).
        next_seq: one more than the newest stored message's seq: messages up
            to it are known (a message that comes again is ignored).
        history: messages already stored, per room, oldest first.
        node: this node's id in a cluster (labels what it publishes).
    """

    def __init__(
        self,
        *,
        epoch: str,
        next_seq: int,
        history_size: int,
        max_rooms: int,
        presence_grace: float,
        history: dict[str, list[Message]] | None = None,
        node: str = "",
        remote_timeout: float = 5.0,
    ) -> None:
        self.node = node
        self._remote_timeout = remote_timeout
        self._epoch = epoch
        self._last_seq = next_seq - 1
        # Whispers are not stored: a per-process prefix keeps their ids unique
        # across restarts that keep the (stored) epoch.
        self._whisper_prefix = f"{epoch}-w{secrets.token_hex(3)}."
        self._whisper_ids = itertools.count(1)
        #: Whispers sent to another node, waiting for its `WhisperResult`.
        self._whispers_out: dict[int, _RemoteWhisper] = {}
        self._whisper_deadlines: list[tuple[float, int]] = []
        self._whisper_requests = itertools.count(1)
        #: Frames dropped by the rate limit (a metric).
        self.rate_limited = 0
        self._history_size = history_size
        self._max_rooms = max_rooms
        self._grace = presence_grace
        self.rooms: dict[str, Room] = {}
        #: Every user this node holds, by `name_key` (docs/protocol.md §2.1).
        self.users: dict[str, User] = {}
        #: The same users by `confusable_key`: a look-alike is `name_taken` too.
        self._skeletons: dict[str, User] = {}
        self.clients: dict[Client, None] = {}
        self._deadlines: list[tuple[float, int, User]] = []
        self._tiebreak = itertools.count()
        #: Says the hub must store, then call `stored` or `store_failed`.
        self.to_store: list[PendingSay] = []
        #: Stored says whose message has not come back yet, by id.
        self._awaiting: dict[str, list[PendingSay]] = {}
        #: Says acked since the hub last took this list (it times them: metrics).
        self.acked: list[PendingSay] = []
        #: Events for the other nodes, in order; the hub publishes them.
        self.to_publish: list[Event] = []
        #: Names this node no longer holds; the hub releases them.
        self.to_release: list[str] = []
        #: Other nodes' entries: (room, name) memberships and ("", name) users.
        self._remote: dict[str, set[Entry]] = {}
        #: Users connected on other nodes: name key -> nodes, and the name as bound.
        self._remote_online: dict[str, set[str]] = {}
        self._remote_names: dict[str, str] = {}
        #: Whether events reach the other nodes now (set by the hub each step):
        #: a whisper for another node is refused, not acked, while they do not.
        self.backplane_up = True
        self._load_history(history or {})

    def _load_history(self, history: dict[str, list[Message]]) -> None:
        for room_name, messages in history.items():
            room = self._room(room_name)
            kept = messages[-self._history_size :]
            room.messages = list(kept)
            room.seqs = [self._seq_of(m.id) or 0 for m in kept]
            self._last_seq = max(self._last_seq, room.seqs[-1] if room.seqs else 0)

    # --- ids -----------------------------------------------------------------

    def _seq_of(self, message_id: str) -> int | None:
        return seq_of(self._epoch, message_id)

    def _index_of(self, room: Room, message_id: str) -> int | None:
        """Where ``message_id`` stands in the room's kept history, if it does."""
        seq = self._seq_of(message_id)
        if seq is None:
            return None
        index = bisect.bisect_left(room.seqs, seq)
        if index < len(room.seqs) and room.messages[index].id == message_id:
            return index
        return None

    # --- connections -----------------------------------------------------------

    def connect(self, client: Client) -> None:
        """Register a new connection (a `/` listener starts hearing lobby)."""
        self.clients[client] = None
        if client.listener:
            self._room(CLASSIC_ROOM).listeners[client] = None

    def disconnect(self, client: Client, now: float) -> None:
        """The connection is gone: hold its user's rooms for the grace period.

        Never awaits; safe to call from a ``finally``. The caller runs `expire`
        once `next_deadline` has passed (also with a zero grace period).
        """
        self.clients.pop(client, None)
        if client.gone:
            return
        self._drop_subscriptions(client)
        user = client.user
        if user is None or user.client is not client:
            return
        user.client = None
        self._changed(remove=("", user.name))
        self._hold(user, now)

    def _drop_subscriptions(self, client: Client) -> None:
        client.gone = True
        for room_name in client.rooms:
            self._unsubscribe(self.rooms[room_name], client)
        client.rooms = set()
        self._unlisten(client)

    def _hold(self, user: User, now: float, delay: float | None = None) -> None:
        """Keep the memberships ``user``'s connection no longer has until ``delay``
        (default: the presence grace) has passed; `expire` then ends them."""
        if delay is None:
            deadline = now + self._grace
        else:
            # A shorter wait (a leave) never cuts short a grace already running.
            deadline = max(now + delay, user.deadline or 0.0)
            if deadline == user.deadline:
                return
        user.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), user))

    def next_deadline(self) -> float:
        """When `expire` must next run (``inf`` when nothing is held or awaited)."""
        held = self._deadlines[0][0] if self._deadlines else float("inf")
        awaited = self._whisper_deadlines[0][0] if self._whisper_deadlines else float("inf")
        return min(held, awaited)

    def expire(self, now: float) -> None:
        """Release every membership whose grace period has ended; answer every
        whisper whose node did not answer in time."""
        waiting = self._whisper_deadlines
        while waiting and waiting[0][0] <= now:
            _, request = heapq.heappop(waiting)
            whisper = self._whispers_out.pop(request, None)
            if whisper is not None and not whisper.client.gone:
                _error(
                    whisper.client,
                    ErrorCode.UNAVAILABLE,
                    f"no answer from the node of {whisper.to}: it may not have been delivered",
                    whisper.ref,
                )
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, _, user = heapq.heappop(deadlines)
            if user.deadline != deadline:
                continue  # superseded by a later disconnect
            user.deadline = None
            live = user.client.rooms if user.client is not None else set()
            for room_name in sorted(user.rooms - live):
                self._remove_member(user, self.rooms[room_name])
            if user.client is None and self.users.get(user.key) is user:
                self._forget_user(user)
                self.to_release.append(user.name)

    # --- frames --------------------------------------------------------------

    def handle(
        self,
        client: Client,
        frame: ClientFrame,
        now: float,
        wall_ms: int,
        claim: Claim | None = None,
    ) -> None:
        """Apply one decoded client frame; answers go to the peers.

        ``claim``: the cluster's answer for the name this frame binds (see
        `needs_claim`); None on a single node, where local users decide.
        """
        if client.gone:
            return
        if client.mode is None:
            self._decide_mode(client, frame)
        try:
            if isinstance(frame, Say):
                self._say(client, frame, now, wall_ms)
            elif isinstance(frame, Join):
                self._join(client, frame, now, claim)
            elif isinstance(frame, Typing):
                self._typing(client, frame, now)
            elif isinstance(frame, Leave):
                self._leave(client, frame, now)
            elif isinstance(frame, Whisper):
                self._whisper(client, frame, now, wall_ms)
            elif isinstance(frame, HistoryRequest):
                self._history(client, frame, now)
            else:
                self._classic(client, frame, now, wall_ms, claim)
        except _Refused as refused:
            self._refused(client, refused.code, refused.message, frame.ref, now)

    def needs_claim(self, client: Client, frame: ClientFrame) -> str | None:
        """The name ``frame`` would take that only the cluster can grant, if any.

        A first join (or classic frame) for a name no local user holds: the
        hub asks the backplane (`Backplane.claim`) and passes the answer to
        `handle`. Frames that will be refused anyway (bad name or room) need
        no claim.
        """
        if client.gone or client.user is not None:
            return None
        if isinstance(frame, Join):
            if frame.name is None or not is_valid_room(frame.room):
                return None
            requested = frame.name
        elif isinstance(frame, ClassicFrame):
            requested = frame.name
        else:
            return None
        name = normalize_name(requested)
        if name is None:
            return None
        user = self.users.get(name_key(name))
        if user is not None:
            # A takeover of a user here that rotates its token: the cluster
            # records the new one (§6). Without `rotate` this node decides.
            if not (isinstance(frame, Join) and frame.rotate and frame.token is not None):
                return None
            if not secrets.compare_digest(frame.token, user.token):
                return None  # taken: refused without asking
            return name
        if confusable_key(name) in self._skeletons:
            return None  # a look-alike of a user here: refused without asking
        return name

    def refuse(
        self,
        client: Client,
        code: str,
        message: str,
        ref: str | None,
        *,
        classic: bool = False,
        now: float | None = None,
    ) -> None:
        """Answer a frame that failed decoding (as a first frame it decides the mode).

        ``classic``: the frame had the classic shape, so a `/` listener stays
        a classic connection (and its error carries ``name`` and ``msg``).
        """
        if client.gone:
            return
        if client.mode is None:
            self._decide_mode(client, ClassicFrame("", "") if classic else None)
        self._refused(client, code, message, ref, now)

    def _refused(
        self, client: Client, code: str, message: str, ref: str | None, now: float | None
    ) -> None:
        """Answer a refused frame; the 100th refusal within 60 s closes with 1008
        (docs/protocol.md section 9): a client that only sends what is refused
        (bad JSON, rate-limited says, ...) is not answered forever."""
        _error(client, code, message, ref)
        if now is not None and client.limiter.record_drop(now):
            client.peer.close_soon(CloseCode.POLICY_VIOLATION, "too many refused frames")

    def _decide_mode(self, client: Client, frame: ClientFrame | None) -> None:
        # A classic `/` listener stays in lobby's listeners: it becomes a
        # classic member there. A typed one stops listening.
        if isinstance(frame, ClassicFrame):
            client.mode = "classic"
            client.classic = True
        else:
            client.mode = "typed"
            if client.listener:
                self._unlisten(client)
        client.listener = False

    def _unlisten(self, client: Client) -> None:
        room = self.rooms.get(CLASSIC_ROOM)
        if room is not None and room.listeners.pop(client, 0) is None:
            self._forget_if_empty(room)

    # --- checks (PROTOCOL.md §2 order: name, room, rate, state) ---------------

    def _check_name(self, client: Client, requested: str | None) -> str:
        if requested is None:
            if client.name is None:
                raise _Refused(ErrorCode.BAD_NAME, "a first join needs a `name`")
            return client.name
        name = normalize_name(requested)
        if name is None:
            raise _Refused(
                ErrorCode.BAD_NAME,
                "a name is 1-32 visible characters, with no control, format or invisible"
                " characters, and not a reserved name",
            )
        # "The same name" is the same name key (§2.1): a takeover binds the name
        # as first bound, which may differ from the one typed in case or form.
        if client.name is not None and name_key(name) != name_key(client.name):
            raise _Refused(ErrorCode.BAD_NAME, f"this connection is already named {client.name}")
        return name

    def _check_room(self, client: Client, room: str, *, joining: bool = False) -> None:
        if not is_valid_room(room):
            raise _Refused(ErrorCode.BAD_ROOM, "a room name matches [a-z0-9][a-z0-9_-]{0,63}")
        if joining and room not in client.rooms and len(client.rooms) >= self._max_rooms:
            raise _Refused(ErrorCode.BAD_ROOM, f"at most {self._max_rooms} rooms per connection")

    def _check_rate(self, client: Client, now: float) -> None:
        if client.limiter.allow(now):
            return
        self.rate_limited += 1
        raise _Refused(ErrorCode.RATE_LIMITED, "slow down: too many messages")

    def _check_reply_budget(self, client: Client, now: float) -> None:
        """Replies that copy history (`history`, a join's replay) draw their size on
        a bucket of their own (docs/protocol.md §9); one in debt refuses the next."""
        if client.classic or client.limiter.allow_reply(now):
            return
        self.rate_limited += 1
        raise _Refused(ErrorCode.RATE_LIMITED, "slow down: too much history asked for")

    def _check_membership_rate(self, client: Client, now: float) -> None:
        """Joins and leaves that change a membership draw on a bucket of their own."""
        if client.limiter.allow_membership(now):
            return
        self.rate_limited += 1
        raise _Refused(ErrorCode.RATE_LIMITED, "slow down: too many joins and leaves")

    def _check_joined(self, client: Client, room: str) -> Room:
        if room not in client.rooms:
            raise _Refused(ErrorCode.NOT_JOINED, f"join {room} first")
        return self.rooms[room]

    # --- frame handlers ------------------------------------------------------

    def _join(self, client: Client, frame: Join, now: float, claim: Claim | None) -> None:
        name = self._check_name(client, frame.name)
        self._check_room(client, frame.room, joining=True)
        self._check_reply_budget(client, now)  # (takes nothing: before the bucket that does)
        if frame.room not in client.rooms:
            self._check_membership_rate(client, now)
        user = self._bind(client, name, frame.token, now, claim, rotate=frame.rotate)
        room = self._room(frame.room)
        if frame.room not in client.rooms:
            client.rooms.add(frame.room)
            self._subscribe(room, client)
            if user.name not in room.members:
                self._add_member(user, room, skip=client)
        if client.classic:
            return
        history, recovered = self._replay(room, frame.since)
        joined = JoinedFrame(
            room=room.name,
            name=user.name,
            token=user.token,
            members=sorted(room.members.keys() | room.remote.keys()),
            history=history,
            recovered=recovered,
            ref=frame.ref,
        )
        out = OutFrame.of(joined)
        client.limiter.charge_reply(len(out.ws))
        client.peer.deliver(out)

    def _bind(
        self,
        client: Client,
        name: str,
        token: str | None,
        now: float,
        claim: Claim | None,
        *,
        rotate: bool = False,
    ) -> User:
        """The user ``client`` speaks as, taking the name over with its token."""
        if client.user is not None:
            return client.user
        # Names are held by key (docs/protocol.md §2.1): "ALICE" and "\u0430lice"
        # (Cyrillic a) are "alice"; a look-alike of another user's name is taken too.
        user = self.users.get(name_key(name))
        if user is None:
            if claim is not None and claim.status == "taken":
                raise _Refused(ErrorCode.NAME_TAKEN, f"{name} is taken")
            if claim is not None and claim.status == "takeover" and claim.name:
                name = claim.name  # taken over from another node: the name as first bound
            if confusable_key(name) in self._skeletons:
                raise _Refused(ErrorCode.NAME_TAKEN, f"{name} is taken (too like another name)")
            user = User(name, client, claim.token if claim else None)
            self.users[user.key] = user
            self._skeletons[user.skeleton] = user
            self._changed(add=("", name))
            if claim is not None and claim.previous and claim.previous != self.node:
                # The name was held on another node: it closes that connection
                # and hands the user's rooms over (`apply` of Kick/Handover).
                self.to_publish.append(Kick(claim.previous, name, self.node))
        elif (
            token is None
            or not secrets.compare_digest(token, user.token)
            or (claim is not None and claim.status == "taken")
        ):
            raise _Refused(ErrorCode.NAME_TAKEN, f"{name} is taken")
        else:
            self._take_over(user, client, now)  # keeps the name as first bound
            if rotate:
                # A new token (docs/protocol.md §6): the one used stops working, so
                # a leaked copy of it takes the name over no more.
                user.token = claim.token if claim is not None else secrets.token_urlsafe(24)
        client.name = user.name
        client.user = user
        return user

    def _forget_user(self, user: User) -> None:
        """``user`` no longer holds its name here (never awaits)."""
        del self.users[user.key]
        if self._skeletons.get(user.skeleton) is user:
            del self._skeletons[user.skeleton]

    def _take_over(self, user: User, client: Client, now: float) -> None:
        old = user.client
        user.client = client
        if old is None:
            self._changed(add=("", user.name))
            return
        # The old connection's memberships are held for the grace period, as on
        # a disconnect; the new connection takes them back by joining again.
        old.peer.close_soon(CloseCode.REPLACED, "replaced by a newer connection")
        self._drop_subscriptions(old)
        old.user = None
        if user.rooms:
            self._hold(user, now)

    def _say(self, client: Client, frame: Say, now: float, wall_ms: int) -> None:
        self._check_room(client, frame.room)
        self._check_rate(client, now)
        room = self._check_joined(client, frame.room)
        self._submit(client, room.name, frame.msg, frame.ref, wall_ms)

    def _submit(self, client: Client, room: str, text: str, ref: str | None, wall_ms: int) -> None:
        """Queue a say for the store, unless it retries one already taken.

        A client that lost its connection cannot know whether an unacked say
        got through; it sends it again with the same ``ref`` after taking its
        name back. Same user, ref, room and text: the first one is acked
        (now, or when it is stored) and nothing is stored twice.
        """
        user = client.user
        assert user is not None  # joined implies named
        assert client.name is not None
        if ref is not None:
            earlier = user.refs.get(ref)
            if earlier is not None and (earlier.draft.room, earlier.draft.msg) == (room, text):
                if not earlier.committed:
                    earlier.waiting.append(client)
                elif not client.classic:
                    client.peer.deliver(OutFrame.of(AckFrame(ref, earlier.id)))
                return
        pending = PendingSay(client, Draft(room, client.name, text, wall_ms, ref), user)
        if ref is not None:
            refs = user.refs
            refs.pop(ref, None)  # re-inserted: now the newest
            refs[ref] = pending
            if len(refs) > MAX_REFS_PER_USER:
                del refs[next(iter(refs))]
        self.to_store.append(pending)

    def _typing(self, client: Client, frame: Typing, now: float) -> None:
        self._check_room(client, frame.room)
        self._check_rate(client, now)
        room = self._check_joined(client, frame.room)
        assert client.name is not None
        self._to_typed(room, TypingFrame(room.name, client.name), skip=client)
        if self._remote:
            self.to_publish.append(TypingEvent(self.node, room.name, client.name))

    def _leave(self, client: Client, frame: Leave, now: float) -> None:
        self._check_room(client, frame.room)
        room = self._check_joined(client, frame.room)
        self._check_membership_rate(client, now)
        client.rooms.discard(room.name)
        self._unsubscribe(room, client)
        if client.user is not None:
            # Still a member for the others until it settles (a join again
            # within it shows them nothing); `expire` removes it then.
            self._hold(client.user, now, min(LEAVE_SETTLE, self._grace))
        if not client.classic:
            client.peer.deliver(OutFrame.of(LeftFrame(room.name, frame.ref)))

    def _whisper(self, client: Client, frame: Whisper, now: float, wall_ms: int) -> None:
        self._check_rate(client, now)
        if client.name is None:
            raise _Refused(ErrorCode.NOT_JOINED, "join a room first: whispers need a name")
        # `to` names a user by key (docs/protocol.md §3): "Alice" reaches "alice".
        typed = normalize_name(frame.to)
        key = name_key(typed) if typed is not None else None
        target = self.users.get(key) if key is not None else None
        target_client = target.client if target is not None else None
        nodes = self._remote_online.get(key, ()) if key is not None else ()
        if key is None or (target_client is None and not nodes):
            raise _Refused(ErrorCode.NO_SUCH_USER, f"nobody is called {frame.to}")
        if target_client is not None:
            assert target is not None
            to = target.name
        else:
            to = self._remote_names.get(key, typed or "")
        if target is not None and target_client is not None and not _may_whisper_to(target, now):
            raise _Refused(ErrorCode.RATE_LIMITED, f"{to} gets too many whispers: try again")
        whisper_id = f"{self._whisper_prefix}{next(self._whisper_ids)}"
        out = OutFrame.of(
            WhisperFrame(whisper_id, client.name, to, client.name, frame.msg, wall_ms)
        )
        if target_client is None:
            if not self.backplane_up:
                raise _Refused(
                    ErrorCode.UNAVAILABLE, f"{to} is on another node, out of reach: try again"
                )
            # The user's node delivers it, if the user is still connected there
            # (it may be in its grace period), and answers: the sender's copy
            # and ack wait for that answer (`_whisper_result`).
            node = min(nodes)  # one node holds a connected user; min() is deterministic
            request = next(self._whisper_requests)
            deadline = now + self._remote_timeout
            self._whispers_out[request] = _RemoteWhisper(client, whisper_id, out, frame.ref, to)
            heapq.heappush(self._whisper_deadlines, (deadline, request))
            self.to_publish.append(WhisperEvent(node, to, out.json.decode(), self.node, request))
            return
        target_client.peer.deliver(out)
        if target_client is not client:
            client.peer.deliver(out)
        if frame.ref is not None and not client.classic:
            client.peer.deliver(OutFrame.of(AckFrame(frame.ref, whisper_id)))

    def _whisper_result(self, result: WhisperResult) -> None:
        """The answer to a whisper this node sent to another: copy and ack, or no_such_user."""
        whisper = self._whispers_out.pop(result.request, None)
        if whisper is None or whisper.client.gone:
            return  # answered already (timed out), or nobody to tell
        client = whisper.client
        if not result.delivered:
            if result.refused == ErrorCode.RATE_LIMITED:
                message = f"{whisper.to} gets too many whispers: try again"
                _error(client, ErrorCode.RATE_LIMITED, message, whisper.ref)
            else:
                _error(
                    client, ErrorCode.NO_SUCH_USER, f"nobody is called {whisper.to}", whisper.ref
                )
            return
        client.peer.deliver(whisper.frame)
        if whisper.ref is not None and not client.classic:
            client.peer.deliver(OutFrame.of(AckFrame(whisper.ref, whisper.id)))

    def _history(self, client: Client, frame: HistoryRequest, now: float) -> None:
        self._check_room(client, frame.room)
        self._check_reply_budget(client, now)
        room = self._check_joined(client, frame.room)
        end = len(room.messages)
        if frame.before is not None:
            index = self._index_of(room, frame.before)
            if index is None:
                raise _Refused(ErrorCode.BAD_FRAME, "unknown `before` id")
            end = index
        start = max(0, end - frame.limit)
        reply = HistoryFrame(room.name, room.messages[start:end], start > 0, frame.ref)
        if not client.classic:
            out = OutFrame.of(reply)
            client.limiter.charge_reply(len(out.ws))
            client.peer.deliver(out)

    def _classic(
        self, client: Client, frame: ClassicFrame, now: float, wall_ms: int, claim: Claim | None
    ) -> None:
        """``{name, msg}``: join lobby as ``name`` if not yet joined, then say."""
        name = self._check_name(client, frame.name)
        self._check_rate(client, now)
        if CLASSIC_ROOM not in client.rooms:
            self._join(client, Join(room=CLASSIC_ROOM, name=name, ref=frame.ref), now, claim)
        self._submit(client, CLASSIC_ROOM, frame.msg, frame.ref, wall_ms)

    # --- storage results -------------------------------------------------------

    def stored(self, batch: Sequence[PendingSay], ids: Sequence[str]) -> None:
        """The backplane stored ``batch`` as ``ids``: ack each when its message is here."""
        for pending, message_id in zip(batch, ids, strict=True):
            pending.id = message_id
            seq = self._seq_of(message_id)
            if seq is not None and seq <= self._last_seq:
                self._answer(pending)  # a retry of a say delivered long ago
            else:
                self._awaiting.setdefault(message_id, []).append(pending)

    def store_failed(self, batch: Iterable[PendingSay], reason: str) -> None:
        """Nothing in the batch was stored: tell each sender, ack nothing."""
        for pending in batch:
            user, ref = pending.user, pending.ref
            pending.user = None
            if user is not None and ref is not None and user.refs.get(ref) is pending:
                del user.refs[ref]  # a retry must be stored for real
            for client in _answer_to(pending):
                _error(client, ErrorCode.UNAVAILABLE, reason, ref)

    def _answer(self, pending: PendingSay) -> None:
        pending.committed = True
        pending.user = None  # (user.refs -> pending -> user would be a cycle)
        if pending.ref is not None:
            ack = OutFrame.of(AckFrame(pending.ref, pending.id))
            for client in _answer_to(pending):
                if not client.classic:
                    client.peer.deliver(ack)
            self.acked.append(pending)

    # --- what the backplane brings -------------------------------------------------

    def apply(self, received: Received, now: float) -> None:
        """Apply one thing from the backplane (a message, or another node's event)."""
        if isinstance(received, Message):
            self._message(received)
        elif isinstance(received, MemberState):
            if received.node != self.node:
                for entry in received.remove:
                    self._remote_remove(received.node, entry)
                for entry in received.add:
                    self._remote_add(received.node, entry)
        elif isinstance(received, TypingEvent):
            room = self.rooms.get(received.room)
            if room is not None and received.node != self.node:
                self._to_typed(room, TypingFrame(room.name, received.name))
        elif isinstance(received, WhisperEvent):
            if received.node == self.node:
                user = self.users.get(name_key(received.to))
                target = user.client if user is not None else None
                refused = ""
                if user is None or target is None:
                    refused = ErrorCode.NO_SUCH_USER
                elif not _may_whisper_to(user, now):
                    refused = ErrorCode.RATE_LIMITED
                else:
                    target.peer.deliver(OutFrame(received.frame.encode()))
                if received.request:
                    self.to_publish.append(
                        WhisperResult(received.sender, received.request, not refused, refused)
                    )
        elif isinstance(received, WhisperResult):
            if received.node == self.node:
                self._whisper_result(received)
        elif isinstance(received, Kick):
            if received.node == self.node:
                self._kicked(received.name, received.by)
        elif isinstance(received, Handover):
            self._handed_over(received, now)
        elif isinstance(received, NodeState):
            self._replace_node(received.node, received.entries)
        elif isinstance(received, NodeGone):
            self._node_gone(received.node)
        elif isinstance(received, Resync):
            self._resync(received.states)
        elif isinstance(received, Reload):
            self._reload(received)
        # SsePost/SsePostResult are the server's business, not the chat's.

    def _message(self, message: Message) -> None:
        """A stored message, in the chat's one order: keep it, broadcast it, ack it."""
        seq = self._seq_of(message.id)
        if seq is None:
            return  # another epoch's: a backplane sends a `Reload` before those
        if seq <= self._last_seq:
            return  # already here (a gap fill and a live copy may overlap)
        self._last_seq = seq
        room = self._room(message.room)
        room.messages.append(message)
        room.seqs.append(seq)
        if len(room.messages) > self._history_size:
            del room.messages[: -self._history_size]
            del room.seqs[: -self._history_size]
        out = OutFrame.of(message, message.id)
        for member in room.typed:
            member.peer.deliver(out)
        for listener in room.listeners:
            listener.peer.deliver(out)
        for pending in self._awaiting.pop(message.id, ()):
            self._answer(pending)

    def _reload(self, reload: Reload) -> None:
        """The backplane could not fill a gap (or its store lost everything and
        started a new epoch): deliver what is stored and new here, in order."""
        snapshot = reload.snapshot
        if snapshot.epoch != self._epoch:
            self._epoch = snapshot.epoch
            self._last_seq = 0
            for room in list(self.rooms.values()):
                room.messages = []
                room.seqs = []
                self._forget_if_empty(room)
            # Says stored under the old epoch were lost with it: not acked, say so.
            lost = [pending for waiting in self._awaiting.values() for pending in waiting]
            self._awaiting = {}
            self.store_failed(lost, "the history was lost (new epoch): send it again")
        fresh = [m for kept in snapshot.rooms.values() for m in kept]
        fresh.sort(key=lambda message: self._seq_of(message.id) or 0)
        for message in fresh:
            self._message(message)  # (skips what is here already)
        self._last_seq = max(self._last_seq, snapshot.next_seq - 1)
        for message_id in list(self._awaiting):
            seq = self._seq_of(message_id)
            if seq is not None and seq <= self._last_seq:
                for pending in self._awaiting.pop(message_id):
                    self._answer(pending)

    # --- other nodes ------------------------------------------------------------------

    def _changed(self, *, add: Entry | None = None, remove: Entry | None = None) -> None:
        """Publish a change of this node's entries (merged with the one just before)."""
        last = self.to_publish[-1] if self.to_publish else None
        # A receiver applies removes before adds: an entry that was just added
        # (or removed) must go into a new event to keep its order.
        if (
            not isinstance(last, MemberState)
            or (add is not None and add in last.remove)
            or (remove is not None and remove in last.add)
        ):
            last = MemberState(self.node, [], [])
            self.to_publish.append(last)
        # (Its lists are ours until the hub publishes it.)
        if add is not None:
            last.add.append(add)
        if remove is not None:
            last.remove.append(remove)

    def _remote_add(self, node: str, entry: Entry) -> None:
        entries = self._remote.setdefault(node, set())
        if entry in entries:
            return
        entries.add(entry)
        room_name, name = entry
        if not room_name:
            key = name_key(name)
            self._remote_online.setdefault(key, set()).add(node)
            self._remote_names[key] = name
            return
        room = self._room(room_name)
        nodes = room.remote.get(name)
        if nodes is None:
            nodes = room.remote[name] = set()
            if name not in room.members:
                self._to_typed(room, PresenceFrame(room.name, "join", name))
        nodes.add(node)

    def _remote_remove(self, node: str, entry: Entry) -> None:
        entries = self._remote.get(node)
        if entries is None or entry not in entries:
            return
        entries.discard(entry)
        room_name, name = entry
        if not room_name:
            key = name_key(name)
            online = self._remote_online.get(key)
            if online is not None:
                online.discard(node)
                if not online:
                    del self._remote_online[key]
                    self._remote_names.pop(key, None)
            return
        room = self.rooms.get(room_name)
        nodes = room.remote.get(name) if room is not None else None
        if room is None or nodes is None:
            return
        nodes.discard(node)
        if not nodes:
            del room.remote[name]
            if name not in room.members:
                self._to_typed(room, PresenceFrame(room.name, "leave", name))
            self._forget_if_empty(room)

    def _node_gone(self, node: str) -> None:
        if node == self.node:
            return
        for entry in sorted(self._remote.get(node, ())):
            self._remote_remove(node, entry)
        self._remote.pop(node, None)

    def _resync(self, states: dict[str, list[Entry]]) -> None:
        """Replace what is known of the other nodes (after the backplane reconnected)."""
        for node in list(self._remote):
            if node not in states:
                self._node_gone(node)
        for node, entries in states.items():
            self._replace_node(node, entries)

    def _replace_node(self, node: str, entries: list[Entry]) -> None:
        """``node`` holds exactly ``entries`` now; presence frames for what changed."""
        if node == self.node:
            return
        now_held = {(room, name) for room, name in entries}
        for entry in sorted(self._remote.get(node, set()) - now_held):
            self._remote_remove(node, entry)
        for entry in sorted(now_held):
            self._remote_add(node, entry)

    def own_entries(self) -> list[Entry]:
        """This node's entries, for the backplane to rewrite after an outage."""
        entries: list[Entry] = []
        for user in self.users.values():
            if user.client is not None:
                entries.append(("", user.name))
            entries.extend((room, user.name) for room in sorted(user.rooms))
        return entries

    def own_users(self) -> list[tuple[str, str]]:
        """(name, token) of every user this node holds."""
        return [(user.name, user.token) for user in self.users.values()]

    def _kicked(self, name: str, by: str) -> None:
        """Node ``by`` took ``name`` over: close it here and hand its rooms over."""
        user = self.users.get(name_key(name))
        if user is None:
            return
        self._forget_user(user)
        # The entries this node published carry the name as bound here (the
        # same name, unless a backplane could not tell the new node).
        name = user.name
        # Frees what `by`'s claim did not take over (the backplane keeps the rest).
        self.to_release.append(name)
        old = user.client
        if old is not None:
            old.peer.close_soon(CloseCode.REPLACED, "replaced by a newer connection")
            self._drop_subscriptions(old)
            old.user = None
            user.client = None
        rooms = sorted(user.rooms)
        user.deadline = None
        user.rooms = set()
        for room_name in rooms:
            # The member moves to node `by` without a leave/join flicker here.
            self._remote_add(by, (room_name, name))
            room = self.rooms[room_name]
            if room.members.get(name) is user:
                del room.members[name]
        self.to_publish.append(Handover(self.node, by, name, rooms))

    def _handed_over(self, handover: Handover, now: float) -> None:
        name, old, new = handover.name, handover.node, handover.to
        if old == self.node:
            return
        if new != self.node:
            for room_name in handover.rooms:
                self._remote_add(new, (room_name, name))
            for room_name in handover.rooms:
                self._remote_remove(old, (room_name, name))
            self._remote_remove(old, ("", name))
            return
        user = self.users.get(name_key(name))
        if user is None:
            return  # gone again already: the rooms go with the old node's entries
        held = False
        for room_name in handover.rooms:
            room = self._room(room_name)
            if user.name not in room.members:
                room.members[user.name] = user
                user.rooms.add(room_name)
                self._changed(add=(room_name, user.name))
                held = True
                if user.name != name and user.name not in room.remote:
                    self._to_typed(room, PresenceFrame(room.name, "join", user.name))
            if user.name != name:
                # Bound here under another form of the name: the other nodes
                # took the old form as ours on the handover; it goes.
                self._changed(remove=(room_name, name))
            self._remote_remove(old, (room_name, name))
        self._remote_remove(old, ("", name))
        if held:
            self._hold(user, now)  # the new connection takes them back by joining

    # --- rooms -------------------------------------------------------------------

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room

    def _forget_if_empty(self, room: Room) -> None:
        if not (room.members or room.remote or room.typed or room.listeners or room.messages):
            del self.rooms[room.name]

    def _subscribe(self, room: Room, client: Client) -> None:
        if client.classic:
            room.listeners[client] = None
        else:
            room.typed[client] = None

    def _unsubscribe(self, room: Room, client: Client) -> None:
        room.typed.pop(client, None)
        room.listeners.pop(client, None)

    def _add_member(self, user: User, room: Room, skip: Client | None = None) -> None:
        room.members[user.name] = user
        user.rooms.add(room.name)
        self._changed(add=(room.name, user.name))
        if user.name not in room.remote:
            self._to_typed(room, PresenceFrame(room.name, "join", user.name), skip=skip)

    def _remove_member(self, user: User, room: Room) -> None:
        if room.members.get(user.name) is user:
            del room.members[user.name]
            user.rooms.discard(room.name)
            self._changed(remove=(room.name, user.name))
            if user.name not in room.remote:
                self._to_typed(room, PresenceFrame(room.name, "leave", user.name))
        self._forget_if_empty(room)

    def _to_typed(
        self, room: Room, frame: PresenceFrame | TypingFrame, skip: Client | None = None
    ) -> None:
        out = OutFrame.of(frame)
        for member in room.typed:
            if member is not skip:
                member.peer.deliver(out)

    def _replay(self, room: Room, since: str | None) -> tuple[list[Message], bool]:
        """`joined.history` and `recovered` for a join with ``since``."""
        messages = room.messages
        if since is None:
            return messages[-JOIN_HISTORY:], True
        index = self._index_of(room, since)
        if index is None or len(messages) - index - 1 > MAX_RECOVERY:
            return messages[-JOIN_HISTORY:], False
        return messages[index + 1 :], True
