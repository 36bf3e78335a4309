"""The HTTP front's public names, as the server, the tests and the
conformance app import them; the front itself is the `triochat.front`
package (its docstring has the rules and the module map).

- `handle_http` (`front.loop`): serve one accepted connection; returns the
  vetted `Upgrade` (`front.handshake`) or `SseOpen` (`front.sse`) to run.
- `FrontContext` (`front.context`): what the front needs of the server.
- `Routes`, `OPERATOR_PATHS`, `StaticFiles` (`front.routes`): what a
  listener serves, and the page's files.
- `PendingSockets`, `peer_ip`, `address_ip`, `UNKNOWN_PEER` (`front.peers`):
  the accept loop's count of sockets that are not a chat yet, and their address.
- `host_allowed`, `origin_allowed` (`front.policy`), `MAX_BODY_BYTES`
  (`front.wire`), `PAGE_CSP` (`front.messages`), `SSE_SESSION_HEADER`
  (`front.sse`).
"""

from __future__ import annotations

from .front.context import FrontContext
from .front.handshake import Upgrade
from .front.loop import handle_http
from .front.messages import PAGE_CSP
from .front.peers import UNKNOWN_PEER, PendingSockets, address_ip, peer_ip
from .front.policy import host_allowed, origin_allowed
from .front.routes import OPERATOR_PATHS, Routes, StaticFiles
from .front.sse import SSE_SESSION_HEADER, SseOpen
from .front.wire import MAX_BODY_BYTES

__all__ = [
    "MAX_BODY_BYTES",
    "OPERATOR_PATHS",
    "PAGE_CSP",
    "SSE_SESSION_HEADER",
    "UNKNOWN_PEER",
    "FrontContext",
    "PendingSockets",
    "Routes",
    "SseOpen",
    "StaticFiles",
    "Upgrade",
    "address_ip",
    "handle_http",
    "host_allowed",
    "origin_allowed",
    "peer_ip",
]
