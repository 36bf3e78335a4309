"""What an established WebSocket chat keeps (issue #16: memory per idle connection).

The connection reads in its own task (no trio-websocket reader task, no
message channel) and is built established, holding none of the handshake's
state (transports/wsopen.py). These tests check that it does, that the
private parts of trio-websocket and wsproto it relies on still behave as it
assumes (a tripwire for upgrades), that our 101 is wsproto's own, and the
behaviours that moved with the reader: the closing race, a 101 not taken.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import inspect
import logging
import socket
import textwrap

import h11
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.handshake
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from triochat.config import Config
from triochat.front.handshake import vetted_upgrade
from triochat.front.messages import Request as FrontRequest
from triochat.transports import TransportClosed
from triochat.transports.deflate import DeflateExtension
from triochat.transports.replay import ReplayStream
from triochat.transports.websocket import accept_websocket
from triochat.transports.wsopen import (
    FINISHED_HANDSHAKE,
    NO_CHANNEL,
    NO_LOCK,
    NO_PINGS,
    EstablishedProtocol,
    EstablishedWebSocket,
    EventList,
    LazyEvent,
    accept_upgrade,
    switching_protocols,
)

from .conftest import counting_steps, memory_server


def _server_task_names() -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()

    def visit(task: trio.lowlevel.Task) -> None:
        names[task.name] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                visit(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    visit(root)
    return names


async def test_websocket_state_idle_chat_keeps_no_reader_task_channel_or_handshake(
    autojump_clock,
):
    """An idle joined chat has no trio-websocket reader task, and its handshake's state,
    message channel, write lock and event deque are replaced by shared stand-ins (#16)."""
    async with memory_server() as net, net.client() as alice:
        await alice.join("lobby", "alice")
        await trio.testing.wait_all_tasks_blocked()
        reader = "trio_websocket._impl.WebSocketConnection._reader_task"
        assert _server_task_names()[reader] == 1, "the client's only"
        (connection,) = net.server.connections
        ws = connection._transport._ws  # type: ignore[attr-defined]
        protocol = ws._wsproto
        assert protocol.handshake is FINISHED_HANDSHAKE
        assert isinstance(protocol.connection._events, EventList)
        assert ws._send_channel is ws._recv_channel is NO_CHANNEL
        assert ws._stream_lock is NO_LOCK
        assert ws._pings is NO_PINGS
        assert ws._connection_proposal is None
        assert isinstance(ws._close_handshake, LazyEvent)
        assert ws._close_handshake._event is None  # made only once someone waits
        await alice.say("still chatting")
        assert (await alice.expect("message"))["msg"] == "still chatting"


def _methods_using(cls: type, attribute: str) -> set[str]:
    """The methods of ``cls`` whose source reads or writes ``self.<attribute>``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Attribute)
                    and inner.attr == attribute
                    and isinstance(inner.value, ast.Name)
                    and inner.value.id == "self"
                ):
                    found.add(node.name)
    return found


def test_websocket_state_library_internals_are_as_assumed():
    """`EstablishedWebSocket` and `EstablishedProtocol` set exactly the attributes
    trio-websocket's and wsproto's constructors set, and the private state they
    stand in for is used by those libraries only where the stand-ins cover it
    (fails on an upgrade that changes that)."""
    assert trio_websocket.__version__.startswith("0.12."), trio_websocket.__version__
    assert wsproto.__version__.startswith("1."), wsproto.__version__
    stream, _ = trio.testing.memory_stream_pair()
    real = WebSocketConnection(stream, WSConnection(ConnectionType.SERVER))
    ours = EstablishedWebSocket(
        stream, EstablishedProtocol([]), path="/ws", max_message_size=1 << 16
    )
    assert set(vars(ours)) == set(vars(real))
    assert set(vars(EstablishedProtocol([]))) == set(vars(WSConnection(ConnectionType.SERVER)))
    # trio-websocket: the channel is only used by its reader task, get_message
    # and the closing; the lock by _send; the pings by ping and its pong handler.
    assert _methods_using(WebSocketConnection, "_send_channel") == {
        "__init__",
        "_close_web_socket",
        "_handle_message_event",
        "_reader_task",
    }
    assert _methods_using(WebSocketConnection, "_recv_channel") == {
        "__init__",
        "_aclose",
        "get_message",
        "_handle_message_event",
    }
    assert _methods_using(WebSocketConnection, "_stream_lock") == {"__init__", "_send"}
    assert _methods_using(WebSocketConnection, "_pings") == {
        "__init__",
        "ping",
        "_handle_pong_event",
    }
    assert _methods_using(WebSocketConnection, "_connection_proposal") == {
        "__init__",
        "_get_request",
        "_handle_request_event",
    }
    # The events: set, waited for (the close handshake only in _aclose), nothing else.
    source = inspect.getsource(WebSocketConnection)
    for event in ("_open_handshake", "_close_handshake", "_for_testing_peer_closed_connection"):
        uses = {
            line.split(f"self.{event}", 1)[1][:8]
            for line in source.splitlines()
            if f"self.{event}" in line
        }
        assert uses <= {" = trio.", ".set()", ".wait()"}, (event, uses)
    assert _methods_using(WebSocketConnection, "_close_handshake") >= {"_aclose"}
    # wsproto: an established WSConnection asks its handshake only for events,
    # and Connection's event queue is only appended to and popped from the left.
    assert _methods_using(WSConnection, "handshake") == {
        "__init__",
        "state",
        "initiate_upgrade_connection",
        "send",
        "receive_data",
        "events",
    }
    queue_uses = {
        line.strip()
        for line in inspect.getsource(wsproto.connection.Connection).splitlines()
        if "self._events" in line
    }
    assert queue_uses == {
        "self._events: deque[Event] = deque()",
        "self._events.append(CloseConnection(code=CloseReason.ABNORMAL_CLOSURE))",
        "while self._events:",
        "yield self._events.popleft()",
    }, queue_uses


def _client_handshake(client: WSConnection) -> bytes:
    return client.send(Request(host="localhost", target="/ws"))


async def test_websocket_state_ping_after_our_close_is_not_answered(autojump_clock, caplog):
    """A ping that arrives after the server's close frame (the drain's 1001) gets no
    pong and breaks nothing: the close handshake completes when the client answers
    (trio-websocket's reader task died of this: the old closing race)."""
    async with memory_server() as net:
        stream = await net.listener.connect()
        client = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(_client_handshake(client))

        async def events() -> list[object]:
            got: list[object] = []
            while not got:
                data = await stream.receive_some()
                client.receive_data(data or None)
                got = list(client.events())
            return got

        assert isinstance((await events())[0], AcceptConnection)
        await stream.send_all(client.send(TextMessage('{"type":"join","room":"r","name":"z"}')))
        assert "joined" in (await events())[0].data  # type: ignore[attr-defined]
        net.server.drain()
        closing = [event for event in await events() if isinstance(event, CloseConnection)]
        while not closing:
            closing = [event for event in await events() if isinstance(event, CloseConnection)]
        assert closing[0].code == 1001
        # A ping now: wsproto (the client's, in REMOTE_CLOSING) still lets us frame one.
        await stream.send_all(b"\x89\x84" + b"\x00\x00\x00\x00" + b"late")
        with trio.move_on_after(1):
            data = await stream.receive_some()
            client.receive_data(data or None)
            assert not [e for e in client.events() if isinstance(e, Pong)], "a pong after close"
        await stream.send_all(client.send(closing[0].response()))
        with trio.fail_after(10):
            while await stream.receive_some():
                pass  # the server closes the TCP connection
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("compression", [False, True])
def test_websocket_state_101_is_wsproto_s_own_byte_for_byte(compression: bool):
    """Our 101 (`accept_upgrade`, from what the front vetted) is the one wsproto's own
    handshake writes for the same request; the accept token is RFC 6455 1.3's; and
    the wsproto connection it opens talks to a wsproto client."""
    max_bytes = Config().max_frame_bytes
    client = WSConnection(ConnectionType.CLIENT)
    offers = [PerMessageDeflate()] if compression else []
    head = client.send(Request(host="localhost", target="/ws", extensions=offers))
    theirs = WSConnection(ConnectionType.SERVER)
    theirs.receive_data(head)
    (request,) = list(theirs.events())
    assert isinstance(request, Request)
    expected = theirs.send(AcceptConnection(extensions=[DeflateExtension(max_bytes)]))
    front = h11.Connection(h11.SERVER)
    front.receive_data(head)
    event = front.next_event()
    assert isinstance(event, h11.Request)
    upgrade = vetted_upgrade(FrontRequest.from_h11(event), "127.0.0.1", b"")
    response, ours = accept_upgrade(upgrade.key, upgrade.offers, DeflateExtension(max_bytes))
    assert response == expected
    assert (b"permessage-deflate" in response) is compression
    client.receive_data(response)
    assert isinstance(next(client.events()), AcceptConnection)
    ours.receive_data(client.send(TextMessage(data="hello")))
    (message,) = list(ours.events())
    assert isinstance(message, TextMessage)
    assert message.data == "hello"
    rfc_example = switching_protocols(b"dGhlIHNhbXBsZSBub25jZQ==", None)
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in rfc_example


async def test_websocket_state_101_not_taken_in_time_fails_the_handshake(autojump_clock):
    """A client that does not read the 101 within the handshake timeout: the
    handshake fails (TransportClosed), not the server."""
    ours, _theirs = trio.testing.lockstep_stream_pair()
    config = Config()
    started = trio.current_time()
    with pytest.raises(TransportClosed, match="handshake failed: TooSlowError"):
        await accept_websocket(
            ReplayStream(ours, b""), b"dGhlIHNhbXBsZSBub25jZQ==", [], config, path="/ws"
        )
    assert trio.current_time() - started == pytest.approx(config.handshake_timeout)


async def test_websocket_state_101_to_a_full_socket_is_sent_when_it_drains():
    """A socket whose buffer cannot take the 101 at once: `write_nowait` takes the
    write gate, the bounded send finishes the 101 once the peer reads, and the gate
    is free again afterwards (the next write goes through)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += ours.send(b"x" * 65536)
    stream = ReplayStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), b"")
    peer = trio.socket.from_stdlib_socket(theirs)
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    expected = b"x" * filler + switching_protocols(key, None) + b"after"
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(expected):
            received.extend(await peer.recv(65536))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            transport = await accept_websocket(stream, key, [], Config(), path="/ws")
            await stream.send_all(b"after")
    assert bytes(received) == expected
    assert transport is not None
    ours.close()
    theirs.close()


async def test_websocket_state_lazy_event_waits_until_set():
    """The close handshake's stand-in: a wait before `set` returns once set; after, at once."""
    event = LazyEvent()
    assert not event.is_set()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def waiter() -> None:
            await event.wait()
            done.set()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        event.set()
        await done.wait()
    assert event.is_set()
    with trio.fail_after(1):
        await event.wait()


def test_websocket_state_event_list_pops_from_the_left():
    events = EventList([Ping(b"1"), Ping(b"2")])
    events.append(Ping(b"3"))
    assert [events.popleft().payload for _ in range(3)] == [b"1", b"2", b"3"]
    assert not events


async def test_websocket_state_a_close_frame_is_written_without_a_task_switch():
    """The close reply ends a connection: written to a socket with room, it
    costs no task switch (one per closing connection; #16), while any other
    frame's write yields once, as trio's send_all does."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    stream = ReplayStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), b"")
    me = trio.lowlevel.current_task()
    with counting_steps(lambda task: task is me) as mine:
        await stream.send_all(b"\x81\x02hi")
        text_steps, mine.steps = mine.steps, 0
        await stream.send_all(b"\x88\x02\x03\xe8")
        close_steps = mine.steps
    assert (text_steps, close_steps) == (1, 0)
    assert stream.close_sent
    assert theirs.recv(64) == b"\x81\x02hi\x88\x02\x03\xe8"
    ours.close()
    theirs.close()
