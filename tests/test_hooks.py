"""The embedding hooks (README "Embedding", `triochat.hooks`): real servers, real sockets.

The README's example is run as written (only the port changed) in its own
process; the rest start a `Server` in the test with hooks that record what
they see, and talk to it over real WebSocket connections.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from triochat import Config, Identity, Refusal, SayInfo, Server
from triochat.api import ApiError

from .chatclient import ChatClient, open_client
from .conftest import client_of

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_embedding() -> str:
    """The first ```python block after the "Embedding" heading, verbatim."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Embedding")
    match = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, "no ```python block after the Embedding heading"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(port: int) -> None:
    """Returns once the process listens (it takes a moment to start)."""
    for _ in range(200):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
        else:
            await stream.aclose()
            return
    raise AssertionError(f"nothing listens on port {port}")


async def test_readme_embedding_example_runs_as_written() -> None:
    port = free_port()
    code = readme_embedding()
    assert "port=8181" in code
    code = code.replace("port=8181", f"port={port}")
    url = f"ws://127.0.0.1:{port}/ws"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-c", code],
                    check=False,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            await wait_for_port(port)
            async with open_client(url) as alice:
                await alice.send({"type": "auth", "token": "token-of-alice", "ref": "a"})
                assert (await alice.expect("authed", ref="a"))["name"] == "alice"
                joined = await alice.join("lobby")
                assert [m["msg"] for m in joined["history"]] == ["the server is up"]
                assert joined["history"][0]["name"] == "server"
                await alice.say("NO SHOUTING HERE", ref="s1")
                refused = await alice.expect("error", ref="s1", code="forbidden")
                assert refused["message"] == "no shouting"
                await alice.say("  hi  ", ref="s2")
                assert (await alice.expect("message", name="alice"))["msg"] == "hi"
                await alice.expect("ack", ref="s2")
            async with open_client(url) as mallory:
                await mallory.send({"type": "auth", "token": "guess", "ref": "a"})
                error = await mallory.expect("error", code="unauthorized", ref="a")
                assert error["message"] == "unknown token"
                assert (await mallory.closed())[0] == 4003
            assert process.returncode is None, "the example server is still running"
            nursery.cancel_scope.cancel()


# --- hooks in a server started here --------------------------------------------------


@asynccontextmanager
async def hooked_server(**hooks: Any) -> AsyncIterator[Server]:
    config = Config(port=0, memory=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(Server(config, **hooks).run)
            yield server
            server.drain()


def identity_of(token: str, *, rooms: tuple[str, ...] | None = None) -> Identity:
    return Identity(sub="id-" + token, name=token, exp=int(time.time()) + 600, rooms=rooms)


async def accept_any(token: str, peer: str) -> Identity:
    return identity_of(token)


async def authed(client: ChatClient, token: str) -> dict[str, Any]:
    await client.send({"type": "auth", "token": token, "ref": "a"})
    return await client.expect("authed", ref="a")


async def test_the_authenticator_decides_and_sees_the_peer_address() -> None:
    seen: list[tuple[str, str]] = []

    async def authenticate(token: str, peer: str) -> Identity:
        seen.append((token, peer))
        if token == "no":
            raise Refusal("not you", code="unauthorized")
        return identity_of(token, rooms=("team-*",))

    async with hooked_server(authenticate=authenticate) as server:
        async with client_of(server) as alice:
            frame = await authed(alice, "alice")
            assert (frame["user"], frame["name"]) == ("id-alice", "alice")
            await alice.join("team-1")
            await alice.send({"type": "join", "room": "lobby", "ref": "j"})
            await alice.expect("error", code="forbidden", ref="j")
        async with client_of(server) as other:
            await other.send({"type": "join", "room": "team-1", "name": "x", "ref": "j"})
            await other.expect("error", code="unauthorized")
            assert (await other.closed())[0] == 4003
        async with client_of(server) as refused:
            await refused.send({"type": "auth", "token": "no", "ref": "a"})
            assert (await refused.expect("error", code="unauthorized"))["message"] == "not you"
            assert (await refused.closed())[0] == 4003
    assert [token for token, _ in seen] == ["alice", "no"]
    assert all(peer == "127.0.0.1" for _, peer in seen)


@pytest.mark.parametrize(
    "outcome", ["raises", "bad name", "not an identity"], ids=lambda o: o.replace(" ", "-")
)
async def test_a_failing_authenticator_refuses_and_is_logged(
    outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def authenticate(token: str, peer: str) -> Identity:
        if outcome == "raises":
            raise RuntimeError("the user database is down")
        if outcome == "bad name":
            return Identity(sub="u", name="\u202e", exp=int(time.time()) + 60)
        return "alice"  # type: ignore[return-value]

    async with hooked_server(authenticate=authenticate) as server, client_of(server) as client:
        await client.send({"type": "auth", "token": "t", "ref": "a"})
        error = await client.expect("error", code="unauthorized", ref="a")
        assert error["message"] == "the token could not be checked"
        assert (await client.closed())[0] == 4003
    assert any(record.levelname == "ERROR" for record in caplog.records)


async def test_the_say_hook_rewrites_refuses_and_sees_who_speaks() -> None:
    seen: list[SayInfo] = []

    async def on_say(say: SayInfo) -> str:
        seen.append(say)
        if "spam" in say.msg:
            raise Refusal("looks like spam")
        if "secret" in say.msg:
            raise Refusal("not for you", code="rate_limited")
        return say.msg.replace("darn", "d**n")

    async with hooked_server(authenticate=accept_any, on_say=on_say) as server:
        async with client_of(server) as alice, client_of(server) as bob:
            await authed(alice, "alice")
            await authed(bob, "bob")
            await alice.join("lobby")
            await bob.join("lobby")
            await alice.expect("presence", name="bob")
            await alice.say("darn it", ref="1")
            for client in (alice, bob):
                assert (await client.expect("message", name="alice"))["msg"] == "d**n it"
            await alice.expect("ack", ref="1")
            await alice.say("buy spam", ref="2")
            await alice.expect("error", code="forbidden", ref="2", message="looks like spam")
            await alice.say("a secret", ref="3")
            await alice.expect("error", code="rate_limited", ref="3")
            await alice.send({"type": "history", "room": "lobby", "ref": "h"})
            history = await alice.expect("history", ref="h")
            assert [m["msg"] for m in history["messages"]] == ["d**n it"]
    assert [(s.room, s.name, s.user) for s in seen] == [("lobby", "alice", "id-alice")] * 3


@pytest.mark.parametrize("outcome", ["raises", "empty", "too long"])
async def test_a_failing_say_hook_stores_nothing(
    outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_say(say: SayInfo) -> str:
        if outcome == "raises":
            raise RuntimeError("the filter service is down")
        return "" if outcome == "empty" else "x" * 5000

    async with hooked_server(on_say=on_say) as server, client_of(server) as alice:
        await alice.join("lobby", name="alice")
        await alice.say("hello", ref="1")
        error = await alice.expect("error", code="internal", ref="1")
        assert error["message"] == "the message could not be checked"
        # The connection stays: the client did nothing wrong.
        await alice.send({"type": "history", "room": "lobby", "ref": "h"})
        assert (await alice.expect("history", ref="h"))["messages"] == []
    assert any(record.levelname == "ERROR" for record in caplog.records)


async def test_a_slow_say_hook_holds_up_only_its_sender() -> None:
    release = trio.Event()

    async def on_say(say: SayInfo) -> str:
        if say.name == "slow":
            await release.wait()
        return say.msg

    async with hooked_server(on_say=on_say) as server:
        async with client_of(server) as slow, client_of(server) as quick:
            await slow.join("lobby", name="slow")
            await quick.join("lobby", name="quick")
            await slow.expect("presence", name="quick")
            await slow.say("first", ref="s")
            await quick.say("second", ref="q")
            assert (await quick.expect("message"))["msg"] == "second"
            await quick.expect("ack", ref="q")
            release.set()
            assert (await slow.expect("message"))["msg"] == "second"
            assert (await slow.expect("message"))["msg"] == "first"
            await slow.expect("ack", ref="s")


async def test_the_say_hook_sees_classic_frames_in_the_lobby() -> None:
    seen: list[SayInfo] = []

    async def on_say(say: SayInfo) -> str:
        seen.append(say)
        return say.msg.upper()

    async with hooked_server(on_say=on_say) as server, client_of(server, "/") as classic:
        await classic.send({"name": "carol", "msg": "hi"})
        frame = await classic.recv()
        assert (frame["name"], frame["msg"]) == ("carol", "HI")
    assert [(s.room, s.name, s.user) for s in seen] == [("lobby", "carol", None)]


async def test_server_publish_reaches_members_and_history() -> None:
    async with hooked_server() as server, client_of(server) as alice:
        await alice.join("news", name="alice")
        message_id = await server.publish("news", "hello from the host")
        message = await alice.expect("message", name="server")
        assert (message["id"], message["msg"]) == (message_id, "hello from the host")
        with pytest.raises(ApiError) as bad_room:
            await server.publish("no such room!", "x")
        assert bad_room.value.code == "bad_room"
        with pytest.raises(ApiError) as too_long:
            await server.publish("news", "x" * 5000)
        assert too_long.value.code == "too_long"
