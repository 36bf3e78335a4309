"""The front's request loop: `handle_http` serves one accepted connection.

It reads each request head with h11 (bounded in size and time; a plain
WebSocket upgrade that has arrived whole, without it: `quickhead`), checks its
``Host`` first, then routes it: a WebSocket upgrade (vetted by `handshake`)
or ``GET /sse`` (vetted by `sse`) is returned to the caller to run; ``POST
/sse``, ``/api/…`` and the plain paths (`routes`) are answered here, and
the loop goes on with the next request on the connection (keep-alive).
"""

from __future__ import annotations

import h11
import trio

from ..api import API_PREFIX
from ..config import Config
from ..transports.replay import read_arrived
from . import access as access_log
from .access import Access
from .api import api_of, serve_api
from .context import FrontContext
from .handshake import Upgrade, upgrade_refusal, vetted_upgrade
from .messages import Request
from .peers import PendingSockets, peer_ip
from .policy import client_ip, host_allowed
from .quickhead import quick_upgrade
from .routes import GET_HEAD, GET_HEAD_POST, Routes, StaticFiles, route
from .sse import SseOpen, post_sse, vet_sse
from .wire import (
    RECEIVE_BYTES,
    answer_protocol_error,
    answering_protocol_errors,
    event_at_hand,
    finish_request,
    next_event,
    send,
    send_raw,
)


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
        routes: what this listener serves.

    Resource handling: the caller closes ``stream`` afterwards.
    """
    counted = pending is not None
    access: Access | None = None  # the request being answered, until its line is out
    if ip is None:
        ip = peer_ip(stream)
    try:
        config = ctx.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        while True:
            request = await _next_request(stream, conn, config, quick=routes.chats)
            if request is None:
                return None
            access = access_log.begin(request)
            # First of all (§1): a name we do not serve is a DNS-rebinding page.
            if not host_allowed(request.headers.get("host"), config.allow_hosts):
                ctx.stats.hosts_refused += 1
                await send_raw(
                    stream,
                    421,
                    "this server does not answer for that host name",
                    head=request.method == "HEAD",
                )
                return None
            ctx.stats.http_requests += 1
            if routes.chats and "websocket" in request.headers.get("upgrade", "").lower():
                upgrade = await _open_upgrade(stream, conn, request, ctx, ip)
                if upgrade is not None:
                    access = None  # a chat now: it logs its own open and close lines
                    access_log.detach()
                return upgrade
            if routes.chats and request.path == "/sse" and request.method == "GET":
                if pending is not None and counted:
                    counted = False  # a stream for hours: a chat now, counted per IP
                    pending.release(ip)
                client = client_ip(ip, request.headers, config)
                if not await vet_sse(stream, request, ctx, client):
                    return None
                opened = SseOpen(client, access, ip, config)
                access = None  # its line is written when the stream ends (`finished`)
                access_log.detach()
                return opened
            if not await _answer(stream, conn, request, ctx, static, routes):
                return None
            if not await _read_past_body(stream, conn, config):
                return None
            access_log.log_access(access, ip, config)
            access = None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
    finally:
        if access is not None:
            access_log.log_access(access, ip, ctx.config)
        if pending is not None and counted:
            pending.release(ip)


async def _next_request(
    stream: trio.abc.Stream, conn: h11.Connection, config: Config, *, quick: bool = False
) -> Request | None:
    """The next request head, within ``handshake_timeout``; None when the
    connection is to close (a broken or slow head answered, or the client gone).

    ``quick``: a plain WebSocket upgrade that has arrived whole may be read
    without h11 (`quickhead`); it then has `Request.early` and ``conn`` has not
    seen it, so the caller must not go on with ``conn`` after it.
    """
    limit = config.max_header_bytes
    event: object = h11.NEED_DATA
    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
        # A request on a plain socket (a new connection's, mostly) has often
        # arrived whole by the time it is read: taken without a deadline then
        # (a cancel scope and a wait cost 10-20 µs of a connection's setup; #16).
        arrived = read_arrived(stream, RECEIVE_BYTES)
        if arrived is not None:
            if quick and (upgrade := quick_upgrade(arrived, limit)) is not None:
                return upgrade
            conn.receive_data(arrived)
            try:
                event = event_at_hand(conn, head_limit=limit)
            except h11.RemoteProtocolError as exc:
                with trio.move_on_after(config.handshake_timeout):
                    await answer_protocol_error(stream, exc)
                return None
    if event is h11.NEED_DATA:
        # (A cancel scope rather than trio.fail_after: one generator less per request.)
        with trio.CancelScope(deadline=trio.current_time() + config.handshake_timeout) as scope:
            event = await answering_protocol_errors(
                stream, next_event(conn, stream, head_limit=limit)
            )
        if scope.cancelled_caught:
            # Silence between requests just closes; a request begun and stalled is a 408.
            if conn.their_state is h11.SEND_BODY or conn.trailing_data[0]:
                await send_raw(stream, 408, "the request took too long")
            return None
    if not isinstance(event, h11.Request):
        return None  # the client closed the connection
    return Request.from_h11(event)


async def _open_upgrade(
    stream: trio.abc.Stream, conn: h11.Connection, request: Request, ctx: FrontContext, ip: str
) -> Upgrade | None:
    """Vet a WebSocket upgrade from TCP peer ``ip``: the `Upgrade`, holding the
    client address's chat slot, or None once a refusal is written."""
    config = ctx.config
    refusal = upgrade_refusal(request, config.allow_origins, draining=ctx.draining)
    if refusal is not None:
        await send_raw(stream, refusal.status, refusal.message, extra=refusal.extra)
        return None
    client = client_ip(ip, request.headers, config)
    if not ctx.take_ip_slot(client):
        await send_raw(stream, 429, "too many connections from your address")
        return None
    early = request.early if request.early is not None else conn.trailing_data[0]
    return vetted_upgrade(request, client, early)


async def _answer(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: Request,
    ctx: FrontContext,
    static: StaticFiles,
    routes: Routes,
) -> bool:
    """Answer a request that stays HTTP; False when the connection must close."""
    if routes.chats and (
        request.path.startswith("/sse/") or (request.path == "/sse" and request.method == "POST")
    ):
        return bool(await answering_protocol_errors(stream, post_sse(stream, conn, request, ctx)))
    if routes.chats and request.path.startswith(API_PREFIX) and (api := api_of(ctx)) is not None:
        return bool(
            await answering_protocol_errors(
                stream, serve_api(stream, conn, request, api, ctx.config)
            )
        )
    return await _respond(stream, conn, request, ctx, static, routes)


async def _read_past_body(stream: trio.abc.Stream, conn: h11.Connection, config: Config) -> bool:
    """Read past an answered request's body, within ``handshake_timeout``;
    False when the connection must close instead of taking the next request."""
    try:
        with trio.move_on_after(config.handshake_timeout) as scope:
            finished = await finish_request(stream, conn)
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False  # answered already; a broken body only ends the connection
    return not scope.cancelled_caught and finished


async def _respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: Request,
    ctx: FrontContext,
    static: StaticFiles,
    routes: Routes = Routes.ALL,
) -> bool:
    """Answer a plain request (`routes.route`); False when the connection must close."""
    found = route(request.path, ctx, static, routes)
    if found is None:
        return await send(stream, conn, request, 404, b"not found\n")
    if request.method not in ("GET", "HEAD"):
        # /sse also takes POST (a frame of a session, docs/protocol.md §13).
        allow = GET_HEAD_POST if request.path == "/sse" and routes.chats else GET_HEAD
        return await send(stream, conn, request, 405, b"method not allowed\n", allow=allow)
    status, body, content_type, extra = found()
    return await send(stream, conn, request, status, body, content_type=content_type, extra=extra)
