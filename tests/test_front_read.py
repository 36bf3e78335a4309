"""The front's read of a request head on a real socket (`front.loop._next_request`).

A new connection's request has mostly arrived by the time it is accepted:
then it is taken as it is, with no deadline to set (#16). Whatever has not
arrived is waited for within ``handshake_timeout`` as before: half a head
then silence is a 408, a head that trickles in is read whole.
"""

from __future__ import annotations

import h11
import trio

from triochat.config import Config
from triochat.front import loop, wire
from triochat.front.loop import _next_request

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _pair() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    ours, theirs = trio.socket.socketpair()
    return trio.SocketStream(ours), theirs


async def test_a_head_already_arrived_is_taken_without_waiting(monkeypatch) -> None:
    """A head that is there already is read from what arrived: `next_event`,
    which waits on the stream (under the deadline), is not called."""
    waited_on: list[object] = []

    async def next_event(conn, stream, **kwargs):
        waited_on.append(stream)
        return await wire.next_event(conn, stream, **kwargs)

    monkeypatch.setattr(loop, "next_event", next_event)
    stream, theirs = _pair()
    with theirs:
        await theirs.send(REQUEST)
        conn = h11.Connection(h11.SERVER)
        request = await loop._next_request(stream, conn, Config())
        assert request is not None
        assert request.path == "/healthz"
        assert waited_on == []
        await stream.aclose()


async def test_half_a_head_already_arrived_then_silence_is_a_408() -> None:
    stream, theirs = _pair()
    with theirs:
        await theirs.send(REQUEST[:20])
        conn = h11.Connection(h11.SERVER)
        with trio.fail_after(5):
            assert await _next_request(stream, conn, Config(handshake_timeout=0.2)) is None
            answer = await theirs.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        await stream.aclose()


async def test_a_head_that_trickles_in_after_the_first_part_is_read_whole() -> None:
    stream, theirs = _pair()
    with theirs:
        await theirs.send(REQUEST[:20])
        conn = h11.Connection(h11.SERVER)
        async with trio.open_nursery() as nursery:

            async def rest() -> None:
                await trio.sleep(0.05)
                await theirs.send(REQUEST[20:])

            nursery.start_soon(rest)
            request = await _next_request(stream, conn, Config(handshake_timeout=5.0))
        assert request is not None
        assert request.path == "/healthz"
        await stream.aclose()


async def test_a_malformed_head_already_arrived_is_answered_400() -> None:
    stream, theirs = _pair()
    with theirs:
        await theirs.send(b"NOT HTTP AT ALL\r\n\r\n")
        conn = h11.Connection(h11.SERVER)
        assert await _next_request(stream, conn, Config()) is None
        answer = await theirs.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        await stream.aclose()


async def test_a_peer_gone_before_its_request_just_ends() -> None:
    stream, theirs = _pair()
    theirs.close()
    conn = h11.Connection(h11.SERVER)
    with trio.fail_after(5):
        assert await _next_request(stream, conn, Config()) is None
    await stream.aclose()
