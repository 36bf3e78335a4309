"""The server API end to end (#14 §2-3, docs/protocol.md §16): curl against real servers.

Every call goes through the real curl, as an operator types it, to a real
server on real sockets: the documented examples verbatim (only the port,
the key and the ids put in), then what members see (a published message, a
`deleted` frame, a 4009 close) on one node, after a restart, and across two
nodes sharing a real redis-server.
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
import trio

from triochat.config import Config
from triochat.server import Server

from .chatclient import ChatClient
from .conftest import client_of, running_server
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


async def _next(client: ChatClient, kind: str, **fields: Any) -> dict[str, Any]:
    while True:
        frame = await client.recv()
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
            return frame


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
    async with api_server() as server, client_of(server) as alice:
        await alice.join("lobby", name="alice")
        # Two messages before, so the history example's `before` has an older page.
        for text in ("first", "second"):
            await alice.say(text)
        ids = [(await _next(alice, "message", msg=text))["id"] for text in ("first", "second")]
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
        notice = await _next(alice, "message", name="notice", msg="hi")
        assert notice["id"] == published[1]["id"]
        assert presence == (200, {"room": "lobby", "members": ["alice"]})
        assert history[0] == 200
        assert [m["msg"] for m in history[1]["messages"]] == ["first"]
        assert history[1]["more"] is False
        assert deleted == (204, None)
        assert (await _next(alice, "deleted"))["id"] == ids[-1]
        assert disconnected == (204, None)
        assert await alice.closed() == (4009, "disconnected by an operator")


# --- publish -------------------------------------------------------------------------------


async def test_publish_is_a_message_for_members_and_200_means_stored(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            running_server(api_key=KEY, memory=False, data_dir=tmp_path) as server,
            client_of(server) as bob,
        ):
            await bob.join("news", name="bob")
            status, body = await curl(
                server.port,
                "-d",
                '{"room":"news","msg":"deploy done","name":"ci"}',
                url("/api/publish"),
            )
            assert status == 200
            message = await _next(bob, "message", name="ci", msg="deploy done")
            assert (message["id"], message["ts"]) == (body["id"], body["ts"])
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
            client_of(server) as alice,
        ):
            await alice.join("lobby", name="alice")
            for text in ("keep", "drop", "last"):
                await alice.say(text)
            ids = {
                text: (await _next(alice, "message", msg=text))["id"]
                for text in ("keep", "drop", "last")
            }
            status, _ = await curl(
                server.port, "-X", "DELETE", url(f"/api/messages/{ids['drop']}?room=lobby")
            )
            assert status == 204
            assert await _next(alice, "deleted") == {
                "type": "deleted",
                "room": "lobby",
                "id": ids["drop"],
            }
            # Gone from history, and again: 404.
            _, page = await curl(server.port, url("/api/history?room=lobby"))
            assert [m["msg"] for m in page["messages"]] == ["keep", "last"]
            status, body = await curl(
                server.port, "-X", "DELETE", url(f"/api/messages/{ids['drop']}?room=lobby")
            )
            assert (status, body["code"]) == (404, "no_such_message")
            # Gone from recovery: a join with since=keep replays only "last".
            async with client_of(server) as late:
                joined = await late.join("lobby", name="late", since=ids["keep"])
                assert [m["msg"] for m in joined["history"]] == ["last"]
        # Gone from the store: not back after a restart.
        async with running_server(memory=False, data_dir=tmp_path) as again, client_of(again) as c:
            joined = await c.join("lobby", name="carol")
            assert [m["msg"] for m in joined["history"]] == ["keep", "last"]


async def test_disconnect_closes_every_connection_of_the_user_with_4009() -> None:
    def token(sub: str, name: str) -> str:
        return jwt.encode({"sub": sub, "name": name, "exp": int(time.time()) + 600}, SECRET)

    async with (
        api_server(jwt_secret=SECRET) as server,
        client_of(server) as tab1,
        client_of(server) as tab2,
        client_of(server) as other,
    ):
        for client, sub, name in (
            (tab1, "u1", "alice"),
            (tab2, "u1", "alice"),
            (other, "u2", "bob"),
        ):
            await client.send({"type": "auth", "token": token(sub, name)})
            await client.expect("authed")
            await client.join("lobby")
        status, _ = await curl(server.port, "-d", '{"user":"u1"}', url("/api/disconnect"))
        assert status == 204
        assert await tab1.closed() == (4009, "disconnected by an operator")
        assert await tab2.closed() == (4009, "disconnected by an operator")
        await other.say("still here", ref="s")
        await _next(other, "ack", ref="s")
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
            async with client_of(a) as on_a, client_of(b) as on_b:
                await on_a.join("lobby", name="alice")
                await on_b.join("lobby", name="bob")
                await _next(on_a, "presence", name="bob")
                # Publish on B: members on both nodes get it.
                status, body = await curl(
                    b.port,
                    "-d",
                    '{"room":"lobby","msg":"from the api","name":"ops"}',
                    url("/api/publish"),
                )
                assert status == 200
                for client in (on_a, on_b):
                    assert (await _next(client, "message", msg="from the api"))["id"] == body["id"]
                # Presence on A lists the member on B.
                _, presence = await curl(a.port, url("/api/presence?room=lobby"))
                assert presence["members"] == ["alice", "bob"]
                # Delete on A: both nodes tell their members, and Redis forgets it.
                status, _ = await curl(
                    a.port, "-X", "DELETE", url(f"/api/messages/{body['id']}?room=lobby")
                )
                assert status == 204
                for client in (on_a, on_b):
                    assert (await _next(client, "deleted"))["id"] == body["id"]
                for node in (a, b):
                    _, page = await curl(node.port, url("/api/history?room=lobby"))
                    assert page["messages"] == []
                # Disconnect on A closes bob, who is on B.
                status, _ = await curl(a.port, "-d", '{"user":"bob"}', url("/api/disconnect"))
                assert status == 204
                assert await on_b.closed() == (4009, "disconnected by an operator")
            for node in nodes:
                node.drain()
