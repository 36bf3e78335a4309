"""Connection behaviour in virtual time: a whole server on an in-memory network.

Every test takes ``autojump_clock``: sleeps, pings, grace periods and
timeouts pass instantly and deterministically.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import socket
import types

import trio
import trio.testing
from trio_websocket import ConnectionClosed, wrap_client_stream

from triochat.outbox import Flushable, FlushSchedule

from .chatclient import ChatClient
from .conftest import memory_server
from .faults import FaultyMemoryHistory


async def _read_messages(client: ChatClient, count: int) -> list[str]:
    """The `msg` of the next ``count`` message frames, other frames skipped."""
    seen: list[str] = []
    while len(seen) < count:
        frame = await client.recv()
        if frame["type"] == "message":
            seen.append(frame["msg"])
    return seen


async def test_connection_slow_consumer_never_delays_others(autojump_clock):
    """2000 messages while one member stalls: the healthy one gets all, in order; the stalled one is closed 1013 (#2)."""
    async with (
        memory_server(rate=0) as net,
        net.client() as sender,
        net.client() as healthy,
        net.client(lockstep=True) as stalled,
    ):
        await stalled.join("lobby", "stalled")
        await healthy.join("lobby", "healthy")
        await sender.join("lobby", "sender")
        expected = [f"m{i}" for i in range(2000)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_messages, sender, 2000)
            for text in expected:
                await sender.say(text)
            assert await _read_messages(healthy, 2000) == expected
        # The stalled member's outbox overflowed: 1013 (its pending write and
        # the close frame get close_timeout each), and the hub let go of it.
        await trio.sleep(2 * 5 + 1)
        assert net.server.stats.closes_by_code.get(1013) == 1
        assert net.server.stats.slow_consumers == 1
        assert len(net.server.connections) == 2
        assert len(net.server.hub.chat.rooms["lobby"].typed) == 2


async def test_connection_slow_consumer_that_wakes_gets_close_1013(autojump_clock):
    """A consumer that stalls past its outbox, then reads again, receives close code 1013."""
    async with memory_server(rate=0, outbox_frames=16, close_timeout=5) as net:
        async with net.client() as sender, net.client(lockstep=True) as slow:
            await slow.join("lobby", "slow")
            await sender.join("lobby", "sender")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_messages, sender, 100)
                for i in range(100):
                    await sender.say(f"m{i}")
            await trio.testing.wait_all_tasks_blocked()
            code, reason = await slow.closed()  # reads again, within close_timeout
            assert (code, reason) == (1013, "slow consumer")


def _server_tasks() -> collections.Counter[str]:
    """The running tasks of this `trio.run` by name, for the server's own ones."""
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


def _connection_tasks(tasks: collections.Counter[str]) -> dict[str, int]:
    own = ("triochat.connection.", "triochat.outbound.")
    return {name: n for name, n in tasks.items() if name.startswith(own)}


async def test_connection_idle_holds_one_task_of_its_own_and_a_writer_only_while_needed(
    autojump_clock,
):
    """An idle joined connection keeps its reader task only (memory: #6); a writer task
    runs while frames wait for a peer that does not read, and is gone once they are out."""
    handler = "triochat.server.Server._handle_stream"  # the connection's reader runs here
    writer = "triochat.outbound.Outbound._write"
    async with memory_server(rate=0) as net, net.client() as alice:
        async with net.client(lockstep=True) as slow:
            await alice.join("lobby", "alice")
            await slow.join("lobby", "slow")
            await alice.expect("presence", name="slow", event="join")
            for i in range(5):
                await alice.say(f"m{i}")
            await _read_messages(alice, 5)
            await trio.testing.wait_all_tasks_blocked()
            # slow's client reads no more: its messages wait in a writer task.
            tasks = _server_tasks()
            assert (tasks[handler], tasks[writer]) == (2, 1)
            assert await _read_messages(slow, 5) == [f"m{i}" for i in range(5)]
            await trio.testing.wait_all_tasks_blocked()
            tasks = _server_tasks()
            assert tasks[handler] == 2
            assert not _connection_tasks(tasks), "both idle: their readers only"
            await trio.sleep(3600)  # an hour of pings and pongs changes nothing
            tasks = _server_tasks()
            assert tasks[handler] == 2
            assert not _connection_tasks(tasks)
            assert len(net.server.connections) == 2


async def test_connection_half_open_peer_closed_after_ping_timeout(autojump_clock):
    """A peer that vanishes without FIN is closed within 40 s and leaves after the grace period."""
    async with memory_server() as net, net.client() as observer:
        await observer.join("lobby", "observer")
        stream = await net.listener.connect()
        async with trio.open_nursery() as frozen:
            ws = await wrap_client_stream(frozen, stream, "localhost", "/ws")
            ghost = ChatClient(ws)
            await ghost.join("lobby", "ghost")
            frozen.cancel_scope.cancel()  # its reader stops: no pongs, no FIN
        await observer.expect("presence", event="join", name="ghost")
        vanished = trio.current_time()
        await trio.sleep(40.01)
        assert len(net.server.connections) == 1, "the half-open connection is still served"
        await observer.expect("presence", event="leave", name="ghost")
        assert trio.current_time() - vanished <= 40 + 5 + 0.1
        await stream.aclose()


async def test_connection_pings_keep_an_idle_connection_open(autojump_clock):
    """An idle client that answers pings stays connected for hours of virtual time."""
    async with memory_server() as net, net.client() as alice:
        await alice.join("lobby", "alice")
        await trio.sleep(3 * 3600)
        await alice.say("still here")
        await alice.expect("message", msg="still here")


async def test_connection_presence_leave_waits_for_grace(autojump_clock):
    """A dropped member's leave is announced when the grace period ends, not before."""
    async with memory_server(presence_grace=5) as net, net.client() as observer:
        await observer.join("lobby", "observer")
        async with net.client() as leaver:
            await leaver.join("lobby", "leaver")
            await observer.expect("presence", event="join", name="leaver")
        dropped = trio.current_time()
        await observer.expect("presence", event="leave", name="leaver")
        assert 5 <= trio.current_time() - dropped <= 5.1


async def test_connection_reconnect_with_token_in_grace_shows_no_flicker(autojump_clock):
    """A reconnect with the resume token inside the grace period shows no leave/join."""
    async with memory_server(presence_grace=5) as net, net.client() as observer:
        await observer.join("lobby", "observer")
        async with net.client() as first:
            token = (await first.join("lobby", "alice"))["token"]
            await observer.expect("presence", event="join", name="alice")
        await trio.sleep(2)
        async with net.client() as second:
            joined = await second.join("lobby", "alice", token=token)
            assert joined["members"] == ["alice", "observer"]
            with trio.move_on_after(30):
                frame = await observer.recv()
                raise AssertionError(f"unexpected frame {frame}")


async def test_connection_flood_is_rate_limited_then_closed_1008(autojump_clock):
    """A client at 10x the rate limit gets rate_limited, then close 1008 at the 100th drop; others are unaffected."""
    async with memory_server(rate=10, burst=20) as net:
        async with net.client() as flooder, net.client() as calm:
            await calm.join("lobby", "calm")
            await flooder.join("lobby", "flooder")
            answers: list[str] = []

            async def read_answers():
                while True:
                    try:
                        frame = await flooder.recv()
                    except ConnectionClosed as exc:
                        assert exc.reason.code == 1008
                        return
                    answers.append(frame.get("code", frame["type"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_answers)
                with contextlib.suppress(ConnectionClosed):
                    for i in range(400):  # 100 frames/s for up to 4 s
                        await flooder.say(f"f{i}")
                        await trio.sleep(0.01)
            assert answers.count("rate_limited") == 100
            accepted = answers.count("message")
            assert 20 <= accepted <= 20 + 2 * 10  # the burst, plus 10/s while it lasted
            await calm.say("fine")
            seen = await _read_messages(calm, accepted + 1)
            assert seen[-1] == "fine"


async def test_connection_drain_closes_with_1001_after_flushing(autojump_clock):
    """drain(): frames already queued are delivered, then every client gets 1001."""
    async with memory_server(rate=0) as net, net.client() as alice, net.client() as bob:
        await alice.join("lobby", "alice")
        await bob.join("lobby", "bob")
        for i in range(50):
            await alice.say(f"m{i}", ref=f"r{i}")
        await trio.testing.wait_all_tasks_blocked()
        net.server.drain()
        assert await _read_messages(bob, 50) == [f"m{i}" for i in range(50)]
        assert await bob.closed() == (1001, "going away")
        acked = 0
        while True:
            try:
                frame = await alice.recv()
            except ConnectionClosed as exc:
                assert exc.reason.code == 1001
                break
            acked += frame["type"] == "ack"
        assert acked == 50, "says received before the drain are stored and acked"


async def test_connection_storage_failure_answers_unavailable(autojump_clock):
    """While the store fails, say answers `unavailable` and acks nothing; it recovers after."""
    history = FaultyMemoryHistory(1000)
    async with memory_server(history=history) as net, net.client() as alice:
        await alice.join("lobby", "alice")
        history.fail_with = "disk full"
        await alice.say("lost?", ref="r1")
        error = await alice.expect("error", code="unavailable", ref="r1")
        assert error["message"]
        history.fail_with = None
        await alice.say("stored", ref="r2")
        message = await alice.expect("message", msg="stored")
        await alice.expect("ack", ref="r2", id=message["id"])
        async with net.client() as bob:
            joined = await bob.join("lobby", "bob")
            assert [m["msg"] for m in joined["history"]] == ["stored"]


async def test_connection_bug_in_handler_closes_only_that_connection(
    autojump_clock, monkeypatch, caplog
):
    """An exception while handling one client's frame closes it with 1011; others go on."""
    from triochat import chat

    original = chat.ChatState._typing

    def broken(self, client, frame, now):
        raise RuntimeError("injected bug")

    async with memory_server() as net, net.client() as victim, net.client() as other:
        await victim.join("lobby", "victim")
        await other.join("lobby", "other")
        monkeypatch.setattr(chat.ChatState, "_typing", broken)
        await victim.send({"type": "typing", "room": "lobby"})
        assert await victim.closed() == (1011, "internal error")
        monkeypatch.setattr(chat.ChatState, "_typing", original)
        await other.say("alive")
        assert await _read_messages(other, 1) == ["alive"]
    assert any("injected bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_connection_accept_emfile_backs_off_and_recovers(autojump_clock, caplog):
    """EMFILE on accept: the server backs off, logs once, and accepts again."""
    caplog.set_level(logging.WARNING, logger="triochat")
    async with memory_server() as net:
        net.listener.accept_errors.extend(
            OSError(errno.EMFILE, "Too many open files") for _ in range(5)
        )
        async with net.client() as alice:
            await alice.join("lobby", "alice")
    backoff_lines = [r for r in caplog.records if "backing off" in r.getMessage()]
    assert len(backoff_lines) == 1


async def test_connection_no_direct_write_after_the_socket_is_closed():
    """Once a connection's socket is closed, the hub's direct write is refused.

    The descriptor's number may belong to a new connection by the time the
    hub flushes a step that still holds the old one: writing there would hand
    one client's frames to another.
    """
    from triochat.transports.websocket import ReplayStream

    ours, theirs = trio.socket.socketpair()
    stream = ReplayStream(trio.SocketStream(ours), b"")
    assert stream.write_nowait(b"\x81\x02hi") == 4
    assert await theirs.recv(16) == b"\x81\x02hi"
    await stream.close_now()
    reused, other_end = trio.socket.socketpair()  # likely takes the freed number
    with reused, other_end, theirs:
        assert stream.write_nowait(b"\x81\x02hi") is None
        with trio.move_on_after(0.05):
            assert await other_end.recv(16) == b"", "nothing reaches the new socket"


class _RecordingSchedule(FlushSchedule):
    """The hub's step policy, recording which connections asked to be flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.filed: list[object] = []

    def flush_later(self, outbound: Flushable) -> None:
        self.filed.append(outbound)
        super().flush_later(outbound)


class _StepHub:
    """All a `Connection` takes from the hub while it delivers: the step policy."""

    def __init__(self) -> None:
        self.schedule = _RecordingSchedule()


async def test_connection_lone_message_is_written_at_once_and_keeps_the_order():
    """Write-through (a hub step with one message): a member with nothing queued gets it
    at once; one with frames queued earlier in the step gets it after them, in one write."""
    from triochat.config import Config
    from triochat.connection import Connection
    from triochat.frames import OutFrame
    from triochat.metrics import Stats
    from triochat.transports.websocket import ReplayStream, WebSocketTransport

    ours, theirs = trio.socket.socketpair()
    hub = _StepHub()
    stream = ReplayStream(trio.SocketStream(ours), b"")
    connection = Connection(WebSocketTransport(None, stream), hub, Config(), Stats())  # type: ignore[arg-type]
    first, second, third = (OutFrame(f'"{n}"'.encode()) for n in ("first", "second", "third"))

    async def received() -> bytes:
        with trio.move_on_after(0.05):
            return await theirs.recv(1024)
        return b""

    with theirs:
        out = connection.outbound
        out.deliver(first)  # queued, as in a busy step
        assert hub.schedule.filed == [out]
        assert await received() == b""
        hub.schedule.write_through = True
        out.deliver(second)  # behind `first`: still waits for the step's end
        assert await received() == b""
        out.flush_nowait()  # the end of the step
        assert await received() == first.ws + second.ws
        out.deliver(third)  # nothing queued: written at once
        assert await received() == third.ws
        assert hub.schedule.filed == [out]  # only the first delivery asked for a flush
        await stream.close_now()


async def test_connection_frames_that_may_wait_go_with_the_next_write_or_soon():
    """Frames shared through a room's run (presence, typing; docs/protocol.md
    §6; `triochat.waiting`) are not written at the end of their step but with
    the connection's next write, in the order produced, or once the
    schedule's `SOON` has passed, by a step."""
    from triochat.config import Config
    from triochat.connection import Connection
    from triochat.frames import OutFrame
    from triochat.metrics import Stats
    from triochat.outbox import SOON
    from triochat.transports.websocket import ReplayStream, WebSocketTransport
    from triochat.waiting import WaitingRun

    ours, theirs = trio.socket.socketpair()
    hub = _StepHub()
    schedule = hub.schedule
    stream = ReplayStream(trio.SocketStream(ours), b"")
    connection = Connection(WebSocketTransport(None, stream), hub, Config(), Stats())  # type: ignore[arg-type]
    joined, left, message = (OutFrame(f'"{n}"'.encode()) for n in ("joined", "left", "message"))

    async def received() -> bytes:
        with trio.move_on_after(0.05):
            return await theirs.recv(1024)
        return b""

    with theirs:
        out = connection.outbound
        run = WaitingRun()
        out.share(run)
        run.add(joined)
        schedule.end_step(100.0)  # waits: the schedule now wants a step at 100 + SOON
        assert schedule.soon_at == 100.0 + SOON
        assert await received() == b""
        run.add(left)  # the same round: filed once
        schedule.end_step(100.0 + SOON / 2)
        assert await received() == b""
        out.deliver(message)  # a frame that cannot wait takes them along, in order
        schedule.end_step(100.0 + SOON / 2)
        assert await received() == joined.ws + left.ws + message.ws
        schedule.end_step(100.0 + SOON)  # the round ends: nothing left to write
        assert schedule.soon_at == math.inf
        assert await received() == b""
        assert not run.open
        run = WaitingRun()
        out.share(run)
        run.add(left)  # a new round, on its own
        schedule.end_step(200.0)
        schedule.end_step(200.0 + SOON)
        assert await received() == left.ws
        assert schedule.filed == [out]  # (`deliver` asked once; the rest waited)
        await stream.close_now()


class _HeldSocket(socket.socket):
    """A socket that takes none of ``held`` (as if full) until ``released``."""

    held = b""
    released = False

    def send(self, data, flags=0) -> int:  # type: ignore[override]
        if not self.released and bytes(data) == self.held:
            raise BlockingIOError(errno.EAGAIN, "held")
        return super().send(data, flags)


class _HeldStream(trio.abc.Stream):
    """A socket stream whose writes of ``held`` bytes wait for ``release``: the
    socket takes none of them at once (`_HeldSocket`), and the stream's
    ``send_all`` waits."""

    def __init__(self, raw: socket.socket, held: bytes) -> None:
        # The direct writes (`ReplayStream.write_nowait`, and `send_reserved`
        # first) go to ``socket._sock``: a held socket on the same connection.
        sock = _HeldSocket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        sock.held = held
        self._sock = sock
        self.socket = types.SimpleNamespace(_sock=sock)
        self.inner = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        self.held = held
        self.release = trio.Event()

    async def send_all(self, data) -> None:
        if bytes(data) == self.held:
            await self.release.wait()
            self._sock.released = True
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._sock.close()
        await self.inner.aclose()


async def test_connection_frames_keep_their_order_when_a_pong_hands_over_the_gate():
    """A pong in flight, the writer parked behind it with frame A, then the hub delivers
    B the moment the pong is written: the wire carries pong, A, B (#12 defect 1).

    The write gate is handed to the parked writer, never freed in between: on the
    old gate the hub's direct write took it and B went out before A.
    """
    from triochat.config import Config
    from triochat.connection import Connection
    from triochat.frames import OutFrame
    from triochat.metrics import Stats
    from triochat.transports.websocket import PING_FRAME, ReplayStream, WebSocketTransport

    pong = b"\x8a\x00"
    assert pong != PING_FRAME
    raw, theirs_raw = socket.socketpair()
    theirs = trio.socket.from_stdlib_socket(theirs_raw)
    held = _HeldStream(raw, pong)
    stream = ReplayStream(held, b"")
    hub = _StepHub()
    connection = Connection(WebSocketTransport(None, stream), hub, Config(), Stats())  # type: ignore[arg-type]
    first, second = OutFrame(b'"A"'), OutFrame(b'"B"')
    seq = trio.testing.Sequencer()

    async def pong_then_hub() -> None:
        async with seq(0):
            pass
        await stream.send_all(pong)  # trio-websocket answering a ping: held until seq 2
        # The pong is written: with no checkpoint in between, the hub delivers B.
        hub.schedule.write_through = True
        connection.outbound.deliver(second)

    async def run_connection(nursery: trio.Nursery) -> None:
        connection.outbound.start(nursery)  # the writer starts here (as in `Connection.run`)
        async with seq(1):
            connection.outbound.deliver(first)  # a busy step: queued, flushed at its end
            connection.outbound.flush_nowait()  # the gate is taken by the pong: the writer starts
            await trio.testing.wait_all_tasks_blocked()  # the writer parks with A

    with theirs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pong_then_hub)
            nursery.start_soon(run_connection, nursery)
            async with seq(2):
                held.release.set()
            await trio.testing.wait_all_tasks_blocked()
            received = b""
            with trio.move_on_after(0.2):
                while len(received) < len(pong + first.ws + second.ws):
                    received += await theirs.recv(1024)
            nursery.cancel_scope.cancel()
        await stream.close_now()
    assert received == pong + first.ws + second.ws


class _RecordedTasks:
    """A connection's task group that records each task started, and runs it in
    ``nursery`` if one is given."""

    cancel_scope = trio.CancelScope()

    def __init__(self, nursery: trio.Nursery | None = None) -> None:
        self.started: list[object] = []
        self._nursery = nursery

    def start_soon(self, fn) -> None:
        self.started.append(fn)
        if self._nursery is not None:
            self._nursery.start_soon(fn)


def _connection_on_a_socketpair():
    """A `Connection` over a `ReplayStream` on one end of a socket pair: the
    connection, the stream, our socket and the peer's."""
    from triochat.config import Config
    from triochat.connection import Connection
    from triochat.metrics import Stats
    from triochat.transports.websocket import ReplayStream, WebSocketTransport

    ours, theirs = trio.socket.socketpair()
    stream = ReplayStream(trio.SocketStream(ours), b"")
    connection = Connection(WebSocketTransport(None, stream), _StepHub(), Config(), Stats())  # type: ignore[arg-type]
    return connection, stream, ours, theirs


async def test_connection_ping_of_an_idle_connection_is_written_with_no_writer_task():
    """A keepalive ping goes straight to the socket when it takes it (an idle
    connection's: no task started per ping, #16); to a full socket it goes
    with the writer, once the socket drains."""
    from triochat.transports.websocket import PING_FRAME

    connection, stream, ours, theirs = _connection_on_a_socketpair()
    out = connection.outbound

    with theirs:
        async with trio.open_nursery() as nursery:
            tasks = _RecordedTasks(nursery)
            started = tasks.started
            out.start(tasks)
            out.ping_soon()
            assert started == [], "no writer task for a ping the socket took"
            assert await theirs.recv(16) == PING_FRAME
            # A full socket: the ping waits for the writer, which sends it once
            # the peer reads.
            filler = b"\x00" * 65536
            with trio.move_on_after(0.2):
                while True:
                    await ours.send(filler)  # (a send that waits sends nothing)
            out.ping_soon()
            assert len(started) == 1, "the writer takes the ping"
            received = b""
            with trio.fail_after(5):
                while not received.endswith(PING_FRAME):
                    received += await theirs.recv(65536)
            out.stop()
        await stream.close_now()


async def test_connection_frames_after_the_close_reply_start_no_writer_task():
    """The reader answered the peer's close frame (its reply went straight to the
    socket): frames the hub flushes afterwards (a churn's `left`) can never be
    written, so they are dropped without starting a writer task to find that out
    (#16: churn); the close reply was the last thing on the wire."""
    from triochat.frames import OutFrame
    from triochat.transports.websocket import close_frame

    connection, stream, _, theirs = _connection_on_a_socketpair()
    out = connection.outbound
    tasks = _RecordedTasks()
    started = tasks.started

    with theirs:
        out.start(tasks)
        reply = close_frame(1000, "")
        await stream.send_all(reply)  # trio-websocket's reply to the peer's close
        out.deliver(OutFrame(b'{"type":"left"}'))
        out.flush_nowait()
        assert started == [], "no writer task for frames that can never be written"
        assert not out.outbox
        with trio.fail_after(5):
            assert await theirs.recv(64) == reply
        out.stop()
    await stream.close_now()


async def test_connection_a_tail_starting_with_0x88_is_not_taken_for_a_close_frame():
    """The rest of a partial direct write may begin with any byte of a frame
    (0x88 is a UTF-8 continuation byte of "∈", or a length): finishing it
    (`send_rest`) must not make the stream think a close frame went, which
    would refuse every later write and drop the connection without one."""
    from triochat.transports.websocket import ReplayStream, WebSocketTransport

    ours, theirs = trio.socket.socketpair()
    stream = ReplayStream(trio.SocketStream(ours), b"")
    transport = WebSocketTransport(None, stream)
    with theirs:
        with trio.move_on_after(0.2):
            while True:
                await ours.send(b"\x00" * 65536)  # (a send that waits sends nothing)
        assert stream.write_nowait(b"\x81\x03\xe2") == 0  # a full socket: the gate is ours
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                while await theirs.recv(65536):
                    pass

            nursery.start_soon(drain)
            with trio.fail_after(5):
                await transport.send_rest(b"\x88\x88")  # "the rest" of that frame
            assert not stream.close_sent
            assert stream.write_nowait(b"\x81\x00") == 2, "later writes still go"
            nursery.cancel_scope.cancel()
        await stream.close_now()
