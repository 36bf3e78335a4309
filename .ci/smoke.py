"""Smoke-test a running triochat as a user would (run by `.ci/run`).

Waits for the port, then: ``GET /`` serves the page, ``/healthz`` says ok,
and a WebSocket ``join`` + ``say`` gets ``joined``, ``message`` and ``ack``.
Exits 0 when all of it holds, 1 with the reason otherwise.

Usage: python .ci/smoke.py [--port 8181] [--wait 180]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request
from typing import NoReturn

from websockets.sync.client import connect


def wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                fail(f"nothing listens on port {port} after {seconds:g} s")
            time.sleep(0.5)


def fail(reason: str) -> NoReturn:
    print(f"smoke: FAILED: {reason}", file=sys.stderr)
    raise SystemExit(1)


def check(holds: bool, what: object) -> None:
    if not holds:
        fail(repr(what))


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


def expect(ws: object, kind: str) -> dict[str, object]:
    """The next frame of type ``kind`` (presence and the like are skipped)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = json.loads(ws.recv(timeout=10))  # type: ignore[attr-defined]
        if frame.get("type") == kind:
            return dict(frame)
        if frame.get("type") == "error":
            fail(f"error frame while waiting for {kind}: {frame}")
    fail(f"no {kind} frame within 10 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--wait", type=float, default=180.0)
    args = parser.parse_args()
    wait_for_port(args.port, args.wait)
    base = f"http://127.0.0.1:{args.port}"

    status, kind, page = get(base + "/")
    check(status == 200 and kind.startswith("text/html"), (status, kind))
    check(b"<html" in page.lower() and b"app.js" in page, page[:200])
    status, _, body = get(base + "/static/app.js")
    check(status == 200 and bool(body), status)
    status, _, body = get(base + "/healthz")
    check((status, body) == (200, b"ok\n"), (status, body))
    print(f"smoke: GET / ({len(page)} bytes of page), /static/app.js and /healthz are fine")

    with connect(f"ws://127.0.0.1:{args.port}/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "join", "room": "lobby", "name": "smoke"}))
        joined = expect(ws, "joined")
        check(joined["room"] == "lobby", joined)
        ws.send(json.dumps({"type": "say", "room": "lobby", "msg": "hello", "ref": "s1"}))
        message = expect(ws, "message")
        check((message["name"], message["msg"]) == ("smoke", "hello"), message)
        ack = expect(ws, "ack")
        check((ack["ref"], ack["id"]) == ("s1", message["id"]), ack)
    print(f"smoke: WebSocket join, say -> joined, message {message['id']}, ack")


if __name__ == "__main__":
    main()
