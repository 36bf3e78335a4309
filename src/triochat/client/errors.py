"""The Python client's exceptions, and the close codes that end it for good.

::

    TriochatError
    ├── ClientError            the server answered a request with `error`
    ├── DeliveryUnknown        a whisper was sent, then the connection was lost
    └── ConnectionEnded        the client is over; it will not reconnect
        ├── ConnectFailed          the first connection could not be made
        ├── Replaced               4001: a newer connection took the name over
        ├── AuthenticationFailed   4003 / `unauthorized`: the token was refused
        ├── DisconnectedByOperator 4009
        └── PolicyViolation        1008: too many refused frames
"""

from __future__ import annotations

from typing import Final

from ..errors import TriochatError

__all__ = [
    "NO_RECONNECT",
    "AuthenticationFailed",
    "ClientError",
    "ConnectFailed",
    "ConnectionEnded",
    "DeliveryUnknown",
    "DisconnectedByOperator",
    "PolicyViolation",
    "Replaced",
]


class ClientError(TriochatError):
    """The server answered a request with an ``error`` frame.

    Attributes:
        code: the error code (docs/protocol.md §5), e.g. ``not_joined``.
        message: the server's human-readable text; don't match on it.
        ref: the request's ``ref``.
    """

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


class DeliveryUnknown(TriochatError):
    """A whisper went out but the connection was lost before its ``ack``.

    Whispers are not stored, so the client does not send it again (that could
    deliver it twice): the caller decides.
    """


class ConnectionEnded(TriochatError):
    """The client has ended for good and will not reconnect.

    Raised by every call once it happens, pending ones included, and by the
    event iterator after the events buffered before it.

    Attributes:
        code: the WebSocket close code, or None (no close frame, no connection).
        reason: what happened, in words.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})" if code is not None else reason)
        self.code = code
        self.reason = reason


class ConnectFailed(ConnectionEnded):
    """The first connection could not be opened (refused, timed out, HTTP error)."""


class Replaced(ConnectionEnded):
    """Closed with 4001: a newer connection took the name over with its resume token."""


class AuthenticationFailed(ConnectionEnded):
    """The token was refused (``unauthorized``) or expired (close 4003)."""


class DisconnectedByOperator(ConnectionEnded):
    """Closed with 4009 by an operator (the server API): do not come back by yourself."""


class PolicyViolation(ConnectionEnded):
    """Closed with 1008: too many refused frames (docs/protocol.md §9)."""


#: Close codes after which the client does not reconnect, and what it raises.
NO_RECONNECT: Final[dict[int, type[ConnectionEnded]]] = {
    4001: Replaced,
    4003: AuthenticationFailed,
    4009: DisconnectedByOperator,
    1008: PolicyViolation,
}
