"""The connection registry: which connections are open, and what mode each is in.

A connection registers when it opens and leaves when it closes (sync calls:
a cancelled connection cannot tear them). Its first frame decides its mode
for good (docs/protocol.md §7): classic (`{name, msg}`: message, whisper and
error frames only) or typed. A connection that only sends what is refused is
closed (§9).
"""

from __future__ import annotations

from ..identity import TokenCheck
from ..protocol import ClassicFrame, ClientFrame, CloseCode
from .model import Client, send_error
from .presence import Presence
from .rooms import Rooms

__all__ = ["Connections"]


class Connections:
    """Every open connection of this node."""

    __slots__ = ("_presence", "_rooms", "clients")

    def __init__(self, rooms: Rooms, presence: Presence) -> None:
        self._rooms = rooms
        self._presence = presence
        #: Every registered connection (a dict: ordered, and cheap to remove from).
        self.clients: dict[Client, None] = {}

    def connect(self, client: Client) -> None:
        """Register a new connection (a `/` listener starts hearing lobby)."""
        self.clients[client] = None
        if client.listener:
            self._rooms.listen(client)

    def disconnect(self, client: Client, now: float) -> None:
        """The connection is gone: its user's rooms are held (`Presence`)."""
        self.clients.pop(client, None)
        if client.gone:
            return
        self._rooms.drop(client)
        self._presence.connection_lost(client, now)

    def decide_mode(self, client: Client, frame: ClientFrame | TokenCheck | None) -> None:
        """The first frame (None: one that was not a frame) decides the mode."""
        # A classic `/` listener stays in lobby's listeners: it becomes a
        # classic member there. A typed one stops listening.
        if isinstance(frame, ClassicFrame):
            client.mode = "classic"
            client.classic = True
        else:
            client.mode = "typed"
            if client.listener:
                self._rooms.unlisten(client)
        client.listener = False

    @staticmethod
    def refused(
        client: Client, code: str, message: str, ref: str | None, now: float | None
    ) -> None:
        """Answer a refused frame; the 100th refusal within 60 s closes with 1008
        (docs/protocol.md section 9): a client that only sends what is refused
        (bad JSON, rate-limited says, ...) is not answered forever."""
        send_error(client, code, message, ref)
        if now is not None and client.limiter.record_drop(now):
            client.peer.close_soon(CloseCode.POLICY_VIOLATION, "too many refused frames")
