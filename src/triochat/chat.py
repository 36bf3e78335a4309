"""Chat state, sans-I/O: the `ChatState` facade over the parts in `triochat.state`.

Rules of this module (and of its parts):

1. No trio, no awaits. Every method runs to completion, so a cancellation can
   never leave a room half-updated. Time is passed in (``now``, seconds on the
   caller's clock; ``wall_ms`` for message timestamps).
2. Frames leave through ``Peer.deliver``, which never blocks (a full outbox is
   the peer's problem: it closes itself with 1013).
3. Everything else leaves through `take_output` (as websockets'
   ``data_to_send()``): says to store, events for the other nodes, names to
   release, acked says. A say is not broadcast here: the hub has it stored,
   then calls `stored` (or `store_failed`); messages are broadcast when they
   come back from the backplane (`apply`), in the one order every node sees,
   and the sender's ack follows its message (`state.says`).
4. Checks run in docs/protocol.md §5's order: name, room, rate, state, all before
   anything changes (`state.checks`, run by `state.handlers`).
5. Other nodes (a cluster) are known only through `apply`'d events: their
   members per room and their connected users (`state.cluster`).

`ChatState` builds the parts (`triochat.state` lists them) and routes to
them: each client frame (`handle`) to its handler in `state.handlers` (or to
`state.access` for `auth`), each thing the backplane brings (`apply`) to the
part it concerns, the server API's calls to `state.operator`; the rest of its
methods are the hub's view of the parts. It keeps no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .events import (
    Claim,
    Deletion,
    Disconnect,
    Entry,
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
from .identity import TokenCheck
from .protocol import (
    Auth,
    ClassicFrame,
    ClientFrame,
    HistoryRequest,
    Join,
    Leave,
    Limits,
    Message,
    Say,
    Typing,
    Whisper,
)
from .recent import Snapshot
from .state.access import Access
from .state.checks import Checks
from .state.cluster import ClusterView
from .state.connections import Connections
from .state.handlers import FrameHandlers
from .state.log import RoomCacheStats, RoomLog
from .state.model import Client, PendingSay, Refused, Room, User
from .state.model import Peer as Peer
from .state.operator import Operator
from .state.output import ChatOutput, OutputBuffer
from .state.presence import LEAVE_SETTLE as LEAVE_SETTLE
from .state.presence import Presence
from .state.rooms import Rooms
from .state.says import Says
from .state.whispers import Whispers

__all__ = ["LEAVE_SETTLE", "ChatOutput", "ChatState", "Client", "Peer", "PendingSay"]


class ChatState:
    """Every room and user of one server.

    Args:
        epoch: the stored history's epoch (ids are ``<epoch>-<seq>``).
        next_seq: one more than the newest stored message's seq: messages up
            to it are known (a message that comes again is ignored).
        history: messages already stored, per room, oldest first.
        history_complete: ``history`` names every room the store has messages
            of (else the others are read when joined: `to_load`).
        room_cache, room_cache_bytes: the bounds of the idle rooms kept in
            memory (docs/protocol.md §8, `state.rooms`).
        node: this node's id in a cluster (labels what it publishes).
        remote_timeout: seconds a whisper waits for another node's answer.
        authenticating: connections must send a token first (docs/protocol.md
            §15), within ``handshake_timeout`` seconds.
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
        history_complete: bool = True,
        room_cache: int = 1000,
        room_cache_bytes: int = 1 << 26,
        node: str = "",
        remote_timeout: float = 5.0,
        limits: Limits | None = None,
        authenticating: bool = False,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.node = node
        # Each part gets the parts it uses; none knows this class (no circle).
        output = self._output = OutputBuffer(node)
        rooms = self._rooms = Rooms(output, cache_rooms=room_cache, cache_bytes=room_cache_bytes)
        log = self._log = RoomLog(rooms, epoch=epoch, next_seq=next_seq, history_size=history_size)
        checks = self._checks = Checks(rooms, max_rooms=max_rooms)
        access = self._access = Access(
            authenticating=authenticating, handshake_timeout=handshake_timeout
        )
        presence = self._presence = Presence(rooms, output, presence_grace=presence_grace)
        says = self._says = Says(rooms, log, output)
        cluster = self._cluster = ClusterView(rooms, presence, output)
        whispers = self._whispers = Whispers(
            rooms, presence, cluster, output, epoch=epoch, remote_timeout=remote_timeout
        )
        self._connections = Connections(rooms, presence, access)
        self._handlers = FrameHandlers(
            rooms=rooms,
            log=log,
            checks=checks,
            presence=presence,
            says=says,
            cluster=cluster,
            whispers=whispers,
            output=output,
            limits=limits,
        )
        self._operator = Operator(rooms, log, presence, says, output)
        stored = Snapshot(epoch, next_seq, history or {}, complete=history_complete)
        log.load(stored)

    @property
    def clients(self) -> dict[Client, None]:
        """Every registered connection (read only)."""
        return self._connections.clients

    @property
    def rooms(self) -> dict[str, Room]:
        """Every room this node knows of, by name (read only: a gauge, tests)."""
        return self._rooms.rooms

    @property
    def users(self) -> dict[str, User]:
        """Every user this node holds, by `name_key` (read only)."""
        return self._presence.users

    @property
    def room_cache(self) -> RoomCacheStats:
        """The room cache's figures (metrics)."""
        rooms = self._rooms
        return RoomCacheStats(rooms.idle, rooms.cached_bytes, rooms.evicted, self._log.loads)

    @property
    def rate_limited(self) -> int:
        """Frames refused by a rate limit so far (a metric)."""
        return self._checks.rate_limited

    @property
    def backplane_up(self) -> bool:
        """Whether events reach the other nodes now (the hub sets it each step)."""
        return self._whispers.backplane_up

    @backplane_up.setter
    def backplane_up(self, up: bool) -> None:
        self._whispers.backplane_up = up

    def take_output(self) -> ChatOutput:
        """What to store, publish and release, and the says acked, since the
        last call (each in order); the hub acts on it (rule 3)."""
        return self._output.take()

    # --- connections -------------------------------------------------------------

    def connect(self, client: Client, now: float = 0.0) -> None:
        """Register a new connection (a lobby listener starts hearing lobby); with
        tokens on, it has the handshake timeout to authenticate."""
        self._connections.connect(client, now)

    def disconnect(self, client: Client, now: float) -> None:
        """The connection is gone: hold its user's rooms for the grace period.

        Never awaits; safe to call from a ``finally``. The caller runs `expire`
        once `next_deadline` has passed (also with a zero grace period).
        """
        self._connections.disconnect(client, now)

    def next_deadline(self) -> float:
        """When `expire` must next run (``inf`` when nothing is held or awaited)."""
        return min(
            self._presence.next_deadline(),
            self._whispers.next_deadline(),
            self._access.next_deadline(),
        )

    def expire(self, now: float) -> None:
        """Release every membership whose grace period has ended; answer every
        whisper whose node did not answer in time; close (4003) every connection
        whose token ran out."""
        self._access.expire(now)
        self._whispers.expire(now)
        self._presence.expire(now)

    # --- frames ------------------------------------------------------------------

    def handle(
        self,
        client: Client,
        frame: ClientFrame | TokenCheck,
        now: float,
        wall_ms: int,
        claim: Claim | None = None,
    ) -> None:
        """Apply one decoded client frame (an `auth` frame as its verdict,
        `TokenCheck`, when tokens are on); answers go to the peers.

        ``claim``: the cluster's answer for the name this frame binds (see
        `needs_claim`); None on a single node, where local users decide.
        """
        if not self._connections.admit(client, frame):
            return
        handlers = self._handlers
        try:
            if isinstance(frame, TokenCheck | Auth):
                self._access.authenticate(client, frame, now, wall_ms)
            elif isinstance(frame, Say):
                handlers.say(client, frame, now, wall_ms)
            elif isinstance(frame, Join):
                handlers.join(client, frame, now, claim)
            elif isinstance(frame, Typing):
                self._typing(client, frame, now)
            elif isinstance(frame, Leave):
                handlers.leave(client, frame, now)
            elif isinstance(frame, Whisper):
                handlers.whisper(client, frame, now, wall_ms)
            elif isinstance(frame, HistoryRequest):
                handlers.history(client, frame, now)
            else:
                handlers.classic(client, frame, now, wall_ms, claim)
        except Refused as refused:
            self._connections.refused(client, refused.code, refused.message, frame.ref, now)

    def _typing(self, client: Client, frame: Typing, now: float) -> None:
        # (A method of its own: tests/test_connection.py breaks it to see a
        # bug in a handler close only that connection, with 1011.)
        self._handlers.typing(client, frame, now)

    def needs_claim(self, client: Client, frame: ClientFrame | TokenCheck) -> str | None:
        """The name ``frame`` would take that only the cluster can grant, if any.

        A first join (or classic frame) for a name no local user holds: the
        hub asks the backplane (`Backplane.claim`) and passes the answer to
        `handle`. Frames that will be refused anyway (bad name or room) need
        no claim.
        """
        return self._presence.needs_claim(client, frame)

    def to_load(self, client: Client, frame: ClientFrame | TokenCheck) -> str | None:
        """The room whose history must be read from the store before ``frame`` is
        handled (docs/protocol.md §8): the hub reads it beside its step, between
        `begin_load` and `end_load`."""
        return None if isinstance(frame, TokenCheck) else self._log.to_load(client, frame)

    def history_in_memory(self, room: str) -> bool:
        """Whether ``room``'s history is here (else it is in the store only)."""
        return self._log.in_memory(room)

    def begin_load(self, room: str) -> None:
        self._log.begin_load(room)

    def end_load(self, room: str, stored: list[Message] | None) -> None:
        """The read of ``room``'s history ended: ``stored``, or None if it failed."""
        self._log.end_load(room, stored)

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

        ``classic``: the frame had the classic shape, so a lobby listener
        becomes a classic connection (and its error carries ``name`` and ``msg``).
        """
        first = ClassicFrame("", "") if classic else None
        if self._connections.admit(client, first):
            self._connections.refused(client, code, message, ref, now)

    # --- storage results -------------------------------------------------------------

    def stored(self, batch: Sequence[PendingSay], ids: Sequence[str]) -> None:
        """The backplane stored ``batch`` as ``ids``: ack each when its message is here."""
        self._says.stored(batch, ids)

    def store_failed(self, batch: Iterable[PendingSay], reason: str) -> None:
        """Nothing in the batch was stored: tell each sender, ack nothing."""
        self._says.store_failed(batch, reason)

    # --- what the backplane brings -------------------------------------------------------

    def apply(self, received: Received, now: float) -> None:
        """Apply one thing from the backplane (a message, or another node's event)."""
        if isinstance(received, Message):
            self._says.message(received)
        elif isinstance(received, MemberState):
            self._cluster.member_state(received)
        elif isinstance(received, TypingEvent):
            self._cluster.typing(received)
        elif isinstance(received, WhisperEvent):
            self._whispers.arrived(received, now)
        elif isinstance(received, WhisperResult):
            self._whispers.result(received)
        elif isinstance(received, Kick):
            self._cluster.kicked(received)
        elif isinstance(received, Handover):
            self._cluster.handed_over(received, now)
        elif isinstance(received, NodeState):
            self._cluster.replace_node(received.node, received.entries)
        elif isinstance(received, NodeGone):
            self._cluster.node_gone(received.node)
        elif isinstance(received, Resync):
            self._cluster.resync(received.states, received.waiting)
        elif isinstance(received, Reload):
            self._says.reload(received.snapshot)
        elif isinstance(received, Deletion | Disconnect):
            self._operator.event(received)
        # SsePost/SsePostResult are the server's business, not the chat's.

    # --- the server API (docs/protocol.md §16) ------------------------------------------

    def publish(self, client: Client, room: str, name: str, msg: str, wall_ms: int) -> None:
        """Post ``msg`` to ``room`` as ``name``: stored, broadcast and acked as a
        say is; ``client`` (no connection: its peer takes the answer) gets the
        `ack` or the `error`."""
        self._operator.publish(client, room, name, msg, wall_ms)

    def members(self, room: str) -> list[str]:
        """The names in ``room``, on every node (empty for a room with nobody)."""
        return self._operator.members(room)

    def history_page(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A `history` page of ``room`` (a room with no messages: an empty one).

        Raises:
            Refused: ``before`` is not a kept message's id.
        """
        return self._operator.history_page(room, before, limit)

    def delete(self, room: str, message_id: str) -> bool:
        """A message was deleted from the store: forget it here, tell the room,
        and have every other node do the same. Whether it was kept here."""
        return self._operator.delete(room, message_id)

    def disconnect_user(self, user: str) -> None:
        """Close every connection of ``user`` with 4009, on every node."""
        self._operator.disconnect_user(user)

    # --- for the backplane -------------------------------------------------------------

    def own_entries(self) -> list[Entry]:
        """This node's entries, for the backplane to rewrite after an outage."""
        return self._presence.own_entries()

    def own_users(self) -> list[tuple[str, str]]:
        """(name, token) of every user this node holds."""
        return self._presence.own_users()
