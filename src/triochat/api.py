"""The server API's HTTP side (docs/protocol.md §16): ``/api/…`` for a backend.

A backend holding ``--api-key`` publishes into rooms, reads presence and
history, deletes messages and disconnects users, on any node of a cluster.
The front (`front/api.py`) hands every ``/api/`` request here when the key is set
and reads and writes the bytes; this module decides the answer, and the chat
side does the work behind `ChatApi`. Rules:

1. The key first: a request without ``Authorization: Bearer <key>`` gets
   `UNAUTHORIZED_BODY`, the same bytes whatever was wrong (no header, another
   scheme, another key of any length), and the keys are compared by their
   SHA-256 digests with `hmac.compare_digest`, so neither the key's length
   nor its content leaks through timing. Only then a path (404) and a method
   (405, with ``Allow``; HEAD wherever GET).
2. Every input is checked here before `ChatApi` is called, by the rules and
   with the error codes of the WebSocket frames (protocol.py): shape
   (``bad_json``, ``bad_frame``), ``too_long``, ``bad_name``, ``bad_room``,
   then ids (``bad_id``). The chat side gets normalised values only.
3. `ChatApi` answers or raises `ApiError` (its status is the answer's). Any
   other exception is a bug: logged with its traceback, answered ``500
   internal`` without it.
4. Never imports h11 or trio: the front reads the body through the
   ``read_body`` it passes in, which raises `ApiError` (408, 413) when the
   body cannot be had; that answer closes the connection, the body unread.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, NamedTuple, Protocol, TypeVar

import msgspec

from .config import Config
from .errors import TriochatError
from .protocol import (
    DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
    RESERVED_NAMES,
    ErrorCode,
    Message,
    is_valid_room,
    msg_problem,
    normalize_name,
)

__all__ = [
    "API_PREFIX",
    "JSON_TYPE",
    "UNAUTHORIZED_BODY",
    "ApiAnswer",
    "ApiError",
    "ChatApi",
    "answer_api",
]

LOGGER = logging.getLogger("triochat.api")

_T = TypeVar("_T")

API_PREFIX: Final = "/api/"
JSON_TYPE: Final = "application/json"
#: Longest message id or ``before`` taken (ids are ``<epoch>-<seq>``, 28
#: characters today; docs/protocol.md §2.2 keeps them opaque, so this is a
#: cap, not a parse).
MAX_ID_CHARS: Final = 64
#: Longest ``user`` of a disconnect: a token's ``sub`` (at most 64, §15) or a
#: name (at most 32).
MAX_USER_CHARS: Final = 64
#: Query parameters parsed at most (a query is small; more is not a request).
MAX_QUERY_FIELDS: Final = 16
#: The one answer to every request without the key (rule 1): it says nothing
#: about what was wrong.
UNAUTHORIZED_BODY: Final = b'{"code":"unauthorized","message":"a valid API key is needed"}'
# Codes of the API alone; the others are the frames' (ErrorCode, §5).
BAD_ID: Final = "bad_id"
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
_ID_PATTERN: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_CHARS}}}")  # visible ASCII


class ApiError(TriochatError):
    """An API call refused: answered with ``status`` and ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _BodyUnread(ApiError):
    """The body could not be read (too big, too slow): the connection closes."""


class ChatApi(Protocol):
    """What the server API needs of the chat (any node of a cluster).

    Every argument is valid and normalised already (rule 2): a room matches
    the room pattern, a name is `normalize_name`'s result, a ``msg`` is 1 to
    ``max_msg_chars`` characters, a ``limit`` is 1-200, an id is 1-64
    visible ASCII characters.
    """

    async def publish(self, room: str, msg: str, name: str) -> tuple[str, int]:
        """Post ``msg`` to ``room`` as ``name``; its (id, ts) once stored.

        Raises:
            ApiError: ``503 unavailable`` when it could not be stored.
        """
        ...

    async def presence(self, room: str) -> list[str]:
        """The names in ``room`` (empty for a room with nobody)."""
        ...

    async def history(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A page like the ``history`` frame's: messages, and whether older ones exist.

        Raises:
            ApiError: e.g. ``400 bad_id`` for a ``before`` the room does not have.
        """
        ...

    async def delete(self, room: str, message_id: str) -> bool:
        """Delete one message of ``room``; False when the room has no such message."""
        ...

    async def disconnect(self, user: str) -> None:
        """Close every connection of ``user`` (a token's ``sub`` or a name); idempotent."""
        ...


class ApiAnswer(NamedTuple):
    """What the front sends: ``status``, a JSON ``body`` (empty for 204) and
    ``headers`` besides content type and length."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    #: The request's body was left unread: close the connection after this.
    close: bool = False


class _Error(msgspec.Struct, frozen=True):
    code: str
    message: str


class _Published(msgspec.Struct, frozen=True):
    id: str
    ts: int


class _Presence(msgspec.Struct, frozen=True):
    room: str
    members: list[str]


class _History(msgspec.Struct, frozen=True):
    """The ``history`` frame's fields without its ``type`` and ``ref``."""

    room: str
    messages: list[Message]  # each with "type": "message", as in frames
    more: bool


class _PublishBody(msgspec.Struct, frozen=True):
    room: str
    msg: str
    name: str


class _DisconnectBody(msgspec.Struct, frozen=True):
    user: str


_encoder: Final = msgspec.json.Encoder()
_publish_decoder: Final = msgspec.json.Decoder(_PublishBody)
_disconnect_decoder: Final = msgspec.json.Decoder(_DisconnectBody)

_Handler = Callable[["_Call"], Awaitable[ApiAnswer]]


class _Call:
    """One authorised request on its way to `ChatApi`."""

    __slots__ = ("arg", "chat", "config", "query", "read_body")

    def __init__(
        self,
        chat: ChatApi,
        config: Config,
        query: str,
        read_body: Callable[[], Awaitable[bytes]],
        arg: str,
    ) -> None:
        self.chat = chat
        self.config = config
        self.query = query
        self.read_body = read_body
        #: The path's last part, percent-decoded, for ``/api/messages/<id>``.
        self.arg = arg


async def answer_api(
    chat: ChatApi,
    config: Config,
    method: str,
    target: bytes,
    headers: Mapping[str, str],
    read_body: Callable[[], Awaitable[bytes]],
) -> ApiAnswer:
    """The answer to one ``/api/…`` request (docs/protocol.md §16).

    Args:
        chat: the chat side.
        config: the server's; ``config.api_key`` must be set.
        method: the request's method.
        target: the request target as received, query included.
        headers: the request's headers, names in lower case (repeats joined).
        read_body: reads the whole request body; raises `ApiError` (413, 408)
            when it cannot. Awaited at most once, and only for a POST route
            once the key is checked.

    Returns:
        The answer; ``close`` when the body was left unread.

    Raises:
        Whatever ``read_body`` raises besides `ApiError` (a malformed body, a
        broken connection): the front's to handle. Nothing else.
    """
    key = config.api_key
    if key is None or not _authorized(headers.get("authorization"), key):
        return ApiAnswer(401, UNAUTHORIZED_BODY, (("www-authenticate", "Bearer"),))
    raw_path, _, raw_query = target.partition(b"?")
    path = raw_path.decode("ascii", "replace")  # h11 admits visible ASCII only
    found = _find(path)
    if found is None:
        return _error(404, NOT_FOUND, "no such API call")
    allow, handler, arg = found
    if method not in allow.split(", "):
        answer = _error(405, METHOD_NOT_ALLOWED, f"use {allow}")
        return answer._replace(headers=(("allow", allow),))
    call = _Call(chat, config, raw_query.decode("ascii", "replace"), read_body, arg)
    try:
        return await handler(call)
    except ApiError as exc:
        return _error(exc.status, exc.code, exc.message, close=isinstance(exc, _BodyUnread))


def _authorized(header: str | None, key: str) -> bool:
    """Whether ``header`` is ``Bearer <key>`` (scheme in any case; rule 1)."""
    scheme, _, token = (header or "").strip().partition(" ")
    # latin-1 gives back the header's bytes (the front decodes it so), which
    # hold the key in UTF-8 when it is not ASCII.
    given = hashlib.sha256(token.strip().encode("latin-1")).digest()
    matches = hmac.compare_digest(given, _key_digest(key))
    bearer = scheme.lower() == "bearer"
    return matches & bearer  # (both always evaluated: no branch on the key)


@functools.lru_cache(maxsize=4)
def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _error(status: int, code: str, message: str, *, close: bool = False) -> ApiAnswer:
    return ApiAnswer(status, _encoder.encode(_Error(code, message)), close=close)


def _ok(value: msgspec.Struct) -> ApiAnswer:
    return ApiAnswer(200, _encoder.encode(value))


def _find(path: str) -> tuple[str, _Handler, str] | None:
    """(allowed methods, handler, path argument) for ``path``; None: no such call."""
    fixed = _CALLS.get(path)
    if fixed is not None:
        return (*fixed, "")
    prefix = "/api/messages/"
    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
        return "DELETE", _delete, urllib.parse.unquote(path[len(prefix) :], errors="replace")
    return None


# --- input (rule 2) -----------------------------------------------------------------


def _query(call: _Call) -> dict[str, str]:
    """The query's parameters, percent-decoded; unknown ones are ignored later."""
    try:
        pairs = urllib.parse.parse_qsl(
            call.query, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
        )
    except UnicodeDecodeError:
        raise ApiError(400, ErrorCode.BAD_FRAME, "the query is not UTF-8") from None
    except ValueError:
        raise ApiError(400, ErrorCode.BAD_FRAME, "too many query parameters") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise ApiError(400, ErrorCode.BAD_FRAME, f"`{name}` is given twice")
        params[name] = value
    return params


def _room_of(params: Mapping[str, str]) -> str:
    room = params.get("room")
    if room is None:
        raise ApiError(400, ErrorCode.BAD_FRAME, "`room` is missing")
    return _valid_room(room)


def _valid_room(room: str) -> str:
    if not is_valid_room(room):
        raise ApiError(400, ErrorCode.BAD_ROOM, "`room` must match [a-z0-9][a-z0-9_-]{0,63}")
    return room


def _message_id(text: str, field: str) -> str:
    if _ID_PATTERN.fullmatch(text) is None:
        raise ApiError(400, BAD_ID, f"`{field}` is not a message id")
    return text


def _limit(params: Mapping[str, str]) -> int:
    text = params.get("limit")
    if text is None:
        return DEFAULT_HISTORY_LIMIT
    limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 4 else 0
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ApiError(400, ErrorCode.BAD_FRAME, f"`limit` must be 1-{MAX_HISTORY_LIMIT}")
    return limit


async def _json_body(call: _Call, decoder: msgspec.json.Decoder[_T]) -> _T:
    try:
        body = await call.read_body()
    except ApiError as exc:
        raise _BodyUnread(exc.status, exc.code, exc.message) from None
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, ErrorCode.BAD_FRAME, f"bad body: {exc}") from None
    except msgspec.DecodeError:
        raise ApiError(400, ErrorCode.BAD_JSON, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, ErrorCode.BAD_FRAME, "the body is nested too deeply") from None


async def _calling(step: Awaitable[_T]) -> _T:
    """Await one `ChatApi` call; a bug in it is logged and answered 500 (rule 3)."""
    try:
        return await step
    except ApiError:
        raise
    except Exception:
        LOGGER.exception("an API call failed")
        raise ApiError(500, ErrorCode.INTERNAL, "the server hit a bug (it is logged)") from None


# --- the calls ----------------------------------------------------------------------


async def _publish(call: _Call) -> ApiAnswer:
    body = await _json_body(call, _publish_decoder)
    room, name = check_publish(body.room, body.msg, body.name, call.config.max_msg_chars)
    message_id, ts = await _calling(call.chat.publish(room, body.msg, name))
    return _ok(_Published(message_id, ts))


def check_publish(room: str, msg: str, name: str, max_msg_chars: int) -> tuple[str, str]:
    """The room and the name (normalized) a publish of ``msg`` goes to.

    Raises:
        ApiError: 400 with `bad_frame`, `too_long`, `bad_name` or `bad_room`.
    """
    problem = msg_problem(msg, max_msg_chars)
    if problem is not None:
        raise ApiError(400, *problem)
    # The reserved names (§2.1) are the API's own: users cannot take them, so
    # a message from `server` is always from the operator's side.
    checked_name = name if name in RESERVED_NAMES else normalize_name(name)
    if checked_name is None:
        raise ApiError(400, ErrorCode.BAD_NAME, "`name` is not a valid name")
    return _valid_room(room), checked_name


async def _presence(call: _Call) -> ApiAnswer:
    room = _room_of(_query(call))
    members = await _calling(call.chat.presence(room))
    return _ok(_Presence(room, members))


async def _history(call: _Call) -> ApiAnswer:
    params = _query(call)
    limit = _limit(params)
    room = _room_of(params)
    before = params.get("before")
    if before is not None:
        before = _message_id(before, "before")
    messages, more = await _calling(call.chat.history(room, before, limit))
    return _ok(_History(room, messages, more))


async def _delete(call: _Call) -> ApiAnswer:
    room = _room_of(_query(call))
    message_id = _message_id(call.arg, "id")
    if not await _calling(call.chat.delete(room, message_id)):
        raise ApiError(404, ErrorCode.NO_SUCH_MESSAGE, "the room has no message with that id")
    return ApiAnswer(204, b"")


async def _disconnect(call: _Call) -> ApiAnswer:
    body = await _json_body(call, _disconnect_decoder)
    if not 1 <= len(body.user) <= MAX_USER_CHARS:
        raise ApiError(400, ErrorCode.BAD_NAME, f"`user` must be 1-{MAX_USER_CHARS} characters")
    await _calling(call.chat.disconnect(body.user))
    return ApiAnswer(204, b"")


_CALLS: Final[dict[str, tuple[str, _Handler]]] = {
    "/api/publish": ("POST", _publish),
    "/api/presence": ("GET, HEAD", _presence),
    "/api/history": ("GET, HEAD", _history),
    "/api/disconnect": ("POST", _disconnect),
}
