"""TLS on the public port (#11 §2, docs/operations.md "TLS"): real handshakes with
certificates `trustme` makes at test time, on real sockets."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trustme

from triochat import Config, Server
from triochat.tls import Certificate, server_context

from .chatclient import ChatClient, open_memory_client
from .server_process import ServerProcess, run_server
from .sseclient import SseStream
from .test_browser import TIMEOUT, browser, join, say

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["browser"]  # the fixture (Chromium, or a skip outside CI) of test_browser.py

HOSTS = ("localhost", "127.0.0.1")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for localhost from ``ca``: (chain file, key file)."""
    cert = ca.issue_cert(*HOSTS)
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    return certfile, keyfile


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_server(ca: trustme.CA, tmp_path: Path, **options: object) -> AsyncIterator[Server]:
    certfile, keyfile = write_pair(ca, tmp_path)
    config = Config(port=0, memory=True, certfile=certfile, keyfile=keyfile, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(config).run)
        yield server
        server.drain()


def tls_connect(ca: trustme.CA, port: int) -> partial[trio.SSLStream[trio.SocketStream]]:
    return partial(
        trio.open_ssl_over_tcp_stream,
        "localhost",
        port,
        ssl_context=client_context(ca),
        https_compatible=True,
    )


@asynccontextmanager
async def wss_client(ca: trustme.CA, port: int, path: str = "/ws") -> AsyncIterator[ChatClient]:
    stream = await tls_connect(ca, port)()
    try:
        async with open_memory_client(
            stream, path, timeout=5.0, host=f"localhost:{port}"
        ) as client:
            yield client
    finally:
        await trio.aclose_forcefully(stream)


async def test_tls_websocket_chat_join_say_ack(ca: trustme.CA, tmp_path: Path) -> None:
    async with tls_server(ca, tmp_path) as server:
        assert server.scheme == "https"
        assert "tls: on" in server.startup_summary()
        assert f"https://127.0.0.1:{server.port}" in server.startup_summary()
        async with wss_client(ca, server.port) as alice, wss_client(ca, server.port) as bob:
            await alice.join(name="alice")
            await bob.join(name="bob")
            await alice.expect("presence", event="join", name="bob")
            await alice.say("over tls", ref="r1")
            message = await bob.expect("message", msg="over tls")
            assert message["name"] == "alice"
            await alice.expect("message", msg="over tls")
            await alice.expect("ack", ref="r1")


async def test_tls_sse_chat(ca: trustme.CA, tmp_path: Path) -> None:
    async with tls_server(ca, tmp_path) as server:
        connect = tls_connect(ca, server.port)
        stream = await SseStream.open(connect)
        assert stream.status == 200
        await stream.post({"type": "join", "room": "lobby", "name": "sse-alice"})
        await stream.expect("joined", room="lobby")
        await stream.post({"type": "say", "room": "lobby", "msg": "sse over tls", "ref": "s1"})
        await stream.expect("message", msg="sse over tls")
        await stream.expect("ack", ref="s1")
        await stream.aclose()


STATIC = Path(__file__).resolve().parent.parent / "static"


async def test_tls_page_and_health_over_https(ca: trustme.CA, tmp_path: Path) -> None:
    """The page, a whole /static/ asset, health, readiness and metrics: one port, https."""
    asset = (STATIC / "app.js").read_bytes()
    async with tls_server(ca, tmp_path) as server:
        for path, expected in (
            ("/", b"<!doctype html"),
            ("/healthz", b"ok\n"),
            ("/readyz", b"ready\n"),
            ("/metrics", b"\ntriochat_build_info{"),
            ("/static/app.js", b"content-type: text/javascript"),
            ("/static/app.js", b"\r\n\r\n" + asset),  # every byte of it, through TLS
        ):
            stream = await tls_connect(ca, server.port)()
            request = f"GET {path} HTTP/1.1\r\nHost: localhost:{server.port}\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
            answer = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert expected.lower() in answer.lower()
            await trio.aclose_forcefully(stream)


async def test_tls_plain_http_on_the_tls_port_gets_400_then_close(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_server(ca, tmp_path) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                answer += chunk  # ends: the server closed
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"https://" in answer
        await stream.aclose()
        # The server still serves TLS clients.
        async with wss_client(ca, server.port) as client:
            await client.join(name="after-plain")
    assert not [r for r in caplog.records if r.levelno > 20 or r.exc_info], caplog.text


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "half-hello"])
async def test_tls_stalled_handshake_is_dropped_within_the_handshake_timeout(
    ca: trustme.CA, tmp_path: Path, sent: bytes
) -> None:
    async with tls_server(ca, tmp_path, handshake_timeout=0.5) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(sent)
        started = trio.current_time()
        with trio.fail_after(3):
            while await stream.receive_some(4096):
                pass  # (a TLS alert may come first)
        assert trio.current_time() - started < 2.0
        assert server.pending.total == 0, "the socket's pending slot is released"
        await stream.aclose()


async def test_tls_failed_handshake_leaves_the_server_serving(
    ca: trustme.CA, tmp_path: Path
) -> None:
    async with tls_server(ca, tmp_path) as server:
        stranger = ssl.create_default_context()  # does not trust our CA
        bad = await trio.open_ssl_over_tcp_stream("localhost", server.port, ssl_context=stranger)
        with pytest.raises(trio.BrokenResourceError):
            await bad.do_handshake()
        await trio.aclose_forcefully(bad)
        async with wss_client(ca, server.port) as client:
            await client.join(name="after-bad-handshake")
        assert server.pending.total <= 1  # (the chat's own socket is a chat now)


def test_tls_context_is_tls12_or_later(ca: trustme.CA, tmp_path: Path) -> None:
    certfile, keyfile = write_pair(ca, tmp_path)
    context = server_context(certfile, keyfile)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # The key inside the chain file works too.
    both = tmp_path / "both.pem"
    both.write_bytes(certfile.read_bytes() + keyfile.read_bytes())
    assert server_context(both, None).minimum_version >= ssl.TLSVersion.TLSv1_2


def test_tls_bad_pair_reload_keeps_the_old_one(ca: trustme.CA, tmp_path: Path) -> None:
    certfile, keyfile = write_pair(ca, tmp_path)
    certificate = Certificate(certfile, keyfile)
    old = certificate.context
    keyfile.write_text("not a key")
    assert certificate.reload() is False
    assert certificate.context is old
    write_pair(ca, tmp_path)
    assert certificate.reload() is True
    assert certificate.context is not old


def _peer_certificate(port: int, ca: trustme.CA) -> bytes:
    context = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _wait_for(server: ServerProcess, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.output_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.output_text()}"
        time.sleep(0.05)


@pytest.fixture
def tls_process(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, Path]]:
    certfile, keyfile = write_pair(ca, tmp_path)
    with run_server("--certfile", str(certfile), "--keyfile", str(keyfile)) as server:
        yield server, certfile, keyfile


def test_tls_process_start_line_and_sighup_reload(
    ca: trustme.CA, tls_process: tuple[ServerProcess, Path, Path]
) -> None:
    """`python -m triochat --certfile --keyfile`: https in the start-up lines; SIGHUP
    gives new connections the new pair, a bad pair is logged and the old one stays."""
    server, certfile, keyfile = tls_process
    assert server.base_url.startswith("https://")
    _wait_for(server, "tls: on")
    first = _peer_certificate(server.port, ca)
    # An open connection keeps its pair across the reload.
    context = client_context(ca)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as held:
            write_pair(ca, certfile.parent)  # a new pair in the same files
            server.proc.send_signal(signal.SIGHUP)
            _wait_for(server, "reloaded the TLS certificate")
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert held.recv(4096).startswith(b"HTTP/1.1 200 ")
            assert held.getpeercert(binary_form=True) == first
    second = _peer_certificate(server.port, ca)
    assert second != first
    keyfile.write_text("not a key")
    server.proc.send_signal(signal.SIGHUP)
    _wait_for(server, "keeping the certificate in use")
    assert _peer_certificate(server.port, ca) == second
    assert server.proc.poll() is None
    assert "Traceback" not in server.output_text()


def test_tls_process_refuses_to_start_with_a_bad_certificate(tmp_path: Path) -> None:
    certfile = tmp_path / "missing.pem"
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--memory", "--port", "0", "--certfile", str(certfile)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot use the certificate" in result.stderr
    assert "Traceback" not in result.stderr


def test_tls_process_certificate_from_the_environment(ca: trustme.CA, tmp_path: Path) -> None:
    """TRIOCHAT_CERTFILE and TRIOCHAT_KEYFILE turn TLS on as --certfile and --keyfile do
    (the chain file holds no key: the handshake needs the key file too)."""
    certfile, keyfile = write_pair(ca, tmp_path)
    env = {"TRIOCHAT_CERTFILE": str(certfile), "TRIOCHAT_KEYFILE": str(keyfile)}
    with run_server(env=env) as server:
        assert server.base_url.startswith("https://")
        _wait_for(server, "tls: on")
        served = _peer_certificate(server.port, ca)
    assert served == ssl.PEM_cert_to_DER_cert(certfile.read_text())


@pytest.mark.browser
def test_tls_page_chats_in_chromium_over_https(
    browser: Browser, tls_process: tuple[ServerProcess, Path, Path]
) -> None:
    """The page at https://…/ picks wss: and chats (two browser contexts)."""
    from playwright.sync_api import expect

    server, _, _ = tls_process
    url = f"https://localhost:{server.port}/"
    contexts = [browser.new_context(ignore_https_errors=True) for _ in range(2)]
    try:
        alice, bob = (context.new_page() for context in contexts)
        for page, name in ((alice, "alice"), (bob, "bob")):
            page.goto(url)
            join(page, name)
        assert alice.evaluate("location.protocol") == "https:"
        say(alice, "hello over https")
        last = bob.locator("#messages .msg").last
        expect(last.locator(".msg-text")).to_have_text("hello over https", timeout=TIMEOUT)
    finally:
        for context in contexts:
            context.close()
    # The chats were WebSockets (wss:), not the SSE fallback: both opened as
    # ws/ws (their close lines may not be written yet).
    opened = re.findall(r" open \S+ (\S+)\n", server.output_text())
    assert opened == ["ws/ws", "ws/ws"], server.output_text()


def test_sighup_without_tls_keeps_serving() -> None:
    """SIGHUP is the reload signal: without a certificate it is logged, never fatal."""
    with run_server() as server:
        server.proc.send_signal(signal.SIGHUP)
        _wait_for(server, "SIGHUP: no --certfile to reload")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert server.proc.poll() is None
