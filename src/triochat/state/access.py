"""Access: which connections have authenticated, as whom, and until when.

Off unless the server has a token key (docs/protocol.md §15). Then a
connection's first frame must be `auth`; anything else, a refused token, or
no token within the handshake timeout is answered `unauthorized` and closed
with 4003, and so is a connection whose token's ``exp`` passes without a
fresh `auth`. A token's ``rooms`` limit every frame that names a room
(`forbidden`). The token itself is verified before the hub sees it (in the
connection's task: `auth.TokenVerifier`); this part gets the verdict.
"""

from __future__ import annotations

import heapq
import itertools

from ..frames import OutFrame
from ..identity import Identity, TokenCheck
from ..protocol import (
    Auth,
    AuthedFrame,
    ClassicFrame,
    ClientFrame,
    CloseCode,
    ErrorCode,
    name_key,
    normalize_name,
)
from .model import Client, Refused, send_error

__all__ = ["Access"]


class Access:
    """The identities of this node's connections, and their 4003 deadlines.

    Args:
        authenticating: whether the server has a token key.
        handshake_timeout: seconds a new connection has to authenticate.
    """

    __slots__ = ("_deadlines", "_handshake_timeout", "_tiebreak", "authenticating")

    def __init__(self, *, authenticating: bool, handshake_timeout: float) -> None:
        self.authenticating = authenticating
        self._handshake_timeout = handshake_timeout
        self._deadlines: list[tuple[float, int, Client]] = []
        self._tiebreak = itertools.count()

    def connected(self, client: Client, now: float) -> None:
        """A new connection: with tokens on, it has the handshake timeout to send one."""
        if self.authenticating:
            self._close_at(client, now + self._handshake_timeout)

    def admit(self, client: Client, frame: ClientFrame | TokenCheck | None) -> bool:
        """Whether ``frame`` (None: one that did not decode) may be handled.

        With tokens on, only a verdict on `auth` is taken before the connection
        has authenticated, and a classic frame never (it cannot carry a token):
        anything else is `unauthorized`, then 4003.
        """
        if not self.authenticating:
            return True
        if isinstance(frame, TokenCheck):
            return True
        if client.identity is not None and not isinstance(frame, ClassicFrame):
            return True
        why = (
            "classic frames cannot authenticate"
            if isinstance(frame, ClassicFrame)
            else "send an `auth` frame with your token first"
        )
        ref = frame.ref if frame is not None else None
        send_error(client, ErrorCode.UNAUTHORIZED, why, ref)
        client.peer.close_soon(CloseCode.UNAUTHENTICATED, "not authenticated")
        return False

    def authenticate(
        self, client: Client, check: TokenCheck | Auth, now: float, wall_ms: int
    ) -> None:
        """The verdict on an `auth` frame: `authed` and a new deadline, or 4003.

        Raises:
            Refused: tokens are off on this server (`unauthorized`, the
                connection stays: it can join with a name).
        """
        if isinstance(check, Auth):
            raise Refused(ErrorCode.UNAUTHORIZED, "this server takes no tokens: join with a name")
        identity = check.identity
        if identity is not None and client.identity is not None:
            if identity.sub != client.identity.sub:
                identity, error = None, "a fresh token must be for the same user"
        else:
            error = check.error
        if identity is None:
            send_error(client, ErrorCode.UNAUTHORIZED, error or "the token was refused", check.ref)
            client.peer.close_soon(CloseCode.UNAUTHENTICATED, "token refused")
            return
        client.identity = identity
        # `exp` is wall-clock time; the deadline runs on the hub's clock.
        self._close_at(client, now + max(0.0, identity.exp - wall_ms / 1000))
        # A name bound before a refresh stays (the user is the same `sub`).
        name = client.name or identity.name
        client.peer.deliver(OutFrame.of(AuthedFrame(identity.sub, name, identity.exp, check.ref)))

    @staticmethod
    def name_of(identity: Identity, requested: str | None) -> str:
        """The name an authenticated join binds: its token's.

        Raises:
            Refused: ``requested`` is another name (`bad_name`).
        """
        if requested is not None:
            typed = normalize_name(requested)
            if typed is None or name_key(typed) != name_key(identity.name):
                raise Refused(
                    ErrorCode.BAD_NAME,
                    f"your token names you {identity.name}: join without a name",
                )
        return identity.name

    @staticmethod
    def check_room(client: Client, room: str) -> None:
        """Refuse a room the connection's token does not grant (`forbidden`)."""
        identity = client.identity
        if identity is not None and not identity.may_use(room):
            raise Refused(ErrorCode.FORBIDDEN, f"your token does not grant the room {room}")

    def next_deadline(self) -> float:
        """When `expire` must next run (``inf`` when no deadline runs)."""
        return self._deadlines[0][0] if self._deadlines else float("inf")

    def expire(self, now: float) -> None:
        """Close (4003) every connection whose handshake timeout or token ran out."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, _, client = heapq.heappop(deadlines)
            if client.auth_deadline != deadline or client.gone:
                continue  # refreshed since, or closed
            client.auth_deadline = None
            reason = "token expired" if client.identity is not None else "not authenticated"
            client.peer.close_soon(CloseCode.UNAUTHENTICATED, reason)

    def _close_at(self, client: Client, deadline: float) -> None:
        client.auth_deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), client))
