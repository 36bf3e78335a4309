"""The frames the server sends and the events the client yields, as msgspec structs.

Server frames (docs/protocol.md §4) are frozen, tagged structs; unknown fields
are ignored and unknown frame types skipped, for forward compatibility. The
client makes four events of its own (`Disconnected`, `Rejoined`,
`RejoinFailed`, `EventsDropped`). Also here: the decoders for what comes in
and the encoder for what goes out. Sans-I/O.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = [
    "ANSWERS",
    "Ack",
    "Authed",
    "Deleted",
    "Disconnected",
    "Event",
    "EventsDropped",
    "HistoryPage",
    "Joined",
    "Left",
    "Limits",
    "Message",
    "Presence",
    "RejoinFailed",
    "Rejoined",
    "ServerError",
    "ServerFrame",
    "Typing",
    "Whisper",
    "decode_any",
    "decode_frame",
    "encode",
]


class Message(msgspec.Struct, frozen=True, tag="message", tag_field="type"):
    """A message in a room (also an item of `Joined.history` and `HistoryPage`)."""

    room: str
    id: str
    name: str
    msg: str
    ts: int


class Limits(msgspec.Struct, frozen=True):
    """The server's limits (`Joined.limits`, docs/protocol.md §4); None: not told.

    ``say_rate`` (per second per connection, 0: no limit) and ``say_burst`` are
    the server's rate limit of says, typings and whispers: the client paces
    itself under them (`connect`'s ``send_rate``)."""

    msg_chars: int | None = None
    frame_bytes: int | None = None
    rooms: int | None = None
    say_rate: float | None = None
    say_burst: int | None = None


class Joined(msgspec.Struct, frozen=True, tag="joined", tag_field="type"):
    """The answer to `ChatClient.join`; ``limits`` is None from a server that
    does not tell them."""

    room: str
    name: str
    token: str | None = None
    members: tuple[str, ...] = ()
    history: tuple[Message, ...] = ()
    recovered: bool = True
    ref: str | None = None
    limits: Limits | None = None


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    ref: str
    id: str


class Presence(msgspec.Struct, frozen=True, tag="presence", tag_field="type"):
    """Somebody else joined or left a room (``event`` is ``join`` or ``leave``)."""

    room: str
    event: str
    name: str


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    """Somebody else is typing in a room."""

    room: str
    name: str


class Whisper(
    msgspec.Struct, frozen=True, tag="whisper", tag_field="type", rename={"from_": "from"}
):
    """A direct message, to us or (the sender's copy) from us."""

    id: str
    from_: str
    to: str
    msg: str
    ts: int


class Left(msgspec.Struct, frozen=True, tag="left", tag_field="type"):
    room: str
    ref: str | None = None


class HistoryPage(msgspec.Struct, frozen=True, tag="history", tag_field="type"):
    """The answer to `ChatClient.history`: ``messages`` oldest first; ``more``
    is true when the server keeps older ones."""

    room: str
    messages: tuple[Message, ...] = ()
    more: bool = False
    ref: str | None = None


class ServerError(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """An ``error`` frame that answers none of our pending requests."""

    code: str
    message: str = ""
    ref: str | None = None


class Authed(msgspec.Struct, frozen=True, tag="authed", tag_field="type"):
    """The answer to ``auth`` (docs/protocol.md §15): who the token says we are."""

    user: str
    name: str
    exp: int
    ref: str | None = None


class Deleted(msgspec.Struct, frozen=True, tag="deleted", tag_field="type"):
    """An operator deleted message ``id`` of ``room``."""

    room: str
    id: str


# Events made by the client itself, not by the server.


class Disconnected(msgspec.Struct, frozen=True):
    """The connection was lost (or an attempt failed); the next attempt is in ``delay`` s."""

    code: int | None
    reason: str
    delay: float
    attempt: int


class Rejoined(msgspec.Struct, frozen=True):
    """A room was joined again after a reconnect.

    The replayed messages not seen before follow as `Message` events. With
    ``joined.recovered`` false the gap could not be filled: page back with
    `ChatClient.history_pages` if it matters.
    """

    joined: Joined


class RejoinFailed(msgspec.Struct, frozen=True):
    """A room could not be joined again after a reconnect; it is dropped."""

    room: str
    code: str
    message: str


class EventsDropped(msgspec.Struct, frozen=True):
    """The event buffer was full: the ``count`` oldest events were dropped here."""

    count: int


#: What iterating over a `ChatClient` yields.
Event = (
    Message
    | Presence
    | Typing
    | Whisper
    | Deleted
    | ServerError
    | Disconnected
    | Rejoined
    | RejoinFailed
    | EventsDropped
)

#: Every frame the server may send.
ServerFrame = (
    Message
    | Joined
    | Ack
    | Presence
    | Typing
    | Whisper
    | Left
    | HistoryPage
    | ServerError
    | Authed
) | Deleted

#: For answers matched by ``ref`` alone: the request kind each one answers.
ANSWERS: Final[dict[type, str]] = {HistoryPage: "history", Left: "leave", Authed: "auth"}

_decoder: Final = msgspec.json.Decoder(ServerFrame)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


def decode_frame(text: str) -> ServerFrame:
    """The server frame in ``text``.

    Raises:
        msgspec.ValidationError: JSON, but no frame we know (or the wrong shape).
        msgspec.DecodeError: not JSON.
    """
    return _decoder.decode(text)


def decode_any(text: str) -> object:
    """``text`` as plain JSON (to find the ``ref`` of a frame that did not decode)."""
    return _any_decoder.decode(text)


def encode(frame: dict[str, object]) -> str:
    """A client frame as the text to send."""
    return _encoder.encode(frame).decode()
