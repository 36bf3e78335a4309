"""A Python client for triochat, on trio-websocket (docs/python-client.md).

::

    async with triochat.client.connect("ws://127.0.0.1:8181/ws") as chat:
        await chat.join("lobby", name="bot")
        msg_id = await chat.say("lobby", "hello")
        async for event in chat:
            ...

Written against the wire protocol (docs/protocol.md), not against the
server's code. The rules the code keeps, each stated in full where it is kept:

- Rule 1 (`session`): one reader task per connection takes every frame off
  the socket at once and handles it without awaiting (`incoming`); events go
  to a bounded buffer that drops its oldest entry when full (`inbox`).
- Rule 2 (`requests`): every request with an answer carries a fresh ``ref``;
  answers are matched by ``ref`` alone.
- Rule 3 (`outgoing`): one writer task per connection sends requests in the
  order they were made; a room's requests wait until it is joined again.
- Rule 4 (`requests`): a say keeps its ``ref`` for life, so nothing acked is
  lost and nothing is stored twice.

The modules, each importing only those above it:

- `errors`: the exceptions (`ClientError`, `ConnectionEnded` and its kinds);
- `events`: server frames and client events as msgspec structs, the codecs;
- `pacing`: `Backoff` between reconnects, the send bucket;
- `connection`: one connection's record (`Connection`, `End`), the `Endpoint`;
- `state`: who the client is, its rooms, whether it still runs;
- `inbox`: the bounded event buffer `receive` reads;
- `requests`: the pending requests, their refs, what a reconnect settles;
- `outgoing`: which request goes out next, and its frame;
- `incoming`: what each server frame does;
- `session`: one connection's tasks (connect, auth, reader, keepalive, writer);
- `reconnect`: the main task, connection after connection with backoff;
- `chatclient`: `ChatClient`, the facade, and `connect`.
"""

from __future__ import annotations

# The `X as X` names are reachable as before though not in `__all__`: the
# token type and the limits the client keeps.
from .chatclient import MAX_HISTORY_LIMIT as MAX_HISTORY_LIMIT
from .chatclient import ChatClient, connect
from .errors import (
    AuthenticationFailed,
    ClientError,
    ConnectFailed,
    ConnectionEnded,
    DeliveryUnknown,
    DisconnectedByOperator,
    PolicyViolation,
    Replaced,
)
from .events import (
    Ack,
    Authed,
    Deleted,
    Disconnected,
    Event,
    EventsDropped,
    HistoryPage,
    Joined,
    Left,
    Limits,
    Message,
    Presence,
    Rejoined,
    RejoinFailed,
    ServerError,
    Typing,
    Whisper,
)
from .pacing import Backoff
from .session import LIBRARY_QUEUE as LIBRARY_QUEUE
from .session import MAX_MESSAGE_CHARS as MAX_MESSAGE_CHARS
from .state import SEEN_PER_ROOM as SEEN_PER_ROOM
from .state import TokenSource as TokenSource

__all__ = [
    "Ack",
    "Authed",
    "AuthenticationFailed",
    "Backoff",
    "ChatClient",
    "ClientError",
    "ConnectFailed",
    "ConnectionEnded",
    "Deleted",
    "DeliveryUnknown",
    "Disconnected",
    "DisconnectedByOperator",
    "Event",
    "EventsDropped",
    "HistoryPage",
    "Joined",
    "Left",
    "Limits",
    "Message",
    "PolicyViolation",
    "Presence",
    "RejoinFailed",
    "Rejoined",
    "Replaced",
    "ServerError",
    "Typing",
    "Whisper",
    "connect",
]
