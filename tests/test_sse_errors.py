"""The SSE transport's error boundary (`SseErrors`, #17): trio's exceptions on its
stream and inbox become `TransportClosed`, in one place, as before it had one."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from triochat.errors import TriochatError
from triochat.frames import OutFrame
from triochat.transports import TransportClosed
from triochat.transports.sse import SseErrors, SseTransport


async def test_sse_errors_write_to_a_gone_client_is_transport_closed_and_ends_the_session():
    """A write the client is gone for raises TransportClosed("event stream lost") and ends
    the session: its reader then gets "event stream closed", a POST is refused."""
    ours, theirs = trio.testing.memory_stream_pair()
    transport = SseTransport(ours)
    await transport.start()
    assert (await theirs.receive_some()).startswith(b"HTTP/1.1 200 OK")
    await theirs.aclose()
    with pytest.raises(TransportClosed) as lost:
        await transport.send([OutFrame(b'{"type":"pong"}')])
    assert lost.value.reason == "event stream lost"
    assert isinstance(lost.value.__cause__, trio.BrokenResourceError)
    assert transport.ended
    with pytest.raises(TransportClosed) as closed:
        await transport.receive_message()
    assert closed.value.reason == "event stream closed"
    assert await transport.post('{"type":"leave","room":"x"}') is False
    await transport.abort()


async def test_sse_errors_posted_frames_reach_the_reader_until_the_client_closes():
    """POSTed frames are read in order; when the client closes the stream `watch_peer`
    returns, the session has ended, and the reader gets TransportClosed."""
    ours, theirs = trio.testing.memory_stream_pair()
    transport = SseTransport(ours, "node1")
    assert transport.session_id.startswith("node1.")
    assert await transport.post("first") is True
    assert await transport.receive_message() == "first"
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.watch_peer)
            await theirs.aclose()
    assert transport.ended
    with pytest.raises(TransportClosed, match="event stream closed"):
        await transport.receive_message()
    # The close event to a gone client: no error out of close().
    await transport.close(1000, "bye")
    with pytest.raises(TransportClosed, match="event stream lost"):
        await transport.ping()


def test_sse_errors_map_only_trio_errors_and_run_the_end_first():
    """The boundary: trio's "it is over" errors become TransportClosed (a TriochatError),
    after ``on_error``; anything else (a bug) passes through."""
    ended: list[bool] = []
    boundary = SseErrors("event stream lost", on_error=lambda: ended.append(True))
    for error in (trio.BrokenResourceError(), trio.ClosedResourceError(), trio.EndOfChannel()):
        with pytest.raises(TransportClosed) as raised, boundary:
            raise error
        assert isinstance(raised.value, TriochatError)
        assert raised.value.__cause__ is error
    assert ended == [True, True, True]
    with pytest.raises(ValueError, match="a bug"), boundary:
        raise ValueError("a bug")
    assert ended == [True, True, True]
