"""Whispers: direct messages to a connected user, on this node or another.

A whisper is not stored (docs/protocol.md §3 `whisper`): it is delivered
at once to a user connected here, or sent to the user's node, whose answer
(`WhisperResult`) decides the sender's copy and ack; no answer in time is
`unavailable`. The whispers one user receives, from everybody together,
are bounded (§9). A user with several connections (§15) gets it on every
one, on every node, and so does the sender's copy. With tokens on, a
whisper reaches only a user who shares a room with the sender (§15).
"""

from __future__ import annotations

import heapq
import itertools
import secrets

from ..events import WhisperEvent, WhisperResult
from ..frames import OutFrame
from ..protocol import AckFrame, ErrorCode, Whisper, WhisperFrame, name_key, normalize_name
from ..ratelimit import WHISPERS_IN_BURST, WHISPERS_IN_RATE, RateLimiter
from .cluster import ClusterView
from .model import Client, Refused, User, send_error
from .output import OutputBuffer
from .presence import Presence
from .rooms import Rooms

__all__ = ["Whispers"]


def _may_whisper_to(user: User, now: float) -> bool:
    """Take one token of the bound on whispers ``user`` receives (docs/protocol.md §9)."""
    bucket = user.whispers_in
    if bucket is None:
        bucket = user.whispers_in = RateLimiter(WHISPERS_IN_RATE, WHISPERS_IN_BURST, now)
    return bucket.allow(now)


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


class Whispers:
    """Whisper ids, and the whispers waiting for another node's answer.

    Args:
        epoch: the stored history's epoch, in every whisper id.
        remote_timeout: seconds a whisper waits for its user's node.
    """

    __slots__ = (
        "_cluster",
        "_deadlines",
        "_ids",
        "_output",
        "_presence",
        "_remote_timeout",
        "_requests",
        "_rooms",
        "_waiting",
        "backplane_up",
        "prefix",
    )

    def __init__(
        self,
        rooms: Rooms,
        presence: Presence,
        cluster: ClusterView,
        output: OutputBuffer,
        *,
        epoch: str,
        remote_timeout: float,
    ) -> None:
        self._rooms = rooms
        self._presence = presence
        self._cluster = cluster
        self._output = output
        self._remote_timeout = remote_timeout
        # Whispers are not stored: a per-process prefix keeps their ids unique
        # across restarts that keep the (stored) epoch.
        self.prefix = f"{epoch}-w{secrets.token_hex(3)}."
        self._ids = itertools.count(1)
        #: Whispers sent to another node, waiting for its `WhisperResult`.
        self._waiting: dict[int, _RemoteWhisper] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._requests = itertools.count(1)
        #: Whether events reach the other nodes now (set by the hub each step):
        #: a whisper for another node is refused, not acked, while they do not.
        self.backplane_up = True

    def send(self, client: Client, frame: Whisper, now: float, wall_ms: int) -> None:
        """A `whisper` frame (past the rate check).

        Raises:
            Refused: no name yet, nobody of that name connected (or, with
                tokens on, in no room with the sender), the user gets too many
                whispers, or its node is out of reach.
        """
        if client.name is None or client.user is None:
            raise Refused(ErrorCode.NOT_JOINED, "join a room first: whispers need a name")
        # `to` names a user by key (docs/protocol.md §3): "Alice" reaches "alice".
        typed = normalize_name(frame.to)
        key = name_key(typed) if typed is not None else None
        target = self._presence.users.get(key) if key is not None else None
        local = list(target.clients) if target is not None else []
        elsewhere = self._cluster.online(key) if key is not None else None
        if key is None or (not local and elsewhere is None):
            raise Refused(ErrorCode.NO_SUCH_USER, f"nobody is called {frame.to}")
        if target is not None and local:
            to = target.name
        else:
            assert elsewhere is not None
            to = elsewhere[1] or typed or ""
        if client.identity is not None and not self._share_a_room(client.user, to):
            # The same answer as for nobody: it reveals nothing (§15).
            raise Refused(ErrorCode.NO_SUCH_USER, f"nobody is called {frame.to}")
        if target is not None and local and not _may_whisper_to(target, now):
            raise Refused(ErrorCode.RATE_LIMITED, f"{to} gets too many whispers: try again")
        whisper_id = f"{self.prefix}{next(self._ids)}"
        out = OutFrame.of(
            WhisperFrame(whisper_id, client.name, to, client.name, frame.msg, wall_ms)
        )
        # Further nodes of a user with several connections (§15): no answer awaited.
        other_nodes = sorted(elsewhere[0]) if elsewhere is not None else []
        if not local:
            first, *other_nodes = other_nodes
            self._send_to_node(client, first, whisper_id, out, frame.ref, to, now)
        if client.identity is not None:
            for node in other_nodes:
                self._output.publish(WhisperEvent(node, to, out.json.decode()))
        if not local:
            return
        for target_client in local:
            target_client.peer.deliver(out)
        self._copy_to_sender(client, out, skip=local)
        if frame.ref is not None and not client.classic:
            client.peer.deliver(OutFrame.of(AckFrame(frame.ref, whisper_id)))

    def _share_a_room(self, user: User, name: str) -> bool:
        """Whether the user called ``name`` is a member of one of ``user``'s rooms."""
        rooms = self._rooms.rooms
        for room_name in user.rooms:
            room = rooms.get(room_name)
            if room is not None and (name in room.members or name in room.remote):
                return True
        return False

    def _copy_to_sender(self, client: Client, out: OutFrame, skip: list[Client]) -> None:
        """The sender's copy, on each of its user's connections here (and, for a
        user with several, on its other nodes: §15)."""
        user = client.user
        if user is None or user.sub is None:
            if client not in skip:
                client.peer.deliver(out)
            return
        for own in user.clients:
            if own not in skip:
                own.peer.deliver(out)
        elsewhere = self._cluster.online(user.key)
        if elsewhere is not None:
            for node in sorted(elsewhere[0]):
                self._output.publish(WhisperEvent(node, user.name, out.json.decode(), copy=True))

    def _send_to_node(
        self,
        client: Client,
        node: str,
        whisper_id: str,
        out: OutFrame,
        ref: str | None,
        to: str,
        now: float,
    ) -> None:
        """The user's node delivers it, if the user is still connected there (it
        may be in its grace period), and answers: the sender's copy and ack wait
        for that answer (`result`). (One node holds a connected user; ``node``
        is the least of them, to be deterministic.)"""
        if not self.backplane_up:
            raise Refused(
                ErrorCode.UNAVAILABLE, f"{to} is on another node, out of reach: try again"
            )
        request = next(self._requests)
        self._waiting[request] = _RemoteWhisper(client, whisper_id, out, ref, to)
        heapq.heappush(self._deadlines, (now + self._remote_timeout, request))
        self._output.publish(
            WhisperEvent(node, to, out.json.decode(), self._cluster.node, request)
        )

    def arrived(self, event: WhisperEvent, now: float) -> None:
        """A whisper from another node for a user here: deliver it, and answer."""
        if event.node != self._cluster.node:
            return
        user = self._presence.users.get(name_key(event.to))
        targets = list(user.clients) if user is not None else []
        refused = ""
        if user is None or not targets:
            refused = ErrorCode.NO_SUCH_USER
        elif not event.copy and not _may_whisper_to(user, now):
            refused = ErrorCode.RATE_LIMITED
        else:
            out = OutFrame(event.frame.encode())
            for target in targets:
                target.peer.deliver(out)
        if event.request:
            self._output.publish(WhisperResult(event.sender, event.request, not refused, refused))

    def result(self, result: WhisperResult) -> None:
        """The answer to a whisper this node sent to another: copy and ack, or the error."""
        if result.node != self._cluster.node:
            return
        whisper = self._waiting.pop(result.request, None)
        if whisper is None or whisper.client.gone:
            return  # answered already (timed out), or nobody to tell
        client = whisper.client
        if not result.delivered:
            if result.refused == ErrorCode.RATE_LIMITED:
                message = f"{whisper.to} gets too many whispers: try again"
                send_error(client, ErrorCode.RATE_LIMITED, message, whisper.ref)
            else:
                message = f"nobody is called {whisper.to}"
                send_error(client, ErrorCode.NO_SUCH_USER, message, whisper.ref)
            return
        self._copy_to_sender(client, whisper.frame, skip=[])
        if whisper.ref is not None and not client.classic:
            client.peer.deliver(OutFrame.of(AckFrame(whisper.ref, whisper.id)))

    def next_deadline(self) -> float:
        """When the oldest whisper sent to another node times out (``inf``: none)."""
        return self._deadlines[0][0] if self._deadlines else float("inf")

    def expire(self, now: float) -> None:
        """Answer every whisper whose node did not answer in time."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, request = heapq.heappop(deadlines)
            whisper = self._waiting.pop(request, None)
            if whisper is not None and not whisper.client.gone:
                send_error(
                    whisper.client,
                    ErrorCode.UNAVAILABLE,
                    f"no answer from the node of {whisper.to}: it may not have been delivered",
                    whisper.ref,
                )
