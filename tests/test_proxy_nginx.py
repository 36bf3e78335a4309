"""Behind nginx (#11 §3, docs/protocol.md §1): deploy/nginx.conf in front of a node
started as that file says (`--trusted-proxy 127.0.0.1/32`), with
``--max-conns-per-ip 1``, spoken to over raw sockets.

The clients connect to nginx from 127.0.0.2 and 127.0.0.3 (Linux routes all of
127/8 to lo): nginx itself reaches the node from 127.0.0.1, the trusted
address, and a client on that same address would be a trusted hop too.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .nginxserver import running_nginx
from .redisserver import free_port
from .server_process import ServerProcess, run_server
from .test_cluster_browser import render_deploy_conf

CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
WS_KEY = base64.b64encode(b"0123456789abcdef").decode()
SPOOFED = (
    ("X-Forwarded-For", "203.0.113.7"),
    ("Forwarded", "for=198.51.100.23"),
)


@contextmanager
def node_behind_nginx(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    """A node with deploy/nginx.conf's flags and ``--max-conns-per-ip 1``, and
    nginx running deploy/nginx.conf (both upstream entries on that node); yields
    the node and nginx's port."""
    with ExitStack() as stack:
        node = stack.enter_context(
            run_server(
                *("--trusted-proxy", "127.0.0.1/32", "--max-pending-per-ip", "0"),
                *("--max-conns-per-ip", "1"),
            )
        )
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        front, *pinned = (free_port() for _ in range(3))
        # (The pinned copies render_deploy_conf adds go unused: the deploy file's
        # own server block is the one under test.)
        conf = render_deploy_conf([node.port, node.port], front, pinned)
        (prefix / "triochat.conf").write_text(conf)
        # deploy/nginx.conf is an http-context snippet, as in Debian's conf.d/.
        stack.enter_context(running_nginx(prefix, f"include {prefix}/triochat.conf;", [front]))
        yield node, front


@contextmanager
def handshake_via(
    front: int, source: str, extra: tuple[tuple[str, str], ...] = ()
) -> Iterator[int]:
    """A WebSocket handshake to nginx from ``source``; yields the status while the
    connection stays open (an accepted chat holds its slot until then)."""
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{front}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra),
    ]
    with socket.create_connection(
        ("127.0.0.1", front), timeout=10, source_address=(source, 0)
    ) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            assert chunk, f"nginx closed without a response: {head!r}"
            head += chunk
        yield int(head.split(b" ", 2)[1])


def wait_for_line(node: ServerProcess, *parts: str, timeout: float = 5.0) -> str:
    """The first output line of ``node`` that holds every one of ``parts``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(node.output):
            if all(part in line for part in parts):
                return line
        assert time.monotonic() < deadline, f"no line with {parts!r} in:\n{node.output_text()}"
        time.sleep(0.05)


def test_proxy_nginx_spoofed_forwarding_headers_do_not_unlock_a_second_slot(
    tmp_path: Path,
) -> None:
    """Through deploy/nginx.conf, a client's second chat gets 429 under
    ``--max-conns-per-ip 1`` even when it sends a spoofed X-Forwarded-For or
    Forwarded (nginx appends the address it saw, and drops Forwarded); another
    client still gets its own slot; the node's log names each client, via nginx."""
    with node_behind_nginx(tmp_path) as (node, front):
        with handshake_via(front, CLIENT) as first:
            assert first == 101
            opened = wait_for_line(node, "open ", " ws/ws")
            assert opened.split("open ", 1)[1].startswith(f"{CLIENT} via 127.0.0.1:"), opened
            for header in SPOOFED:
                with handshake_via(front, CLIENT, (header,)) as second:
                    assert second == 429, header
            with handshake_via(front, CLIENT, SPOOFED) as second:
                assert second == 429
            with handshake_via(front, OTHER_CLIENT, SPOOFED) as other:
                assert other == 101
                wait_for_line(node, f"open {OTHER_CLIENT} via 127.0.0.1:", " ws/ws")
        wait_for_line(node, f"close {CLIENT} via 127.0.0.1:", " ws/ws")
        wait_for_line(node, f"{CLIENT} via 127.0.0.1 GET /ws 429 ")  # the access lines
    output = node.output_text()
    for spoof in ("203.0.113.7", "198.51.100.23"):
        assert spoof not in output, output
    assert "Traceback" not in output
