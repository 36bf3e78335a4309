"""Authentication end to end (#14 §1-2, docs/protocol.md §15): real servers, real tokens.

Tokens are real JWTs (PyJWT) checked by a server started with a key; the
clients are real WebSocket and SSE connections, on one node and on two
nodes sharing a real redis-server. Expiry runs in virtual time (the memory
network and ``autojump_clock``): a token's ``exp`` is wall-clock time, and the
server turns it into a deadline on its own clock when the token arrives.

Users are the package's own client, `triochat.client` (docs/python-client.md),
given a token as a bot or backend would. Bad input (frames before `auth`, bad
tokens, no `auth` at all, the exact error and close of a refusal) and the SSE
transport stay with the raw test clients (tests/chatclient.py, tests/sseclient.py):
the package client sends only well-formed frames, always authenticates first,
and speaks WebSocket only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from triochat.client import (
    AuthenticationFailed,
    ClientError,
    Message,
    Presence,
    ServerError,
    Whisper,
    connect,
)
from triochat.client import ChatClient as User
from triochat.config import Config
from triochat.server import Server

from .chatclient import ChatClient
from .conftest import client_of, memory_server, running_server, ws_url
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


def user_of(server: Server, tok: str) -> AbstractAsyncContextManager[User]:
    """A `triochat.client` connection to ``server``, authenticated with ``tok``."""
    return connect(ws_url(server), token=tok)


async def expect_event(user: User, kind: type[Any], **fields: Any) -> Any:
    """The next event, asserted to be a ``kind`` with ``fields`` (as the raw `expect`)."""
    event = await user.receive()
    assert isinstance(event, kind), event
    for key, value in fields.items():
        assert getattr(event, key) == value, (key, event)
    return event


async def drain(user: User) -> None:
    """Take events until `receive` raises (the client ended)."""
    while True:
        await user.receive()


async def skip_to_event(user: User, kind: type[Any], **fields: Any) -> Any:
    """The next event of ``kind`` with ``fields``; fails on a presence leave of
    anyone on the way (several connections of one user never leave)."""
    while True:
        event = await user.receive()
        assert not (isinstance(event, Presence) and event.event == "leave"), event
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            return event


# --- the auth frame ------------------------------------------------------------------


async def test_auth_then_join_without_a_name_takes_the_tokens_name() -> None:
    async with auth_server() as server, user_of(server, token("u1", name="Alice")) as alice:
        frame = alice.authed
        assert frame is not None
        assert (frame.user, frame.name) == ("u1", "Alice")
        assert (alice.user, alice.name) == ("u1", "Alice")
        assert isinstance(frame.exp, int)
        assert frame.exp > time.time()
        joined = await alice.join("lobby")
        assert (joined.name, list(joined.members)) == ("Alice", ["Alice"])
        message_id = await alice.say("lobby", "hi")  # the ack
        # The message came before the ack: it is the next event, buffered already.
        message = alice.receive_nowait()
        assert isinstance(message, Message), message
        assert (message.id, message.msg, message.name) == (message_id, "hi", "Alice")


async def test_the_name_defaults_to_sub_and_another_name_is_bad_name() -> None:
    async with auth_server() as server, user_of(server, token("bob")) as bob:
        assert bob.authed is not None
        assert bob.authed.name == "bob"
        with pytest.raises(ClientError) as refused_join:
            await bob.join("lobby", name="mallory")
        assert refused_join.value.code == "bad_name"
        assert bob.rooms == ()
        # The same name (by key) is fine.
        joined = await bob.join("lobby", name="BOB")
        assert joined.name == "bob"


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
        user_of(server, token(aud="chat", iss="https://id.example")) as good,
        # Raw: the refusal's exact error frame and its 4003 close (bad input).
        client_of(server) as wrong,
    ):
        assert good.user == "u1"
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
            user_of(server, good) as a,
            # Raw: the refusal's exact error frame and its 4003 close (bad input).
            client_of(server) as b,
        ):
            assert a.user == "u9"
            assert (await a.join("lobby")).name == "u9"
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
    # (Virtual time: the bound stands in for the raw client's per-frame timeout.)
    with trio.fail_after(300):
        async with memory_server(jwt_secret=SECRET) as net:

            def user(tok: str) -> AbstractAsyncContextManager[User]:
                return connect("ws://127.0.0.1/ws", token=tok, open_stream=net.listener.connect)

            async with user(token("u1", ttl=60)) as short, user(token("u2", ttl=60)) as refreshed:
                await refreshed.join("lobby")
                started = trio.current_time()
                await trio.sleep(30)
                again = await refreshed.authenticate(token("u2", ttl=600))
                assert again.exp > time.time() + 500
                assert refreshed.authed == again
                # A token (not a token function) that ran out ends the client.
                with pytest.raises(AuthenticationFailed) as expired:
                    await drain(short)
                assert (expired.value.code, expired.value.reason) == (4003, "token expired")
                assert 58 <= trio.current_time() - started <= 61
                # The refreshed one is still there, well past the first exp.
                await trio.sleep(60)
                assert refreshed.connected
                message_id = await refreshed.say("lobby", "still here")
                await expect_event(refreshed, Message, msg="still here", id=message_id)


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
    rooms = ["lobby", "team-*"]
    async with (
        auth_server() as server,
        user_of(server, token("u1", rooms=rooms)) as user,
        # Raw, for `typing` only: the package client sends a typing hint only in a
        # room it has joined, and without a `ref`, so it cannot show the refusal
        # of one in a room it may not join.
        client_of(server) as raw,
    ):
        await user.join("lobby")
        await user.join("team-red")
        forbidden = (
            lambda: user.join("secret"),
            lambda: user.say("secret", "x"),
            lambda: user.history("secret"),
            lambda: user.join("team"),  # not a team-* room
        )
        for request in forbidden:
            with pytest.raises(ClientError) as refused_request:
                await request()
            assert refused_request.value.code == "forbidden"
        assert user.rooms == ("lobby", "team-red")
        await authed(raw, token("u1", rooms=rooms))
        await raw.send({"type": "typing", "room": "secret", "ref": "r"})
        await raw.expect("error", code="forbidden", ref="r")
        # A refreshed token with fewer rooms: the rooms it no longer grants are
        # forbidden from then on, also those already joined.
        await user.authenticate(token("u1", rooms=["lobby"]))
        with pytest.raises(ClientError) as refused_say:
            await user.say("team-red", "x")
        assert refused_say.value.code == "forbidden"
        with pytest.raises(ClientError) as refused_history:
            await user.history("team-red")
        assert refused_history.value.code == "forbidden"
        # A typing hint there (joined, so the client sends it) is refused too; it
        # carries no ref, so the refusal comes as an event.
        assert await user.typing("team-red")
        refusal = await expect_event(user, ServerError, code="forbidden")
        assert refusal.ref is None
        # The room it still grants works as before.
        await user.say("lobby", "still fine")


# --- several connections of one user --------------------------------------------------------


async def test_several_connections_of_one_user_are_one_member() -> None:
    alice = token("u1", name="alice")
    async with (
        auth_server(presence_grace=0.2) as server,
        user_of(server, token("obs")) as observer,
        user_of(server, alice) as tab1,
    ):
        await observer.join("lobby")
        await tab1.join("lobby")
        await expect_event(observer, Presence, room="lobby", event="join", name="alice")
        async with user_of(server, alice) as tab2:
            joined = await tab2.join("lobby")  # never name_taken, never a takeover
            assert list(joined.members) == ["alice", "obs"]
            # A say from one tab is a normal message on the other.
            message_id = await tab2.say("lobby", "from tab 2")
            for client in (tab1, observer, tab2):
                await expect_event(client, Message, id=message_id, msg="from tab 2", name="alice")
            # A whisper to the user reaches both tabs.
            whisper_id = await observer.whisper("alice", "psst")
            for tab in (tab1, tab2):
                await skip_to_event(tab, Whisper, id=whisper_id, from_="obs", msg="psst")
        # tab2 closed: the user is still there (tab1); no leave, no 4001 on tab1.
        await observer.say("lobby", "after tab 2")
        event = await skip_to_event(observer, Message, msg="after tab 2")
        assert event.name == "obs"
        await tab1.say("lobby", "tab 1 lives")
        await skip_to_event(tab1, Message, msg="tab 1 lives")
        assert tab1.connected
        assert tab1.ended is None
    async with (
        auth_server(presence_grace=0.2) as server,
        user_of(server, token("obs")) as observer,
    ):
        await observer.join("lobby")
        async with user_of(server, alice) as tab1:
            await tab1.join("lobby")
            await expect_event(observer, Presence, room="lobby", event="join", name="alice")
        # The last connection gone: leave after the grace period.
        await expect_event(observer, Presence, room="lobby", event="leave", name="alice")


async def test_another_user_with_the_same_name_is_name_taken() -> None:
    async with (
        auth_server() as server,
        user_of(server, token("u1", name="alice")) as a,
        user_of(server, token("u2", name="ALICE")) as b,
    ):
        await a.join("lobby")
        with pytest.raises(ClientError) as taken:
            await b.join("lobby")
        assert taken.value.code == "name_taken"
        assert b.rooms == ()


async def test_a_whisper_needs_a_shared_room_when_authenticated() -> None:
    async with (
        auth_server() as server,
        user_of(server, token("a", name="alice")) as alice,
        user_of(server, token("b", name="bob")) as bob,
    ):
        await alice.join("one")
        await bob.join("two")
        with pytest.raises(ClientError) as refused_whisper:
            await alice.whisper("bob", "hi")
        error = refused_whisper.value
        assert error.code == "no_such_user"
        assert error.message == "nobody is called bob"  # the same as for nobody
        await bob.join("one")
        await skip_to_event(alice, Presence, room="one", event="join", name="bob")
        whisper_id = await alice.whisper("bob", "hi")
        await skip_to_event(bob, Whisper, id=whisper_id, from_="alice", to="bob", msg="hi")


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
            alice = token("u1", name="alice")
            async with user_of(a, token("obs")) as observer:
                await observer.join("lobby")
                async with user_of(a, alice) as on_a:
                    await on_a.join("lobby")
                    await expect_event(
                        observer, Presence, room="lobby", event="join", name="alice"
                    )
                    async with (
                        user_of(b, alice) as on_b,
                        user_of(b, token("u2", name="alice")) as mallory,
                    ):
                        joined = await on_b.join("lobby")  # shared, not taken over
                        assert list(joined.members) == ["alice", "obs"]
                        # Another user may not take the name on the other node either.
                        with pytest.raises(ClientError) as taken:
                            await mallory.join("lobby")
                        assert taken.value.code == "name_taken"
                        # A whisper reaches the user on both nodes (acked once delivered).
                        whisper_id = await observer.whisper("alice", "both?")
                        for client in (on_a, on_b):
                            await skip_to_event(client, Whisper, id=whisper_id, msg="both?")
                        message_id = await on_b.say("lobby", "from b")
                        await skip_to_event(on_a, Message, id=message_id, msg="from b")
                    # on_b gone: alice is still on node A, and never left.
                    await observer.say("lobby", "check")
                    await skip_to_event(observer, Message, msg="check")
                    message_id = await on_a.say("lobby", "a lives")  # acked
                    await skip_to_event(on_a, Message, id=message_id, msg="a lives")
                # The last connection gone: alice leaves, once, after the grace period.
                event = await observer.receive()
                while not isinstance(event, Presence):  # ("a lives")
                    event = await observer.receive()
                assert (event.event, event.name, event.room) == ("leave", "alice", "lobby")
                # Once: nothing more about alice before a message said after the leave.
                await observer.say("lobby", "after")
                await skip_to_event(observer, Message, msg="after")
            for node in nodes:
                node.drain()
