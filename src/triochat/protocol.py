"""The wire protocol (docs/protocol.md §2-4), sans-I/O: frames in, frames out.

Rules of this module:

1. It never imports trio and never does I/O; a test asserts it.
2. ``decode_client_frame`` either returns a structurally valid frame or raises
   `ClientProtocolError` with the documented error code. Any other exception
   out of it is a bug.
3. Checks that need no state run here (JSON, shape, types, empty `msg`, `ref`,
   `limit`, `msg` length: the `bad_frame` and `too_long` steps of §2). The
   later steps (`bad_name`, `bad_room`, rate, state) need the connection's
   state and run in `chat.py`, in the order §2 gives.

The name rules (§2.1: `normalize_name`, `name_key`, `confusable_key`) are
names.py's, re-exported here; a room name's rule (`is_valid_room`) is here.
"""

from __future__ import annotations

import enum
import re
from typing import Final, Literal

import msgspec

from .errors import ClientProtocolError

# The name rules live in names.py; re-exported here, where callers have
# always imported them from.
from .names import (
    FORBIDDEN_NAME_CATEGORIES,
    INVISIBLE_NAME_RANGES,
    MAX_NAME_CHARS,
    RESERVED_NAMES,
    confusable_key,
    name_key,
    normalize_name,
    skeleton,
)

__all__ = [
    "FORBIDDEN_NAME_CATEGORIES",
    "INVISIBLE_NAME_RANGES",
    "MAX_HISTORY_LIMIT",
    "MAX_NAME_CHARS",
    "MAX_REF_CHARS",
    "MAX_ROOM_CHARS",
    "RESERVED_NAMES",
    "Auth",
    "AuthedFrame",
    "ClassicFrame",
    "ClientFrame",
    "CloseCode",
    "DeletedFrame",
    "ErrorCode",
    "ErrorFrame",
    "HistoryFrame",
    "HistoryRequest",
    "Join",
    "JoinedFrame",
    "JoinedReply",
    "Leave",
    "LeftFrame",
    "Message",
    "PresenceFrame",
    "Say",
    "Typing",
    "TypingFrame",
    "Whisper",
    "WhisperFrame",
    "confusable_key",
    "decode_client_frame",
    "encode",
    "is_valid_room",
    "make_id",
    "msg_problem",
    "name_key",
    "normalize_name",
    "seq_of",
    "skeleton",
]

MAX_REF_CHARS: Final = 64
MAX_ROOM_CHARS: Final = 64  # a room name's length; ROOM_PATTERN is built from it
DEFAULT_HISTORY_LIMIT: Final = 50
MAX_HISTORY_LIMIT: Final = 200
ROOM_PATTERN: Final = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_ROOM_CHARS - 1}}}")


class CloseCode(enum.IntEnum):
    """Every WebSocket close code docs/protocol.md §11 names."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # a binary frame
    POLICY_VIOLATION = 1008  # abuse (rate-limit drops)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # slow consumer
    REPLACED = 4001  # taken over with the resume token
    UNAUTHENTICATED = 4003  # no token, a refused one, or it expired (§15)
    DISCONNECTED = 4009  # by an operator (the server API, §16): do not come back


class ErrorCode(enum.StrEnum):
    """Every `error.code` of docs/protocol.md §5."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    NOT_JOINED = "not_joined"
    NAME_TAKEN = "name_taken"
    BAD_NAME = "bad_name"
    BAD_ROOM = "bad_room"
    NO_SUCH_USER = "no_such_user"
    RATE_LIMITED = "rate_limited"
    TOO_LONG = "too_long"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNAUTHORIZED = "unauthorized"  # authentication (§15)
    FORBIDDEN = "forbidden"  # a room the token does not grant (§15)
    NO_SUCH_MESSAGE = "no_such_message"  # the server API's delete (§16)


# --- client -> server ------------------------------------------------------
# Unknown fields are ignored (forward compatibility); missing or wrongly typed
# ones are `bad_frame`.


class Join(msgspec.Struct, frozen=True, tag="join", tag_field="type"):
    room: str
    name: str | None = None
    since: str | None = None
    token: str | None = None
    #: With ``token``: take the name over with a new token, the one used stops
    #: working (docs/protocol.md §6; an extension, off unless asked for).
    rotate: bool = False
    ref: str | None = None


class Say(msgspec.Struct, frozen=True, tag="say", tag_field="type"):
    room: str
    msg: str
    ref: str | None = None


class Leave(msgspec.Struct, frozen=True, tag="leave", tag_field="type"):
    room: str
    ref: str | None = None


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    room: str
    ref: str | None = None


class Whisper(msgspec.Struct, frozen=True, tag="whisper", tag_field="type"):
    to: str
    msg: str
    ref: str | None = None


class Auth(msgspec.Struct, frozen=True, tag="auth", tag_field="type"):
    """A connection token (docs/protocol.md §15): the first frame when the
    server authenticates, and again before ``exp`` to refresh it."""

    token: str
    ref: str | None = None


class HistoryRequest(msgspec.Struct, frozen=True, tag="history", tag_field="type"):
    room: str
    before: str | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    ref: str | None = None


class ClassicFrame(msgspec.Struct, frozen=True):
    """The 2012 page's frame: ``{"name": …, "msg": …}`` with no ``type``."""

    name: str
    msg: str
    ref: str | None = None


#: Frames with a ``type`` (a tagged union); the classic frame has none.
TypedClientFrame = Join | Say | Leave | Typing | Whisper | HistoryRequest | Auth
ClientFrame = TypedClientFrame | ClassicFrame

_typed_decoder: Final = msgspec.json.Decoder(TypedClientFrame)
_classic_decoder: Final = msgspec.json.Decoder(ClassicFrame)
_any_decoder: Final = msgspec.json.Decoder()


def _ref_of(obj: object) -> str | None:
    """The `ref` to echo from an undecodable frame, if it has a usable one."""
    if isinstance(obj, dict):
        ref = obj.get("ref")
        if isinstance(ref, str) and 1 <= len(ref) <= MAX_REF_CHARS:
            return ref
    return None


def decode_client_frame(text: str | bytes, *, max_msg_chars: int) -> ClientFrame:
    """Decode one client text frame and run the stateless checks of §2.

    Args:
        text: the frame's payload.
        max_msg_chars: the configured `msg` limit (`too_long` above it).

    Returns:
        A typed frame, or a `ClassicFrame` for a frame without ``type``.

    Raises:
        ClientProtocolError: `bad_json`, `bad_frame` or `too_long`. Anything
            else is a bug.
    """
    try:
        frame: ClientFrame = _typed_decoder.decode(text)
    except msgspec.ValidationError as exc:
        frame = _decode_untyped(text, exc)
    except (msgspec.DecodeError, UnicodeError):
        # UnicodeError: a str holding a lone surrogate (not from a WebSocket,
        # whose text is valid UTF-8, but from any other caller).
        raise ClientProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    except RecursionError:
        raise ClientProtocolError(ErrorCode.BAD_FRAME, "frame is nested too deeply") from None
    try:
        _check_fields(frame, max_msg_chars)
    except ClientProtocolError as exc:
        exc.classic = isinstance(frame, ClassicFrame)
        raise
    return frame


def _decode_untyped(text: str | bytes, exc: msgspec.ValidationError) -> ClientFrame:
    """Second chance for a frame the typed union refused: maybe a classic one."""
    # The typed decode stops at the first mismatch, so the rest of the text
    # may still be broken JSON: decode it all before judging the shape.
    try:
        obj = _any_decoder.decode(text)
    except (msgspec.DecodeError, UnicodeError):
        raise ClientProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    except RecursionError:
        raise ClientProtocolError(ErrorCode.BAD_FRAME, "frame is nested too deeply") from None
    ref = _ref_of(obj)
    if not isinstance(obj, dict):
        raise ClientProtocolError(ErrorCode.BAD_FRAME, "a frame must be a JSON object", ref)
    if "type" in obj:
        raise ClientProtocolError(ErrorCode.BAD_FRAME, f"bad frame: {exc}", ref)
    if "name" not in obj or "msg" not in obj:
        raise ClientProtocolError(ErrorCode.BAD_FRAME, "frame has no `type`", ref)
    try:
        return _classic_decoder.decode(text)
    except msgspec.ValidationError as classic_exc:
        raise ClientProtocolError(
            ErrorCode.BAD_FRAME, f"bad frame: {classic_exc}", ref, classic=True
        ) from None


def _check_fields(frame: ClientFrame, max_msg_chars: int) -> None:
    ref = frame.ref
    if ref is not None and not 1 <= len(ref) <= MAX_REF_CHARS:
        raise ClientProtocolError(
            ErrorCode.BAD_FRAME, f"`ref` must be 1-{MAX_REF_CHARS} characters"
        )
    if isinstance(frame, HistoryRequest) and not 1 <= frame.limit <= MAX_HISTORY_LIMIT:
        raise ClientProtocolError(
            ErrorCode.BAD_FRAME, f"`limit` must be 1-{MAX_HISTORY_LIMIT}", ref
        )
    if isinstance(frame, Say | Whisper | ClassicFrame):
        problem = msg_problem(frame.msg, max_msg_chars)
        if problem is not None:
            raise ClientProtocolError(*problem, ref)


def msg_problem(msg: str, max_msg_chars: int) -> tuple[ErrorCode, str] | None:
    """Why ``msg`` cannot be a message's text (empty, or over ``--max-msg-chars``):
    the error code and message a frame or an API call gets; None when it can."""
    if not msg:
        return ErrorCode.BAD_FRAME, "`msg` must not be empty"
    if len(msg) > max_msg_chars:
        return ErrorCode.TOO_LONG, f"`msg` is longer than {max_msg_chars} characters"
    return None


def is_valid_room(room: str) -> bool:
    """True when ``room`` is 1-`MAX_ROOM_CHARS` of ``[a-z0-9_-]``, starting with
    ``[a-z0-9]`` (`ROOM_PATTERN`, docs/protocol.md §2)."""
    return ROOM_PATTERN.fullmatch(room) is not None


# --- message ids ----------------------------------------------------------
# Opaque to clients. The server's own format: "<epoch>-<seq>", where the epoch
# names one history store's lifetime and seq grows by one per message.


def make_id(epoch: str, seq: int) -> str:
    """The message id for sequence number ``seq`` of a store's ``epoch``."""
    return f"{epoch}-{seq}"


#: Digits of the largest sequence number (a signed 64-bit counter, as Redis's INCR).
MAX_SEQ_DIGITS: Final = 19


def seq_of(epoch: str, message_id: str) -> int | None:
    """The sequence number inside one of ``epoch``'s ids; None for any other id.

    Ids come back from clients (``since``, ``before``): more digits than a
    sequence number ever has is an id never issued, not an ``int()`` to try
    (Python refuses over 4300 digits).
    """
    head, _, digits = message_id.rpartition("-")
    if (
        head != epoch
        or len(digits) > MAX_SEQ_DIGITS
        or not digits.isdigit()
        or not digits.isascii()
    ):
        return None
    return int(digits)


# --- server -> client ------------------------------------------------------
# omit_defaults drops a None `ref`, so frames carry only what §4 shows.


class Message(msgspec.Struct, frozen=True, tag="message", tag_field="type"):
    room: str
    id: str
    name: str
    msg: str
    ts: int


class Limits(msgspec.Struct, frozen=True):
    """The server's limits a client needs to know (docs/protocol.md §4 `joined`)."""

    #: Longest `msg`, in code points (``--max-msg-chars``).
    msg_chars: int
    #: Largest frame, in bytes (``--max-frame-bytes``).
    frame_bytes: int
    #: Rooms one connection may be in (``--max-rooms``).
    rooms: int
    #: Says, typings and whispers per second per connection (``--rate``; 0: no limit).
    say_rate: float
    #: The token bucket of ``say_rate``: that many at once (``--burst``).
    say_burst: int


class JoinedFrame(msgspec.Struct, frozen=True, tag="joined", tag_field="type", omit_defaults=True):
    room: str
    name: str
    token: str
    members: list[str]
    history: list[Message]
    recovered: bool
    ref: str | None = None
    #: An extension (docs/protocol.md §4): the server's limits (absent: the defaults).
    limits: Limits | None = None


class JoinedReply(msgspec.Struct, frozen=True, tag="joined", tag_field="type", omit_defaults=True):
    """`JoinedFrame` as the server writes it: the same fields in the same order,
    its ``history`` already JSON (an array of `message` frames, `msgspec.Raw`),
    joined from the room's kept JSON rather than encoded again for every join
    (`state.log.RoomLog.replay`; #16). Encode-only; the contract and the schema
    are `JoinedFrame`'s, and tests/test_chat.py checks the two encode alike."""

    room: str
    name: str
    token: str
    members: list[str]
    history: msgspec.Raw
    recovered: bool
    ref: str | None = None
    limits: Limits | None = None


class AckFrame(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    ref: str
    id: str


class PresenceFrame(msgspec.Struct, frozen=True, tag="presence", tag_field="type"):
    room: str
    event: Literal["join", "leave"]
    name: str


class TypingFrame(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    room: str
    name: str


class WhisperFrame(
    msgspec.Struct, frozen=True, tag="whisper", tag_field="type", rename={"from_": "from"}
):
    id: str
    from_: str
    to: str
    name: str
    msg: str
    ts: int


class LeftFrame(msgspec.Struct, frozen=True, tag="left", tag_field="type", omit_defaults=True):
    room: str
    ref: str | None = None


class HistoryFrame(
    msgspec.Struct, frozen=True, tag="history", tag_field="type", omit_defaults=True
):
    room: str
    messages: list[Message]
    more: bool
    ref: str | None = None


class AuthedFrame(msgspec.Struct, frozen=True, tag="authed", tag_field="type", omit_defaults=True):
    """The answer to `auth` (docs/protocol.md §15): who the token says you are."""

    user: str
    name: str
    exp: int
    ref: str | None = None


class DeletedFrame(msgspec.Struct, frozen=True, tag="deleted", tag_field="type"):
    """A message was deleted (the server API, docs/protocol.md §16): drop it."""

    room: str
    id: str


class ErrorFrame(msgspec.Struct, frozen=True, tag="error", tag_field="type", omit_defaults=True):
    """An `error`; a classic connection's copy also has ``name`` and ``msg``."""

    code: str
    message: str
    ref: str | None = None
    name: str | None = None
    msg: str | None = None


ServerFrame = (
    Message
    | JoinedFrame
    | AckFrame
    | PresenceFrame
    | TypingFrame
    | WhisperFrame
    | LeftFrame
    | HistoryFrame
    | AuthedFrame
    | DeletedFrame
    | ErrorFrame
)

_encoder: Final = msgspec.json.Encoder()


def encode(frame: ServerFrame | JoinedReply) -> bytes:
    """The UTF-8 JSON of one server frame."""
    return _encoder.encode(frame)


def encode_history(messages: list[Message]) -> msgspec.Raw:
    """``messages`` as the JSON array a `JoinedReply`'s ``history`` holds."""
    return msgspec.Raw(_encoder.encode(messages))
