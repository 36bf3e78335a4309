"""What the HTTP front needs of the server: `FrontContext`.

The server (`triochat.server.Server`) and the conformance echo app each
provide one; the front reads the config and counters through it, asks it
for health and metrics, takes and gives back a client address's chat slot,
and hands it POSTed SSE frames.

Rule: no trio here (a protocol of types only).
"""

from __future__ import annotations

from typing import Protocol

from ..api import ChatApi
from ..config import Config
from ..metrics import Stats


class FrontContext(Protocol):
    """What the front needs of the server."""

    config: Config
    stats: Stats

    @property
    def draining(self) -> bool: ...

    # Read-only (a property), so a server may hold it as a plain attribute
    # ``api: ChatApi | None`` or as a narrower type.
    @property
    def api(self) -> ChatApi | None:
        """The server API's chat side (docs/protocol.md §16); None: not wired, /api/ is 404."""
        ...

    def ready(self) -> bool: ...

    def metrics(self) -> bytes: ...

    def take_ip_slot(self, ip: str) -> bool:
        """Count one more chat connection from ``ip``; False when over the limit."""
        ...

    def release_ip_slot(self, ip: str) -> None: ...

    async def post_sse(self, session_id: str, body: bytes) -> tuple[int, str, str]:
        """Deliver a POSTed frame: (status, error code, message); 204 when taken."""
        ...
