"""Authentication end to end (#14 §1-2, docs/protocol.md §15): real servers, real tokens.

Tokens are real JWTs (PyJWT) checked by a server started with a key; the
clients are real WebSocket and SSE connections, on one node and on two
nodes sharing a real redis-server. Expiry runs in virtual time (the memory
network and ``autojump_clock``): a token's ``exp`` is wall-clock time, and the
server turns it into a deadline on its own clock when the token arrives.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from triochat.config import Config
from triochat.server import Server

from .chatclient import ChatClient
from .conftest import client_of, memory_server, running_server
from .redisserver import redis_server
from .sseclient import SseStream, tcp
from .test_auth import hs_by_hand

SECRET = "a-test-secret-of-some-length-0123456789"


def token(sub: str = "u1", *, ttl: float = 600, secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


async def authed(client: ChatClient, tok: str, ref: str = "a1") -> dict[str, Any]:
    await client.send({"type": "auth", "token": tok, "ref": ref})
    return await client.expect("authed", ref=ref)


async def refused(client: ChatClient, code: str = "unauthorized") -> None:
    """The next frame is an error ``code``, then the server closes with 4003."""
    await client.expect("error", code=code)
    closed = await client.closed()
    assert closed[0] == 4003, closed


@asynccontextmanager
async def auth_server(**options: Any) -> AsyncIterator[Server]:
    with trio.fail_after(30):
        async with running_server(jwt_secret=SECRET, **options) as server:
            yield server


# --- the auth frame ------------------------------------------------------------------


async def test_auth_then_join_without_a_name_takes_the_tokens_name() -> None:
    async with auth_server() as server, client_of(server) as alice:
        frame = await authed(alice, token("u1", name="Alice"))
        assert (frame["user"], frame["name"]) == ("u1", "Alice")
        assert isinstance(frame["exp"], int)
        assert frame["exp"] > time.time()
        joined = await alice.join("lobby")
        assert (joined["name"], joined["members"]) == ("Alice", ["Alice"])
        await alice.say("hi", ref="s1")
        message = await alice.expect("message", msg="hi")
        assert message["name"] == "Alice"
        await alice.expect("ack", ref="s1")


async def test_the_name_defaults_to_sub_and_another_name_is_bad_name() -> None:
    async with auth_server() as server, client_of(server) as bob:
        assert (await authed(bob, token("bob")))["name"] == "bob"
        await bob.send({"type": "join", "room": "lobby", "name": "mallory", "ref": "j"})
        await bob.expect("error", code="bad_name", ref="j")
        # The same name (by key) is fine.
        joined = await bob.join("lobby", name="BOB")
        assert joined["name"] == "bob"


@pytest.mark.parametrize(
    "first",
    [
        {"type": "join", "room": "lobby", "name": "alice"},
        {"type": "say", "room": "lobby", "msg": "hi"},
        {"name": "alice", "msg": "a classic frame cannot authenticate"},
        "not json",
    ],
)
async def test_any_frame_before_auth_is_unauthorized_then_4003(first: Any) -> None:
    async with auth_server() as server, client_of(server) as client:
        await client.send(first)
        await refused(client)


def _none_alg(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, None, algorithm="none")


def _bad_tokens() -> dict[str, str]:
    exp = int(time.time() + 600)
    other_key = ed25519.Ed25519PrivateKey.generate()
    return {
        "forged": token(secret="another-secret-of-some-length-98765"),
        "expired": token(ttl=-5),
        "no exp": jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"exp": exp}, SECRET, algorithm="HS256"),
        "alg none": _none_alg({"sub": "u1", "exp": exp}),
        "wrong key type": jwt.encode({"sub": "u1", "exp": exp}, other_key, algorithm="EdDSA"),
        "oversized": token(pad="x" * 9000),
        "garbage": "not.a.jwt",
        "bad name": token(name="\u200b"),
        "bad rooms": token(rooms=["Not A Room"]),
    }


@pytest.mark.parametrize("kind", sorted(_bad_tokens()))
async def test_a_bad_token_is_unauthorized_then_4003(kind: str) -> None:
    async with auth_server() as server, client_of(server) as client:
        await client.send({"type": "auth", "token": _bad_tokens()[kind], "ref": "a"})
        error = await client.expect("error", code="unauthorized", ref="a")
        assert "Traceback" not in error["message"]
        closed = await client.closed()
        assert closed[0] == 4003


async def test_audience_and_issuer_are_enforced_when_configured() -> None:
    async with (
        auth_server(jwt_audience="chat", jwt_issuer="https://id.example") as server,
        client_of(server) as good,
        client_of(server) as wrong,
    ):
        await authed(good, token(aud="chat", iss="https://id.example"))
        await wrong.send({"type": "auth", "token": token(aud="other", iss="https://id.example")})
        await refused(wrong)


async def test_a_public_key_server_takes_eddsa_tokens(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    good = jwt.encode({"sub": "u9", "exp": int(time.time() + 60)}, private, algorithm="EdDSA")
    # An HS256 token signed with the public key as the secret (algorithm
    # confusion), made by hand: PyJWT itself refuses to make one.
    confused = hs_by_hand({"sub": "u9", "exp": int(time.time() + 60)}, pem)
    with trio.fail_after(30):
        async with (
            running_server(jwt_public_key=tmp_path / "key.pem") as server,
            client_of(server) as a,
            client_of(server) as b,
        ):
            assert (await authed(a, good))["user"] == "u9"
            await b.send({"type": "auth", "token": confused})
            await refused(b)


async def test_no_auth_within_the_handshake_timeout_is_4003(autojump_clock: Any) -> None:
    async with (
        memory_server(jwt_secret=SECRET, handshake_timeout=3) as net,
        net.client() as idle,
    ):
        started = trio.current_time()
        code, reason = await idle.closed()
        assert (code, reason) == (4003, "not authenticated")
        assert 3 <= trio.current_time() - started < 4


async def test_at_exp_the_connection_closes_4003_unless_refreshed(autojump_clock: Any) -> None:
    async with (
        memory_server(jwt_secret=SECRET) as net,
        net.client() as short,
        net.client() as refreshed,
    ):
        short.timeout = refreshed.timeout = 200
        await authed(short, token("u1", ttl=60))
        await authed(refreshed, token("u2", ttl=60))
        await refreshed.join("lobby")
        started = trio.current_time()
        await trio.sleep(30)
        again = await authed(refreshed, token("u2", ttl=600), ref="a2")
        assert again["exp"] > time.time() + 500
        code, reason = await short.closed()
        assert (code, reason) == (4003, "token expired")
        assert 58 <= trio.current_time() - started <= 61
        # The refreshed one is still there, well past the first exp.
        await trio.sleep(60)
        await refreshed.say("still here", ref="s")
        await refreshed.expect("message", msg="still here")


async def test_a_fresh_token_for_another_user_is_refused() -> None:
    async with auth_server() as server, client_of(server) as client:
        await authed(client, token("u1"))
        await client.send({"type": "auth", "token": token("u2"), "ref": "a2"})
        await refused(client)


async def test_without_a_key_auth_is_refused_and_names_work_as_before(server: Server) -> None:
    async with client_of(server) as client:
        await client.send({"type": "auth", "token": token(), "ref": "a"})
        await client.expect("error", code="unauthorized", ref="a")
        joined = await client.join("lobby", name="anon")
        assert joined["name"] == "anon"


# --- rooms in the token ------------------------------------------------------------------


async def test_rooms_in_the_token_limit_join_say_history_and_typing() -> None:
    async with auth_server() as server, client_of(server) as client:
        await authed(client, token("u1", rooms=["lobby", "team-*"]))
        await client.join("lobby")
        await client.join("team-red")
        for frame in (
            {"type": "join", "room": "secret", "ref": "r"},
            {"type": "say", "room": "secret", "msg": "x", "ref": "r"},
            {"type": "history", "room": "secret", "ref": "r"},
            {"type": "typing", "room": "secret", "ref": "r"},
            {"type": "join", "room": "team", "ref": "r"},  # not a team-* room
        ):
            await client.send(frame)
            await client.expect("error", code="forbidden", ref="r")
        # A refreshed token with fewer rooms: the rooms it no longer grants are
        # forbidden from then on, also those already joined.
        await authed(client, token("u1", rooms=["lobby"]), ref="a2")
        await client.send({"type": "say", "room": "team-red", "msg": "x", "ref": "r2"})
        await client.expect("error", code="forbidden", ref="r2")


# --- several connections of one user --------------------------------------------------------


async def test_several_connections_of_one_user_are_one_member() -> None:
    async with (
        auth_server(presence_grace=0.2) as server,
        client_of(server) as observer,
        client_of(server) as tab1,
    ):
        await authed(observer, token("obs"))
        await observer.join("lobby")
        await authed(tab1, token("u1", name="alice"))
        await tab1.join("lobby")
        await observer.expect("presence", event="join", name="alice")
        async with client_of(server) as tab2:
            await authed(tab2, token("u1", name="alice"))
            joined = await tab2.join("lobby")  # never name_taken, never a takeover
            assert joined["members"] == ["alice", "obs"]
            # A say from one tab is a normal message on the other.
            await tab2.say("from tab 2", ref="t2")
            await tab1.expect("message", msg="from tab 2", name="alice")
            await observer.expect("message", msg="from tab 2", name="alice")
            # A whisper to the user reaches both tabs.
            await observer.send({"type": "whisper", "to": "alice", "msg": "psst", "ref": "w"})
            for tab in (tab1, tab2):
                await _skip_to(tab, "whisper", msg="psst")
        # tab2 closed: the user is still there (tab1); no leave, no 4001 on tab1.
        await observer.say("after tab 2", ref="o2")
        frame = await _skip_to(observer, "message", msg="after tab 2")
        assert frame["name"] == "obs"
        await tab1.say("tab 1 lives", ref="t1")
        await _skip_to(tab1, "message", msg="tab 1 lives")
    async with auth_server(presence_grace=0.2) as server, client_of(server) as observer:
        await authed(observer, token("obs"))
        await observer.join("lobby")
        async with client_of(server) as tab1:
            await authed(tab1, token("u1", name="alice"))
            await tab1.join("lobby")
            await observer.expect("presence", event="join", name="alice")
        # The last connection gone: leave after the grace period.
        await observer.expect("presence", event="leave", name="alice")


async def test_another_user_with_the_same_name_is_name_taken() -> None:
    async with auth_server() as server, client_of(server) as a, client_of(server) as b:
        await authed(a, token("u1", name="alice"))
        await a.join("lobby")
        await authed(b, token("u2", name="ALICE"))
        await b.send({"type": "join", "room": "lobby", "ref": "j"})
        await b.expect("error", code="name_taken", ref="j")


async def test_a_whisper_needs_a_shared_room_when_authenticated() -> None:
    async with auth_server() as server, client_of(server) as alice, client_of(server) as bob:
        await authed(alice, token("a", name="alice"))
        await alice.join("one")
        await authed(bob, token("b", name="bob"))
        await bob.join("two")
        await alice.send({"type": "whisper", "to": "bob", "msg": "hi", "ref": "w1"})
        error = await alice.expect("error", code="no_such_user", ref="w1")
        assert error["message"] == "nobody is called bob"  # the same as for nobody
        await bob.join("one")
        await _skip_to(alice, "presence", name="bob")
        await alice.send({"type": "whisper", "to": "bob", "msg": "hi", "ref": "w2"})
        await _skip_to(bob, "whisper", msg="hi")


# --- SSE ------------------------------------------------------------------------------------


async def test_sse_authenticates_with_its_first_post() -> None:
    async with auth_server() as server:
        stream = await SseStream.open(tcp(server.port))
        try:
            status, _ = await stream.post({"type": "auth", "token": token("u5"), "ref": "a"})
            assert status == 204
            frame = await stream.expect("authed", ref="a")
            assert frame["user"] == "u5"
            await stream.post({"type": "join", "room": "lobby", "ref": "j"})
            assert (await stream.expect("joined", ref="j"))["name"] == "u5"
        finally:
            await stream.aclose()
        unauth = await SseStream.open(tcp(server.port))
        try:
            await unauth.post({"type": "join", "room": "lobby", "name": "x", "ref": "j"})
            await unauth.expect("error", code="unauthorized")
        finally:
            await unauth.aclose()


# --- a cluster ----------------------------------------------------------------------------


async def test_one_user_on_two_nodes_is_one_member(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nodes = []
            for _ in range(2):
                config = Config(
                    port=0, redis=redis.url, jwt_secret=SECRET, presence_grace=0.3, rate=0
                )
                nodes.append(await nursery.start(Server(config).run))
            a, b = nodes
            async with client_of(a) as observer, client_of(a) as on_a:
                await authed(observer, token("obs"))
                await observer.join("lobby")
                await authed(on_a, token("u1", name="alice"))
                await on_a.join("lobby")
                await observer.expect("presence", event="join", name="alice")
                async with client_of(b) as on_b, client_of(b) as mallory:
                    await authed(on_b, token("u1", name="alice"))
                    joined = await on_b.join("lobby")  # shared, not taken over
                    assert joined["members"] == ["alice", "obs"]
                    # Another user may not take the name on the other node either.
                    await authed(mallory, token("u2", name="alice"))
                    await mallory.send({"type": "join", "room": "lobby", "ref": "j"})
                    await mallory.expect("error", code="name_taken", ref="j")
                    # A whisper reaches the user on both nodes.
                    await observer.send({"type": "whisper", "to": "alice", "msg": "both?"})
                    await _skip_to(on_a, "whisper", msg="both?")
                    await _skip_to(on_b, "whisper", msg="both?")
                    await on_b.say("from b", ref="b1")
                    await _skip_to(on_a, "message", msg="from b")
                # on_b gone: alice is still on node A, and never left.
                await observer.say("check", ref="c")
                await _skip_to(observer, "message", msg="check")
                await on_a.say("a lives", ref="a1")
                await _skip_to(on_a, "ack", ref="a1")
            for node in nodes:
                node.drain()


async def _skip_to(client: ChatClient, kind: str, **fields: Any) -> dict[str, Any]:
    """The next frame of ``kind`` with ``fields``; fails on a presence leave
    of anyone on the way (several connections of one user never leave)."""
    while True:
        frame = await client.recv()
        assert not (frame.get("type") == "presence" and frame.get("event") == "leave"), frame
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
            return frame
