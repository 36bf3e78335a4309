"""The HTTP front (docs/protocol.md §1), spoken byte by byte over real TCP.

Written from docs/protocol.md alone: raw requests, responses parsed here.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from triochat import Server

from .conftest import running_server

WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConn:
    """One TCP connection with a read buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # a reset counts as closed
            return False
        self.buffer += data
        return bool(data)

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert await self._more(), "connection closed early"
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def eof(self) -> bytes:
        """Read until the server closes; what came before the close."""
        while await self._more():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def response(self, *, head: bool = False) -> Response:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            assert await self._more(), f"closed without a response: {bytes(self.buffer)!r}"
        raw = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status_line, *lines = raw.split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        code = int(status)
        body = b""
        if not head and code != 101:
            length = headers.get("content-length")
            body = await self.read_exactly(int(length)) if length is not None else await self.eof()
        return Response(code, headers, body)


@asynccontextmanager
async def open_tcp(server: Server) -> AsyncIterator[RawConn]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        yield RawConn(stream)


def request_bytes(
    server: Server, method: str, target: str, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def fetch(
    server: Server, method: str, target: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """One request on a fresh connection."""
    async with open_tcp(server) as conn:
        await conn.send(request_bytes(server, method, target, headers))
        return await conn.response(head=method == "HEAD")


def handshake_bytes(
    server: Server,
    path: str = "/ws",
    *,
    host: str | None = None,
    origin: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host if host is not None else f'127.0.0.1:{server.port}'}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@asynccontextmanager
async def open_handshake(
    server: Server, path: str = "/ws", **kwargs: Any
) -> AsyncIterator[tuple[Response, RawConn]]:
    """A WebSocket handshake; the response and the (still open) connection."""
    async with open_tcp(server) as conn:
        await conn.send(handshake_bytes(server, path, **kwargs))
        yield await conn.response(), conn


async def handshake_status(server: Server, path: str = "/ws", **kwargs: Any) -> int:
    async with open_handshake(server, path, **kwargs) as (response, _):
        return response.status


def ws_frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2); ``fin=False`` for a fragment."""
    mask = os.urandom(4)
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


async def read_ws_frame(conn: RawConn) -> tuple[int, bytes]:
    """One server frame: (first byte, payload); server frames are unmasked."""
    first, second = await conn.read_exactly(2)
    assert not second & 0x80, "server frames must not be masked"
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await conn.read_exactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await conn.read_exactly(8))
    return first, await conn.read_exactly(size)


@asynccontextmanager
async def open_raw_chat(server: Server, name: str = "alice") -> AsyncIterator[RawConn]:
    """A joined chat connection that never answers a close frame (holds a drain)."""
    async with open_handshake(server) as (response, conn):
        assert response.status == 101, response
        join = {"type": "join", "room": "lobby", "name": name}
        await conn.send(ws_frame(json.dumps(join).encode()))
        first, payload = await read_ws_frame(conn)
        assert first & 0x0F == 0x1
        assert json.loads(payload)["type"] == "joined"
        yield conn


async def assert_close_frame(conn: RawConn, code: int) -> None:
    first, payload = await read_ws_frame(conn)
    assert first & 0x0F == 0x8, (first, payload)
    assert struct.unpack("!H", payload[:2])[0] == code, payload


# --- plain HTTP ----------------------------------------------------------------


async def test_http_root_serves_chat_page():
    """GET / answers 200 with the HTML chat page."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert b"triochat" in response.body.lower()


async def test_http_static_asset_served_with_js_type():
    """GET /static/app.js answers 200 with a JavaScript content type."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", "/static/app.js")
    assert response.status == 200
    assert "javascript" in response.headers["content-type"]
    assert response.body


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/healthz", "/readyz", "/metrics"])
async def test_http_head_same_headers_without_body(path):
    """HEAD answers GET's status and headers, with no body on the wire."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(request_bytes(server, "GET", path))
            got = await conn.response()
            await conn.send(request_bytes(server, "HEAD", path))
            head = await conn.response(head=True)
            # No body bytes may follow: the next response starts right here.
            await conn.send(request_bytes(server, "GET", "/healthz"))
            after = await conn.response()
    assert head.status == got.status == 200
    assert head.headers["content-type"] == got.headers["content-type"]
    if path != "/metrics":  # metrics change between requests
        assert head.headers["content-length"] == got.headers["content-length"]
    assert after.status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/nope",
        "/static/",
        "/static",
        "/static/../pyproject.toml",
        "/static/%2e%2e/pyproject.toml",
        "/static/%2e%2e/x",
        "/static/..%2fpyproject.toml",
        "/static/nope.js",
        "/static//etc/passwd",
    ],
)
async def test_http_unknown_paths_not_found(target):
    """Unknown paths, /static/ itself and `..` escapes answer 404."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", target)
    assert response.status == 404


@pytest.mark.parametrize("path", ["/healthz", "/", "/static/app.js", "/metrics"])
async def test_http_wrong_method_405_with_allow(path):
    """POST on a GET endpoint answers 405 with an Allow header naming GET and HEAD."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "POST", path, (("Content-Length", "0"),))
    assert response.status == 405
    allow = {method.strip() for method in response.headers["allow"].split(",")}
    assert {"GET", "HEAD"} <= allow


async def test_http_healthz_ok():
    """GET /healthz answers 200 while the process runs."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", "/healthz")
    assert response.status == 200


async def test_http_readyz_ok_then_503_while_draining():
    """/readyz answers 200, then 503 once draining; the chat gets 1001."""
    with trio.fail_after(10):
        async with running_server(close_timeout=5) as server:
            assert (await fetch(server, "GET", "/readyz")).status == 200
            async with open_raw_chat(server) as chat:
                server.drain()
                assert (await fetch(server, "GET", "/readyz")).status == 503
                assert (await fetch(server, "GET", "/healthz")).status == 200
                await assert_close_frame(chat, 1001)


async def test_http_metrics_prometheus_text():
    """GET /metrics answers 200 with Prometheus text holding triochat_ metrics."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.body.decode()
    assert "triochat_" in text
    assert any(line.startswith("# TYPE triochat_") for line in text.splitlines())


async def test_http_ws_without_upgrade_426():
    """GET /ws without an upgrade answers 426."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, "GET", "/ws")
    assert response.status == 426


async def test_http_upgrade_on_other_path_404():
    """A WebSocket upgrade on a path other than /ws or / answers 404."""
    with trio.fail_after(10):
        async with running_server() as server:
            assert await handshake_status(server, "/nope") == 404
            assert await handshake_status(server, "/healthz") == 404


@pytest.mark.parametrize(
    "head",
    [b"GARBAGE\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"],
)
async def test_http_malformed_request_400(head):
    """A malformed request answers 400 and the connection closes."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(head)
            response = await conn.response()
            await conn.eof()
    assert response.status == 400


async def test_http_blanks_then_a_nul_in_a_head_is_a_quick_400():
    """16,000 blanks and a NUL in a header line (h11's pattern would spend
    0.8 s of the event loop on it): 400 and a close, and the server goes on
    answering others at once (docs/reliability.md)."""
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nx:" + b" " * 16_000 + b"\x00\r\n\r\n"
    with trio.fail_after(10):
        async with running_server() as server:
            for _ in range(5):
                async with open_tcp(server) as conn:
                    await conn.send(head)
                    response = await conn.response()
                    await conn.eof()
                assert response.status == 400
            assert (await fetch(server, "GET", "/healthz")).status == 200
            # The loop never stalled for it (h11 alone: about 0.8 s, five times).
            from .test_metrics import scrape, total  # (it imports this module)

            stalled = total(await scrape(server), "triochat_loop_stall_max_seconds")
            assert stalled < 0.25


async def test_http_oversized_head_4xx_and_closed():
    """A request head over max_header_bytes answers 431 (or 400) and closes."""
    with trio.fail_after(10):
        async with running_server(max_header_bytes=1024) as server, open_tcp(server) as conn:
            await conn.send(request_bytes(server, "GET", "/", (("X-Big", "a" * 2000),)))
            response = await conn.response()
            assert response.status in (431, 400)
            await conn.eof()


async def test_http_stalled_head_cut_at_handshake_timeout():
    """Half a request head then silence: closed within handshake_timeout; others served."""
    timeout = 0.5
    with trio.fail_after(10):
        async with (
            running_server(handshake_timeout=timeout) as server,
            open_tcp(server) as slow,
        ):
            await slow.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start = trio.current_time()
            for path in ("/healthz", "/", "/static/app.js"):
                assert (await fetch(server, "GET", path)).status == 200
            served = trio.current_time() - start
            rest = await slow.eof()
            ended = trio.current_time() - start
    assert served < timeout
    assert ended < timeout + 0.5
    assert not rest or rest.startswith(b"HTTP/1.1 408"), rest


async def test_http_trickled_head_cut_at_handshake_timeout():
    """A head trickled a byte at a time is still cut at handshake_timeout."""
    timeout = 0.5
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000

    async def trickle(conn: RawConn) -> None:
        try:
            for byte in head:
                await conn.send(bytes([byte]))
                await trio.sleep(0.05)  # the client's pace, not a wait for an event
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with running_server(handshake_timeout=timeout) as server, open_tcp(server) as slow:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, slow)
                await slow.eof()
                ended = trio.current_time() - start
                nursery.cancel_scope.cancel()
    assert ended < timeout + 0.5


async def test_http_keep_alive_serves_two_requests():
    """Two GETs on one connection are both answered."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(request_bytes(server, "GET", "/healthz"))
            first = await conn.response()
            await conn.send(request_bytes(server, "GET", "/static/app.js"))
            second = await conn.response()
    assert first.status == second.status == 200
    assert "javascript" in second.headers["content-type"]


async def test_http_pipelined_requests_both_answered():
    """Two GETs sent back to back before reading are answered in order."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(
                request_bytes(server, "GET", "/healthz") + request_bytes(server, "GET", "/nope")
            )
            first = await conn.response()
            second = await conn.response()
    assert (first.status, second.status) == (200, 404)


# --- WebSocket handshakes: Origin, limits, draining, compression -----------------


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        (None, None, 101),
        (None, "http://127.0.0.1:{port}", 101),
        (None, "https://127.0.0.1:{port}", 101),
        ("localhost:{port}", "http://LocalHost:{port}", 101),
        ("LOCALHOST:{port}", "http://localhost:{port}", 101),
        (None, "http://127.0.0.1:{other}", 403),
        (None, "http://127.0.0.1", 403),
        (None, "http://127.0.0.1:{port}.evil.example", 403),
        (None, "ftp://127.0.0.1:{port}", 403),
        (None, "http://evil.example", 403),
        (None, "null", 403),
    ],
)
async def test_http_origin_rules_default(host, origin, status):
    """Without --allow-origin, only no Origin or the request's own host is allowed."""
    with trio.fail_after(10):
        async with running_server() as server:
            port, other = server.port, server.port % 65535 + 1

            def fill(text):
                return None if text is None else text.format(port=port, other=other)

            got = await handshake_status(server, host=fill(host), origin=fill(origin))
    assert got == status


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        (("null",), "null", 101),
        (("null",), "http://evil.example", 403),
        (("http://localhost:3000",), "http://localhost:3000", 101),
        (("http://localhost:3000",), "http://localhost:3001", 403),
        (("http://localhost:3000",), "https://localhost:3000", 403),
        (("http://localhost:3000",), "http://localhost", 403),
        (("http://localhost:3000",), "null", 403),
        (("http://localhost:3000",), "http://127.0.0.1:{port}", 101),
        (("*",), "http://evil.example", 101),
        (("*",), "https://any.where:8443", 101),
    ],
)
async def test_http_origin_rules_allow_origin(allowed, origin, status):
    """--allow-origin admits exactly the listed origins (`null`, `*` for any)."""
    with trio.fail_after(10):
        async with running_server(allow_origins=allowed) as server:
            got = await handshake_status(server, origin=origin.format(port=server.port))
    assert got == status


async def test_http_origin_refused_on_root_endpoint():
    """The Origin rule holds for the upgrade on / as well."""
    with trio.fail_after(10):
        async with running_server() as server:
            assert await handshake_status(server, "/", origin="http://evil.example") == 403
            assert await handshake_status(server, "/") == 101


async def test_http_per_ip_limit_429_then_slot_freed():
    """With max_conns_per_ip=2 the third handshake gets 429; after a close, one succeeds."""
    with trio.fail_after(10):
        async with (
            running_server(max_conns_per_ip=2) as server,
            open_handshake(server) as (first, _),
        ):
            assert first.status == 101
            async with open_handshake(server) as (second, conn):
                assert second.status == 101
                assert await handshake_status(server) == 429
                assert await handshake_status(server, "/") == 429
                assert (await fetch(server, "GET", "/healthz")).status == 200  # HTTP isn't
                await conn.send(ws_frame(struct.pack("!H", 1000), opcode=0x8))
                await assert_close_frame(conn, 1000)
                await conn.eof()  # the server has dropped the connection
            # The slot frees once the server has wound the connection down.
            for _ in range(200):
                status = await handshake_status(server)
                if status == 101:
                    break
                assert status == 429
                await trio.sleep(0.01)
            assert status == 101


async def test_http_per_ip_limit_zero_is_unlimited():
    """max_conns_per_ip=0 turns the per-IP limit off."""
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=0) as server, AsyncExitStack() as stack:
            for _ in range(5):
                response, _ = await stack.enter_async_context(open_handshake(server))
                assert response.status == 101


async def test_http_handshake_while_draining_503():
    """A new WebSocket handshake after drain() answers 503."""
    with trio.fail_after(10):
        async with running_server(close_timeout=5) as server, open_raw_chat(server) as chat:
            server.drain()
            assert await handshake_status(server) == 503
            assert await handshake_status(server, "/") == 503
            await assert_close_frame(chat, 1001)


async def test_http_permessage_deflate_declined():
    """A permessage-deflate offer is declined; the chat proceeds uncompressed."""
    offer = (("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),)
    with trio.fail_after(10):
        async with (
            running_server() as server,
            open_handshake(server, extra=offer) as (
                response,
                conn,
            ),
        ):
            assert response.status == 101
            assert "sec-websocket-extensions" not in response.headers
            join = {"type": "join", "room": "lobby", "name": "alice"}
            await conn.send(ws_frame(json.dumps(join).encode()))
            first, payload = await read_ws_frame(conn)
    assert first == 0x81  # FIN, no RSV1 (not compressed), text
    assert json.loads(payload)["type"] == "joined"


def _upgrade_head(request_line: str, *headers: str) -> bytes:
    lines = [request_line, "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_KEY_8_BYTES = base64.b64encode(b"01234567").decode()
_VALID = ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {WS_KEY}")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (_upgrade_head("GET /ws HTTP/1.0", *_VALID, "Sec-WebSocket-Version: 13"), 400),
        (_upgrade_head("POST /ws HTTP/1.1", *_VALID, "Sec-WebSocket-Version: 13"), 400),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {_KEY_8_BYTES}",
                "Sec-WebSocket-Version: 13",
            ),
            400,
        ),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                *_VALID,
                f"Sec-WebSocket-Key: {WS_KEY}",
                "Sec-WebSocket-Version: 13",
            ),
            400,
        ),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: not base64!",
                "Sec-WebSocket-Version: 13",
            ),
            400,
        ),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                "Upgrade: websocketx",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {WS_KEY}",
                "Sec-WebSocket-Version: 13",
            ),
            400,
        ),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                "Upgrade: websocket",
                "Connection: keep-alive",
                f"Sec-WebSocket-Key: {WS_KEY}",
                "Sec-WebSocket-Version: 13",
            ),
            400,
        ),
        (_upgrade_head("GET /ws HTTP/1.1", *_VALID, "Sec-WebSocket-Version: 8"), 426),
        (_upgrade_head("GET /ws HTTP/1.1", *_VALID), 426),
        (
            _upgrade_head(
                "GET /ws HTTP/1.1",
                "Upgrade: WebSocket",
                "Connection: keep-alive, Upgrade",
                f"Sec-WebSocket-Key: {WS_KEY}",
                "Sec-WebSocket-Version: 13",
            ),
            101,
        ),
    ],
    ids=[
        "http-1.0",
        "post",
        "key-8-bytes",
        "key-twice",
        "key-not-base64",
        "upgrade-websocketx",
        "connection-without-upgrade",
        "version-8",
        "no-version",
        "tokens-in-other-case",
    ],
)
async def test_http_handshake_checked_as_rfc6455_4_2_1(head, status):
    """An upgrade that breaks RFC 6455 4.2.1 gets 400 (426 with Sec-WebSocket-Version: 13
    for the version) and the connection closes; a valid one in any case gets 101 (#13)."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(head)
            response = await conn.response()
            if status != 101:
                await conn.eof()
    assert response.status == status
    if status == 426:
        assert response.headers["sec-websocket-version"] == "13"


# --- hostile clients (#18) ---------------------------------------------------------


def _raw_request(method: str, target: str, host: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@asynccontextmanager
async def open_tcp_from(server: Server, local_address: str) -> AsyncIterator[RawConn]:
    """A connection from another loopback address (Linux routes all of 127/8 to lo)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address=local_address)
    async with stream:
        yield RawConn(stream)


async def _pending_reaches(server: Server, count: int) -> None:
    """Wait (up to 2 s) until the server counts ``count`` sockets that are not chats yet.

    Polled: the server accepts (or notices a close) in its own time, and
    nothing a test can await says so.
    """
    for _ in range(400):
        if server.pending.total == count:
            return
        await trio.sleep(0.005)
    assert server.pending.total == count


async def _closed_at_once(conn: RawConn) -> bytes:
    """What the server wrote before closing; fails unless it closes within 1 s."""
    with trio.fail_after(1):
        return await conn.eof()


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LocalHost:{port}",
        "localhost.:{port}",
        "127.0.0.1",
        "127.0.0.1:{port}",
        "10.1.2.3:80",
        "[::1]",
        "[::1]:{port}",
        "[2001:DB8::1]:8443",
    ],
)
async def test_http_host_localhost_and_ip_literals_allowed_by_default(host):
    """Without --allow-host, localhost and IP literals are served, with any port or none (#18)."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(_raw_request("GET", "/healthz", host.format(port=server.port)))
            response = await conn.response()
    assert response.status == 200


_ROUTES = [
    ("GET", "/", ()),
    ("HEAD", "/", ()),
    ("GET", "/static/app.js", ()),
    ("GET", "/static/index.html", ()),
    ("GET", "/healthz", ()),
    ("GET", "/readyz", ()),
    ("GET", "/metrics", ()),
    ("GET", "/nope", ()),
    ("GET", "/sse", ("Accept: text/event-stream",)),
    ("POST", "/sse/abc", ("Content-Type: application/json", "Content-Length: 2")),
    ("GET", "/ws", ()),
    ("GET", "/ws", (*_VALID, "Sec-WebSocket-Version: 13")),
    ("GET", "/", (*_VALID, "Sec-WebSocket-Version: 13")),
]


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "localhostx",
        "::1",
        "[::1",
        "[not-an-ip]:{port}",
        "127.0.0.1:{port}:80",
        "localhost:http",
        "999.1.1.1",
    ],
)
@pytest.mark.parametrize(("method", "target", "extra"), _ROUTES)
async def test_http_foreign_host_421_on_every_route(host, method, target, extra):
    """A Host that is not localhost, an IP literal or allowed gets 421 and a close on every
    route, page, static, health, metrics, SSE and WebSocket alike: DNS rebinding (#18)."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            head = _raw_request(method, target, host.format(port=server.port), *extra)
            body = b"{}" if method == "POST" else b""
            # A pipelined second request must not be answered.
            await conn.send(head + body + request_bytes(server, "GET", "/healthz"))
            response = await conn.response(head=method == "HEAD")
            rest = await _closed_at_once(conn)
            assert not server.connections
            assert not server.hub.chat.clients
    assert response.status == 421
    assert response.headers["connection"] == "close"
    assert rest == b""


@pytest.mark.parametrize(
    ("allowed", "host", "status"),
    [
        (("chat.example.com",), "chat.example.com", 200),
        (("chat.example.com",), "Chat.Example.COM:8443", 200),
        (("chat.example.com",), "chat.example.com.:80", 200),
        (("Chat.Example.com.",), "chat.example.com", 200),
        (("chat.example.com",), "localhost:{port}", 200),
        (("chat.example.com",), "127.0.0.1:{port}", 200),
        (("chat.example.com",), "www.chat.example.com", 421),
        (("chat.example.com",), "example.com", 421),
        (("a.example", "b.example"), "b.example", 200),
        (("*",), "anything.example:1234", 200),
    ],
)
async def test_http_allow_host_adds_names(allowed, host, status):
    """--allow-host adds exact names (any port, any case, a trailing dot ignored); `*` any (#18)."""
    with trio.fail_after(10):
        async with running_server(allow_hosts=allowed) as server, open_tcp(server) as conn:
            await conn.send(_raw_request("GET", "/healthz", host.format(port=server.port)))
            response = await conn.response()
    assert response.status == status


async def test_http_allowed_host_chat_still_opens():
    """A WebSocket upgrade naming an --allow-host name (and a matching Origin) is a chat (#18)."""
    with trio.fail_after(10):
        async with running_server(allow_hosts=("chat.example.com",)) as server:
            status = await handshake_status(
                server, host="chat.example.com", origin="https://chat.example.com"
            )
    assert status == 101


def _csp_directives(policy: str) -> dict[str, list[str]]:
    directives = {}
    for part in policy.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/static/index.html")])
async def test_http_every_html_response_has_csp_and_frame_deny(method, path):
    """The page, at / or /static/index.html, comes with the same CSP (connect-src 'self' only,
    frame-ancestors 'none') and X-Frame-Options: DENY: it can not be framed (#18)."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            await conn.send(request_bytes(server, method, path))
            response = await conn.response()
            await conn.send(request_bytes(server, "HEAD", path))
            head = await conn.response(head=True)
    assert response.headers["content-type"].startswith("text/html")
    for answer in (response, head):
        directives = _csp_directives(answer.headers["content-security-policy"])
        assert directives["connect-src"] == ["'self'"]
        assert directives["frame-ancestors"] == ["'none'"]
        assert directives["default-src"] == ["'self'"]
        assert answer.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "framing",
    [
        ("Transfer-Encoding: chunked", "Content-Length: 5"),
        ("Content-Length: 5", "Transfer-Encoding: chunked"),
    ],
    ids=["te-first", "cl-first"],
)
@pytest.mark.parametrize(("method", "path"), [("POST", "/healthz"), ("GET", "/")])
async def test_http_transfer_encoding_with_content_length_400_and_closed(method, path, framing):
    """Both Transfer-Encoding and Content-Length: 400 and a close, nothing pipelined after it
    is answered (RFC 9112 6.1, request smuggling) (#18)."""
    with trio.fail_after(10):
        async with running_server() as server, open_tcp(server) as conn:
            head = _raw_request(method, path, f"127.0.0.1:{server.port}", *framing)
            smuggled = request_bytes(server, "GET", "/nope")
            await conn.send(head + b"0\r\n\r\n" + smuggled)
            response = await conn.response()
            rest = await _closed_at_once(conn)
    assert response.status == 400
    assert rest == b""


async def test_http_silent_sockets_capped_per_address():
    """Silent sockets from one address beyond --max-pending-per-ip are closed at once; other
    addresses are served meanwhile; a freed slot admits again (#18)."""
    with trio.fail_after(10):
        async with running_server(max_pending_per_ip=3, handshake_timeout=5) as server:
            async with AsyncExitStack() as stack:
                for _ in range(3):
                    await stack.enter_async_context(open_tcp(server))
                await _pending_reaches(server, 3)
                async with open_tcp(server) as fourth:
                    await fourth.send(request_bytes(server, "GET", "/healthz"))
                    assert await _closed_at_once(fourth) == b""
                assert server.stats.pending_refused == 1
                metrics = server.metrics().decode()
                assert "triochat_pending_sockets 3.0" in metrics
                assert "triochat_pending_refused_total 1.0" in metrics
                async with open_tcp_from(server, "127.0.0.2") as other:
                    await other.send(request_bytes(server, "GET", "/healthz"))
                    assert (await other.response()).status == 200
            await _pending_reaches(server, 0)  # the silent ones closed: their slots are free
            assert (await fetch(server, "GET", "/healthz")).status == 200


async def test_http_silent_sockets_capped_overall(caplog):
    """Beyond --max-pending sockets in all, a new connection from any address is closed at
    once; one WARNING per episode; served again once under the cap (#18)."""
    with trio.fail_after(10):
        async with running_server(
            max_pending=3, max_pending_per_ip=0, handshake_timeout=5
        ) as server:
            async with AsyncExitStack() as stack:
                for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                    await stack.enter_async_context(open_tcp_from(server, address))
                await _pending_reaches(server, 3)
                for address in ("127.0.0.4", "127.0.0.5"):
                    async with open_tcp_from(server, address) as refused:
                        assert await _closed_at_once(refused) == b""
            await _pending_reaches(server, 0)
            assert (await fetch(server, "GET", "/healthz")).status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "--max-pending" in warnings[0]


async def test_http_keep_alive_idle_counts_as_pending_chats_do_not():
    """A keep-alive connection between requests still counts against the pending caps; a
    WebSocket chat or an SSE stream no longer does (#18)."""
    with trio.fail_after(10):
        async with running_server(max_pending_per_ip=1, handshake_timeout=5) as server:
            async with open_tcp(server) as idle:
                await idle.send(request_bytes(server, "GET", "/healthz"))
                assert (await idle.response()).status == 200
                await _pending_reaches(server, 1)
                async with open_tcp(server) as refused:
                    assert await _closed_at_once(refused) == b""
            await _pending_reaches(server, 0)
            async with open_handshake(server) as (response, _):
                assert response.status == 101
                await _pending_reaches(server, 0)
                async with open_tcp(server) as sse:
                    await sse.send(request_bytes(server, "GET", "/sse"))
                    assert (await sse.response(head=True)).status == 200
                    await _pending_reaches(server, 0)
                    assert (await fetch(server, "GET", "/healthz")).status == 200


async def test_http_refused_upgrade_closes_at_once_and_frees_its_slot():
    """An upgrade the front refuses (Upgrade: websocketx, 400) is closed right after the
    answer, not after the handshake timeout, and its pending slot is free again (#18)."""
    head = _upgrade_head(
        "GET /ws HTTP/1.1",
        "Upgrade: websocketx",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
    )
    with trio.fail_after(10):
        async with running_server(max_pending_per_ip=1, handshake_timeout=30) as server:
            async with open_tcp(server) as conn:
                await conn.send(head)
                response = await conn.response()
                assert await _closed_at_once(conn) == b""
            assert response.status == 400
            assert server.pending.total == 0
            assert (await fetch(server, "GET", "/healthz")).status == 200


# --- behind a proxy (#11 §3) -------------------------------------------------------

LOCAL_PROXY = ("127.0.0.1/32",)


def _header(name: str, value: str) -> tuple[tuple[str, str], ...]:
    return ((name, value),)


async def _statuses(server: Server, *extras: tuple[tuple[str, str], ...]) -> list[int]:
    """One handshake per ``extras`` (its extra headers), all held open together."""
    async with AsyncExitStack() as stack:
        statuses = []
        for extra in extras:
            response, _ = await stack.enter_async_context(open_handshake(server, extra=extra))
            statuses.append(response.status)
        return statuses


async def test_http_trusted_proxy_x_forwarded_for_counts_per_client():
    """From a --trusted-proxy peer, X-Forwarded-For names the client --max-conns-per-ip
    counts: two forwarded clients get two chats each, a third from either gets 429, and
    the proxy's own address keeps its own slots (#11 §3)."""
    a = _header("X-Forwarded-For", "203.0.113.7")
    b = _header("X-Forwarded-For", "198.51.100.23")
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=2, trusted_proxies=LOCAL_PROXY) as server:
            assert await _statuses(server, a, a, b, b, a, b, ()) == [
                *(101, 101, 101, 101),
                *(429, 429),
                101,
            ]


async def test_http_trusted_proxy_forwarded_header_counts_per_client():
    """RFC 7239 Forwarded (quoted IPv6 with a port) names the client as well, the port
    and the spelling aside; with both headers, Forwarded is believed (#11 §3)."""
    first = _header("Forwarded", 'for="[2001:db8::1]:4711"')
    same_client = _header("Forwarded", 'for="[2001:DB8:0::1]:9";proto=https')
    chain = _header("Forwarded", 'for=192.0.2.60;proto=http, for="[2001:db8::2]"')
    both = (("Forwarded", 'for="[2001:db8::2]"'), ("X-Forwarded-For", "198.51.100.1"))
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=2, trusted_proxies=LOCAL_PROXY) as server:
            assert await _statuses(server, first, first, same_client, chain, both, both) == [
                *(101, 101, 429),
                *(101, 101, 429),
            ]


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8",), ("127.0.0.2/32", "::1/128")])
async def test_http_untrusted_peer_forwarding_headers_ignored(trusted):
    """From a peer that is no --trusted-proxy (none by default), X-Forwarded-For and
    Forwarded change nothing: every chat counts against 127.0.0.1 (#11 §3)."""
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=2, trusted_proxies=trusted) as server:
            assert await _statuses(
                server,
                _header("X-Forwarded-For", "203.0.113.7"),
                _header("X-Forwarded-For", "198.51.100.23"),
                _header("X-Forwarded-For", "192.0.2.1"),
                _header("Forwarded", "for=192.0.2.2"),
            ) == [101, 101, 429, 429]


async def test_http_forwarding_headers_believed_from_trusted_address_only():
    """With 127.0.0.2 trusted, a header from 127.0.0.1 is ignored and the same header
    from 127.0.0.2 names the client (here 127.0.0.1, whose slot is taken) (#11 §3)."""
    names_local = (("X-Forwarded-For", "127.0.0.1"),)
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=1, trusted_proxies=("127.0.0.2",)) as server:
            async with open_tcp_from(server, "127.0.0.1") as local:
                await local.send(
                    handshake_bytes(server, extra=_header("X-Forwarded-For", "1.2.3.4"))
                )
                assert (await local.response()).status == 101
                async with open_tcp_from(server, "127.0.0.2") as proxied:
                    await proxied.send(handshake_bytes(server, extra=names_local))
                    assert (await proxied.response()).status == 429
                async with open_tcp_from(server, "127.0.0.2") as proxied:
                    await proxied.send(handshake_bytes(server))
                    assert (await proxied.response()).status == 101


async def test_http_trusted_proxy_chain_right_most_untrusted_hop():
    """X-Forwarded-For `198.51.100.9, 10.0.0.5` with 127.0.0.1/32 and 10.0.0.0/8 trusted
    is 198.51.100.9, whatever the client put further left; a chain of trusted hops only
    is its left-most (#11 §3)."""
    with trio.fail_after(10):
        async with running_server(
            max_conns_per_ip=1, trusted_proxies=("127.0.0.1/32", "10.0.0.0/8")
        ) as server:
            assert await _statuses(
                server,
                _header("X-Forwarded-For", "198.51.100.9, 10.0.0.5"),
                _header("X-Forwarded-For", "198.51.100.9"),
                _header("X-Forwarded-For", "203.0.113.50, 198.51.100.9, 10.0.0.5"),
                _header("X-Forwarded-For", "10.0.0.9, 10.0.0.5"),
                _header("X-Forwarded-For", "10.0.0.9"),
            ) == [101, 429, 429, 101, 429]


@pytest.mark.parametrize(
    "extra",
    [
        _header("X-Forwarded-For", "not-an-address"),
        _header("X-Forwarded-For", "203.0.113.7, [2001:db8::1"),
        _header("X-Forwarded-For", "203.0.113.7:port"),
        _header("X-Forwarded-For", "\xff\xfe"),
        _header("X-Forwarded-For", ""),
        _header("Forwarded", 'for="[2001:db8::1'),
        _header("Forwarded", "for=[2001:db8::1]"),
        _header("Forwarded", "for=203.0.113.7;for=198.51.100.9"),
        _header("Forwarded", "for=unknown"),
        _header("Forwarded", "for=_hidden"),
        (("Forwarded", "for=?"), ("X-Forwarded-For", "203.0.113.7")),
    ],
)
async def test_http_trusted_proxy_malformed_headers_fall_back_to_peer(extra):
    """A forwarding header from a trusted proxy that names no address counts the chat
    against the TCP peer (a good one, meanwhile, its client): no 500, no crash, HTTP
    still served (#11 §3)."""
    good = _header("X-Forwarded-For", "198.51.100.77")
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=1, trusted_proxies=LOCAL_PROXY) as server:
            assert await _statuses(server, extra, (), good) == [101, 429, 101]
            assert (await fetch(server, "GET", "/healthz", extra)).status == 200


async def test_http_trusted_proxy_client_named_in_log_and_sse_slot(caplog):
    """The open and close lines of a WebSocket chat and of an SSE stream name the
    forwarded client (and the proxy it came through); an SSE stream holds its client's
    slot, not the proxy's (#11 §3)."""
    caplog.set_level(logging.INFO, logger="triochat.server")
    ws_client = _header("X-Forwarded-For", "203.0.113.7")
    sse_client = _header("Forwarded", 'for="[2001:db8::5]:443"')
    with trio.fail_after(10):
        async with running_server(max_conns_per_ip=1, trusted_proxies=LOCAL_PROXY) as server:
            async with open_handshake(server, extra=ws_client) as (response, conn):
                assert response.status == 101
                await conn.send(ws_frame(struct.pack("!H", 1000), opcode=0x8))
                await assert_close_frame(conn, 1000)
                await conn.eof()
            async with open_tcp(server) as sse:
                await sse.send(request_bytes(server, "GET", "/sse", sse_client))
                assert (await sse.response(head=True)).status == 200
                while b"session" not in sse.buffer:
                    assert await sse._more()
                assert await handshake_status(server, extra=sse_client) == 429
                assert await _statuses(server, (), ws_client) == [101, 101]
    lines = [r.getMessage() for r in caplog.records if r.name == "triochat.server"]
    for event, kind in (("open", "ws/ws"), ("close", "ws/ws"), ("open", "sse"), ("close", "sse")):
        client = "203.0.113.7" if kind == "ws/ws" else "2001:db8::5"
        assert any(
            line.startswith(f"{event} {client} via 127.0.0.1:") and f" {kind}" in line
            for line in lines
        ), (event, kind, lines)


async def test_http_trusted_proxy_client_named_in_access_line(caplog):
    """A plain request from a --trusted-proxy peer: its access line (the text and
    the ``peer`` field) names ``client via proxy``; one without forwarding headers
    names the proxy alone (#11 §3, §4)."""
    caplog.set_level(logging.INFO, logger="triochat.access")
    with trio.fail_after(10):
        async with running_server(trusted_proxies=LOCAL_PROXY) as server:
            xff = _header("X-Forwarded-For", "203.0.113.7")
            forwarded = _header("Forwarded", 'for="[2001:db8::5]:443"')
            assert (await fetch(server, "GET", "/healthz", xff)).status == 200
            assert (await fetch(server, "GET", "/nope", forwarded)).status == 404
            assert (await fetch(server, "GET", "/readyz")).status == 200
    access = [r for r in caplog.records if r.name == "triochat.access"]
    assert [r.peer for r in access] == [  # type: ignore[attr-defined]
        "203.0.113.7 via 127.0.0.1",
        "2001:db8::5 via 127.0.0.1",
        "127.0.0.1",
    ]
    messages = [r.getMessage() for r in access]
    assert messages[0].startswith("203.0.113.7 via 127.0.0.1 GET /healthz 200 "), messages
    assert messages[1].startswith("2001:db8::5 via 127.0.0.1 GET /nope 404 "), messages
    assert messages[2].startswith("127.0.0.1 GET /readyz 200 "), messages


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8",)])
async def test_http_untrusted_peer_spoofed_headers_stay_out_of_the_log(caplog, trusted):
    """From a peer that is no --trusted-proxy, spoofed X-Forwarded-For and Forwarded
    headers reach none of the open, close and access lines of a WebSocket chat, an
    SSE stream and a plain request: they name the real peer alone (#11 §3)."""
    caplog.set_level(logging.INFO, logger="triochat")
    spoofed = (("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=198.51.100.23"))
    with trio.fail_after(10):
        async with running_server(trusted_proxies=trusted) as server:
            async with open_handshake(server, extra=spoofed) as (response, conn):
                assert response.status == 101
                await conn.send(ws_frame(struct.pack("!H", 1000), opcode=0x8))
                await assert_close_frame(conn, 1000)
                await conn.eof()
            async with open_tcp(server) as sse:
                await sse.send(request_bytes(server, "GET", "/sse", spoofed))
                assert (await sse.response(head=True)).status == 200
                while b"session" not in sse.buffer:
                    assert await sse._more()
            assert (await fetch(server, "GET", "/healthz", spoofed)).status == 200
    records = [r for r in caplog.records if r.name in ("triochat.server", "triochat.access")]
    chats = [r.getMessage() for r in records if r.getMessage().startswith(("open ", "close "))]
    assert [line.split()[0] for line in chats] == ["open", "close", "open", "close"]
    assert all(line.split()[1].startswith("127.0.0.1:") for line in chats), chats
    access = [r for r in records if r.name == "triochat.access"]
    assert sorted((r.path, r.peer) for r in access) == [  # type: ignore[attr-defined]
        ("/healthz", "127.0.0.1"),
        ("/sse", "127.0.0.1"),
    ]
    assert all(r.getMessage().startswith("127.0.0.1 GET /") for r in access)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for spoof in ("203.0.113.7", "198.51.100.23", " via "):
        assert spoof not in text, text


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_http_sse_405_allows_every_method_it_takes(method):
    """/sse takes GET (a stream), HEAD and POST (a frame of a session, docs/protocol.md
    §13): a 405 there names all three, so a client is never told POST is not allowed."""
    with trio.fail_after(10):
        async with running_server() as server:
            response = await fetch(server, method, "/sse", (("Content-Length", "0"),))
    assert response.status == 405
    allow = {method.strip() for method in response.headers["allow"].split(",")}
    assert allow == {"GET", "HEAD", "POST"}
