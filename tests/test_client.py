"""triochat.client (issue #14 §4): against real servers, a scripted one, and in virtual time.

Real sockets and real time (guarded with ``fail_after``) for what a user
does; a TCP proxy (`Proxy`) cuts, refuses and holds connections, and a
server subprocess is killed and restarted on its port for resume across a
restart. Backoff, keepalive and pacing run against the in-memory server under
``autojump_clock``; what the real server cannot be made to do (answer out of
order on purpose, authenticate, close with 4009) a scripted server does.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream
from wsproto.utilities import LocalProtocolError

from triochat.client import (
    AuthenticationFailed,
    Backoff,
    ChatClient,
    ClientError,
    ConnectFailed,
    ConnectionEnded,
    DeliveryUnknown,
    Disconnected,
    DisconnectedByOperator,
    EventsDropped,
    Message,
    PolicyViolation,
    Presence,
    Rejoined,
    Replaced,
    Typing,
    Whisper,
    connect,
)

from .conftest import memory_server, running_server, ws_url
from .server_process import run_server

README = Path(__file__).resolve().parent.parent / "README.md"
FAST = Backoff(initial=0.05, maximum=0.2)


async def next_event(client: ChatClient, kind: type[Any], **fields: Any) -> Any:
    """The next event of ``kind`` with ``fields``; skips others."""
    while True:
        event = await client.receive()
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            return event


async def drain(client: ChatClient) -> None:
    """Take events until `receive` raises."""
    while True:
        await client.receive()


async def messages_until(client: ChatClient, count: int) -> list[Message]:
    """The next ``count`` `Message` events."""
    seen: list[Message] = []
    while len(seen) < count:
        event = await client.receive()
        if isinstance(event, Message):
            seen.append(event)
    return seen


# --- a TCP proxy the test controls ----------------------------------------------------


class Gate:
    """Open or held; a held gate keeps bytes in the proxy until released."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def hold(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def release(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class Proxy:
    """``127.0.0.1:port`` forwards to ``target_port``: cut, refuse, hold a direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self.replies = Gate()  # server -> client
        self.requests = Gate()  # client -> server
        self._links: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        """Close every current connection, both sides, now."""
        for scope in list(self._links):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self.refusing:
                return
            try:
                target = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with target:
                with trio.CancelScope() as scope:
                    self._links.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, target, self.requests, scope)
                            nursery.start_soon(self._pump, target, client, self.replies, scope)
                    finally:
                        self._links.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, gate: Gate, scope: trio.CancelScope
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some():
                await gate.wait()
                await sink.send_all(data)
        scope.cancel()


@contextlib.asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


# --- a scripted server on memory streams ----------------------------------------------

Script = Callable[[WebSocketConnection, int], Awaitable[None]]


async def recv_frame(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())


async def send_frame(ws: WebSocketConnection, **frame: Any) -> None:
    await ws.send_message(json.dumps(frame))


def joined_frame(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "joined",
        "room": request["room"],
        "name": request.get("name", "someone"),
        "token": "t",
        "members": [],
        "history": [],
        "recovered": True,
        "ref": request["ref"],
        **extra,
    }


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Callable[[], Awaitable[trio.abc.Stream]]]:
    """An ``open_stream`` for `connect`: each connection runs ``script(ws, n)``, n from 1."""
    count = 0
    async with trio.open_nursery() as nursery:

        async def serve_one(stream: trio.abc.Stream, number: int) -> None:
            try:
                async with trio.open_nursery() as inner:
                    request = await wrap_server_stream(inner, stream)
                    ws = await request.accept()
                    with contextlib.suppress(ConnectionClosed):
                        await script(ws, number)
                    inner.cancel_scope.cancel()
            except* LocalProtocolError:  # trio-websocket's closing race
                pass
            finally:
                await trio.aclose_forcefully(stream)

        async def open_stream() -> trio.abc.Stream:
            nonlocal count
            count += 1
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(serve_one, server_end, count)
            return client_end

        yield open_stream
        nursery.cancel_scope.cancel()


MEMORY_URL = "ws://127.0.0.1/ws"


# --- the basics, against a real server -------------------------------------------------


async def test_client_join_and_say_returns_the_ack_id():
    """join answers Joined; say returns the id of the stored message, the same our Message event carries."""
    with trio.fail_after(10):
        async with running_server() as server, connect(ws_url(server)) as alice:
            joined = await alice.join("lobby", name="alice")
            assert (joined.room, joined.name, joined.members) == ("lobby", "alice", ("alice",))
            assert joined.recovered is True
            assert joined.token is not None
            assert alice.resume_token == joined.token
            msg_id = await alice.say("lobby", "hello")
            event = await next_event(alice, Message)
            assert (event.id, event.name, event.msg) == (msg_id, "alice", "hello")
            assert alice.last_ids == {"lobby": msg_id}


async def test_client_two_clients_see_each_other():
    """Messages, presence, typing and whispers reach the other client as events."""
    with trio.fail_after(10):
        async with (
            running_server() as server,
            connect(ws_url(server)) as alice,
            connect(ws_url(server)) as bob,
        ):
            await alice.join("lobby", name="alice")
            assert (await bob.join("lobby", name="bob")).members == ("alice", "bob")
            assert await next_event(alice, Presence) == Presence("lobby", "join", "bob")
            said = await bob.say("lobby", "hi alice")
            seen = await next_event(alice, Message)
            assert (seen.id, seen.name, seen.msg) == (said, "bob", "hi alice")
            assert await alice.typing("lobby") is True
            assert await next_event(bob, Typing) == Typing("lobby", "alice")
            whisper_id = await alice.whisper("bob", "psst")
            got = await next_event(bob, Whisper)
            assert (got.id, got.from_, got.to, got.msg) == (whisper_id, "alice", "bob", "psst")
            await bob.leave("lobby")
            assert bob.rooms == ()
            assert await next_event(alice, Presence, event="leave") == Presence(
                "lobby", "leave", "bob"
            )


async def test_client_refusals_raise_client_error():
    """An error frame answering a request raises ClientError with its code; the client carries on."""
    with trio.fail_after(10):
        async with (
            running_server() as server,
            connect(ws_url(server)) as alice,
            connect(ws_url(server)) as other,
        ):
            await alice.join("lobby", name="alice")
            with pytest.raises(ClientError) as taken:
                await other.join("lobby", name="alice")
            assert taken.value.code == "name_taken"
            assert other.rooms == ()
            with pytest.raises(ClientError) as not_joined:
                await alice.say("elsewhere", "hello?")
            assert not_joined.value.code == "not_joined"
            with pytest.raises(ClientError) as nobody:
                await alice.whisper("nobody", "hello?")
            assert nobody.value.code == "no_such_user"
            assert await alice.say("lobby", "still here")


async def test_client_replies_matched_by_ref_not_order_real_server():
    """A history sent right after a say, both pending at once: each call gets its own answer."""
    with trio.fail_after(10):
        async with running_server() as server, connect(ws_url(server)) as alice:
            await alice.join("lobby", name="alice")
            answers: dict[str, Any] = {}

            async def say() -> None:
                answers["say"] = await alice.say("lobby", "first")

            async def history() -> None:
                answers["history"] = await alice.history("lobby")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(say)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(history)
            assert isinstance(answers["say"], str)
            assert answers["history"].room == "lobby"


async def test_client_replies_matched_by_ref_when_answered_out_of_order(autojump_clock):
    """A server that answers the history before the say's ack: both calls still get their own answers."""

    async def script(ws: WebSocketConnection, number: int) -> None:
        join = await recv_frame(ws)
        await send_frame(ws, **joined_frame(join))
        say = await recv_frame(ws)
        history = await recv_frame(ws)
        assert (say["type"], history["type"]) == ("say", "history")
        await send_frame(ws, type="history", room="r", messages=[], more=False, ref=history["ref"])
        await send_frame(ws, type="message", room="r", id="m-1", name="me", msg="x", ts=1)
        await send_frame(ws, type="ack", ref=say["ref"], id="m-1")
        await trio.sleep_forever()

    async with scripted(script) as open_stream:
        async with connect(MEMORY_URL, open_stream=open_stream) as client:
            await client.join("r", name="me")
            order: list[str] = []
            answers: dict[str, Any] = {}

            async def say() -> None:
                answers["say"] = await client.say("r", "x")
                order.append("say")

            async def history() -> None:
                answers["history"] = await client.history("r")
                order.append("history")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(say)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(history)
            assert order == ["history", "say"]
            assert answers["say"] == "m-1"
            assert answers["history"].messages == ()


async def test_client_history_pages_through_300_messages():
    """history_pages walks back from the newest page to the oldest message, 300 in all, each once."""
    with trio.fail_after(30):
        async with (
            running_server(rate=0) as server,
            connect(ws_url(server), send_rate=None) as alice,
        ):
            await alice.join("lobby", name="alice")
            ids = [await alice.say("lobby", f"m{i}") for i in range(300)]
            page = await alice.history("lobby", limit=50)
            assert [m.msg for m in page.messages] == [f"m{i}" for i in range(250, 300)]
            assert page.more is True
            pages = [p async for p in alice.history_pages("lobby", limit=50)]
            assert len(pages) == 6
            assert pages[-1].more is False
            walked = [m for p in reversed(pages) for m in p.messages]
            assert [m.id for m in walked] == ids
            assert [m.msg for m in walked] == [f"m{i}" for i in range(300)]
            older = [p async for p in alice.history_pages("lobby", before=ids[100], limit=200)]
            assert [m.msg for p in older for m in p.messages] == [f"m{i}" for i in range(100)]


# --- resume, against a real server ----------------------------------------------------


async def test_client_resume_resends_unacked_says_with_same_ref_exactly_once():
    """Says stored but not acked when the connection dies are sent again with their ref: acked with the first ids, stored once (server dedup)."""
    with trio.fail_after(20):
        # history_size 1: the rejoin's replay cannot show them, so the resend decides.
        async with (
            running_server(history_size=1, presence_grace=10) as server,
            proxy_to(server.port) as proxy,
            connect(proxy.url, backoff=FAST) as alice,
            connect(ws_url(server)) as bob,
        ):
            await alice.join("lobby", name="alice")
            await bob.join("lobby", name="bob")
            first_token = alice.resume_token
            proxy.replies.hold()
            results: dict[int, str] = {}

            async def say(i: int) -> None:
                results[i] = await alice.say("lobby", f"unacked {i}")

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(say, i)
                stored = await messages_until(bob, 3)  # on the server, acks held back
                proxy.cut()
                proxy.replies.release()
            # (The three tasks may run in any order: match by text.)
            assert results == {int(m.msg.split()[1]): m.id for m in stored}
            assert sorted(m.msg for m in stored) == [f"unacked {i}" for i in range(3)]
            after = await bob.say("lobby", "after")
            tail = await messages_until(bob, 1)
            assert [m.id for m in tail] == [after], "nothing stored twice in between"
            assert alice.resume_token not in (None, first_token), "takeover rotates the token"
            assert alice.name == "alice"


async def test_client_resume_sends_queued_says_and_recovers_since():
    """While the network is down says wait; after the reconnect the missed messages arrive once (since) and the says go out once."""
    with trio.fail_after(20):
        async with (
            running_server() as server,
            proxy_to(server.port) as proxy,
            connect(proxy.url, backoff=FAST) as alice,
            connect(ws_url(server)) as bob,
        ):
            await alice.join("lobby", name="alice")
            await bob.join("lobby", name="bob")
            before = await bob.say("lobby", "before")
            assert (await next_event(alice, Message)).id == before
            proxy.requests.hold()  # says sent now never reach the server
            results: dict[int, str] = {}

            async def say(i: int) -> None:
                results[i] = await alice.say("lobby", f"queued {i}")

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(say, i)
                await trio.sleep(0.2)
                proxy.refusing = True
                proxy.cut()
                proxy.requests.release()
                disconnected = await next_event(alice, Disconnected)
                assert disconnected.code == 1006
                missed = [await bob.say("lobby", f"missed {i}") for i in range(3)]
                proxy.refusing = False
                rejoined = await next_event(alice, Rejoined)
                assert rejoined.joined.recovered is True
                assert [m.id for m in rejoined.joined.history] == missed
            replayed = await messages_until(alice, 5)
            assert [m.id for m in replayed[:3]] == missed
            # (The two say tasks may have started in either order.)
            assert sorted(m.msg for m in replayed[3:]) == ["queued 0", "queued 1"]
            seen_by_bob = await messages_until(bob, 6)
            assert [m.msg for m in seen_by_bob[:4]] == [
                "before",
                "missed 0",
                "missed 1",
                "missed 2",
            ]
            assert results == {int(m.msg.split()[1]): m.id for m in seen_by_bob[4:]}
            page = await bob.history("lobby")
            assert [m.msg for m in page.messages].count("queued 0") == 1


async def test_client_resume_after_server_restart_binds_stored_says_from_replay(tmp_path):
    """SIGKILL and restart on the same port and data dir: the unacked say is found in the since replay, not stored again; missed messages arrive."""
    data_dir = str(tmp_path / "data")
    with trio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            sync = contextlib.ExitStack()
            stack.callback(sync.close)
            first = await trio.to_thread.run_sync(
                sync.enter_context, run_server("--data-dir", data_dir, memory=False)
            )
            url = f"ws://127.0.0.1:{first.port}/ws"
            proxy = await stack.enter_async_context(proxy_to(first.port))
            alice = await stack.enter_async_context(connect(proxy.url, backoff=FAST))
            bob = await stack.enter_async_context(connect(url, reconnect=False))
            await alice.join("room", name="alice")
            await bob.join("room", name="bob")
            one = await alice.say("room", "one")
            proxy.replies.hold()
            result: list[str] = []

            async def say_two() -> None:
                result.append(await alice.say("room", "two"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(say_two)
                two = next(m for m in await messages_until(bob, 2) if m.msg == "two")
                proxy.refusing = True
                await trio.to_thread.run_sync(first.kill)
                proxy.cut()
                proxy.replies.release()
                await trio.to_thread.run_sync(
                    sync.enter_context,
                    run_server("--data-dir", data_dir, memory=False, port=first.port),
                )
                async with connect(url) as carol:
                    await carol.join("room", name="carol")
                    three = await carol.say("room", "three")
                    proxy.refusing = False
                    rejoined = await next_event(alice, Rejoined)
                    assert rejoined.joined.recovered is True
                    assert [m.id for m in rejoined.joined.history] == [two.id, three]
                    assert (await messages_until(alice, 2))[1].id == three
                    page = await carol.history("room")
                    assert [(m.id, m.msg) for m in page.messages] == [
                        (one, "one"),
                        (two.id, "two"),
                        (three, "three"),
                    ]
            assert result == [two.id]


async def test_client_takeover_ends_old_client_with_replaced():
    """A join with our resume token elsewhere closes us with 4001: Replaced, no reconnect."""
    with trio.fail_after(10):
        async with running_server() as server, connect(ws_url(server)) as alice:
            await alice.join("lobby", name="alice")
            async with connect(ws_url(server), resume_token=alice.resume_token) as again:
                joined = await again.join("lobby", name="alice")
                assert joined.token != alice.resume_token, "rotate: true"
                with pytest.raises(Replaced) as ended:
                    await drain(alice)
                assert ended.value.code == 4001
                with pytest.raises(Replaced):
                    await alice.say("lobby", "still me?")
                assert alice.ended is ended.value
                assert await again.say("lobby", "it is me now")


async def test_client_first_connect_failure_raises_connect_failed():
    """Nothing listening: connect raises ConnectFailed at once (no retry for the first one)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with trio.fail_after(10), pytest.raises(ConnectFailed) as failed:
        async with connect(f"ws://127.0.0.1:{port}/ws"):
            pass  # pragma: no cover
    assert failed.value.code is None


# --- backoff, keepalive, pacing: the in-memory server in virtual time ------------------


def test_client_backoff_delays():
    """Backoff: the ceiling doubles up to the maximum; jitter takes a random part; never below the floor."""
    backoff = Backoff(initial=1, factor=2, maximum=8, jitter=0)
    assert [backoff.delay(n, 0.99) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    full = Backoff(initial=1, maximum=8)
    assert full.delay(3, 0.0) == 8
    assert full.delay(3, 0.5) == 4
    assert full.delay(3, 0.999999) == pytest.approx(full.floor, abs=1e-4)
    assert Backoff().delay(10_000, 0.0) == 30
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=10, maximum=1)


class Network:
    """An ``open_stream`` to the memory server that the test can break and refuse."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.attempts: list[float] = []
        self.refuse = 0  # attempts still to refuse
        self.streams: list[trio.abc.Stream] = []

    async def open_stream(self) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if self.refuse:
            self.refuse -= 1
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        stream = await self.net.listener.connect()
        self.streams.append(stream)
        return stream

    async def break_current(self) -> None:
        await trio.aclose_forcefully(self.streams[-1])


async def test_client_backoff_timings_in_virtual_time(autojump_clock):
    """After a loss, attempts come 1, 2, 4, 4, 4 s apart (no jitter, cap 4), then the rooms are joined again."""
    async with memory_server() as net:
        network = Network(net)
        backoff = Backoff(initial=1, factor=2, maximum=4, jitter=0)
        async with connect(MEMORY_URL, open_stream=network.open_stream, backoff=backoff) as alice:
            await alice.join("lobby", name="alice")
            network.refuse = 4
            lost_at = trio.current_time()
            await network.break_current()
            delays = []
            while True:
                event = await alice.receive()
                if isinstance(event, Disconnected):
                    delays.append(event.delay)
                elif isinstance(event, Rejoined):
                    break
            assert delays == [1, 2, 4, 4, 4]
            assert [round(t - lost_at, 6) for t in network.attempts[1:]] == [1, 3, 7, 11, 15]
            assert await alice.say("lobby", "back")


async def test_client_gives_up_after_max_attempts(autojump_clock):
    """max_attempts failed reconnects end the client: pending calls and the events raise ConnectionEnded."""
    async with memory_server() as net:
        network = Network(net)
        backoff = Backoff(initial=1, maximum=1, max_attempts=3)
        async with connect(MEMORY_URL, open_stream=network.open_stream, backoff=backoff) as alice:
            await alice.join("lobby", name="alice")
            network.refuse = 100
            await network.break_current()
            with pytest.raises(ConnectionEnded) as ended:
                await alice.say("lobby", "anyone?")
            assert "gave up after 3 attempts" in str(ended.value)
            assert len(network.attempts) == 4
            with pytest.raises(ConnectionEnded):
                await drain(alice)


class Freezable(trio.abc.Stream):
    """A stream whose peer can freeze: nothing arrives any more, what is sent is lost."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.frozen = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.frozen:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.frozen:
            await trio.sleep_forever()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_client_ping_timeout_detects_a_frozen_peer(autojump_clock):
    """A peer that stops answering is dropped within ping_interval + ping_timeout, then the client reconnects."""
    async with memory_server() as net:
        streams: list[Freezable] = []

        async def open_stream() -> trio.abc.Stream:
            streams.append(Freezable(await net.listener.connect()))
            return streams[-1]

        async with connect(
            MEMORY_URL, open_stream=open_stream, ping_interval=5, ping_timeout=3, backoff=FAST
        ) as alice:
            await alice.join("lobby", name="alice")
            await trio.sleep(1)
            streams[0].frozen = True
            frozen_at = trio.current_time()
            lost = await next_event(alice, Disconnected)
            assert "no pong" in lost.reason
            assert trio.current_time() - frozen_at <= 5 + 3 + 0.01
            await next_event(alice, Rejoined)
            assert len(streams) == 2


async def test_client_paces_says_under_the_server_rate_limit(autojump_clock):
    """60 says at once against the default limits (10/s, burst 20): none is refused, paced at 8/s."""
    async with memory_server() as net:
        network = Network(net)
        async with connect(MEMORY_URL, open_stream=network.open_stream, retries=0) as alice:
            await alice.join("lobby", name="alice")
            start = trio.current_time()
            ids: list[str] = []
            made: list[str] = []

            async def say(i: int) -> None:
                made.append(f"m{i}")
                ids.append(await alice.say("lobby", f"m{i}"))

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(say, i)
            assert len(set(ids)) == 60
            assert trio.current_time() - start >= (60 - 10) / 8 - 0.01
            page = await alice.history("lobby", limit=60)
            assert [m.msg for m in page.messages] == made, "sent in the order the calls came"


async def test_client_event_buffer_drops_oldest_and_says_so(autojump_clock):
    """A full event buffer drops its oldest events and reports how many, in their place."""
    async with memory_server(rate=0) as net:
        network = Network(net)
        async with (
            connect(MEMORY_URL, open_stream=network.open_stream) as bob,
            connect(MEMORY_URL, open_stream=network.open_stream, event_buffer=3) as alice,
        ):
            await bob.join("lobby", name="bob")
            await alice.join("lobby", name="alice")
            for i in range(5):
                await bob.say("lobby", f"b{i}")
            await trio.sleep(1)
            await alice.say("lobby", "mine")  # after bob's five, in the room's order
            events = [await alice.receive() for _ in range(4)]
            assert events[0] == EventsDropped(3)
            assert [e.msg for e in events[1:] if isinstance(e, Message)] == ["b3", "b4", "mine"]


async def test_client_cancelled_say_before_sending_is_never_sent(autojump_clock):
    """A say cancelled before it went out (the connection was down) is never sent."""
    async with memory_server() as net:
        network = Network(net)
        async with (
            connect(
                MEMORY_URL,
                open_stream=network.open_stream,
                backoff=Backoff(initial=5, maximum=5, jitter=0),
            ) as alice,
            connect(MEMORY_URL, open_stream=Network(net).open_stream) as bob,
        ):
            await alice.join("lobby", name="alice")
            await bob.join("lobby", name="bob")
            await network.break_current()
            await next_event(alice, Disconnected)
            with trio.move_on_after(1):
                await alice.say("lobby", "never")
            assert await alice.say("lobby", "later")
            seen = await messages_until(bob, 1)
            assert [m.msg for m in seen] == ["later"]


# --- what the real server does not do yet: a scripted server --------------------------


async def test_client_rejoin_frame_and_resent_say_on_the_wire(autojump_clock):
    """After a loss: join with token, rotate and since first; the unacked say only after joined, with its first ref."""
    seen: dict[str, Any] = {}

    async def script(ws: WebSocketConnection, number: int) -> None:
        join = await recv_frame(ws)
        if number == 1:
            message = {
                "type": "message",
                "room": "r",
                "id": "m-1",
                "name": "me",
                "msg": "x",
                "ts": 1,
            }
            await send_frame(ws, **joined_frame(join, name="me", token="t1", history=[message]))
            say = await recv_frame(ws)
            seen["first ref"] = say["ref"]
            await ws.aclose(1011, "lost")
            return
        seen["rejoin"] = {k: join.get(k) for k in ("name", "token", "rotate", "since")}
        with trio.move_on_after(1):
            seen["early"] = await recv_frame(ws)  # nothing may come before joined
        await send_frame(ws, **joined_frame(join, name="me", token="t2"))
        say = await recv_frame(ws)
        seen["second ref"] = say["ref"]
        await send_frame(ws, type="message", room="r", id="m-2", name="me", msg="y", ts=2)
        await send_frame(ws, type="ack", ref=say["ref"], id="m-2")
        await trio.sleep_forever()

    async with (
        scripted(script) as open_stream,
        connect(MEMORY_URL, open_stream=open_stream, backoff=FAST) as client,
    ):
        await client.join("r", name="me")
        assert await client.say("r", "y") == "m-2"
        assert seen["rejoin"] == {"name": "me", "token": "t1", "rotate": True, "since": "m-1"}
        assert "early" not in seen
        assert seen["first ref"] == seen["second ref"]
        assert client.resume_token == "t2"


async def test_client_authenticate_refreshes_the_token(autojump_clock):
    """authenticate sends auth again on the live connection and returns the new authed."""
    auths: list[str] = []

    async def script(ws: WebSocketConnection, number: int) -> None:
        while True:
            frame = await recv_frame(ws)
            assert frame["type"] == "auth"
            auths.append(frame["token"])
            await send_frame(
                ws, type="authed", user="u1", name="u1", exp=len(auths), ref=frame["ref"]
            )

    async with (
        scripted(script) as open_stream,
        connect(MEMORY_URL, token="old", open_stream=open_stream) as client,
    ):
        authed = await client.authenticate("new")
        assert (authed.user, authed.exp) == ("u1", 2)
        assert auths == ["old", "new"]


def auth_script(tokens: dict[str, str], *, expire_first: bool = False) -> Script:
    """Accepts ``auth`` with a known token first (docs/protocol.md §15), then joins."""

    async def script(ws: WebSocketConnection, number: int) -> None:
        auth = await recv_frame(ws)
        if auth.get("type") != "auth" or auth.get("token") not in tokens:
            await send_frame(
                ws, type="error", code="unauthorized", message="bad token", ref=auth.get("ref")
            )
            await ws.aclose(4003, "unauthorized")
            return
        user = tokens[auth["token"]]
        await send_frame(
            ws, type="authed", user=user, name=user, exp=2_000_000_000, ref=auth["ref"]
        )
        join = await recv_frame(ws)
        assert join["type"] == "join"
        assert "name" not in join, "the token names us"
        assert "token" not in join, "no resume takeover with a JWT"
        await send_frame(ws, **joined_frame(join, name=user))
        if expire_first and number == 1:
            await ws.aclose(4003, "token expired")
            return
        await trio.sleep_forever()

    return script


async def test_client_authenticates_first_with_its_token(autojump_clock):
    """With a token, auth is the first frame and join waits for authed; user and name come from it."""
    async with (
        scripted(auth_script({"good": "u1"})) as open_stream,
        connect(MEMORY_URL, token="good", open_stream=open_stream) as client,
    ):
        assert (client.user, client.name) == ("u1", "u1")
        joined = await client.join("lobby")
        assert joined.name == "u1"


async def test_client_refused_token_raises_authentication_failed(autojump_clock):
    """An unauthorized answer to auth: connect raises AuthenticationFailed (4003)."""
    async with scripted(auth_script({"good": "u1"})) as open_stream:
        with pytest.raises(AuthenticationFailed) as failed:
            async with connect(MEMORY_URL, token="bad", open_stream=open_stream):
                pass  # pragma: no cover
        assert failed.value.code == 4003


async def test_client_expired_token_reconnects_with_a_fresh_one(autojump_clock):
    """A 4003 after authed with a token function: it is asked again and the client rejoins."""
    given: list[str] = []

    async def fresh_token() -> str:
        given.append("good")
        return "good"

    async with (
        scripted(auth_script({"good": "u1"}, expire_first=True)) as open_stream,
        connect(MEMORY_URL, token=fresh_token, open_stream=open_stream, backoff=FAST) as client,
    ):
        await client.join("lobby")
        lost = await next_event(client, Disconnected)
        assert lost.code == 4003
        await next_event(client, Rejoined)
        assert given == ["good", "good"]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (4001, Replaced),
        (4003, AuthenticationFailed),
        (4009, DisconnectedByOperator),
        (1008, PolicyViolation),
    ],
)
async def test_client_final_close_codes_end_the_client(autojump_clock, code, error):
    """4001, 4003, 4009 and 1008 are not reconnected: the client ends with its exception."""

    async def script(ws: WebSocketConnection, number: int) -> None:
        join = await recv_frame(ws)
        await send_frame(ws, **joined_frame(join))
        await ws.aclose(code, "bye")

    async with scripted(script) as open_stream:
        async with connect(MEMORY_URL, open_stream=open_stream, backoff=FAST) as client:
            await client.join("lobby", name="me")
            with pytest.raises(error) as ended:
                await drain(client)
            assert ended.value.code == code
            with pytest.raises(error):
                await client.say("lobby", "hello?")


async def test_client_refused_handshake_raises_connect_failed(autojump_clock):
    """A first handshake refused with HTTP 403: ConnectFailed naming the status."""
    async with trio.open_nursery() as nursery:

        async def refuse(stream: trio.abc.Stream) -> None:
            async with trio.open_nursery() as inner:
                request = await wrap_server_stream(inner, stream)
                await request.reject(403)

        async def open_stream() -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(refuse, server_end)
            return client_end

        with pytest.raises(ConnectFailed, match="403"):
            async with connect(MEMORY_URL, open_stream=open_stream):
                pass  # pragma: no cover


async def test_client_whisper_lost_with_its_connection_raises_delivery_unknown(autojump_clock):
    """A whisper sent, then the connection lost before its ack: DeliveryUnknown, not sent again."""
    whispers: list[int] = []

    async def script(ws: WebSocketConnection, number: int) -> None:
        join = await recv_frame(ws)
        await send_frame(ws, **joined_frame(join))
        while True:
            frame = await recv_frame(ws)
            if frame["type"] == "whisper":
                whispers.append(number)
                await ws.aclose(1011, "oops")
                return

    async with (
        scripted(script) as open_stream,
        connect(MEMORY_URL, open_stream=open_stream, backoff=FAST) as client,
    ):
        await client.join("lobby", name="me")
        with pytest.raises(DeliveryUnknown):
            await client.whisper("you", "psst")
        await next_event(client, Rejoined)
        assert whispers == [1]


# --- the README's ten-line bot -----------------------------------------------------------

BOT_MARKER = "A ten-line bot"
BOT_URL = "ws://127.0.0.1:8181/ws"


def readme_bot() -> str:
    """The first ```python block after the bot's heading in README.md, verbatim."""
    text = README.read_text(encoding="utf-8")
    start = text.index(BOT_MARKER)
    match = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, "no ```python block after the bot's heading"
    return match.group(1)


def test_client_readme_bot_is_ten_lines():
    """The README's bot is ten lines of code (blank lines aside) and names the default URL."""
    code = readme_bot()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    assert BOT_URL in code


async def test_client_readme_bot_runs_against_a_real_server():
    """The README's bot, run as written (only the port changed), echoes in the lobby."""
    with trio.fail_after(30):
        async with running_server() as server, trio.open_nursery() as nursery:
            code = readme_bot().replace(BOT_URL, ws_url(server))
            bot = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-c", code],
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
            )
            async with connect(ws_url(server)) as alice:
                joined = await alice.join("lobby", name="alice")
                if "echo-bot" not in joined.members:
                    await next_event(alice, Presence, name="echo-bot", event="join")
                await alice.say("lobby", "!echo hello")
                reply = await next_event(alice, Message, name="echo-bot")
                assert reply.msg == "hello"
            assert bot.returncode is None, "the bot is still running"
            nursery.cancel_scope.cancel()


# --- authentication against a real server (docs/protocol.md §15) -----------------------------

AUTH_SECRET = "the-python-client-test-secret-0123456789"


def jwt_for(sub: str, *, ttl: float = 600, name: str | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl)}
    if name is not None:
        claims["name"] = name
    return jwt.encode(claims, AUTH_SECRET, algorithm="HS256")


async def test_client_authenticates_on_a_real_server_and_speaks_under_the_tokens_name():
    with trio.fail_after(30):
        async with (
            running_server(jwt_secret=AUTH_SECRET) as server,
            connect(ws_url(server), token=jwt_for("u-1", name="Alice")) as alice,
        ):
            assert alice.user == "u-1"
            joined = await alice.join("lobby")
            assert (joined.name, list(joined.members)) == ("Alice", ["Alice"])
            message_id = await alice.say("lobby", "hi")
            message = await next_event(alice, Message, id=message_id)
            assert message.name == "Alice"


async def test_client_with_a_refused_token_raises_authentication_failed():
    with trio.fail_after(30):
        async with running_server(jwt_secret=AUTH_SECRET) as server:
            forged = jwt.encode(
                {"sub": "u", "exp": 2**31}, "another-secret-of-32-bytes-or-more-012", "HS256"
            )
            with pytest.raises(AuthenticationFailed):
                async with connect(ws_url(server), token=forged):
                    pass


async def test_client_token_function_reconnects_after_expiry_and_refresh_keeps_the_user():
    """A token that runs out closes 4003; a token function gives the reconnect a fresh
    one, so the client carries on (rejoined, says acked); `authenticate` refreshes in place."""
    issued: list[float] = []

    async def fresh_token() -> str:
        issued.append(trio.current_time())
        # The first token runs out in 2 s (exp has whole seconds: 2-3 s), later ones in 10 min.
        return jwt_for("u-2", ttl=2 if len(issued) == 1 else 600)

    with trio.fail_after(30):
        async with (
            running_server(jwt_secret=AUTH_SECRET) as server,
            connect(ws_url(server), token=fresh_token) as bob,
        ):
            await bob.join("lobby")
            disconnected = await next_event(bob, Disconnected)
            assert disconnected.code == 4003
            await next_event(bob, Rejoined)
            assert len(issued) == 2
            assert await bob.say("lobby", "still here")
            authed = await bob.authenticate(jwt_for("u-2", ttl=1200))
            assert authed.user == "u-2"
            with pytest.raises(AuthenticationFailed):
                await bob.authenticate(jwt_for("someone-else"))


# --- the authed answer, buffered events, deletions (found moving the e2e tests onto it) ----------


async def test_client_authed_shows_the_tokens_expiry_and_follows_a_refresh():
    """`chat.authed` is the server's latest `authed` (user, name, exp): the client's
    own one on connecting, then the answer to `authenticate`; None when anonymous."""
    first = jwt_for("u-3", name="Carol")
    with trio.fail_after(30):
        async with (
            running_server(jwt_secret=AUTH_SECRET) as server,
            connect(ws_url(server), token=first) as carol,
        ):
            authed = carol.authed
            assert authed is not None
            assert (authed.user, authed.name) == ("u-3", "Carol")
            assert authed.exp == jwt.decode(first, AUTH_SECRET, algorithms=["HS256"])["exp"]
            refreshed = await carol.authenticate(jwt_for("u-3", ttl=1200, name="Carol"))
            assert carol.authed == refreshed
            assert refreshed.exp >= authed.exp + 500
        async with running_server() as server, connect(ws_url(server)) as anonymous:
            assert anonymous.authed is None


async def test_client_receive_nowait_has_our_message_when_the_say_returns():
    """The server sends our message before the ack, so it is buffered by the time
    `say` returns; with nothing buffered `receive_nowait` raises WouldBlock, and
    EndOfChannel after `aclose`."""
    with trio.fail_after(10):
        async with running_server() as server, connect(ws_url(server)) as alice:
            await alice.join("lobby", name="alice")
            with pytest.raises(trio.WouldBlock):
                alice.receive_nowait()
            said = await alice.say("lobby", "hello")
            event = alice.receive_nowait()
            assert isinstance(event, Message)
            assert (event.id, event.msg) == (said, "hello")
            with pytest.raises(trio.WouldBlock):
                alice.receive_nowait()
            await alice.aclose()
            with pytest.raises(trio.EndOfChannel):
                alice.receive_nowait()


async def test_client_rejoin_after_a_deleted_message_still_recovers():
    """A deleted message's id is no `since`: the server forgot it and would answer
    `recovered: false`. After a `Deleted` of the newest message seen, the rejoin
    asks from the one before it, and recovers exactly what was missed."""
    from triochat.client import Deleted

    key = "an-api-key-for-the-client-tests-0123456789"
    with trio.fail_after(30):
        async with (
            running_server(api_key=key) as server,
            proxy_to(server.port) as proxy,
            connect(proxy.url, backoff=FAST) as alice,
            connect(ws_url(server)) as bob,
        ):
            await alice.join("lobby", name="alice")
            await bob.join("lobby", name="bob")
            keep = await bob.say("lobby", "keep")
            drop = await bob.say("lobby", "drop")
            await next_event(alice, Message, id=drop)
            assert alice.last_ids == {"lobby": drop}
            done = await trio.run_process(
                [
                    *("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE"),
                    *("-H", f"Authorization: Bearer {key}"),
                    f"http://127.0.0.1:{server.port}/api/messages/{drop}?room=lobby",
                ],
                capture_stdout=True,
            )
            assert done.stdout == b"204"
            assert await next_event(alice, Deleted) == Deleted(room="lobby", id=drop)
            assert alice.last_ids == {"lobby": keep}
            proxy.refusing = True
            proxy.cut()
            await next_event(alice, Disconnected)
            missed = await bob.say("lobby", "missed")
            proxy.refusing = False
            rejoined = await next_event(alice, Rejoined)
            assert rejoined.joined.recovered is True
            assert [m.id for m in rejoined.joined.history] == [missed]
            assert (await next_event(alice, Message)).id == missed


async def test_client_paces_under_the_rate_limit_the_server_tells():
    """A server started with --rate 2 --burst 2 tells its rate limit in `joined.limits`
    (#15): 6 says at once are paced under it (80 % of the rate, half the burst: one at
    once, then 1.6/s), so every one is acked and none refused with rate_limited
    (retries=0: a refusal would raise; the server counts none). Paced under a constant
    8/s, burst 10, four of the six were refused."""
    with trio.fail_after(30):
        async with (
            running_server(rate=2, burst=2) as server,
            connect(ws_url(server), retries=0) as alice,
        ):
            joined = await alice.join("lobby", name="alice")
            start = trio.current_time()
            ids: dict[int, str] = {}
            made: list[str] = []

            async def say(i: int) -> None:
                made.append(f"m{i}")
                ids[i] = await alice.say("lobby", f"m{i}")

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(say, i)
            assert len(set(ids.values())) == 6
            assert server.hub.chat.rate_limited == 0
            assert trio.current_time() - start >= 5 / 1.6 - 0.05
            page = await alice.history("lobby", limit=10)
            assert [m.msg for m in page.messages] == made, "sent in the order the calls came"
            assert joined.limits is not None
            assert (joined.limits.say_rate, joined.limits.say_burst) == (2, 2)
            assert joined.limits.rooms == 32
            events = []
            with contextlib.suppress(trio.WouldBlock):
                while True:
                    events.append(alice.receive_nowait())
            # Our own messages only: no unsolicited error came.
            assert [type(event) for event in events] == [Message] * 6

        # --rate 0: no limit on the server, no pacing in the client (over the old burst of 10).
        async with (
            running_server(rate=0) as server,
            connect(ws_url(server), retries=0) as bob,
        ):
            joined = await bob.join("lobby", name="bob")
            assert joined.limits is not None
            assert joined.limits.say_rate == 0
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(bob.say, "lobby", f"n{i}")
            assert trio.current_time() - start < 2.0
