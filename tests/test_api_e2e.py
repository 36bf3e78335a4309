"""The server API end to end (#14 §2-3, docs/protocol.md §16): curl against real servers.

Every call goes through the real curl, as an operator types it, to a real
server on real sockets: the documented examples verbatim (only the port,
the key and the ids put in), then what members see (a published message, a
`deleted` frame, a 4009 close) on one node, after a restart, and across two
nodes sharing a real redis-server.

The members are the package's own client, `triochat.client` (docs/python-client.md),
as a bot or backend would use it; only an exact frame shape is checked with the
raw test client (tests/chatclient.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from triochat.client import ChatClient, Deleted, DisconnectedByOperator, Message, Presence, connect
from triochat.config import Config
from triochat.server import Server

from .conftest import client_of, running_server, ws_url
from .redisserver import redis_server

KEY = "an-api-key-for-the-tests-0123456789"
SECRET = "a-test-secret-of-some-length-0123456789"
PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


async def curl(port: int, *args: str, key: str | None = KEY) -> tuple[int, Any]:
    """Run curl against 127.0.0.1:``port``: the status and the JSON body (None if empty)."""
    auth = ["-H", f"Authorization: Bearer {key}"] if key is not None else []
    command = ["curl", "-sS", "-w", "\n%{http_code}", *auth, *args]
    command = [arg.replace("127.0.0.1:8181", f"127.0.0.1:{port}") for arg in command]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    body, _, status = done.stdout.decode().rpartition("\n")
    if not body.strip():
        return int(status), None
    try:
        return int(status), json.loads(body)
    except json.JSONDecodeError:
        return int(status), body  # (a plain-text answer of the front: 404)


def url(path: str) -> str:
    return f"http://127.0.0.1:8181{path}"


@asynccontextmanager
async def api_server(**options: Any) -> AsyncIterator[Server]:
    with trio.fail_after(30):
        async with running_server(api_key=KEY, **options) as server:
            yield server


async def _next(client: ChatClient, kind: type[Any], **fields: Any) -> Any:
    """The next event of ``kind`` with ``fields``; skips others."""
    while True:
        event = await client.receive()
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            return event


async def _drain(client: ChatClient) -> None:
    """Take events until `receive` raises (the client ended)."""
    while True:
        await client.receive()


async def disconnected_by_operator(client: ChatClient) -> None:
    """The client ends with 4009 "disconnected by an operator" and does not come back."""
    with pytest.raises(DisconnectedByOperator) as ended:
        await _drain(client)
    assert (ended.value.code, ended.value.reason) == (4009, "disconnected by an operator")
    assert client.ended is ended.value
    assert not client.connected


# --- the documented examples, verbatim -------------------------------------------------


def _documented_commands() -> list[str]:
    """The ```sh blocks of §16, each one curl command (line continuations joined)."""
    text = PROTOCOL_MD.read_text()
    section = text[text.index("## 16. Server API") :]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    return [block.replace("\\\n", " ").strip() for block in blocks if "curl" in block]


async def test_the_documented_curl_examples_work_as_documented() -> None:
    commands = _documented_commands()
    assert len(commands) == 5, commands  # publish, presence, history, delete, disconnect
    async with api_server() as server, connect(ws_url(server)) as alice:
        await alice.join("lobby", name="alice")
        # Two messages before, so the history example's `before` has an older page.
        ids = [await alice.say("lobby", text) for text in ("first", "second")]
        for text, message_id in zip(("first", "second"), ids, strict=True):
            await _next(alice, Message, msg=text, id=message_id)
        outputs = []
        for command in commands:
            # The example ids stand for the newest message; the port for ours.
            command = command.replace("5f1c9a2e-42", ids[-1]).replace(
                "127.0.0.1:8181", f"127.0.0.1:{server.port}"
            )
            done = await trio.run_process(
                ["bash", "-c", command + ' -sS -w "\\n%{http_code}"'],
                capture_stdout=True,
                env={"KEY": KEY, "PATH": "/usr/bin:/bin"},
            )
            body, _, status = done.stdout.decode().rpartition("\n")
            outputs.append((int(status), json.loads(body) if body.strip() else None))
        (published, presence, history, deleted, disconnected) = outputs
        assert published[0] == 200
        assert set(published[1]) == {"id", "ts"}
        notice = await _next(alice, Message, name="notice", msg="hi")
        assert notice.id == published[1]["id"]
        assert presence == (200, {"room": "lobby", "members": ["alice"]})
        assert history[0] == 200
        assert [m["msg"] for m in history[1]["messages"]] == ["first"]
        assert history[1]["more"] is False
        assert deleted == (204, None)
        assert await _next(alice, Deleted) == Deleted(room="lobby", id=ids[-1])
        assert disconnected == (204, None)
        await disconnected_by_operator(alice)


# --- publish -------------------------------------------------------------------------------


async def test_publish_is_a_message_for_members_and_200_means_stored(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            running_server(api_key=KEY, memory=False, data_dir=tmp_path) as server,
            connect(ws_url(server)) as bob,
        ):
            await bob.join("news", name="bob")
            status, body = await curl(
                server.port,
                "-d",
                '{"room":"news","msg":"deploy done","name":"ci"}',
                url("/api/publish"),
            )
            assert status == 200
            message = await _next(bob, Message, name="ci", msg="deploy done")
            assert (message.room, message.id, message.ts) == ("news", body["id"], body["ts"])
            assert abs(body["ts"] - time.time() * 1000) < 60_000
        # 200 meant stored: a new server on the same file has it.
        async with running_server(memory=False, data_dir=tmp_path, api_key=KEY) as again:
            status, page = await curl(again.port, url("/api/history?room=news"))
            assert status == 200
            assert [m["msg"] for m in page["messages"]] == ["deploy done"]


async def test_publish_bad_input_gets_the_frames_codes() -> None:
    async with api_server(max_msg_chars=10) as server:
        for body, code in (
            ('{"room":"Bad Room","msg":"x","name":"ci"}', "bad_room"),
            ('{"room":"a","msg":"x","name":"\\u200b"}', "bad_name"),
            ('{"room":"a","msg":"01234567890","name":"ci"}', "too_long"),
            ('{"room":"a","msg":"","name":"ci"}', "bad_frame"),
            ("not json", "bad_json"),
        ):
            status, answer = await curl(server.port, "-d", body, url("/api/publish"))
            assert (status, answer["code"]) == (400, code), body


# --- keys ---------------------------------------------------------------------------------


async def test_without_the_key_every_call_is_401_and_says_nothing_more() -> None:
    async with api_server() as server:
        answers = set()
        for key in (None, "wrong", KEY + "x", KEY[:-1]):
            for path in ("/api/presence?room=a", "/api/nothing-here"):
                status, body = await curl(server.port, url(path), key=key)
                assert status == 401
                answers.add(json.dumps(body))
        assert len(answers) == 1  # one fixed body: nothing about the key or the path


async def test_without_an_api_key_there_is_no_api() -> None:
    async with running_server() as server:
        status, _ = await curl(server.port, url("/api/presence?room=a"))
        assert status == 404


# --- delete and disconnect on one node ---------------------------------------------------------


async def test_delete_removes_the_message_from_history_and_recovery(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            running_server(api_key=KEY, memory=False, data_dir=tmp_path) as server,
            connect(ws_url(server)) as alice,
            # The raw test client, for the exact frame on the wire: `Deleted` is
            # decoded leniently (unknown fields ignored), so it cannot show that
            # the frame has no other fields.
            client_of(server) as wire,
        ):
            await alice.join("lobby", name="alice")
            await wire.join("lobby", name="wire")
            ids = {text: await alice.say("lobby", text) for text in ("keep", "drop", "last")}
            for text, message_id in ids.items():
                await _next(alice, Message, msg=text, id=message_id)
            status, _ = await curl(
                server.port, "-X", "DELETE", url(f"/api/messages/{ids['drop']}?room=lobby")
            )
            assert status == 204
            assert await _next(alice, Deleted) == Deleted(room="lobby", id=ids["drop"])
            frame = await wire.recv()
            while frame["type"] != "deleted":
                frame = await wire.recv()
            assert frame == {"type": "deleted", "room": "lobby", "id": ids["drop"]}
            # Gone from history, and again: 404.
            _, page = await curl(server.port, url("/api/history?room=lobby"))
            assert [m["msg"] for m in page["messages"]] == ["keep", "last"]
            status, body = await curl(
                server.port, "-X", "DELETE", url(f"/api/messages/{ids['drop']}?room=lobby")
            )
            assert (status, body["code"]) == (404, "no_such_message")
            # Gone from recovery: a join with since=keep replays only "last".
            async with connect(ws_url(server)) as late:
                joined = await late.join("lobby", name="late", since=ids["keep"])
                assert [m.msg for m in joined.history] == ["last"]
                # ... and from the client's history paging.
                page = await late.history("lobby")
                assert [m.id for m in page.messages] == [ids["keep"], ids["last"]]
        # Gone from the store: not back after a restart.
        async with (
            running_server(memory=False, data_dir=tmp_path) as again,
            connect(ws_url(again)) as carol,
        ):
            joined = await carol.join("lobby", name="carol")
            assert [m.msg for m in joined.history] == ["keep", "last"]


async def test_disconnect_closes_every_connection_of_the_user_with_4009() -> None:
    def token(sub: str, name: str) -> str:
        return jwt.encode({"sub": sub, "name": name, "exp": int(time.time()) + 600}, SECRET)

    async with (
        api_server(jwt_secret=SECRET) as server,
        connect(ws_url(server), token=token("u1", "alice")) as tab1,
        connect(ws_url(server), token=token("u1", "alice")) as tab2,
        connect(ws_url(server), token=token("u2", "bob")) as other,
    ):
        for client in (tab1, tab2, other):
            await client.join("lobby")
        status, _ = await curl(server.port, "-d", '{"user":"u1"}', url("/api/disconnect"))
        assert status == 204
        await disconnected_by_operator(tab1)
        await disconnected_by_operator(tab2)
        message_id = await other.say("lobby", "still here")  # acked
        await _next(other, Message, msg="still here", id=message_id)
        status, members = await curl(server.port, url("/api/presence?room=lobby"))
        assert status == 200
        assert "bob" in members["members"]


# --- a cluster ---------------------------------------------------------------------------------


async def test_every_call_works_on_any_node_of_a_cluster(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nodes: list[Server] = []
            for _ in range(2):
                config = Config(port=0, redis=redis.url, api_key=KEY, rate=0)
                nodes.append(await nursery.start(Server(config).run))
            a, b = nodes
            async with connect(ws_url(a)) as on_a, connect(ws_url(b)) as on_b:
                await on_a.join("lobby", name="alice")
                await on_b.join("lobby", name="bob")
                await _next(on_a, Presence, room="lobby", event="join", name="bob")
                # Publish on B: members on both nodes get it.
                status, body = await curl(
                    b.port,
                    "-d",
                    '{"room":"lobby","msg":"from the api","name":"ops"}',
                    url("/api/publish"),
                )
                assert status == 200
                for client in (on_a, on_b):
                    assert (await _next(client, Message, msg="from the api")).id == body["id"]
                # Presence on A lists the member on B.
                _, presence = await curl(a.port, url("/api/presence?room=lobby"))
                assert presence["members"] == ["alice", "bob"]
                # Delete on A: both nodes tell their members, and Redis forgets it.
                status, _ = await curl(
                    a.port, "-X", "DELETE", url(f"/api/messages/{body['id']}?room=lobby")
                )
                assert status == 204
                for client in (on_a, on_b):
                    assert await _next(client, Deleted) == Deleted(room="lobby", id=body["id"])
                for node in (a, b):
                    _, page = await curl(node.port, url("/api/history?room=lobby"))
                    assert page["messages"] == []
                # Disconnect on A closes bob, who is on B.
                status, _ = await curl(a.port, "-d", '{"user":"bob"}', url("/api/disconnect"))
                assert status == 204
                await disconnected_by_operator(on_b)
            for node in nodes:
                node.drain()
