"""What the nodes of one chat tell each other, sans-I/O (no trio).

The events travel between nodes (JSON over Redis, or in memory); `Resync`
and `Reload` come from a node's own backplane only. See `backplane` for who
sends what and what is guaranteed. A `Reload` carries a store's `Snapshot`,
which `recent` defines below both this core and the stores (`history`), so
nothing here imports storage.
"""

from __future__ import annotations

import msgspec

from .protocol import Message
from .recent import Snapshot

__all__ = [
    "Claim",
    "Deletion",
    "Disconnect",
    "Draft",
    "Entry",
    "Event",
    "Handover",
    "Kick",
    "MemberState",
    "NodeGone",
    "NodeState",
    "Received",
    "Reload",
    "Resync",
    "SsePost",
    "SsePostResult",
    "TypingEvent",
    "WhisperEvent",
    "WhisperResult",
]

#: (room, name): a member of room; ("", name): a connected user (whisperable).
Entry = tuple[str, str]


class Draft(msgspec.Struct, frozen=True):
    """A say on its way to the sequencer: a `Message` without its id yet."""

    room: str
    name: str
    msg: str
    ts: int
    ref: str | None = None


class Claim(msgspec.Struct, frozen=True):
    """The sequencer's answer to a node that wants to speak as ``name``.

    ``status``: "new" (the name was free; ``token`` is the new one), "takeover"
    (the token matched; ``token`` is a new one, the old one no longer works;
    ``previous`` is the node that held the name, "" if
    none or dead), "shared" (an authenticated user's name, held by other
    nodes too: docs/protocol.md §15), or "taken". Names are claimed by their keys (`name_key`):
    ``name`` is the name as first bound, which a takeover keeps.
    """

    status: str
    token: str = ""
    previous: str = ""
    name: str = ""


# --- events between nodes (JSON over Redis; tagged) ---------------------------


class MemberState(msgspec.Struct, frozen=True, tag="state"):
    """``node``'s entries changed: users that joined/left rooms, came and went."""

    node: str
    add: list[Entry] = []
    remove: list[Entry] = []


class NodeState(msgspec.Struct, frozen=True, tag="node_state"):
    """``node`` wrote all its entries again (after an outage): they replace what is known."""

    node: str
    entries: list[Entry]


class NodeGone(msgspec.Struct, frozen=True, tag="gone"):
    """``node`` stopped (drained) or missed its heartbeats: drop all its entries."""

    node: str


class TypingEvent(msgspec.Struct, frozen=True, tag="typing"):
    node: str
    room: str
    name: str


class WhisperEvent(msgspec.Struct, frozen=True, tag="whisper"):
    """A whisper frame (JSON) for user ``to``, whose connection is on ``node``.

    ``node`` answers ``sender`` with a `WhisperResult` for ``request``: the
    sender's ack waits for it (a whisper is acked only once delivered). With
    no ``request`` nobody waits for an answer: a further node of a user
    connected on several (docs/protocol.md §15), or (``copy``) the sender's
    own copy for its connections there, which no whisper bound counts.
    """

    node: str
    to: str
    frame: str
    sender: str = ""
    request: int = 0
    copy: bool = False


class WhisperResult(msgspec.Struct, frozen=True, tag="whisper_result"):
    """``node``'s whisper ``request`` reached its user (``delivered``), or not:
    ``refused`` is then the error code for the sender (``no_such_user`` by default)."""

    node: str
    request: int
    delivered: bool
    refused: str = ""


class Kick(msgspec.Struct, frozen=True, tag="kick"):
    """``by`` took ``name`` over with its token: ``node`` closes the old connection."""

    node: str
    name: str
    by: str


class Handover(msgspec.Struct, frozen=True, tag="handover"):
    """``node`` hands ``name``'s rooms to ``to``, which holds them for the grace period."""

    node: str
    to: str
    name: str
    rooms: list[str]


class Deletion(msgspec.Struct, frozen=True, tag="deletion"):
    """``node`` deleted message ``id`` of ``room`` from the store (the server
    API, docs/protocol.md §16): every node drops it and tells the room."""

    node: str
    room: str
    id: str


class Disconnect(msgspec.Struct, frozen=True, tag="disconnect"):
    """Close every connection of ``user`` (a token's ``sub``, or an anonymous
    name) with 4009, on every node (the server API, docs/protocol.md §16)."""

    node: str
    user: str


class SsePost(msgspec.Struct, frozen=True, tag="sse_post"):
    """A ``POST /sse/<session>`` that reached ``sender``; the stream is on ``node``."""

    node: str
    session: str
    body: str
    sender: str
    request: int


class SsePostResult(msgspec.Struct, frozen=True, tag="sse_result"):
    node: str
    request: int
    status: int
    code: str
    message: str


Event = (
    MemberState
    | NodeState
    | NodeGone
    | TypingEvent
    | WhisperEvent
    | WhisperResult
    | Kick
    | Handover
    | Deletion
    | Disconnect
    | SsePost
    | SsePostResult
)


# --- what the backplane tells its own node only --------------------------------


class Resync(msgspec.Struct, frozen=True):
    """Every other live node's entries, after (re)connecting: replaces what is known.

    A node in ``waiting`` was in the cluster before this node reconnected and
    has not beaten since: what is known of it stays until it rewrites its
    entries (a `NodeState`) or is gone (a `NodeGone`).
    """

    states: dict[str, list[Entry]]
    waiting: frozenset[str] = frozenset()


class Reload(msgspec.Struct, frozen=True):
    """A gap in the message log could not be filled: history is replaced."""

    snapshot: Snapshot


Received = Message | Event | Resync | Reload
