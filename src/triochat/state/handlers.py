"""What each client frame does (docs/protocol.md §3) once its connection takes it.

Every handler runs its checks first, in §5's order (`checks`, with a token's
rooms right after the room pattern: `access`), so a `Refused` from any of
them leaves everything as it was; then the parts that own the state change
it, and the connection gets its answer. A join binds the name (`presence`),
subscribes and makes a member (`rooms`), and replies with the room's kept
history (`log`); a say goes down the say pipeline (`says`); a classic frame
is a join of lobby, the first time, and a say (§7). `auth` is `access`'s.
"""

from __future__ import annotations

from ..events import Claim, TypingEvent
from ..frames import OutFrame
from ..protocol import (
    ClassicFrame,
    HistoryFrame,
    HistoryRequest,
    Join,
    JoinedReply,
    Leave,
    LeftFrame,
    Limits,
    Say,
    Typing,
    TypingFrame,
    Whisper,
)
from .access import Access
from .checks import Checks
from .cluster import ClusterView
from .log import RoomLog
from .model import CLASSIC_ROOM, Client
from .output import OutputBuffer
from .presence import Presence
from .rooms import Rooms
from .says import Says
from .whispers import Whispers

__all__ = ["FrameHandlers"]


class FrameHandlers:
    """One handler per client frame type; each raises `Refused` to answer an error.

    Args:
        limits: told to every joiner (`JoinedFrame.limits`), so clients need
            no constants.
    """

    __slots__ = (
        "_checks",
        "_cluster",
        "_limits",
        "_log",
        "_output",
        "_presence",
        "_rooms",
        "_says",
        "_whispers",
    )

    def __init__(
        self,
        *,
        rooms: Rooms,
        log: RoomLog,
        checks: Checks,
        presence: Presence,
        says: Says,
        cluster: ClusterView,
        whispers: Whispers,
        output: OutputBuffer,
        limits: Limits | None,
    ) -> None:
        self._rooms = rooms
        self._log = log
        self._checks = checks
        self._presence = presence
        self._says = says
        self._cluster = cluster
        self._whispers = whispers
        self._output = output
        self._limits = limits

    def join(self, client: Client, frame: Join, now: float, claim: Claim | None) -> None:
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
        joined = JoinedReply(
            room=room.name,
            name=user.name,
            token=user.token,
            members=room.member_names(),
            history=history,
            recovered=recovered,
            ref=frame.ref,
            limits=self._limits,
        )
        out = OutFrame.of(joined)
        client.limiter.charge_reply(len(out.ws))
        client.peer.deliver(out)

    def say(self, client: Client, frame: Say, now: float, wall_ms: int) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.rate(client, now)
        room = self._checks.joined(client, frame.room)
        self._says.submit(client, room.name, frame.msg, frame.ref, wall_ms)

    def typing(self, client: Client, frame: Typing, now: float) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.rate(client, now)
        room = self._checks.joined(client, frame.room)
        assert client.name is not None
        self._rooms.to_typed(room, TypingFrame(room.name, client.name), skip=client)
        if self._cluster.has_others():
            self._output.publish(TypingEvent(self._output.node, room.name, client.name))

    def leave(self, client: Client, frame: Leave, now: float) -> None:
        self._checks.room(client, frame.room)
        room = self._checks.joined(client, frame.room)
        self._checks.membership_rate(client, now)
        client.rooms.discard(room.name)
        self._rooms.unsubscribe(room, client)
        if client.user is not None:
            self._presence.settle_leave(client.user, now)
        if not client.classic:
            client.peer.deliver(OutFrame.of(LeftFrame(room.name, frame.ref)))

    def whisper(self, client: Client, frame: Whisper, now: float, wall_ms: int) -> None:
        self._checks.rate(client, now)
        self._whispers.send(client, frame, now, wall_ms)

    def history(self, client: Client, frame: HistoryRequest, now: float) -> None:
        self._checks.room(client, frame.room)
        Access.check_room(client, frame.room)
        self._checks.reply_budget(client, now)
        room = self._checks.joined(client, frame.room)
        messages, more = self._log.page(room, frame.before, frame.limit)
        if not client.classic:
            out = OutFrame.of(HistoryFrame(room.name, messages, more, frame.ref))
            client.limiter.charge_reply(len(out.ws))
            client.peer.deliver(out)

    def classic(
        self, client: Client, frame: ClassicFrame, now: float, wall_ms: int, claim: Claim | None
    ) -> None:
        """``{name, msg}``: join lobby as ``name`` if not yet joined, then say."""
        name = self._checks.name(client, frame.name)
        self._checks.rate(client, now)
        if CLASSIC_ROOM not in client.rooms:
            self.join(client, Join(room=CLASSIC_ROOM, name=name, ref=frame.ref), now, claim)
        self._says.submit(client, CLASSIC_ROOM, frame.msg, frame.ref, wall_ms)
