"""What the client knows across connections: who it is, its rooms, its lifecycle.

`ClientState` is shared by the client's parts (`inbox`, `requests`, `outgoing`,
`incoming`, `session`, `reconnect`), each change made without an await inside,
so no lock is needed. `RoomState` is one room's part: the ``since`` of its
next rejoin and the ids already passed on. Sans-I/O.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .connection import Connection
from .errors import ConnectionEnded
from .events import Authed

__all__ = ["SEEN_PER_ROOM", "ClientState", "RoomState", "TokenSource"]

#: Message ids remembered per room, to pass each message on once.
SEEN_PER_ROOM: Final = 5000

#: A JWT, or an async function asked for a fresh one before every connection.
TokenSource = str | Callable[[], Awaitable[str]]


class RoomState:
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


class ClientState:
    """Who the client is, where it is, and whether it still runs."""

    def __init__(self, token: TokenSource | None, resume_token: str | None) -> None:
        #: `ChatClient.authenticate` swaps a plain token for the fresh one.
        self.token = token
        self.rooms: dict[str, RoomState] = {}
        #: The connection requests go out on; None while there is none.
        self.conn: Connection | None = None
        #: Reconnect attempts in a row; a connection that joins starts it afresh.
        self.attempt = 0

        self.name: str | None = None
        self.wanted_name: str | None = None
        self.resume_token = resume_token
        self.user: str | None = None
        self.authed: Authed | None = None

        #: Why the client ended for good (it will not reconnect).
        self.ended: ConnectionEnded | None = None
        #: `ChatClient.aclose` was called.
        self.closed = False

    def check_usable(self) -> None:
        """Raise why no request may be made now, if one may not."""
        if self.ended is not None:
            raise self.ended
        if self.closed:
            raise trio.ClosedResourceError("the chat client was closed")
