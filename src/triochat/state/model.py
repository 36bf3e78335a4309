"""The nouns of the chat state: connections, users, rooms, says on their way.

Plain objects with slots and no behaviour beyond a lookup; the parts beside
this module (`rooms`, `presence`, ...) change them. `Refused` is how a check
anywhere says "answer this frame with an error" (docs/protocol.md §5).
"""

from __future__ import annotations

import bisect
import secrets
from typing import Final, Literal, Protocol

from ..events import Draft
from ..frames import OutFrame
from ..identity import Identity
from ..protocol import ErrorFrame, Message, confusable_key, name_key
from ..ratelimit import RateLimiter
from ..waiting import WaitingRun

__all__ = [
    "CLASSIC_ROOM",
    "Client",
    "Mode",
    "Peer",
    "PendingSay",
    "Refused",
    "Room",
    "User",
    "send_error",
]

#: The room classic connections and lobby listeners are in (docs/protocol.md §7).
CLASSIC_ROOM: Final = "lobby"


class Peer(Protocol):
    """What the chat state (and the hub) needs of a connection. No method blocks."""

    def deliver(self, frame: OutFrame) -> None: ...

    def share(self, run: WaitingRun) -> None:
        """Take every frame added to ``run`` from now until its round ends: a
        room's presence and typing, held once for all its members (`waiting`),
        which may be written a little later (docs/protocol.md §6) but never
        after a frame delivered after them."""
        ...

    def unshare(self, run: WaitingRun) -> None:
        """No frame added to ``run`` from now on is this connection's."""
        ...

    def close_soon(self, code: int, reason: str) -> None: ...

    def hold(self) -> None:
        """Keep delivered frames queued, unwritten, until `release` (used by the hub)."""
        ...

    def release(self) -> None: ...


#: A connection's mode, decided by its first frame (docs/protocol.md §7).
Mode = Literal["classic", "typed"]


class Client:
    """The chat-side state of one connection."""

    __slots__ = (
        "auth_deadline",
        "gone",
        "identity",
        "limiter",
        "lobby_listener",
        "mode",
        "name",
        "peer",
        "rooms",
        "user",
    )

    def __init__(
        self,
        peer: Peer,
        limiter: RateLimiter,
        *,
        lobby_listener: bool = False,
    ) -> None:
        self.peer = peer
        self.limiter = limiter
        #: Connected on ``/`` and no frame yet: a lobby listener (docs/protocol.md
        #: §7), hearing lobby's messages.
        self.lobby_listener = lobby_listener
        #: None until the first frame decides; `classic` is derived from it.
        self.mode: Mode | None = None
        self.name: str | None = None
        self.user: User | None = None
        #: Rooms this connection has joined (live memberships).
        self.rooms: set[str] = set()
        #: Disconnected or replaced: its late frames are ignored.
        self.gone = False
        #: Who its token says it is (docs/protocol.md §15); None: anonymous.
        self.identity: Identity | None = None
        #: When it is closed 4003: the handshake timeout, then its token's
        #: ``exp`` (on the hub's clock); None while no deadline runs.
        self.auth_deadline: float | None = None

    @property
    def classic(self) -> bool:
        """A classic connection: gets only message, whisper and error frames (§7)."""
        return self.mode == "classic"

    def holds(self, name: str) -> bool:
        """Whether this connection speaks as ``name`` (compared by `name_key`)."""
        return self.user is not None and self.user.key == name_key(name)


class User:
    """A name held by somebody: connected, or within the presence grace period."""

    __slots__ = (
        "clients",
        "deadline",
        "key",
        "name",
        "refs",
        "rooms",
        "skeleton",
        "sub",
        "token",
        "whispers_in",
    )

    def __init__(
        self, name: str, client: Client, token: str | None = None, sub: str | None = None
    ) -> None:
        #: The name as bound (trimmed, as typed): shown in frames, room members
        #: and cluster entries.
        self.name = name
        #: Its identity (`name_key`) and TR39 skeleton (`confusable_key`): no
        #: other user holds either (docs/protocol.md section 2.1).
        self.key = name_key(name)
        self.skeleton = confusable_key(name)
        self.token = token or secrets.token_urlsafe(24)
        #: The token's ``sub`` (docs/protocol.md §15): None for an anonymous user.
        self.sub = sub
        #: Its live connections: one for an anonymous user; an authenticated
        #: one may have several (tabs, devices), all one member (§15).
        self.clients: dict[Client, None] = {client: None}
        #: The bound on whispers this user receives (made on the first one).
        self.whispers_in: RateLimiter | None = None
        #: Rooms the user is a member of (live through ``clients``, or held).
        self.rooms: set[str] = set()
        #: When held rooms are released; None while nothing is held.
        self.deadline: float | None = None
        #: The user's recent says by `ref`, oldest first, so a retry is never
        #: stored twice (a plain dict: an empty one costs less than an OrderedDict).
        self.refs: dict[str, PendingSay] = {}

    def live_rooms(self) -> set[str]:
        """The rooms some connection of the user has joined (not only held)."""
        clients = self.clients
        if len(clients) <= 1:
            return next(iter(clients)).rooms if clients else set()
        live: set[str] = set()
        for client in clients:
            live |= client.rooms
        return live


class RecentJson:
    """The JSON of a room's newest kept messages (oldest first), each as its
    `message` frame: the ``history`` of a join without ``since``, joined
    rather than encoded again for every join (#16). `state.log` builds it and
    brings it in step with ``Room.messages`` when a join reads it."""

    __slots__ = ("first_id", "last_id", "parts", "size")

    def __init__(self, parts: list[bytes], first_id: str, last_id: str) -> None:
        self.parts = parts
        #: The ids of the messages of ``parts[0]`` and ``parts[-1]``: where the
        #: window stands in ``Room.messages`` (any change inside it moves them).
        self.first_id = first_id
        self.last_id = last_id
        #: What it costs in memory, about (counted in ``Room.bytes``).
        self.size = 0


class Room:
    """One room: its members, its subscribers and its kept history."""

    __slots__ = (
        "_names",
        "bytes",
        "classic",
        "loaded",
        "loading",
        "members",
        "messages",
        "name",
        "recent",
        "remote",
        "seqs",
        "typed",
        "waiting",
    )

    def __init__(self, name: str, *, loaded: bool = False) -> None:
        self.name = name
        #: Every member user (live or held), by name. Changed only through
        #: `put_member` and `pop_member` (they keep `member_names` in step).
        self.members: dict[str, User] = {}
        #: Members on other nodes: name -> the nodes that hold it (usually one).
        #: Changed only through `put_remote` and `pop_remote`.
        self.remote: dict[str, set[str]] = {}
        #: Live typed member connections: get every frame of the room.
        self.typed: dict[Client, None] = {}
        #: Classic member connections and lobby listeners (docs/protocol.md §7):
        #: get `message` frames only.
        self.classic: dict[Client, None] = {}
        #: This round's frames that wait (presence, typing), shared by every
        #: typed subscriber (`waiting`); None, or closed, between rounds.
        self.waiting: WaitingRun | None = None
        #: The node's one copy of the room's recent history (`state.log` keeps it).
        self.messages: list[Message] = []
        self.seqs: list[int] = []  # parallel to messages, for bisect
        #: The newest messages' JSON, for joins (`RecentJson`); None until a
        #: join asks for it, and after a change `state.log` does not follow.
        self.recent: RecentJson | None = None
        #: What ``messages`` (`recent.cached_bytes`) and ``recent`` cost in
        #: memory, for the cache bound.
        self.bytes = 0
        #: ``messages`` is the room's whole recent history (read from the store,
        #: or the room is new since): a join may be answered from it. Else the
        #: history is loaded first (`state.log`).
        self.loaded = loaded
        #: Loads of its history under way: until they end, the messages that
        #: arrive are kept (to merge with what the store read) and the room stays.
        self.loading = 0
        #: `member_names`, kept sorted once asked for (`_recount` keeps it in
        #: step): a join's ``joined`` frame lists them all, and sorting a big
        #: room's names for every join was a churn's costliest step (#16).
        self._names: list[str] | None = None

    def member_names(self) -> list[str]:
        """Every member's name, here and on other nodes, sorted (a new list)."""
        names = self._names
        if names is None:
            names = self._names = sorted(self.members.keys() | self.remote.keys())
        return names.copy()

    def put_member(self, user: User) -> None:
        self.members[user.name] = user
        self._recount(user.name)

    def pop_member(self, name: str) -> None:
        del self.members[name]
        self._recount(name)

    def put_remote(self, name: str) -> set[str]:
        """A member on other nodes: its (empty) set of nodes, to fill."""
        nodes = self.remote[name] = set()
        self._recount(name)
        return nodes

    def pop_remote(self, name: str) -> None:
        del self.remote[name]
        self._recount(name)

    def _recount(self, name: str) -> None:
        """``name`` may have become or stopped being a member (``members`` or
        ``remote`` changed)."""
        names = self._names
        if names is None:
            return
        at = bisect.bisect_left(names, name)
        listed = at < len(names) and names[at] == name
        if name in self.members or name in self.remote:
            if not listed:
                names.insert(at, name)
        elif listed:
            del names[at]


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
        #: The id the sequencer gave it (set by `Says.stored`).
        self.id = ""
        #: Acked: stored, and broadcast on this node.
        self.committed = False
        #: Connections that retried this say (same ref) while it was being stored.
        self.waiting: list[Client] = []
        #: When the hub took it (its clock; set by the hub, for the say-to-ack metric).
        self.taken = 0.0


class Refused(Exception):
    """A check failed: the frame is answered with an error, and nothing changed.

    Every check runs before any state changes (#18), so raising this from
    anywhere in a frame's handling leaves the chat state as it was.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def send_error(client: Client, code: str, message: str, ref: str | None = None) -> None:
    """Deliver an `error` frame; a classic client's carries ``name`` and ``msg`` (§7)."""
    if client.classic:
        frame = ErrorFrame(code=code, message=message, ref=ref, name="server", msg=message)
    else:
        frame = ErrorFrame(code=code, message=message, ref=ref)
    client.peer.deliver(OutFrame.of(frame))
