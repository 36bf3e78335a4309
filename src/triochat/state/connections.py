"""The connection registry: which connections are open, what mode each is in,
and whether a frame of theirs is let in.

A connection registers when it opens and leaves when it closes (sync calls:
a cancelled connection cannot tear them). Its first frame decides its mode
for good (docs/protocol.md §7): classic (`{name, msg}`: message, whisper and
error frames only) or typed; a connection on `/` is a lobby listener until
then. With tokens on, `access` then decides whether the frame is taken. A
connection that only sends what is refused is closed (§9).
"""

from __future__ import annotations

from ..identity import TokenCheck
from ..protocol import ClassicFrame, ClientFrame, CloseCode
from .access import Access
from .model import Client, send_error
from .presence import Presence
from .rooms import Rooms

__all__ = ["Connections"]


class Connections:
    """Every open connection of this node."""

    __slots__ = ("_access", "_presence", "_rooms", "clients")

    def __init__(self, rooms: Rooms, presence: Presence, access: Access) -> None:
        self._rooms = rooms
        self._presence = presence
        self._access = access
        #: Every registered connection (a dict: ordered, and cheap to remove from).
        self.clients: dict[Client, None] = {}

    def connect(self, client: Client, now: float) -> None:
        """Register a new connection (a lobby listener starts hearing lobby); with
        tokens on, it has the handshake timeout to authenticate."""
        self.clients[client] = None
        if client.lobby_listener:
            self._rooms.listen_to_lobby(client)
        self._access.connected(client, now)

    def disconnect(self, client: Client, now: float) -> None:
        """The connection is gone: its user's rooms are held (`Presence`)."""
        self.clients.pop(client, None)
        if client.gone:
            return
        self._rooms.drop(client)
        self._presence.connection_lost(client, now)

    def admit(self, client: Client, frame: ClientFrame | TokenCheck | None) -> bool:
        """Whether ``frame`` (None: one that did not decode) is to be handled:
        not for a closed connection, nor one `Access` turns away. A first frame
        decides the mode even so."""
        if client.gone:
            return False
        if client.mode is None:
            self._decide_mode(client, frame)
        return self._access.admit(client, frame)

    def _decide_mode(self, client: Client, frame: ClientFrame | TokenCheck | None) -> None:
        # A classic lobby listener stays in lobby's classic subscribers: it
        # becomes a classic member there. A typed one stops listening.
        if isinstance(frame, ClassicFrame):
            client.mode = "classic"
        else:
            client.mode = "typed"
            if client.lobby_listener:
                self._rooms.stop_listening_to_lobby(client)
        client.lobby_listener = False

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
