"""The HTTP front: one port for the page, health, metrics and chat upgrades.

It reads one request head with h11 (bounded in size and time), then either
answers it (page, assets, health, metrics, errors) or, for a vetted
WebSocket upgrade, hands the socket to the chat side together with the bytes
already read. Rules:

1. Every request gets a status; a malformed one 400 (431 for huge headers),
   a slow one 408. The connection is never left hanging: the whole head must
   arrive within ``handshake_timeout``.
2. An upgrade is vetted before any chat state is touched: path (404),
   the handshake of RFC 6455 4.2.1 (400; 426 for the version), Origin
   (403), draining (503), per-IP limit (429).
3. Hostile clients (#18, docs/protocol.md §1): before anything else, a
   request must name an allowed ``Host`` (421 otherwise: DNS rebinding) and
   must not carry both ``Transfer-Encoding`` and ``Content-Length`` (400:
   request smuggling, RFC 9112 6.1). Every HTML response carries the page's
   CSP and ``X-Frame-Options: DENY``. A socket counts in `PendingSockets`
   until it becomes a chat or closes.
4. Behind a proxy (#11 §3): a chat's slot under ``--max-conns-per-ip`` and
   its log lines go by the client address `forwarded.client_address` finds,
   which is the TCP peer's unless that is a ``--trusted-proxy``. Pending
   sockets stay counted by the TCP peer: they are counted at accept, before
   any header is read.
5. Operators (#11 §4): every plain request gets one access line on
   ``triochat.access`` once answered (an SSE stream once it ends; a WebSocket
   upgrade none: the chat logs its own open and close), with its path
   without the query and without an SSE session id. With ``--metrics-port``
   a listener serves a `Routes` set: the public one everything but
   `OPERATOR_PATHS`, the operator one only those.
6. The server API (docs/protocol.md §16): with ``--api-key``, ``/api/…`` on a
   listener that serves chats goes to api.py, which decides every answer
   (401 included); the front only reads the body and writes the answer.
   Without the key, or on the operator listener, it is 404 like any path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import enum
import functools
import importlib.resources
import ipaddress
import json
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

import h11
import trio

from .api import API_PREFIX, JSON_TYPE, ApiError, ChatApi, answer_api
from .config import Config
from .forwarded import client_address, trusted_networks
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Stats

__all__ = [
    "OPERATOR_PATHS",
    "FrontContext",
    "PendingSockets",
    "Routes",
    "SseOpen",
    "StaticFiles",
    "Upgrade",
    "handle_http",
    "host_allowed",
    "peer_ip",
]

LOGGER = logging.getLogger("triochat.http")
#: One line per plain request (rule 5): a logger of its own, so that an
#: operator can route or silence access lines apart from the rest.
ACCESS_LOGGER = logging.getLogger("triochat.access")

_T = TypeVar("_T")

RECEIVE_BYTES: Final = 16384
MAX_BODY_BYTES: Final = 65536  # a body we must read past before the next request
GET_HEAD: Final = "GET, HEAD"
#: Carries the SSE session id on ``POST /sse`` (docs/protocol.md §13): the id
#: is a bearer secret, and a path is what proxies and access logs record (#18).
SSE_SESSION_HEADER: Final = "x-triochat-session"
# Sent with every HTML response (docs/protocol.md §1). connect-src 'self' covers
# ws:/wss: to the page's own host and port (CSP Level 3; Chromium checked by
# tests/test_browser.py), so the page can reach its own server and no other.
PAGE_CSP: Final = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HTML_HEADERS: Final = (("content-security-policy", PAGE_CSP), ("x-frame-options", "DENY"))
#: What ``--metrics-port`` moves to a listener of its own (rule 5).
OPERATOR_PATHS: Final = frozenset({"/metrics", "/healthz", "/readyz"})
LOGGED_PATH_CHARS: Final = 80  # an access line's path is cut there, like client text
UNKNOWN_PEER: Final = "?"  # a stream with no peer address (in memory, or already reset)
REASONS: Final = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


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
        """The server API's chat side (rule 6); None: not wired, /api/ is 404."""
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


class Routes(enum.Enum):
    """Which endpoints one listener serves (rule 5)."""

    ALL = "all"  # one port for everything: no --metrics-port
    PUBLIC = "public"  # the page and chats; OPERATOR_PATHS answer 404
    OPERATOR = "operator"  # OPERATOR_PATHS only; everything else, chats too, 404

    @property
    def chats(self) -> bool:
        """Whether WebSocket upgrades and SSE are served here."""
        return self is not Routes.OPERATOR


class _Access:
    """One plain request on its way to its access line (rule 5)."""

    __slots__ = ("request", "sent", "started", "status")

    def __init__(self, request: _Request) -> None:
        self.request = request
        self.started = trio.current_time()
        self.status: int | None = None  # None: nothing was answered
        self.sent: int | None = None  # body bytes; None: not counted (an SSE stream)


#: The request the current task answers, for `_send*` to note status and size
#: in: the refusals are written from many places that never see the request.
_ACCESS: Final = contextvars.ContextVar[_Access | None]("triochat_access", default=None)


def _answered(status: int, sent: int | None) -> None:
    access = _ACCESS.get()
    if access is not None:
        access.status, access.sent = status, sent


def _log_access(access: _Access, ip: str, config: Config) -> None:
    """Write ``access``'s line: peer, method, path, status, body bytes, duration."""
    _ACCESS.set(None)
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    request = access.request
    client = _client_ip(ip, request, config)
    peer = ip if client == ip else f"{client} via {ip}"
    path = _logged_path(request.path)
    millis = round((trio.current_time() - access.started) * 1000, 1)
    status, sent = access.status, access.sent
    ACCESS_LOGGER.info(
        "%s %s %s %s %s %.1f ms",
        peer,
        request.method,
        path,
        "-" if status is None else status,
        "-" if sent is None else sent,
        millis,
        extra={
            "peer": peer,
            "method": request.method,
            "path": path,
            "status": status,
            "bytes": sent,
            "duration_ms": millis,
        },
    )


def _logged_path(path: str) -> str:
    """A path for the access line: the query is cut off already (`_Request`); an
    SSE session id in it is a bearer secret, and an absolute-form target may
    carry credentials. h11 admits only visible ASCII: nothing to escape."""
    if path.startswith("/sse/"):
        return "/sse/*"
    if not path.startswith("/"):
        return "-"
    return path if len(path) <= LOGGED_PATH_CHARS else path[:LOGGED_PATH_CHARS] + "..."


class StaticFiles:
    """The page's files, read once at start-up (no listings, no paths)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        root = importlib.resources.files("triochat.static")
        for entry in root.iterdir():
            name = entry.name
            if entry.is_file() and not name.startswith((".", "_")) and name != "__init__.py":
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                if kind.startswith("text/") or kind == "application/javascript":
                    kind += "; charset=utf-8"
                self.files[name] = (entry.read_bytes(), kind)


class PendingSockets:
    """Sockets that are not a chat yet, counted per client address and overall.

    Each costs a file descriptor for up to ``handshake_timeout`` (a head, a
    body or a keep-alive pause on its way), so without a cap one address
    could open silent sockets until accept() fails for everyone (#18). The
    accept loop takes a slot before anything else; the front releases it
    when the socket becomes a chat or closes (docs/protocol.md §9).

    Rule: ``take`` and ``release`` never await and are O(1): they run on the
    accept path of every connection and in ``finally``.
    """

    __slots__ = ("_per_ip", "per_ip_limit", "total", "total_limit")

    def __init__(self, per_ip_limit: int, total_limit: int) -> None:
        self.per_ip_limit = per_ip_limit  # 0 = off
        self.total_limit = total_limit  # 0 = off
        #: Sockets counted now (the ``triochat_pending_sockets`` gauge).
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def take(self, ip: str) -> bool:
        """Count one more socket from ``ip``; False (nothing counted) when over a cap.

        A socket with no known address is counted overall only: lumping all
        of those under one key would let them refuse each other.
        """
        if self.total_limit and self.total >= self.total_limit:
            return False
        if ip != UNKNOWN_PEER:
            held = self._per_ip.get(ip, 0)
            if self.per_ip_limit and held >= self.per_ip_limit:
                return False
            self._per_ip[ip] = held + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        """Uncount one socket taken for ``ip`` (exactly once per successful `take`)."""
        self.total -= 1
        if ip != UNKNOWN_PEER:
            held = self._per_ip[ip] - 1
            if held:
                self._per_ip[ip] = held
            else:
                del self._per_ip[ip]  # the dict holds only addresses with sockets now


class Upgrade:
    """A vetted WebSocket upgrade, for the caller to run (it holds an IP slot)."""

    __slots__ = ("head_size", "ip", "path", "prefix")

    def __init__(self, prefix: bytes, path: str, ip: str, head_size: int) -> None:
        #: The request head as received plus what followed (replayed to trio-websocket).
        self.prefix = prefix
        #: How many bytes of ``prefix`` are the head (the rest are frames).
        self.head_size = head_size
        self.path = path
        #: The client address (behind a trusted proxy the forwarded one, not the
        #: TCP peer's) whose slot was taken: release it with `release_ip_slot`.
        self.ip = ip


class SseOpen:
    """A vetted ``GET /sse``, for the caller to run like an `Upgrade`: nothing is
    written yet, and it holds the client address's chat slot ``ip``."""

    __slots__ = ("_access", "_config", "_peer", "ip")

    def __init__(self, ip: str, access: _Access | None, peer: str, config: Config) -> None:
        #: The client address (behind a trusted proxy the forwarded one) whose
        #: slot was taken: release it with `release_ip_slot`.
        self.ip = ip
        self._access = access
        self._peer = peer
        self._config = config

    def finished(self) -> None:
        """The stream has ended: write its access line (rule 5)."""
        access, self._access = self._access, None
        if access is not None:
            if access.status is None:
                access.status = 200  # served (the stream's bytes are not counted)
            _log_access(access, self._peer, self._config)


class _Request:
    __slots__ = ("event", "headers", "method", "path", "target")

    def __init__(self, event: h11.Request) -> None:
        self.event = event
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target
        self.path = event.target.split(b"?", 1)[0].decode("ascii", "replace")
        self.headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace")
            text = value.decode("latin-1")
            # Repeated headers are joined, as RFC 9110 §5.3 allows.
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text


def peer_ip(stream: trio.abc.Stream) -> str:
    """The client's address, or `UNKNOWN_PEER` when the stream has none."""
    socket = getattr(stream, "socket", None)
    if socket is None:
        return UNKNOWN_PEER
    try:
        address = socket.getpeername()
    except OSError:
        return UNKNOWN_PEER
    return str(address[0]) if isinstance(address, tuple) else str(address)


async def handle_http(
    stream: trio.abc.Stream,
    ctx: FrontContext,
    static: StaticFiles,
    *,
    ip: str | None = None,
    pending: PendingSockets | None = None,
    routes: Routes = Routes.ALL,
) -> Upgrade | SseOpen | None:
    """Serve one accepted connection: requests until it closes or upgrades.

    Returns the vetted WebSocket upgrade or SSE stream, for the caller to
    run: the front's frames and parser are then gone, not kept for the hours
    a chat may last.

    Args:
        ip: the TCP peer's address, when the caller already has it (`peer_ip`).
        pending: where the caller (the accept loop) counted this socket
            under ``ip``; released here once the socket is a chat or done.
            (Always the TCP peer's: behind a proxy, the client address a
            request's headers give goes only into the chat slot, `Upgrade.ip`.)
        routes: what this listener serves (rule 5).

    Resource handling: the caller closes ``stream`` afterwards.
    """
    counted = pending is not None
    access: _Access | None = None  # the request being answered, until its line is out
    if ip is None:
        ip = peer_ip(stream)
    try:
        config = ctx.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        while True:
            try:
                with trio.fail_after(config.handshake_timeout):
                    event = await _answering_protocol_errors(
                        stream, _next_event(conn, stream, head_limit=config.max_header_bytes)
                    )
            except trio.TooSlowError:
                if conn.their_state is h11.SEND_BODY or conn.trailing_data[0]:
                    await _send_raw(stream, 408, "the request took too long")
                return None
            if not isinstance(event, h11.Request):
                return None  # the client closed the connection
            request = _Request(event)
            access = _Access(request)
            _ACCESS.set(access)
            # First of all (§1): a name we do not serve is a DNS-rebinding page.
            if not host_allowed(request.headers.get("host"), config.allow_hosts):
                ctx.stats.hosts_refused += 1
                await _send_raw(
                    stream,
                    421,
                    "this server does not answer for that host name",
                    head=request.method == "HEAD",
                )
                return None
            ctx.stats.http_requests += 1
            if routes.chats and "websocket" in request.headers.get("upgrade", "").lower():
                if not await _vet_upgrade(stream, request, ctx):
                    return None
                client = _client_ip(ip, request, config)
                if not ctx.take_ip_slot(client):
                    await _send_raw(stream, 429, "too many connections from your address")
                    return None
                head = _head_as_received(request.event)
                access = None  # a chat now: it logs its own open and close lines
                _ACCESS.set(None)
                return Upgrade(head + conn.trailing_data[0], request.path, client, len(head))
            if routes.chats and request.path == "/sse" and request.method == "GET":
                if pending is not None and counted:
                    counted = False  # a stream for hours: a chat now, counted per IP
                    pending.release(ip)
                client = _client_ip(ip, request, config)
                if not await _vet_sse(stream, request, ctx, client):
                    return None
                opened = SseOpen(client, access, ip, config)
                access = None  # its line is written when the stream ends (`finished`)
                _ACCESS.set(None)
                return opened
            if routes.chats and (
                request.path.startswith("/sse/")
                or (request.path == "/sse" and request.method == "POST")
            ):
                if not await _answering_protocol_errors(
                    stream, _post_sse(stream, conn, request, ctx)
                ):
                    return None
            elif (
                routes.chats
                and request.path.startswith(API_PREFIX)
                and (api := _api_of(ctx)) is not None
            ):
                if not await _answering_protocol_errors(
                    stream, _serve_api(stream, conn, request, api, config)
                ):
                    return None
            elif not await _respond(stream, conn, request, ctx, static, routes):
                return None
            try:
                with trio.move_on_after(config.handshake_timeout) as body_scope:
                    finished = await _finish_request(stream, conn)
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return None  # answered already; a broken body only ends the connection
            if body_scope.cancelled_caught or not finished:
                return None
            _log_access(access, ip, config)
            access = None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
    finally:
        if access is not None:
            _log_access(access, ip, ctx.config)
        if pending is not None and counted:
            pending.release(ip)


def _client_ip(peer: str, request: _Request, config: Config) -> str:
    """The address a chat from ``peer`` counts under (rule 4): ``peer`` itself
    unless it is a ``--trusted-proxy``. Without that option (the default)
    nothing is parsed, not even ``peer``."""
    trusted = config.trusted_proxies
    if not trusted:
        return peer
    headers = request.headers
    return client_address(
        peer,
        trusted_networks(trusted),
        forwarded=headers.get("forwarded"),
        x_forwarded_for=headers.get("x-forwarded-for"),
    )


async def _answering_protocol_errors(stream: trio.abc.Stream, step: Awaitable[_T]) -> _T | None:
    """Await one step of a request; a client's broken HTTP gets its 4xx and None.

    A malformed request is answered (h11's status hint: 400, 431, ...); a
    connection that broke meanwhile just ends. Either way the caller closes.
    """
    try:
        return await step
    except h11.RemoteProtocolError as exc:
        await _send_raw(stream, exc.error_status_hint, "malformed request")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return None


async def _next_event(
    conn: h11.Connection, stream: trio.abc.Stream, *, head_limit: int | None = None
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event; with ``head_limit``, refuse a longer request head.

    (h11's own limit only applies while the head is incomplete, so a head
    that arrives complete in one large read could pass it.) A request with
    both ``Transfer-Encoding`` and ``Content-Length`` is refused with 400:
    h11 would frame it by the first, a proxy in front of us might by the
    second, and the difference is a smuggled request (RFC 9112 6.1 allows
    either answer; closing after it is required).
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            conn.receive_data(bytes(data))  # b"" means the peer closed
            continue
        if isinstance(event, h11.Request):
            size = len(event.target)
            framing = 0  # bit 1: Content-Length seen, bit 2: Transfer-Encoding
            for name, value in event.headers:  # names come lower case from h11
                size += len(name) + len(value) + 4
                if name == b"content-length":
                    framing |= 1
                elif name == b"transfer-encoding":
                    framing |= 2
            if head_limit is not None and size > head_limit:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            if framing == 3:
                raise h11.RemoteProtocolError(
                    "both Transfer-Encoding and Content-Length", error_status_hint=400
                )
        return event  # type: ignore[return-value]


async def _finish_request(stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    """Read past a request body (bounded) so the connection can be reused."""
    received = 0
    while conn.their_state is h11.SEND_BODY:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            received += len(event.data)
            if received > MAX_BODY_BYTES:
                return False
        elif not isinstance(event, h11.EndOfMessage):
            return False
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: _Request,
    ctx: FrontContext,
    static: StaticFiles,
    routes: Routes = Routes.ALL,
) -> bool:
    """Answer a plain request; False when the connection must close."""
    route = _route(request.path, ctx, static, routes)
    if route is None:
        return await _send(stream, conn, request, 404, b"not found\n")
    if request.method not in ("GET", "HEAD"):
        return await _send(stream, conn, request, 405, b"method not allowed\n", allow=GET_HEAD)
    status, body, content_type, extra = route()
    return await _send(stream, conn, request, status, body, content_type=content_type, extra=extra)


_Route = Callable[[], tuple[int, bytes, str, list[tuple[str, str]]]]


def _route(
    path: str, ctx: FrontContext, static: StaticFiles, routes: Routes = Routes.ALL
) -> _Route | None:
    text = "text/plain; charset=utf-8"
    if (path in OPERATOR_PATHS) != (routes is Routes.OPERATOR) and routes is not Routes.ALL:
        return None  # served on the other listener (rule 5)
    if path == "/" and "index.html" in static.files:
        body, kind = static.files["index.html"]
        return lambda: (200, body, kind, [])
    if path.startswith("/static/"):
        found = static.files.get(path[len("/static/") :])
        if found is None:
            return None
        body, kind = found
        return lambda: (200, body, kind, [])
    if path == "/healthz":
        return lambda: (200, b"ok\n", text, [])
    if path == "/readyz":
        return lambda: (
            (200, b"ready\n", text, []) if ctx.ready() else (503, b"not ready\n", text, [])
        )
    if path == "/metrics":
        return lambda: (200, ctx.metrics(), METRICS_CONTENT_TYPE, [])
    if path == "/sse":  # GET is served by _open_sse; this answers HEAD
        return lambda: (200, b"", "text/event-stream; charset=utf-8", [])
    if path == "/ws":
        return lambda: (
            426,
            b"this endpoint needs a WebSocket upgrade\n",
            text,
            [("upgrade", "websocket")],
        )
    return None


async def _send(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: _Request,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> bool:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("cache-control", "no-cache"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ]
    if allow is not None:
        headers.append(("allow", allow))
    if content_type.startswith("text/html"):
        headers.extend(HTML_HEADERS)  # every HTML response, whatever its route (§1)
    headers.extend(extra or [])
    _answered(status, 0 if request.method == "HEAD" else len(body))
    try:
        data = conn.send(
            h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
        )
        if request.method != "HEAD":
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return False
    return True


async def _send_raw(
    stream: trio.abc.Stream, status: int, message: str, *, extra: str = "", head: bool = False
) -> None:
    """A complete response written without h11, then the connection closes.

    ``head``: it answers a HEAD request, so the body is left out (its length
    is still given, RFC 9110 9.3.2).
    """
    body = (message + "\n").encode()
    response = (
        f"HTTP/1.1 {status} {REASONS.get(status, b'').decode()}\r\n"
        f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
        "cache-control: no-cache\r\nx-content-type-options: nosniff\r\n"
        f"connection: close\r\n{extra}\r\n"
    ).encode()
    _answered(status, 0 if head else len(body))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(response if head else response + body)


@functools.lru_cache(maxsize=8)
def _allowed_names(allowed: tuple[str, ...]) -> frozenset[str]:
    """``--allow-host`` entries as compared: lower case, no trailing dot (cached:
    the tuple is the config's, the same object on every request)."""
    names = (entry.strip().lower().removesuffix(".") for entry in allowed)
    return frozenset(name for name in names if name)


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Host`` is one this server answers for (§1, DNS rebinding).

    Allowed: ``localhost`` and any IP literal (IPv4, or IPv6 in brackets),
    the names in ``allowed`` (``*``: any), each with any port or none,
    ignoring case and one trailing dot. No ``Host`` at all only reaches
    here on HTTP/1.0 (h11 answers 400 on HTTP/1.1): allowed, since a
    browser, which a rebinding attack needs, always sends one.
    """
    if host is None:
        return True
    names = _allowed_names(allowed)
    if "*" in names:
        return True
    host = host.strip().lower()
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return True
    name, colon, port = host.partition(":")
    if colon and not _is_port(port):
        return False  # a second colon, an empty or a non-numeric port
    name = name.removesuffix(".")
    if name == "localhost" or name in names:
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone takes "²" (latin-1)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """docs/protocol.md §1: no Origin, the request's own host, or an allowed origin."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    allowed_lower = {entry.lower() for entry in allowed}
    if origin == "null":
        return "null" in allowed_lower
    if "*" in allowed_lower or origin in allowed_lower:
        return True
    if host is None:
        return False
    host = host.strip().lower()
    return origin in (f"http://{host}", f"https://{host}")


def _tokens(value: str) -> list[str]:
    """A comma-separated header's tokens, lower case (``Connection: keep-alive, Upgrade``)."""
    return [token.strip().lower() for token in value.split(",")]


def _handshake_error(request: _Request) -> str | None:
    """What breaks RFC 6455 4.2.1 in an upgrade request (answered 400), or None."""
    event = request.event
    if request.method != "GET":
        return "a WebSocket upgrade is a GET"
    if event.http_version < b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if "websocket" not in _tokens(request.headers.get("upgrade", "")):
        return "Upgrade must be websocket"
    if "upgrade" not in _tokens(request.headers.get("connection", "")):
        return "Connection must include upgrade"
    keys = [value for name, value in event.headers if name == b"sec-websocket-key"]
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
    for name, value in event.headers:
        if name in _ASCII_HEADERS and not value.isascii():
            return f"{name.decode()} must be ASCII"
    return None


#: Upgrade headers wsproto reads as ASCII (`_handshake_error`).
_ASCII_HEADERS: Final = frozenset(
    {b"host", b"connection", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)


async def _vet_upgrade(stream: trio.abc.Stream, request: _Request, ctx: FrontContext) -> bool:
    """Whether a WebSocket upgrade may go ahead; False after answering a refusal.

    The checks and their answers are docs/protocol.md section 1.1, in order.
    """
    headers = request.headers
    if request.path not in ("/ws", "/"):
        await _send_raw(stream, 404, "no WebSocket endpoint here")
        return False
    problem = _handshake_error(request)
    if problem is not None:
        await _send_raw(stream, 400, problem)
        return False
    if headers.get("sec-websocket-version", "").strip() != "13":
        await _send_raw(
            stream, 426, "WebSocket version 13 only", extra="sec-websocket-version: 13\r\n"
        )
        return False
    if not origin_allowed(headers.get("origin"), headers.get("host"), ctx.config.allow_origins):
        await _send_raw(stream, 403, "origin not allowed")
        return False
    if ctx.draining:
        await _send_raw(stream, 503, "the server is shutting down")
        return False
    return True


def _json_error(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


async def _send_raw_json(stream: trio.abc.Stream, status: int, code: str, message: str) -> None:
    """A JSON error ``{"code", "message"}`` written without h11; then the connection closes."""
    body = _json_error(code, message)
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, b'').decode()}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "cache-control: no-cache\r\nx-content-type-options: nosniff\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    _answered(status, len(body))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head + body)


async def _vet_sse(stream: trio.abc.Stream, request: _Request, ctx: FrontContext, ip: str) -> bool:
    """``GET /sse``: vet it like a WebSocket upgrade (rule 2); True once it holds
    the chat slot of ``ip``, the client address (rule 4)."""
    headers = request.headers
    if not origin_allowed(headers.get("origin"), headers.get("host"), ctx.config.allow_origins):
        await _send_raw_json(stream, 403, "forbidden", "origin not allowed")
        return False
    if ctx.draining:
        await _send_raw_json(stream, 503, "unavailable", "the server is shutting down")
        return False
    if not ctx.take_ip_slot(ip):
        await _send_raw_json(stream, 429, "too_many", "too many connections from your address")
        return False
    return True


async def _post_sse(
    stream: trio.abc.Stream, conn: h11.Connection, request: _Request, ctx: FrontContext
) -> bool:
    """``POST /sse`` (session id in `SSE_SESSION_HEADER`) or, kept for older
    clients, ``POST /sse/<session>``: one client frame. False when the
    connection must close. The path form ignores the header."""
    headers = request.headers
    config = ctx.config
    in_path = request.path.startswith("/sse/")
    session = (
        request.path[len("/sse/") :] if in_path else headers.get(SSE_SESSION_HEADER, "").strip()
    )

    async def answer(status: int, code: str = "", message: str = "") -> bool:
        body = _json_error(code, message) if status != 204 else b""
        kind = "application/json"
        if status == 405:
            return await _send(stream, conn, request, 405, body, content_type=kind, allow="POST")
        return await _send(stream, conn, request, status, body, content_type=kind)

    if request.method != "POST":
        return await answer(405, "method_not_allowed", "POST a frame to this address")
    if not origin_allowed(headers.get("origin"), headers.get("host"), config.allow_origins):
        await _send_raw_json(stream, 403, "forbidden", "origin not allowed")
        return False
    if not session:
        # A client bug, not a lost session: say what is missing (the body is
        # left unread; the request loop reads past it).
        return await answer(400, "no_session", "name the session in X-Triochat-Session")
    limit = config.max_frame_bytes
    declared = headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        await _send_raw_json(stream, 413, "too_big", f"a frame is at most {limit} bytes")
        return False
    with trio.move_on_after(config.handshake_timeout) as scope:
        body = await _read_body(stream, conn, limit)
    if scope.cancelled_caught:
        await _send_raw(stream, 408, "the request body took too long")
        return False
    if body is None:
        await _send_raw_json(stream, 413, "too_big", f"a frame is at most {limit} bytes")
        return False
    status, code, message = await ctx.post_sse(session, body)
    return await answer(status, code, message)


def _api_of(ctx: FrontContext) -> ChatApi | None:
    """The server API when it is on (rule 6): a key, and a chat side wired."""
    return ctx.api if ctx.config.api_key is not None else None


async def _serve_api(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: _Request,
    chat: ChatApi,
    config: Config,
) -> bool:
    """``/api/…`` (rule 6): api.py answers. False when the connection must close."""

    async def read_body() -> bytes:
        too_big = ApiError(413, "too_big", f"a body is at most {MAX_BODY_BYTES} bytes")
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        with trio.move_on_after(config.handshake_timeout) as scope:
            body = await _read_body(stream, conn, MAX_BODY_BYTES)
        if scope.cancelled_caught:
            raise ApiError(408, "timeout", "the request body took too long")
        if body is None:
            raise too_big
        return body

    answer = await answer_api(
        chat, config, request.method, request.target, request.headers, read_body
    )
    extra = [*answer.headers, *([("connection", "close")] if answer.close else [])]
    sent = await _send(
        stream, conn, request, answer.status, answer.body, content_type=JSON_TYPE, extra=extra
    )
    return sent and not answer.close


async def _read_body(stream: trio.abc.Stream, conn: h11.Connection, limit: int) -> bytes | None:
    """The whole request body, or None when it is longer than ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                return None
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise h11.RemoteProtocolError("the request body ended early", error_status_hint=400)


def _head_as_received(event: h11.Request) -> bytes:
    """The request head as received, for wsproto to parse again: every header
    line in its order and spelling, repeats kept (never joined)."""
    lines = [b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)]
    lines.extend(name + b": " + value for name, value in event.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n"
