"""A small Server-Sent Events client for tests (docs/protocol.md §13), on raw TCP."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal

import trio

Connect = Callable[[], Awaitable[trio.abc.Stream]]
#: How a POST names its session: the ``X-Triochat-Session`` header on ``/sse``
#: (preferred) or the ``/sse/<session>`` path (kept for compatibility).
Form = Literal["header", "path"]


def tcp(port: int) -> Connect:
    """Connect to 127.0.0.1:``port`` (for a real server)."""
    return partial(trio.open_tcp_stream, "127.0.0.1", port)


class SseStream:
    """One ``GET /sse`` stream: its session id and its events, in order."""

    def __init__(self, stream: trio.abc.Stream, connect: Connect, timeout: float = 5.0) -> None:
        self.stream = stream
        self.connect = connect
        self.timeout = timeout
        self.status = 0
        self.headers: dict[str, str] = {}
        self.session = ""
        self._buffer = b""
        self.comments = 0

    @classmethod
    async def open(
        cls, connect: Connect, *, origin: str | None = None, timeout: float = 5.0
    ) -> SseStream:
        stream = await connect()
        extra = f"Origin: {origin}\r\n" if origin else ""
        await stream.send_all(
            f"GET /sse HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n{extra}\r\n".encode()
        )
        self = cls(stream, connect, timeout)
        head = await self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        if self.status == 200:
            event = await self.next_event()
            assert event["data"]["type"] == "session", event
            self.session = event["data"]["id"]
        return self

    async def _read_until(self, marker: bytes) -> bytes:
        with trio.fail_after(self.timeout):
            while marker not in self._buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("stream ended")
                self._buffer += data
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    async def next_event(self) -> dict[str, Any]:
        """The next event as ``{"event", "id", "data"}`` (data parsed as JSON); comments are counted and skipped."""
        while True:
            block = (await self._read_until(b"\n\n")).decode()
            fields: dict[str, Any] = {"event": "message", "id": None}
            data_lines = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data_lines.append(value)
                elif name in ("event", "id"):
                    fields[name] = value
            if not data_lines:
                self.comments += 1
                continue
            fields["data"] = json.loads("\n".join(data_lines))
            return fields

    async def recv(self) -> dict[str, Any]:
        """The next chat frame (a ``message`` event's data)."""
        event = await self.next_event()
        assert event["event"] == "message", event
        return event["data"]

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        frame = await self.recv()
        assert frame.get("type") == kind, frame
        for key, value in fields.items():
            assert frame.get(key) == value, (key, frame)
        return frame

    async def post(
        self, frame: dict[str, Any] | str | bytes, **kwargs: Any
    ) -> tuple[int, dict[str, Any] | None]:
        return await post(self.connect, self.session, frame, timeout=self.timeout, **kwargs)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def post(
    connect: Connect,
    session: str,
    frame: dict[str, Any] | str | bytes,
    *,
    origin: str | None = None,
    timeout: float = 5.0,
    form: Form = "header",
) -> tuple[int, dict[str, Any] | None]:
    """POST one frame for ``session`` in ``form``: the status and the JSON body, if any.

    The header form sends no header at all for an empty ``session``.
    """
    if isinstance(frame, dict):
        body = json.dumps(frame).encode()
    elif isinstance(frame, str):
        body = frame.encode()
    else:
        body = frame
    extra = f"Origin: {origin}\r\n" if origin else ""
    target = f"/sse/{session}" if form == "path" else "/sse"
    if form == "header" and session:
        extra += f"X-Triochat-Session: {session}\r\n"
    with trio.fail_after(timeout):
        stream = await connect()
        async with stream:
            await stream.send_all(
                f"POST {target} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n{extra}\r\n".encode()
                + body
            )
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, payload = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, (json.loads(payload) if payload else None)
