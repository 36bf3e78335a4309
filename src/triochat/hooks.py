"""Hooks for a program that embeds triochat (README, "Embedding"; docs/protocol.md §15).

Two async functions a host program may give `Server`:

- an **authenticator**: the token of an `auth` frame and the connection's
  address in, an `Identity` out, or `Refusal` (answered `unauthorized`,
  then 4003). Given one, connections must authenticate, as with a JWT key,
  and it decides instead of the key.
- a **say hook**: each `say` (and classic frame) of a named connection in,
  the text to store out (the same, or rewritten), or `Refusal` (answered
  with its code, ``forbidden`` by default; nothing is stored).

Both run in the connection's own task, before the frame reaches the hub:
a slow hook holds up only the client that sent the frame, never the chat.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from .errors import TriochatError
from .identity import Identity
from .protocol import ErrorCode

__all__ = ["Authenticator", "Identity", "Refusal", "SayHook", "SayInfo"]


class Refusal(TriochatError):
    """A hook's no: the client gets an `error` with ``code`` and ``message``."""

    def __init__(self, message: str, code: str = ErrorCode.FORBIDDEN) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SayInfo(msgspec.Struct, frozen=True):
    """A say on its way in, as the say hook sees it."""

    room: str
    msg: str
    #: The name it is said under.
    name: str
    #: The token's ``sub`` of the speaker; None for an anonymous one.
    user: str | None


#: ``(token, peer address) -> Identity``; raises `Refusal` to refuse.
Authenticator = Callable[[str, str], Awaitable[Identity]]
#: ``SayInfo -> the text to store``; raises `Refusal` to refuse.
SayHook = Callable[[SayInfo], Awaitable[str]]
