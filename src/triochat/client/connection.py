"""One WebSocket connection as the client records it, and where connections go.

`Endpoint` is the URL taken apart (host, port, TLS, ``Host`` header, path);
`Connection` is one connection's record: its socket, the cancel scope of its
tasks, whether the server bound our name to it, and how it ended (`End`).
The tasks that run a connection live in `session`.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Final

import trio
from trio_websocket import WebSocketConnection

from .errors import ConnectionEnded
from .events import Authed

__all__ = ["CLOSE_ABNORMAL", "CLOSE_NORMAL", "Connection", "End", "Endpoint"]

CLOSE_NORMAL: Final = 1000
CLOSE_ABNORMAL: Final = 1006  # no close frame: the TCP connection was lost


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where to connect, from a ``ws://`` or ``wss://`` URL."""

    url: str
    host: str
    port: int
    tls: bool
    host_header: str
    resource: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Take ``url`` apart.

        Raises:
            ValueError: not a ws:// or wss:// URL with a host.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        tls = parts.scheme == "wss"
        default_port = 443 if tls else 80
        port = parts.port or default_port
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return cls(
            url=url,
            host=parts.hostname,
            port=port,
            tls=tls,
            host_header=host if port == default_port else f"{host}:{port}",
            # An empty path means the chat endpoint, not the lobby-listening "/".
            resource=(parts.path or "/ws") + (f"?{parts.query}" if parts.query else ""),
        )


@dataclasses.dataclass
class End:
    """How one connection ended."""

    code: int | None
    reason: str
    error: ConnectionEnded | None = None
    status: int | None = None  # the HTTP status of a refused handshake
    authed: bool = False  # it had authenticated (a 4003 then means "expired")


class Connection:
    """One WebSocket connection; its tasks live in the nursery ``scope`` cancels."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.ws: WebSocketConnection | None = None
        self.scope = trio.CancelScope()
        self.end: End | None = None
        #: A join succeeded on it, so the server bound our name to it.
        self.named = False
        self.authed: Authed | None = None

    def finish(
        self,
        code: int | None,
        reason: str,
        *,
        error: ConnectionEnded | None = None,
        status: int | None = None,
        cancel: bool = True,
    ) -> None:
        """Record the end (the first one counts) and stop the connection's tasks."""
        if self.end is None:
            self.end = End(code, reason, error, status, self.authed is not None)
        if cancel:
            self.scope.cancel()
