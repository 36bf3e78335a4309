"""Fault injection: what the server guarantees when the world misbehaves.

Each test names one scenario and states its guarantee in its docstring.
They run in virtual time on an in-memory network (``autojump_clock``)
wherever possible; the few that need real sockets, threads or processes
use real time under a ``trio.fail_after`` guard. The toolkit is
tests/faults.py; docs/reliability.md maps scenarios to tests.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import signal
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from triochat import Server
from triochat.connection import Connection
from triochat.errors import StorageError
from triochat.history.sqlite import DB_FILE, SqliteHistory
from triochat.outbox import SOON

from .chatclient import ChatClient, open_client
from .conftest import memory_server
from .faults import (
    KillableServer,
    NeverReadingClient,
    RawClient,
    handshake_request,
    live_instances,
    open_faulty_server,
    task_count,
)
from .server_process import ServerProcess, run_server

GRACE = 5.0  # the default presence grace period, seconds

# The guarantees hold with authentication on (docs/protocol.md §15): the tests
# marked AUTH_MODES run anonymous and with every client sending a real JWT first.
SECRET = "the-fault-suite-secret-0123456789"
AUTH_MODES = pytest.mark.parametrize("auth", [False, True], ids=["anonymous", "authenticated"])


def _token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def _authenticate(client: ChatClient, sub: str, auth: bool) -> None:
    """With ``auth``: the `auth` frame for ``sub`` and its `authed`; else nothing."""
    if auth:
        await client.send({"type": "auth", "token": _token(sub), "ref": "auth"})
        await client.expect("authed", ref="auth", user=sub)


def _auth_options(auth: bool) -> dict[str, Any]:
    return {"jwt_secret": SECRET} if auth else {}


def _auth_args(auth: bool) -> tuple[str, ...]:
    return ("--jwt-secret", SECRET) if auth else ()


async def _quiesce(server: Server, seconds: float = GRACE + 1) -> None:
    """Let ``seconds`` of virtual time pass, then let the hub apply everything."""
    await trio.sleep(seconds)
    await server.hub.settle()
    await trio.testing.wait_all_tasks_blocked()


def _assert_only(server: Server, members: set[str], tasks: int) -> None:
    """Nothing but ``members``' connections is left: no task, member, subscription or object."""
    chat = server.hub.chat
    assert len(server.connections) == len(members)
    assert len(chat.clients) == len(members)
    assert {user.name for user in chat.users.values()} == members
    lobby = chat.rooms.get("lobby")
    if members:
        assert lobby is not None
        assert set(lobby.members) == members
        assert {client.name for client in lobby.typed} == members
        assert not lobby.classic
    else:
        assert lobby is None or not (lobby.members or lobby.typed or lobby.classic)
    assert task_count() == tasks, "a task was left behind"
    assert len(live_instances(Connection)) == len(members), "a Connection is still referenced"


@AUTH_MODES
@pytest.mark.parametrize("how", ["eof", "reset"])
@pytest.mark.parametrize("cut_at", [1, 4, 9], ids=["in-header", "in-mask", "in-payload"])
async def test_fault_client_vanishing_mid_frame_leaves_nothing_behind(
    autojump_clock, cut_at, how, auth
):
    """A client that dies halfway through a frame (FIN or reset) leaves no task, member, subscription or object behind."""
    async with open_faulty_server(**_auth_options(auth)) as net:
        async with net.client() as (observer, _):
            await _authenticate(observer, "observer", auth)
            await observer.join("lobby", "observer")
            await _quiesce(net.server, 0)
            tasks = task_count()
            async with net.client() as (victim, link):
                await _authenticate(victim, "victim", auth)
                await victim.join("lobby", "victim")
                await observer.expect("presence", event="join", name="victim")
                if how == "reset":
                    link.server.reset()
                link.client.cut_after(cut_at)
                with pytest.raises(ConnectionClosed):
                    await victim.say("this frame never arrives whole")
            await observer.expect("presence", event="leave", name="victim")
            await _quiesce(net.server)
            _assert_only(net.server, {"observer"}, tasks)
            await observer.say("still here")
            await observer.expect("message", msg="still here")


async def test_fault_one_of_two_connections_of_a_user_vanishing_keeps_the_member(autojump_clock):
    """With tokens on, a user's second tab dying mid-frame is not a leave: the member stays, its first tab still speaks, and only that connection's task and objects go (docs/protocol.md §15)."""
    async with open_faulty_server(**_auth_options(True)) as net:
        async with net.client() as (observer, _), net.client() as (first_tab, _):
            await _authenticate(observer, "observer", True)
            await observer.join("lobby", "observer")
            await _authenticate(first_tab, "victim", True)
            await first_tab.join("lobby", "victim")
            await observer.expect("presence", event="join", name="victim")
            await _quiesce(net.server, 0)
            tasks = task_count()
            async with net.client() as (second_tab, link):
                await _authenticate(second_tab, "victim", True)
                joined = await second_tab.join("lobby", "victim")
                assert sorted(joined["members"]) == ["observer", "victim"]
                link.client.cut_after(4)
                with pytest.raises(ConnectionClosed):
                    await second_tab.say("this frame never arrives whole")
            await _quiesce(net.server)
            _assert_only(net.server, {"observer", "victim"}, tasks)
            await first_tab.say("still here")
            # The observer's next frame is that message: no leave (nor join) in between.
            await observer.expect("message", msg="still here", name="victim")


_UPGRADE = handshake_request("/ws")
_GET = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(_UPGRADE[:10], id="handshake-request-line"),
        pytest.param(_UPGRADE[: len(_UPGRADE) // 2], id="handshake-headers"),
        pytest.param(_UPGRADE[:-2], id="handshake-last-crlf"),
        pytest.param(_UPGRADE, id="handshake-before-101-read"),
        pytest.param(_GET[:7], id="http-request-line"),
        pytest.param(_GET[:-3], id="http-headers"),
    ],
)
async def test_fault_client_vanishing_mid_handshake_leaves_nothing_behind(autojump_clock, sent):
    """A client that closes halfway through an HTTP request or a WebSocket handshake leaves nothing behind."""
    async with open_faulty_server() as net:
        await _quiesce(net.server, 0)
        tasks = task_count()
        link = await net.connect()
        await link.client.send_all(sent)
        await link.client.aclose()
        await _quiesce(net.server, 0)
        _assert_only(net.server, set(), tasks)
        if sent != _UPGRADE:
            assert net.server.stats.connections_opened == 0, "no chat state was touched"


@pytest.mark.parametrize(
    "sent", [_UPGRADE[: len(_UPGRADE) // 2], _GET[:-3]], ids=["handshake", "http"]
)
async def test_fault_silent_half_request_is_closed_within_handshake_timeout(autojump_clock, sent):
    """Half a request head, then silence (slowloris): answered 408 and closed within handshake_timeout; nothing left."""
    async with open_faulty_server(handshake_timeout=10) as net:
        await _quiesce(net.server, 0)
        tasks = task_count()
        link = await net.connect()
        await link.client.send_all(sent)
        start = trio.current_time()
        received = b""
        while data := await link.client.receive_some():
            received += data
        assert trio.current_time() - start <= 10 + 0.01
        assert received.startswith(b"HTTP/1.1 408 "), received
        await link.client.aclose()
        await _quiesce(net.server, 0)
        _assert_only(net.server, set(), tasks)


async def test_fault_peer_that_stops_reading_mid_stream_is_closed_after_ping_timeout(
    autojump_clock, caplog
):
    """A peer that stops reading (no FIN, no pongs) with frames queued for it is closed within ping_interval + ping_timeout; its queue stays bounded and is freed.

    Variant of test_connection.py::test_connection_half_open_peer_closed_after_ping_timeout,
    where the server's writes to the peer block too.
    """
    async with open_faulty_server(rate=0, outbox_frames=64) as net, net.client() as (observer, _):
        await observer.join("lobby", "observer")
        await _quiesce(net.server, 0)
        tasks = task_count()
        before = set(net.server.connections)
        link = await net.connect(lockstep=True)
        stuck = await RawClient.open(link.client)
        await stuck.join("lobby", "stuck")
        assert (await stuck.recv() or {}).get("type") == "joined"
        (connection,) = set(net.server.connections) - before
        await observer.expect("presence", event="join", name="stuck")
        for i in range(5):
            await observer.say(f"m{i}")
            await observer.expect("message", msg=f"m{i}")
            assert (await stuck.recv() or {}).get("msg") == f"m{i}"
        stopped = trio.current_time()  # from now on `stuck` never reads again
        for i in range(5, 30):
            await observer.say(f"m{i}")
            sent = trio.current_time()
            await observer.expect("message", msg=f"m{i}")
            assert trio.current_time() == sent, "the stuck peer delayed someone else"
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < len(connection.outbound.outbox) <= 64, (
            "frames are queued for it, within the bound"
        )
        await observer.expect("presence", event="leave", name="stuck")
        assert trio.current_time() - stopped <= 20 + 20 + GRACE + 0.1
        assert connection not in net.server.connections
        bugs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not bugs, "a peer that stops reading is not a bug in the server"
        assert connection.close_code is None, "its write was cut off: no close frame"
        del connection
        await _quiesce(net.server)
        await stuck.aclose()
        _assert_only(net.server, {"observer"}, tasks)


@pytest.mark.parametrize("fault", ["client-sends-dropped", "server-reads-stalled"])
async def test_fault_peer_whose_frames_never_arrive_is_closed_after_ping_timeout(
    autojump_clock, fault
):
    """A peer whose frames (pongs included) stop arriving, while it still reads, is closed within ping_interval + ping_timeout and leaves after the grace period; the others never wait."""
    async with open_faulty_server() as net, net.client() as (observer, _):
        await observer.join("lobby", "observer")
        async with net.client() as (ghost, link):
            await ghost.join("lobby", "ghost")
            await observer.expect("presence", event="join", name="ghost")
            with contextlib.ExitStack() as faults:
                if fault == "client-sends-dropped":
                    faults.enter_context(link.client.drop_sends())
                else:
                    faults.enter_context(link.server.stall_reads())
                vanished = trio.current_time()
                await ghost.say("lost in transit")
                await observer.expect("presence", event="leave", name="ghost")
                assert trio.current_time() - vanished <= 20 + 20 + GRACE + 0.1
                assert len(net.server.connections) == 1
                if fault == "client-sends-dropped":
                    assert link.client.bytes_dropped > 0
            await observer.say("after")
            await observer.expect("message", msg="after")
            assert (await ghost.closed())[0] == 1006  # dropped: no close frame for a dead peer


async def test_fault_slow_link_gets_everything_in_order_with_coalesced_writes(autojump_clock):
    """A slow but alive link (each write takes 1 s) keeps up by coalescing: every message arrives in order, no 1013, and far fewer writes than frames."""
    async with (
        open_faulty_server(rate=0) as net,
        net.client() as (sender, _),
        net.client() as (slow, link),
    ):
        await slow.join("lobby", "slow")
        await sender.join("lobby", "sender")
        writes_before = link.server.writes
        expected = [f"m{i}" for i in range(200)]
        with link.server.delay_sends(1.0):
            async with trio.open_nursery() as nursery:

                async def say_all() -> None:
                    for text in expected:  # 20 per second for 10 s
                        await sender.say(text)
                        await trio.sleep(0.05)

                nursery.start_soon(say_all)
                seen = []
                while len(seen) < len(expected):
                    frame = await slow.recv()
                    if frame["type"] == "message":
                        seen.append(frame["msg"])
        assert seen == expected
        assert net.server.stats.slow_consumers == 0
        writes = link.server.writes - writes_before
        assert writes <= 12, "one write per second at most: batches, not frames"


async def _read_until(client: RawClient, kind: str) -> dict[str, Any]:
    """Skip frames up to the next one of type ``kind``."""
    while True:
        frame = await client.recv()
        assert frame is not None, f"closed while waiting for {kind}: {client.close}"
        if frame["type"] == kind:
            return frame


async def test_fault_stalled_reader_among_500_never_delays_the_others(autojump_clock):
    """One stalled reader among 500 healthy ones: each healthy one gets all 100 messages in order; the stalled one's outbox stays bounded, it is closed 1013 and freed.

    The healthy ones are 100 typed members of lobby and 400 classic-page
    listeners on ``/`` (both delivery paths; 500 typed members would spend
    the test's time on 125 000 presence frames).
    """
    members, listeners, messages, outbox = 100, 400, 100, 50
    async with open_faulty_server(rate=0, outbox_frames=outbox, max_conns_per_ip=0) as net:
        sender = await RawClient.open((await net.connect()).client)
        await sender.join("lobby", "sender")
        await _read_until(sender, "joined")
        received: list[list[str]] = []

        async def read_messages(client: RawClient, seen: list[str]) -> None:
            while len(seen) < messages:
                frame = await _read_until(client, "message")
                seen.append(frame["msg"])

        async with trio.open_nursery() as readers:
            for i in range(members + listeners):
                if i < members:
                    client = await RawClient.open((await net.connect()).client)
                    await client.join("lobby", f"h{i}")
                    await _read_until(client, "joined")
                else:
                    client = await RawClient.open((await net.connect()).client, "/")
                received.append([])
                readers.start_soon(read_messages, client, received[-1])
            await trio.testing.wait_all_tasks_blocked()
            before = set(net.server.connections)
            stalled = await NeverReadingClient.open((await net.connect(lockstep=True)).client)
            await stalled.join("lobby", "stalled")
            await trio.sleep(SOON)  # its presence frames, which may wait, are out
            await trio.testing.wait_all_tasks_blocked()
            (connection,) = set(net.server.connections) - before
            start = trio.current_time()
            for i in range(messages):
                await sender.say(f"m{i}", ref=f"r{i}")
                await _read_until(sender, "ack")
                # Over the bound at the end of one step is a burst; at the end of
                # the next (one frame per step here) it is a slow consumer.
                assert len(connection.outbound.outbox) <= outbox + 1
        assert trio.current_time() == start, "delivery waited for the stalled reader"
        expected = [f"m{i}" for i in range(messages)]
        assert len(received) == members + listeners
        assert all(seen == expected for seen in received)
        assert net.server.stats.slow_consumers == 1
        await trio.sleep(5 + 0.1)  # close_timeout: its blocked write is given up
        assert connection not in net.server.connections
        assert net.server.stats.closes_by_code == {1013: 1}
        assert len(connection.outbound.outbox) == 0
        del connection
        assert len(live_instances(Connection)) == members + listeners + 1
        await stalled.aclose()


async def test_fault_flood_leaves_calm_clients_latency_unchanged(autojump_clock):
    """A client flooding at 10x the rate limit gets rate_limited, then 1008; three calm clients see every calm message at the instant it is sent.

    Extends test_connection.py::test_connection_flood_is_rate_limited_then_closed_1008
    with latency measured in virtual time (it is exactly zero without load).
    """
    calm_names, says = ["c0", "c1", "c2"], 8
    async with memory_server(rate=10, burst=20) as net:
        async with (
            net.client() as flooder,
            net.client() as c0,
            net.client() as c1,
            net.client() as c2,
        ):
            calm = dict(zip(calm_names, [c0, c1, c2], strict=True))
            for name, client in calm.items():
                await client.join("lobby", name)
            await flooder.join("lobby", "flooder")
            await trio.testing.wait_all_tasks_blocked()
            sent_at: dict[str, float] = {}
            latencies: list[float] = []
            flooder_answers: list[str] = []
            flooder_close: list[int] = []
            flood_ended: list[float] = []

            async def flood() -> None:
                for i in range(400):  # 100 frames/s for up to 4 s
                    try:
                        await flooder.say(f"f{i}")
                    except ConnectionClosed:
                        return
                    await trio.sleep(0.01)

            async def read_flooder() -> None:
                while True:
                    try:
                        frame = await flooder.recv()
                    except ConnectionClosed as exc:
                        flooder_close.append(exc.reason.code)
                        flood_ended.append(trio.current_time())
                        return
                    flooder_answers.append(frame.get("code", frame["type"]))

            async def speak(name: str) -> None:
                for i in range(says):
                    await trio.sleep(0.25)
                    text = f"{name}-{i}"
                    sent_at[text] = trio.current_time()
                    await calm[name].say(text, ref=text)

            async def listen(name: str) -> None:
                seen = 0
                while seen < len(calm_names) * says:
                    frame = await calm[name].recv()
                    assert frame.get("code") != "rate_limited", frame
                    if frame["type"] == "message" and frame["name"] in calm:
                        latencies.append(trio.current_time() - sent_at[frame["msg"]])
                        seen += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_flooder)
                nursery.start_soon(flood)
                for name in calm_names:
                    nursery.start_soon(speak, name)
                    nursery.start_soon(listen, name)
            assert flooder_close == [1008]
            during = [t for t in sent_at.values() if t < flood_ended[0]]
            assert len(during) >= len(calm_names) * 3, "the calm clients spoke during the flood"
            assert flooder_answers.count("rate_limited") == 100
            assert len(latencies) == len(calm_names) ** 2 * says
            assert max(latencies) == 0, "a calm message waited behind the flood"


async def test_fault_accept_resource_errors_back_off_log_once_per_outage(autojump_clock, caplog):
    """EMFILE/ENFILE/ENOBUFS/ENOMEM on accept: the server backs off (capped at 1 s), logs one line per outage and one when it accepts again; chats go on meanwhile.

    Extends test_connection.py::test_connection_accept_emfile_backs_off_and_recovers.
    """
    caplog.set_level(logging.INFO, logger="triochat")
    outages = [
        [OSError(errno.EMFILE, "Too many open files")] * 5,
        [OSError(code, os.strerror(code)) for code in (errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)]
        * 40,  # a long one: 120 failed accepts
    ]
    async with memory_server() as net, net.client() as observer:
        await observer.join("lobby", "observer")
        for number, errors in enumerate(outages, 1):
            net.listener.accept_errors.extend(errors)
            # The accept loop is parked in accept(): this connection is taken
            # at once, and the errors come from the next accept() calls.
            trigger = await net.listener.connect()
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await observer.say(f"during outage {number}")  # chats go on
            await observer.expect("message", msg=f"during outage {number}")
            assert trio.current_time() == start
            async with net.client() as newcomer:  # waits for the outage to end
                joined = trio.current_time()
                await newcomer.join("lobby", f"n{number}")
                await observer.expect("presence", event="join", name=f"n{number}")
            # 0.05 s, doubling, capped at 1 s: no busy loop, and no long wait after.
            backoff = sum(min(0.05 * 2**i, 1.0) for i in range(len(errors)))
            assert backoff <= joined - start <= backoff + 0.1
            await trigger.aclose()
            await observer.expect("presence", event="leave", name=f"n{number}")
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert [r.getMessage() for r in warnings].count(
                "accepting connections again"
            ) == number
            assert sum("backing off" in r.getMessage() for r in warnings) == number
            assert all(r.levelno == logging.WARNING for r in warnings), warnings


async def test_fault_non_io_exception_in_one_writer_closes_only_that_connection(
    autojump_clock, caplog
):
    """A bug (RuntimeError) in one connection's write path closes that connection with 1011 and logs a traceback; no other connection or the server notices."""
    async with open_faulty_server() as net:
        async with net.client() as (other, _), net.client() as (victim, link):
            await other.join("lobby", "other")
            await victim.join("lobby", "victim")
            await other.expect("presence", event="join", name="victim")
            link.server.fail_next_send(RuntimeError("injected writer bug"))
            await other.say("hello")
            await other.expect("message", msg="hello")
            assert await victim.closed() == (1011, "internal error")
            await other.expect("presence", event="leave", name="victim")
            for i in range(3):
                await other.say(f"still chatting {i}")
                await other.expect("message", msg=f"still chatting {i}")
            async with net.client() as (newcomer, _):
                joined = await newcomer.join("lobby", "newcomer")
                assert joined["members"] == ["newcomer", "other"]
            await trio.testing.wait_all_tasks_blocked()  # the server ends newcomer's side
            assert len(net.server.connections) == 1
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(bugs) == 1, bugs
    assert bugs[0].exc_info is not None
    assert isinstance(bugs[0].exc_info[1], RuntimeError)
    assert str(bugs[0].exc_info[1]) == "injected writer bug"


# --- hostile input: names ------------------------------------------------------------


async def test_fault_classic_frame_with_another_name_is_bad_name(autojump_clock):
    """A classic connection cannot speak under another name: bad_name, and nobody sees the spoofed message."""
    async with memory_server() as net, net.client("/") as carol, net.client() as bob:
        await bob.join("lobby", "bob")
        await carol.send({"name": "carol", "msg": "hi"})
        await carol.expect("message", name="carol", msg="hi")
        await carol.send({"name": "alice", "msg": "spoof"})
        error = await carol.expect("error", code="bad_name", name="server")
        assert error["msg"]
        await carol.send({"name": "carol", "msg": "bye"})
        await carol.expect("message", name="carol", msg="bye")
        await bob.expect("presence", event="join", name="carol")
        assert [(await bob.recv())["msg"] for _ in range(2)] == ["hi", "bye"]
        assert set(net.server.hub.chat.users) == {"bob", "carol"}


async def test_fault_typed_join_with_another_name_is_bad_name(autojump_clock):
    """A typed connection's name is bound by its first join; another name on a later join is bad_name."""
    async with memory_server() as net, net.client() as carol:
        await carol.join("lobby", "carol")
        await carol.send({"type": "join", "room": "other", "name": "alice", "ref": "j"})
        await carol.expect("error", code="bad_name", ref="j")
        joined = await carol.join("other", "carol")
        assert joined["members"] == ["carol"]
        assert set(net.server.hub.chat.users) == {"carol"}


SPOOFS = [
    "ali\u200bce",  # zero width space (Cf)
    "alice\u202e",  # right-to-left override (Cf)
    "\u202ealice",
    "\u200balice",  # not white space: not trimmed
    "ali\u2028ce",  # line separator (Zl) inside the name
    "ali\u2029ce",  # paragraph separator (Zp)
    "alice\u2066",  # left-to-right isolate (Cf)
    "al\u00adice",  # soft hyphen (Cf)
    "alice\x00",  # NUL (Cc)
    "ali\x1bce",  # ESC (Cc)
]


@pytest.mark.parametrize("name", SPOOFS, ids=ascii)
@pytest.mark.parametrize("shape", ["typed", "classic"])
async def test_fault_look_alike_name_with_format_or_control_chars_is_bad_name(
    autojump_clock, name, shape
):
    """A name hiding format, control or separator characters is refused with bad_name and binds nothing."""
    async with memory_server() as net, net.client() as alice:
        await alice.join("lobby", "alice")
        async with net.client("/" if shape == "classic" else "/ws") as spoofer:
            if shape == "classic":
                await spoofer.send({"name": name, "msg": "I am alice"})
            else:
                await spoofer.send({"type": "join", "room": "lobby", "name": name})
            await spoofer.expect("error", code="bad_name")
            await net.server.hub.settle()
            assert set(net.server.hub.chat.users) == {"alice"}
            assert set(net.server.hub.chat.rooms["lobby"].members) == {"alice"}


@pytest.mark.parametrize("padded", ["\u2028alice", "alice\u2029", "\u3000alice\u00a0", " alice\t"])
async def test_fault_name_padded_with_unicode_white_space_is_the_same_name(autojump_clock, padded):
    """Leading/trailing Unicode white space (U+2028 included) is trimmed (docs/protocol.md §2.1): the padded name IS "alice", so it is name_taken while alice is here and binds plain "alice" otherwise."""
    async with memory_server() as net:
        async with net.client() as alice, net.client() as spoofer:
            await alice.join("lobby", "alice")
            await spoofer.send({"type": "join", "room": "lobby", "name": padded})
            await spoofer.expect("error", code="name_taken")
        async with net.client() as later:
            await trio.sleep(GRACE + 1)  # alice's hold on the name ends
            joined = await later.join("lobby", padded)
            assert joined["name"] == "alice"
            assert joined["members"] == ["alice"]


async def test_fault_cyrillic_look_alike_is_name_taken(autojump_clock):
    """A Cyrillic look-alike ("\\u0430lice") of a present "alice" gets name_taken, and a whisper to "ALICE" reaches "alice" (#18)."""
    cyrillic = "\u0430lice"
    async with memory_server() as net, net.client() as alice, net.client() as other:
        await alice.join("lobby", "alice")
        await other.send({"type": "join", "room": "lobby", "name": cyrillic, "ref": "j"})
        await other.expect("error", code="name_taken", ref="j")
        joined = await other.join("lobby", "bob")
        assert joined["members"] == ["alice", "bob"]
        await alice.expect("presence", event="join", name="bob")
        await other.send({"type": "whisper", "to": "ALICE", "msg": "which one?"})
        whisper = await alice.expect("whisper", msg="which one?")
        assert (whisper["from"], whisper["to"]) == ("bob", "alice")
        assert set(net.server.hub.chat.users) == {"alice", "bob"}


# --- storage ---------------------------------------------------------------------------


async def test_fault_sqlite_locked_answers_unavailable_and_recovers(tmp_path, caplog):
    """SQLite locked by another process: say answers `unavailable` and nothing unstored is acked or broadcast; other frames are answered meanwhile; acks resume once the lock goes, and after a restart every acked message is in history.

    Real SQLite in worker threads, so real time (no autojump) under fail_after.
    """
    acked: list[str] = []
    with trio.fail_after(30):
        async with (
            memory_server(history=SqliteHistory(tmp_path, 1000)) as net,
            net.client(timeout=10) as alice,
            net.client(timeout=10) as bob,
        ):
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")

            async def say_stored(text: str) -> None:
                await alice.say(text, ref=text)
                message = await alice.expect("message", msg=text)
                await alice.expect("ack", ref=text, id=message["id"])
                acked.append(message["id"])
                await bob.expect("message", msg=text, id=message["id"])

            await say_stored("before")
            locker = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
                await alice.say("lost", ref="lost")
                asked = trio.current_time()
                await bob.send({"type": "history", "room": "lobby", "ref": "h"})
                history = await bob.expect("history", room="lobby")
                # Answered while the store still waits out SQLite's 2 s busy timeout.
                assert trio.current_time() - asked < 1.5
                assert [m["msg"] for m in history["messages"]] == ["before"]
                error = await alice.expect("error", code="unavailable", ref="lost")
                assert error["message"]
                await bob.send({"type": "typing", "room": "lobby"})
                await alice.expect("typing", name="bob")  # still serving
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            await say_stored("after")  # bob's next message is this one, never "lost"
        storage_lines = [r.getMessage() for r in caplog.records if r.name == "triochat.hub"]
        assert len([line for line in storage_lines if "unavailable" in line]) == 1
        assert len([line for line in storage_lines if "available again" in line]) == 1
        async with (
            memory_server(history=SqliteHistory(tmp_path, 1000)) as net,
            net.client(timeout=10) as carol,
        ):
            joined = await carol.join("lobby", "carol")
            assert [m["id"] for m in joined["history"]] == acked
            assert [m["msg"] for m in joined["history"]] == ["before", "after"]


async def test_fault_unopenable_history_fails_the_start(tmp_path):
    """A history file that cannot be opened (a directory in its place) makes the server fail at start with StorageError, not serve without storage."""
    (tmp_path / DB_FILE).mkdir()
    with (
        trio.fail_after(10),
        pytest.RaisesGroup(StorageError, flatten_subgroups=True, allow_unwrapped=True),
    ):
        async with memory_server(history=SqliteHistory(tmp_path, 1000)):
            raise AssertionError("the server started")


# --- a real process: SIGTERM and SIGKILL under load --------------------------------------

CHATTERS = 4
ACKED_BEFORE_SIGNAL = 200


async def _chatter(
    client: ChatClient, name: str, acked: list[str], enough: trio.Event
) -> int | None:
    """Say, wait for the ack, repeat, until the connection closes; the close code."""
    for i in itertools.count():
        ref = f"{name}-{i}"
        try:
            await client.say(ref, ref=ref)
            while True:
                frame = await client.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "ack" and frame["ref"] == ref:
                    acked.append(frame["id"])
                    break
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason else None
        if len(acked) >= ACKED_BEFORE_SIGNAL:
            enough.set()
    raise AssertionError("unreachable")


async def _under_load(
    port: int, stop: Callable[[], Awaitable[None]], auth: bool = False
) -> tuple[list[str], list[int | None]]:
    """Several clients saying continuously; ``stop`` runs once 200 says are acked.

    Returns every acked id and each client's close code.
    """
    acked: list[str] = []
    codes: list[int | None] = []
    enough = trio.Event()
    url = f"ws://127.0.0.1:{port}/ws"
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(url, timeout=10)) for _ in range(CHATTERS)
        ]
        for i, client in enumerate(clients):
            await _authenticate(client, f"chatter{i}", auth)
            await client.join("lobby", f"chatter{i}")

        async def run(i: int) -> None:
            codes.append(await _chatter(clients[i], f"chatter{i}", acked, enough))

        async with trio.open_nursery() as nursery:
            for i in range(CHATTERS):
                nursery.start_soon(run, i)
            await enough.wait()
            await stop()
    return acked, codes


async def _stored_ids(port: int, auth: bool = False) -> list[str]:
    """Every message id lobby's history holds, oldest first (paging back with `history`)."""
    async with open_client(f"ws://127.0.0.1:{port}/ws", timeout=10) as reader:
        await _authenticate(reader, "reader", auth)
        joined = await reader.join("lobby", "reader")
        ids = [m["id"] for m in joined["history"]]
        more = bool(ids)
        while more:
            await reader.send({"type": "history", "room": "lobby", "before": ids[0], "limit": 200})
            page = await reader.expect("history", room="lobby")
            ids = [m["id"] for m in page["messages"]] + ids
            more = page["more"]
    assert len(set(ids)) == len(ids), "an id is stored twice"
    return ids


@AUTH_MODES
async def test_fault_sigterm_under_load_drains_1001_exits_0_and_keeps_every_ack(tmp_path, auth):
    """SIGTERM while clients say continuously: every client gets 1001, the process exits 0 within the drain timeout, and after a restart every acked message is in history."""
    drain_timeout = 5.0
    with (
        trio.fail_after(60),
        KillableServer(
            tmp_path,
            "--rate",
            "0",
            "--history-size",
            "100000",
            "--drain-timeout",
            str(drain_timeout),
            *_auth_args(auth),
        ) as server,
    ):
        server.start()
        signalled: list[float] = []

        async def sigterm() -> None:
            server.proc.send_signal(signal.SIGTERM)
            signalled.append(trio.current_time())

        acked, codes = await _under_load(server.port, sigterm, auth)
        returncode = await trio.to_thread.run_sync(server.proc.wait)
        assert trio.current_time() - signalled[0] <= drain_timeout + 2
        assert returncode == 0, server.current and server.current.output_text()
        assert codes == [1001] * CHATTERS
        assert "Traceback" not in server.current.output_text()
        server.start()
        stored = await _stored_ids(server.port, auth)
        assert len(acked) >= ACKED_BEFORE_SIGNAL
        assert set(acked) <= set(stored), "an acked message was lost"


@AUTH_MODES
async def test_fault_sigkill_under_load_loses_no_acked_message(tmp_path, auth):
    """SIGKILL (no drain, no flush) while clients say continuously: after a restart on the same data every acked message is in history, and no id is reused."""
    with (
        trio.fail_after(60),
        KillableServer(
            tmp_path, "--rate", "0", "--history-size", "100000", *_auth_args(auth)
        ) as server,
    ):
        server.start()

        async def sigkill() -> None:
            assert server.kill() == -signal.SIGKILL

        acked, codes = await _under_load(server.port, sigkill, auth)
        assert codes == [1006] * CHATTERS  # abnormal closure: the TCP connection just ended
        server.start()
        stored = await _stored_ids(server.port, auth)
        assert set(acked) <= set(stored), "an acked message was lost"
        async with open_client(f"ws://127.0.0.1:{server.port}/ws", timeout=10) as alice:
            await _authenticate(alice, "alice", auth)
            await alice.join("lobby", "alice")
            await alice.say("after the crash", ref="new")
            message = await alice.expect("message", msg="after the crash")
            assert message["id"] not in stored, "an id was reused"


# --- hostile input: the HTTP front ------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nab",
        b"PUT /readyz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabcGARBAGE\x00 \r\n\r\n",
    ],
    ids=["truncated-body", "bad-chunk", "garbage-after-body"],
)
async def test_fault_bad_request_body_is_answered_not_logged_as_a_bug(
    autojump_clock, caplog, request_bytes
):
    """A request whose body is truncated or malformed gets its answer and a close; the server logs nothing above INFO (a client's mistake, docs/protocol.md §12)."""
    async with memory_server() as net:
        stream = await net.listener.connect()
        await stream.send_all(request_bytes)
        await stream.send_eof()  # the client is done sending: the body stays bad
        reply = b""
        while data := await stream.receive_some():
            reply += data
        assert _STATUS_LINE.match(reply), reply
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
    above_info = [r for r in caplog.records if r.levelno > logging.INFO]
    assert not above_info, [r.getMessage() for r in above_info]


FUZZ_HANDSHAKE_TIMEOUT = 2.0  # seconds
_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5]\d\d ")


def _mostly(
    usual: st.SearchStrategy[bytes], odd: st.SearchStrategy[bytes]
) -> st.SearchStrategy[bytes]:
    """``usual`` three times in four: requests that get past the first checks."""
    return st.one_of(usual, usual, usual, odd)


_sep = _mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
_method = _mostly(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS"]),
    st.sampled_from([b"CONNECT", b"get", b"G\x00T", b"", b"GET GET"]) | st.binary(max_size=12),
)
_target = _mostly(
    st.sampled_from(
        [b"/", b"/ws", b"/healthz", b"/readyz", b"/metrics", b"/sse", b"/static/app.js"]
    ),
    st.sampled_from(
        [
            b"/sse/x",
            b"/static/",
            b"/static/../../etc/passwd",
            b"/static/%2e%2e/x",
            b"*",
            b"http://evil/ws",
            b"/?" + b"a" * 3000,
            b"/\xff\xfe",
            b"//ws",
            b"",
            b"/ws#x",
        ]
    )
    | st.binary(max_size=40),
)
_version = _mostly(
    st.just(b"HTTP/1.1"),
    st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 x", b"", b"HTTP/1.10"]),
)
_usual_header = st.sampled_from(
    [
        (b"Host", b"localhost"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Connection", b"keep-alive, Upgrade"),
        (b"Connection", b"close"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        (b"Origin", b"http://localhost"),
        (b"Origin", b"null"),
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
    ]
)
_odd_header = st.tuples(
    st.sampled_from(
        [
            b"Host",
            b"Upgrade",
            b"Connection",
            b"Sec-WebSocket-Key",
            b"Sec-WebSocket-Version",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Origin",
            b"Expect",
            b" Host",
            b"Host ",
            b"",
        ]
    )
    | st.binary(max_size=20),
    st.sampled_from(
        [
            b"8",
            b"-1",
            b"0",
            b"gzip, chunked",
            b"99999999999999999999",
            b"100-continue",
            b"\x00",
            b"a" * 20000,
            b"websocket, h2c",
        ]
    )
    | st.binary(max_size=60),
)
_headers = st.builds(
    lambda host, usual, odd: host + usual + odd,
    _mostly(st.just([(b"Host", b"localhost")]), st.just([])),
    st.lists(_usual_header, max_size=6),
    _mostly(st.just([]), st.lists(_odd_header, min_size=1, max_size=2)),
)


def _build(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    sep: bytes,
    body: bytes,
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    return sep.join(lines) + sep + sep + body


# Well-formed requests (distinct headers, Host first) reach the routing and
# the upgrade checks; odd ones mix in bad parts; raw bytes are anything.
_valid_request = st.builds(
    _build,
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS"]),
    st.sampled_from([b"/", b"/ws", b"/healthz", b"/readyz", b"/metrics", b"/sse", b"/nope"]),
    st.just(b"HTTP/1.1"),
    st.lists(_usual_header, max_size=6, unique_by=lambda header: header[0]).map(
        lambda headers: [(b"Host", b"localhost"), *(h for h in headers if h[0] != b"Host")]
    ),
    st.just(b"\r\n"),
    st.just(b""),
)
_odd_request = st.builds(
    _build,
    _method,
    _target,
    _version,
    _headers,
    _sep,
    _mostly(st.just(b""), st.binary(max_size=200)),
)
_request = st.one_of(_valid_request, _odd_request)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    with run_server("--handshake-timeout", str(FUZZ_HANDSHAKE_TIMEOUT)) as proc:
        yield proc


def _exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data``, half-close, read to EOF: what came back and how long it took.

    The server may close with some of ``data`` unread, which the kernel turns
    into a reset: that still counts as a close (what came before it is kept).
    """
    start = time.monotonic()
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=FUZZ_HANDSHAKE_TIMEOUT + 1) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    return reply, time.monotonic() - start


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,  # the same 200 inputs every run: deterministic
    suppress_health_check=list(HealthCheck),
)
@given(data=st.one_of(_request, _request.map(lambda r: r + r), st.binary(max_size=1024)))
def test_fault_http_front_answers_any_bytes_with_a_status_or_a_close(fuzz_server, data):
    """Arbitrary bytes on the HTTP port get a status line or a clean close within handshake_timeout; /healthz still answers."""
    reply, took = _exchange(fuzz_server.port, data)
    assert not reply or _STATUS_LINE.match(reply), reply[:200]
    assert took <= FUZZ_HANDSHAKE_TIMEOUT + 0.5
    health, _ = _exchange(fuzz_server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200 "), health[:200]
    assert fuzz_server.proc.poll() is None


def test_fault_http_fuzzing_logged_nothing_above_info(fuzz_server):
    """After the fuzzing, the server's log holds no warning, error or traceback: a client's mistake is not the server's."""
    assert fuzz_server.proc.poll() is None
    lines = fuzz_server.output_text().splitlines()
    offending = [
        line
        for line in lines
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line)
        or re.match(r"[\w.]*(Error|Exception): ", line)  # a traceback's last line
    ]
    assert not offending, "\n".join(offending[:20])
