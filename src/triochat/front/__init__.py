"""The HTTP front: one port for the page, health, metrics, the server API and chats.

`loop.handle_http` reads each request head of an accepted connection with
h11 and either answers it (page, assets, health, metrics, ``POST /sse``,
``/api/…``, errors) or, for a vetted WebSocket upgrade or ``GET /sse``,
returns it for the caller to run. Its public names are re-exported by
`triochat.http`, which is what the server and the tests import.

Rules:

1. Every request gets a status; a malformed one 400 (431 for huge headers),
   a slow one 408. The connection is never left hanging: the whole head must
   arrive within ``handshake_timeout``.
2. An upgrade is vetted before any chat state is touched: path (404), the
   handshake of RFC 6455 4.2.1 (400; 426 for the version), Origin (403),
   draining (503), per-IP limit (429). ``GET /sse`` likewise, from Origin on.
3. Hostile clients (#18, docs/protocol.md §1): before anything else, a
   request must name an allowed ``Host`` (421 otherwise: DNS rebinding) and
   must not carry both ``Transfer-Encoding`` and ``Content-Length`` (400:
   request smuggling, RFC 9112 6.1). Every HTML response carries the page's
   CSP and ``X-Frame-Options: DENY``. A socket counts in `PendingSockets`
   until it becomes a chat or closes.
4. Behind a proxy (#11 §3): a chat's slot under ``--max-conns-per-ip`` and
   its log lines go by the client address `policy.client_ip` finds, which
   is the TCP peer's unless that is a ``--trusted-proxy``. Pending sockets
   stay counted by the TCP peer: they are counted at accept, before any
   header is read.
5. Operators (#11 §4): every plain request gets one access line on
   ``triochat.access`` once answered (an SSE stream once it ends; a
   WebSocket upgrade none). With ``--metrics-port`` a listener serves a
   `Routes` set: the public one everything but `OPERATOR_PATHS`, the
   operator one only those.
6. The server API (docs/protocol.md §16): with ``--api-key``, ``/api/…`` on a
   listener that serves chats goes to `triochat.api`, which decides every
   answer; without the key, or on the operator listener, it is 404.

The modules, each importing only those above it in this list:

- `messages`: a request head (`Request`) and its checks, the heads of the
  answers with their security headers (CSP and the rest);
- `policy`: the ``Host`` and ``Origin`` rules, the client address;
- `handshake`: the WebSocket upgrade's checks in order, and the vetted
  `Upgrade` (what the 101 needs of the request);
- `peers`: the TCP peer's address and `PendingSockets`;
- `context`: `FrontContext`, what the front needs of the server;
- `routes`: `Routes` per listener, `StaticFiles`, the plain paths' table;
- `access`: access lines;
- `wire`: reads and writes on the stream (h11, and raw refusals);
- `sse`: ``GET /sse`` vetting (`SseOpen`) and ``POST /sse`` frames;
- `api`: ``/api/…`` handed to `triochat.api`;
- `loop`: `handle_http`, the request loop and its routing.

Rule: `messages`, `policy`, `handshake`, `peers`, `context` and `routes`
import no trio (checked as for the chat state: tests/test_protocol.py's
method). This file imports nothing, so that importing one of those does not
import the rest.
"""
