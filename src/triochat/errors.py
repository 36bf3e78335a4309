"""The exceptions triochat raises, grouped by what the caller can do.

::

    TriochatError
    ├── ClientProtocolError   the client sent something wrong; answer, don't crash
    ├── StorageError          history could not be written or read; say `unavailable`
    ├── ConfigError           an option is out of range; exit with a message
    └── TransportClosed       the peer went away or failed; end the connection
                              (triochat.transports: what every transport raises
                              once its libraries' errors are mapped)

Others subclass `TriochatError` where they are raised: the server API's
`ApiError` (triochat.api), a say hook's `Refusal` (triochat.hooks), a
refused token's `TokenError` (triochat.auth), and the Python client's
(`ClientError`, `ConnectionEnded` and its kinds, `DeliveryUnknown`:
triochat.client).
"""

from __future__ import annotations

__all__ = ["ClientProtocolError", "ConfigError", "StorageError", "TriochatError"]


class TriochatError(Exception):
    """Root of every exception triochat raises on purpose."""


class ClientProtocolError(TriochatError):
    """A client frame broke docs/protocol.md §2-3.

    Carries the `error` frame's ``code`` and the ``ref`` to echo, so the I/O
    layer answers without knowing the rules (wsproto's ``event_hint``).
    """

    def __init__(
        self, code: str, message: str, ref: str | None = None, *, classic: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        #: The frame had the classic ``{name, msg}`` shape (no ``type``).
        self.classic = classic


class StorageError(TriochatError):
    """The history store failed; nothing in the failed batch was committed."""


class ConfigError(TriochatError):
    """A configuration value is invalid."""
