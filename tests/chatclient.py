"""A small chat client for tests: JSON frames over trio-websocket.

Written against docs/protocol.md, not against the server's code.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)

# The same trio-websocket closing race hits clients: a ping that arrives while
# the client's close is in flight makes its reader raise.
from triochat.transports.websocket import ClosingRace

Frame = dict[str, Any]


class ChatClient:
    """One test connection; `recv` fails the test after ``timeout`` seconds."""

    def __init__(self, ws: WebSocketConnection, timeout: float = 5.0) -> None:
        self.ws = ws
        self.timeout = timeout

    async def send(self, frame: Frame | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self) -> Frame:
        with trio.fail_after(self.timeout):
            text = await self.ws.get_message()
        return json.loads(text)

    async def expect(self, kind: str, **fields: Any) -> Frame:
        """The next frame, asserted to be of ``kind`` with ``fields``."""
        frame = await self.recv()
        assert frame.get("type") == kind, frame
        for key, value in fields.items():
            assert frame.get(key) == value, (key, frame)
        return frame

    async def join(self, room: str = "lobby", name: str | None = None, **extra: Any) -> Frame:
        frame: Frame = {"type": "join", "room": room, **extra}
        if name is not None:
            frame["name"] = name
        await self.send(frame)
        return await self.expect("joined", room=room)

    async def say(self, msg: str, room: str = "lobby", ref: str | None = None) -> None:
        frame: Frame = {"type": "say", "room": room, "msg": msg}
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)

    async def closed(self) -> tuple[int | None, str | None]:
        """Wait for the server to close; the (code, reason) it sent."""
        with trio.fail_after(self.timeout):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    return (reason.code, reason.reason) if reason else (None, None)


@asynccontextmanager
async def open_client(
    url: str, *, timeout: float = 5.0, **kwargs: Any
) -> AsyncIterator[ChatClient]:
    """A `ChatClient` over a real socket to ``ws://host:port/path``.

    The socket is ours to close: trio-websocket's client leaves it open when
    the server starts the closing handshake.
    """
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "ws", url
    assert parts.hostname, url
    assert parts.port, url
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with open_memory_client(
            stream,
            parts.path or "/",
            timeout=timeout,
            host=f"{parts.hostname}:{parts.port}",
            **kwargs,
        ) as client:
            yield client
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_memory_client(
    stream: trio.abc.Stream,
    resource: str = "/ws",
    *,
    timeout: float = 120.0,
    host: str = "localhost",
    **kwargs: Any,
) -> AsyncIterator[ChatClient]:
    """A `ChatClient` over an already connected stream (memory or TCP).

    ``timeout`` bounds each `recv`; under ``autojump_clock`` it is virtual time.
    """
    try:
        async with _stream_client(stream, resource, timeout, host, **kwargs) as client:
            yield client
    except* ClosingRace:
        pass


@asynccontextmanager
async def _stream_client(
    stream: trio.abc.Stream, resource: str, timeout: float, host: str, **kwargs: Any
) -> AsyncIterator[ChatClient]:
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, resource, **kwargs)
        try:
            yield ChatClient(ws, timeout)
        finally:
            with trio.move_on_after(1, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()
