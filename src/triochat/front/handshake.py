"""WebSocket upgrades, sans-I/O: the checks of an opening handshake and what
the chat side receives once they pass.

- `handshake_error`: what breaks RFC 6455 4.2.1 in a request (answered 400).
- `upgrade_refusal`: every check of docs/protocol.md §1.1 before the IP slot,
  in its order (path 404, handshake 400, version 426, Origin 403,
  draining 503), as the answer to write; None lets the upgrade go ahead.
- `Upgrade` and `vetted_upgrade`: what the 101 needs of a vetted request
  (its key, its extension offers), handed to the caller, which answers it
  without parsing the request again (transports/wsopen.py).

Rule: no trio here (the front's loop writes the refusals).
"""

from __future__ import annotations

import base64
import binascii
from typing import Final, NamedTuple

from .messages import Request
from .policy import origin_allowed

#: The paths a chat opens on: the page's own address, or /ws.
UPGRADE_PATHS: Final = ("/ws", "/")
#: Upgrade headers wsproto reads as ASCII (`handshake_error`).
_ASCII_HEADERS: Final = frozenset(
    {b"host", b"connection", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)


class Refusal(NamedTuple):
    """An upgrade's answer instead of a chat: a plain-text status, then a close."""

    status: int
    message: str
    extra: str = ""  # header lines, each ending in CRLF


class Upgrade:
    """A vetted WebSocket upgrade, for the caller to run (it holds an IP slot)."""

    __slots__ = ("early", "ip", "key", "offers", "path")

    def __init__(
        self, early: bytes, path: str, ip: str, key: bytes, offers: tuple[str, ...] = ()
    ) -> None:
        #: What the client sent after the request head (frames already, perhaps).
        self.early = early
        self.path = path
        #: The client address (behind a trusted proxy the forwarded one, not the
        #: TCP peer's) whose slot was taken: release it with `release_ip_slot`.
        self.ip = ip
        #: Sec-WebSocket-Key, as sent: the 101's accept token is made of it.
        self.key = key
        #: The Sec-WebSocket-Extensions offers, one string each, in order
        #: (as wsproto splits them: every such header, at each comma).
        self.offers = offers


def _tokens(value: str) -> list[str]:
    """A comma-separated header's tokens, lower case (``Connection: keep-alive, Upgrade``)."""
    return [token.strip().lower() for token in value.split(",")]


def handshake_error(request: Request) -> str | None:
    """What breaks RFC 6455 4.2.1 in an upgrade request (answered 400), or None."""
    if request.method != "GET":
        return "a WebSocket upgrade is a GET"
    if request.http_version < b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if "websocket" not in _tokens(request.headers.get("upgrade", "")):
        return "Upgrade must be websocket"
    if "upgrade" not in _tokens(request.headers.get("connection", "")):
        return "Connection must include upgrade"
    keys = [value for name, value in request.fields if name == b"sec-websocket-key"]
    if len(keys) != 1:
        return "exactly one Sec-WebSocket-Key is needed"
    try:
        key = base64.b64decode(keys[0].strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 16:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    # wsproto decodes these as ASCII and raises on any other byte (a "bug" in
    # the log and a dropped connection, with compression on or off).
    for name, value in request.fields:
        if name in _ASCII_HEADERS and not value.isascii():
            return f"{name.decode()} must be ASCII"
    return None


def upgrade_refusal(
    request: Request, allow_origins: tuple[str, ...], *, draining: bool
) -> Refusal | None:
    """Why a WebSocket upgrade may not go ahead, or None when it may.

    The checks and their answers are docs/protocol.md section 1.1, in order;
    the last one, the client address's slot, is the caller's (it counts).
    """
    headers = request.headers
    if request.path not in UPGRADE_PATHS:
        return Refusal(404, "no WebSocket endpoint here")
    problem = handshake_error(request)
    if problem is not None:
        return Refusal(400, problem)
    if headers.get("sec-websocket-version", "").strip() != "13":
        return Refusal(426, "WebSocket version 13 only", "sec-websocket-version: 13\r\n")
    if not origin_allowed(headers.get("origin"), headers.get("host"), allow_origins):
        return Refusal(403, "origin not allowed")
    if draining:
        return Refusal(503, "the server is shutting down")
    return None


def vetted_upgrade(request: Request, ip: str, early: bytes) -> Upgrade:
    """The `Upgrade` of a request `upgrade_refusal` let through (so it has
    exactly one valid key, and its extension offers are ASCII)."""
    key = b""
    offers: list[str] = []
    for name, value in request.fields:
        if name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-extensions":
            offers.extend(piece.decode("ascii").strip() for piece in value.split(b","))
    return Upgrade(early, request.path, ip, key, tuple(offers))
