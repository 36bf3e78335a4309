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
   anything changes (`state.checks`).
5. Other nodes (a cluster) are known only through `apply`'d events: their
   members per room and their connected users (`state.cluster`).

The parts, each in a module of its own: `state.rooms` (rooms, members and
the fan-out), `state.log` (each room's kept history and `since` recovery),
`state.presence` (users, tokens, takeover, grace), `state.says` (the say
pipeline), `state.cluster` (the other nodes), `state.whispers` and
`state.connections` (the registry, each connection's mode). This class
routes frames and events to them.
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
from .frames import OutFrame
from .identity import TokenCheck
from .protocol import (
    Auth,
    ClassicFrame,
    ClientFrame,
    DeletedFrame,
    ErrorCode,
    HistoryFrame,
    HistoryRequest,
    Join,
    JoinedFrame,
    Leave,
    LeftFrame,
    Limits,
    Message,
    Say,
    Typing,
    TypingFrame,
    Whisper,
)
from .state.access import Access
from .state.checks import Checks
from .state.cluster import ClusterView
from .state.connections import Connections
from .state.log import RoomLog
from .state.model import CLASSIC_ROOM, Client, PendingSay, Refused, Room, User
from .state.model import Peer as Peer
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
        node: str = "",
        remote_timeout: float = 5.0,
        limits: Limits | None = None,
        authenticating: bool = False,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.node = node
        #: Told to every joiner (`JoinedFrame.limits`), so clients need no constants.
        self._limits = limits
        # Each part gets the parts it uses; none knows this class (no circle).
        output = self._output = OutputBuffer(node)
        rooms = self._rooms = Rooms(output)
        self._log = RoomLog(rooms, epoch=epoch, next_seq=next_seq, history_size=history_size)
        self._checks = Checks(rooms, max_rooms=max_rooms)
        self._access = Access(authenticating=authenticating, handshake_timeout=handshake_timeout)
        presence = self._presence = Presence(rooms, output, presence_grace=presence_grace)
        self._says = Says(self._log, output)
        cluster = self._cluster = ClusterView(rooms, presence, output)
        self._whispers = Whispers(
            rooms, presence, cluster, output, epoch=epoch, remote_timeout=remote_timeout
        )
        self._connections = Connections(rooms, presence)
        self._log.load(history or {})

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
        """Register a new connection (a `/` listener starts hearing lobby); with
        tokens on, it has the handshake timeout to authenticate."""
        self._connections.connect(client)
        self._access.connected(client, now)

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
        if client.gone:
            return
        if client.mode is None:
            self._connections.decide_mode(client, frame)
        if not self._access.admit(client, frame):
            return
        try:
            if isinstance(frame, TokenCheck | Auth):
                self._access.authenticate(client, frame, now, wall_ms)
            elif isinstance(frame, Say):
                self._say(client, frame, now, wall_ms)
            elif isinstance(frame, Join):
                self._join(client, frame, now, claim)
            elif isinstance(frame, Typing):
                self._typing(client, frame, now)
            elif isinstance(frame, Leave):
                self._leave(client, frame, now)
            elif isinstance(frame, Whisper):
                self._checks.rate(client, now)
                self._whispers.send(client, frame, now, wall_ms)
            elif isinstance(frame, HistoryRequest):
                self._history(client, frame, now)
            else:
                self._classic(client, frame, now, wall_ms, claim)
        except Refused as refused:
            self._connections.refused(client, refused.code, refused.message, frame.ref, now)

    def needs_claim(self, client: Client, frame: ClientFrame | TokenCheck) -> str | None:
        """The name ``frame`` would take that only the cluster can grant, if any.

        A first join (or classic frame) for a name no local user holds: the
        hub asks the backplane (`Backplane.claim`) and passes the answer to
        `handle`. Frames that will be refused anyway (bad name or room) need
        no claim.
        """
        return self._presence.needs_claim(client, frame)

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
        first = ClassicFrame("", "") if classic else None
        if client.mode is None:
            self._connections.decide_mode(client, first)
        if self._access.admit(client, first):
            self._connections.refused(client, code, message, ref, now)

    def _join(self, client: Client, frame: Join, now: float, claim: Claim | None) -> None:
        checks = self._checks
        identity = client.identity
        requested = frame.name if identity is None else Access.name_of(identity, frame.name)
        name = checks.name(client, requested)
        checks.room(client, frame.room, joining=True)
        Access.check_room(client, frame.room)
        checks.reply_budget(client, now)  # (takes nothing: before the bucket that does)
        if frame.room not in client.rooms:
            checks.membership_rate(client, now)
        user = self._presence.bind(client, name, frame.token, now, claim, rotate=frame.rotate)
        rooms = self._rooms
        room = rooms.room(frame.room)
        if frame.room not in client.rooms:
            client.rooms.add(frame.room)
            rooms.subscribe(room, client)
            if user.name not in room.members:
                rooms.add_member(user, room, skip=client)
        if client.classic:
            return
        history, recovered = self._log.replay(room, frame.since)
        joined = JoinedFrame(
            room=room.name,
            name=user.name,
            token=user.token,
            members=sorted(room.members.keys() | room.remote.keys()),
            history=history,
            recovered=recovered,
            ref=frame.ref,
            limits=self._limits,
        )
        out = OutFrame.of(joined)
        client.limiter.charge_reply(len(out.ws))
        client.peer.deliver(out)

    def _say(self, client: Client, frame: Say, now: float, wall_ms: int) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.rate(client, now)
        room = self._checks.joined(client, frame.room)
        self._says.submit(client, room.name, frame.msg, frame.ref, wall_ms)

    def _typing(self, client: Client, frame: Typing, now: float) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.rate(client, now)
        room = self._checks.joined(client, frame.room)
        assert client.name is not None
        self._rooms.to_typed(room, TypingFrame(room.name, client.name), skip=client)
        if self._cluster.has_others():
            self._output.publish(TypingEvent(self.node, room.name, client.name))

    def _leave(self, client: Client, frame: Leave, now: float) -> None:
        self._checks.room(client, frame.room)
        room = self._checks.joined(client, frame.room)
        self._checks.membership_rate(client, now)
        client.rooms.discard(room.name)
        self._rooms.unsubscribe(room, client)
        if client.user is not None:
            self._presence.settle_leave(client.user, now)
        if not client.classic:
            client.peer.deliver(OutFrame.of(LeftFrame(room.name, frame.ref)))

    def _history(self, client: Client, frame: HistoryRequest, now: float) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.reply_budget(client, now)
        room = self._checks.joined(client, frame.room)
        messages, more = self._log.page(room, frame.before, frame.limit)
        if not client.classic:
            out = OutFrame.of(HistoryFrame(room.name, messages, more, frame.ref))
            client.limiter.charge_reply(len(out.ws))
            client.peer.deliver(out)

    def _classic(
        self, client: Client, frame: ClassicFrame, now: float, wall_ms: int, claim: Claim | None
    ) -> None:
        """``{name, msg}``: join lobby as ``name`` if not yet joined, then say."""
        name = self._checks.name(client, frame.name)
        self._checks.rate(client, now)
        if CLASSIC_ROOM not in client.rooms:
            self._join(client, Join(room=CLASSIC_ROOM, name=name, ref=frame.ref), now, claim)
        self._says.submit(client, CLASSIC_ROOM, frame.msg, frame.ref, wall_ms)

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
            self._message(received)
        elif isinstance(received, MemberState):
            self._cluster.member_state(received)
        elif isinstance(received, TypingEvent):
            self._cluster.typing(received)
        elif isinstance(received, WhisperEvent):
            self._whispers.arrived(received, now)
        elif isinstance(received, WhisperResult):
            self._whispers.result(received)
        elif isinstance(received, Kick):
            if received.node == self.node:
                self._cluster.kicked(received.name, received.by)
        elif isinstance(received, Handover):
            self._cluster.handed_over(received, now)
        elif isinstance(received, NodeState):
            self._cluster.replace_node(received.node, received.entries)
        elif isinstance(received, NodeGone):
            self._cluster.node_gone(received.node)
        elif isinstance(received, Resync):
            self._cluster.resync(received.states)
        elif isinstance(received, Reload):
            self._reload(received)
        elif isinstance(received, Deletion | Disconnect):
            self._operator_event(received)
        # SsePost/SsePostResult are the server's business, not the chat's.

    def _message(self, message: Message) -> None:
        """A stored message, in the chat's one order: keep it, broadcast it, ack it."""
        room = self._log.keep(message)
        if room is None:
            return
        self._rooms.broadcast(room, OutFrame.of(message, message.id))
        self._says.arrived(message.id)

    def _reload(self, reload: Reload) -> None:
        """The backplane could not fill a gap (or its store lost everything and
        started a new epoch): deliver what is stored and new here, in order."""
        snapshot = reload.snapshot
        if self._log.start_epoch(snapshot.epoch):
            # Says stored under the old epoch were lost with it: not acked, say so.
            self._says.lost("the history was lost (new epoch): send it again")
        for message in self._log.unseen(snapshot):
            self._message(message)  # (skips what is here already)
        self._log.caught_up(snapshot.next_seq)
        self._says.caught_up()

    # --- the server API (docs/protocol.md §16) ------------------------------------------

    def publish(self, client: Client, room: str, name: str, msg: str, wall_ms: int) -> None:
        """Post ``msg`` to ``room`` as ``name``: stored, broadcast and acked as a
        say is; ``client`` (no connection: its peer takes the answer) gets the
        `ack` or the `error`."""
        self._says.submit_as(client, room, name, msg, wall_ms)

    def members(self, room: str) -> list[str]:
        """The names in ``room``, on every node (empty for a room with nobody)."""
        found = self._rooms.rooms.get(room)
        return sorted(found.members.keys() | found.remote.keys()) if found is not None else []

    def history_page(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A `history` page of ``room`` (a room with no messages: an empty one).

        Raises:
            Refused: ``before`` is not a kept message's id.
        """
        found = self._rooms.rooms.get(room)
        if found is None:
            if before is not None:
                raise Refused(ErrorCode.BAD_FRAME, "unknown `before` id")
            return [], False
        return self._log.page(found, before, limit)

    def delete(self, room: str, message_id: str) -> bool:
        """A message was deleted from the store: forget it here, tell the room,
        and have every other node do the same. Whether it was kept here."""
        kept = self._forget_message(room, message_id)
        self._output.publish(Deletion(self.node, room, message_id))
        return kept

    def disconnect_user(self, user: str) -> None:
        """Close every connection of ``user`` with 4009, on every node."""
        self._presence.disconnect(user)
        self._output.publish(Disconnect(self.node, user))

    def _operator_event(self, event: Deletion | Disconnect) -> None:
        if event.node == self.node:
            return  # the node that published it acted at once
        if isinstance(event, Deletion):
            self._forget_message(event.room, event.id)
        else:
            self._presence.disconnect(event.user)

    def _forget_message(self, room_name: str, message_id: str) -> bool:
        room = self._log.remove(room_name, message_id)
        if room is None:
            return False
        self._rooms.to_typed(room, DeletedFrame(room.name, message_id))
        return True

    # --- for the backplane -------------------------------------------------------------

    def own_entries(self) -> list[Entry]:
        """This node's entries, for the backplane to rewrite after an outage."""
        return self._presence.own_entries()

    def own_users(self) -> list[tuple[str, str]]:
        """(name, token) of every user this node holds."""
        return self._presence.own_users()
