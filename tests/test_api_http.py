"""The server API's HTTP side (docs/protocol.md §16), through the real front.

`handle_http` runs over an in-memory stream pair with a recording `FakeChat`
behind it, so every answer api.py and the front give is checked byte by
byte without a server (the chat side has tests of its own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from triochat import Config
from triochat.api import UNAUTHORIZED_BODY, ApiError, ChatApi
from triochat.http import MAX_BODY_BYTES, FrontContext, Routes, StaticFiles, handle_http
from triochat.metrics import Stats
from triochat.protocol import MAX_HISTORY_LIMIT, Message

KEY = "test-key-0123456789abcdef"
AUTH = (("Authorization", f"Bearer {KEY}"),)
STATIC = StaticFiles()
LOBBY_MESSAGES = [
    Message(room="lobby", id="abcd1234-1", name="alice", msg="hello", ts=1795800000001),
    Message(room="lobby", id="abcd1234-2", name="bob", msg="hi", ts=1795800000002),
]


class FakeChat:
    """A `ChatApi` that records each call; ``fail`` is raised by the next ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: Exception | None = None
        self.members = {"lobby": ["alice", "bob"]}
        self.deletable = {("lobby", "abcd1234-2")}

    async def _called(self, *call: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    async def publish(self, room: str, msg: str, name: str) -> tuple[str, int]:
        await self._called("publish", room, msg, name)
        return "abcd1234-3", 1795800000003

    async def presence(self, room: str) -> list[str]:
        await self._called("presence", room)
        return self.members.get(room, [])

    async def history(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        await self._called("history", room, before, limit)
        return LOBBY_MESSAGES, True

    async def delete(self, room: str, message_id: str) -> bool:
        await self._called("delete", room, message_id)
        return (room, message_id) in self.deletable

    async def disconnect(self, user: str) -> None:
        await self._called("disconnect", user)


class FakeFront:
    """A `FrontContext` with nothing but a config and the API."""

    def __init__(self, config: Config, api: ChatApi | None) -> None:
        self.config = config
        self.stats = Stats()
        self.api = api

    @property
    def draining(self) -> bool:
        return False

    def ready(self) -> bool:
        return True

    def metrics(self) -> bytes:
        return b""

    def take_ip_slot(self, ip: str) -> bool:
        return True

    def release_ip_slot(self, ip: str) -> None:
        pass

    async def post_sse(self, session_id: str, body: bytes) -> tuple[int, str, str]:
        return 404, "no_such_session", "no such session"


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)


class Client:
    """The client end of one connection to the front."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] = AUTH,
    ) -> Response:
        """One request with a ``Content-Length`` body (if any); its response."""
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:8181"]
        lines += [f"{name}: {value}" for name, value in headers]
        payload = body.encode() if isinstance(body, str) else body
        if payload is not None:
            lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        await self.send(head + (payload or b""))
        return await self.response(head=method == "HEAD")

    async def response(self, *, head: bool = False) -> Response:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            assert await self._more(), f"closed without a response: {bytes(self.buffer)!r}"
        status_line, *lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        while len(self.buffer) < length:
            assert await self._more(), "closed in the middle of a body"
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Response(int(status_line.split(" ")[1]), headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection with nothing more sent."""
        return not await self._more() and not self.buffer


@asynccontextmanager
async def open_front(
    chat: ChatApi | None = None,
    *,
    api_key: str | None = KEY,
    routes: Routes = Routes.ALL,
    **options: Any,
) -> AsyncIterator[Client]:
    """A connection to `handle_http`, whose context has ``chat`` and ``api_key``."""
    front = FakeFront(Config(memory=True, api_key=api_key, **options), chat)
    client_end, server_end = trio.testing.memory_stream_pair()

    async def serve() -> None:
        async with server_end:
            await handle_http(server_end, front, STATIC, routes=routes)

    with trio.fail_after(30):  # a guard: every wait here is on in-memory bytes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with client_end:
                yield Client(client_end)


def publish_body(**fields: Any) -> str:
    return json.dumps({"room": "lobby", "msg": "hi", "name": "notice", **fields})


# --- the calls --------------------------------------------------------------------------


async def test_api_publish_answers_id_and_ts():
    """POST /api/publish: 200 {"id", "ts"}; the chat gets the normalised name."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request("POST", "/api/publish", publish_body(name="  notice "))
    assert response.status == 200
    assert response.json() == {"id": "abcd1234-3", "ts": 1795800000003}
    assert chat.calls == [("publish", "lobby", "hi", "notice")]


async def test_api_publish_takes_a_msg_of_the_longest_length():
    """A msg of exactly --max-msg-chars is published."""
    chat = FakeChat()
    async with open_front(chat, max_msg_chars=10) as client:
        response = await client.request("POST", "/api/publish", publish_body(msg="x" * 10))
    assert response.status == 200
    assert chat.calls == [("publish", "lobby", "x" * 10, "notice")]


async def test_api_publish_reads_json_whatever_the_content_type():
    """curl -d sends a form content type: the body is read as JSON anyway."""
    chat = FakeChat()
    form = (*AUTH, ("Content-Type", "application/x-www-form-urlencoded"))
    async with open_front(chat) as client:
        response = await client.request("POST", "/api/publish", publish_body(), headers=form)
    assert response.status == 200


async def test_api_presence_lists_members():
    """GET /api/presence: the room and its members; a room with nobody: []."""
    chat = FakeChat()
    async with open_front(chat) as client:
        full = await client.request("GET", "/api/presence?room=lobby")
        empty = await client.request("GET", "/api/presence?room=nobody-here")
    assert full.status == 200
    assert full.json() == {"room": "lobby", "members": ["alice", "bob"]}
    assert empty.json() == {"room": "nobody-here", "members": []}
    assert chat.calls == [("presence", "lobby"), ("presence", "nobody-here")]


async def test_api_history_answers_like_the_history_frame():
    """GET /api/history: room, messages (typed "message", as in frames), more."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request("GET", "/api/history?room=lobby")
    assert response.status == 200
    assert response.json() == {
        "room": "lobby",
        "messages": [
            {"type": "message", "room": "lobby", "id": "abcd1234-1", "name": "alice"}
            | {"msg": "hello", "ts": 1795800000001},
            {"type": "message", "room": "lobby", "id": "abcd1234-2", "name": "bob"}
            | {"msg": "hi", "ts": 1795800000002},
        ],
        "more": True,
    }
    assert chat.calls == [("history", "lobby", None, 50)]


async def test_api_history_passes_before_and_limit():
    """``before`` and ``limit`` reach the chat as given; unknown parameters are ignored."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request(
            "GET", f"/api/history?room=lobby&before=abcd1234-9&limit={MAX_HISTORY_LIMIT}&x=1"
        )
    assert response.status == 200
    assert chat.calls == [("history", "lobby", "abcd1234-9", MAX_HISTORY_LIMIT)]


async def test_api_query_is_percent_decoded():
    """Query values and the message id in the path are percent-decoded."""
    chat = FakeChat()
    async with open_front(chat) as client:
        history = await client.request(
            "GET", "/api/history?room=lob%62y&before=%61bcd1234%2D9&limit=%31%30"
        )
        deleted = await client.request("DELETE", "/api/messages/abcd1234%2d2?room=%6Cobby")
    assert history.status == 200
    assert deleted.status == 204
    assert chat.calls == [
        ("history", "lobby", "abcd1234-9", 10),
        ("delete", "lobby", "abcd1234-2"),
    ]


async def test_api_delete_answers_204():
    """DELETE /api/messages/ID?room=R: 204, no body."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request("DELETE", "/api/messages/abcd1234-2?room=lobby")
    assert response.status == 204
    assert response.body == b""
    assert chat.calls == [("delete", "lobby", "abcd1234-2")]


async def test_api_delete_of_an_unknown_message_is_404():
    """A room without that message: 404 no_such_message."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request("DELETE", "/api/messages/abcd1234-1?room=lobby")
    assert response.status == 404
    assert response.json()["code"] == "no_such_message"
    assert chat.calls == [("delete", "lobby", "abcd1234-1")]


async def test_api_disconnect_answers_204_every_time():
    """POST /api/disconnect: 204, also for a user not connected (idempotent)."""
    chat = FakeChat()
    async with open_front(chat) as client:
        first = await client.request("POST", "/api/disconnect", '{"user": "user-42"}')
        second = await client.request("POST", "/api/disconnect", '{"user": "user-42"}')
    assert (first.status, second.status) == (204, 204)
    assert first.body == second.body == b""
    assert chat.calls == [("disconnect", "user-42"), ("disconnect", "user-42")]


async def test_api_head_answers_like_get():
    """HEAD on a GET call: the GET's status and length, no body."""
    chat = FakeChat()
    async with open_front(chat) as client:
        get = await client.request("GET", "/api/presence?room=lobby")
        head = await client.request("HEAD", "/api/presence?room=lobby")
        history = await client.request("HEAD", "/api/history?room=lobby")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert history.status == 200


# --- the key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param((), id="no header"),
        pytest.param((("Authorization", "Bearer " + "x" * len(KEY)),), id="other key"),
        pytest.param((("Authorization", f"Bearer {KEY[:-1]}"),), id="shorter key"),
        pytest.param((("Authorization", f"Bearer {KEY}x"),), id="longer key"),
        pytest.param((("Authorization", "Bearer"),), id="no key"),
        pytest.param((("Authorization", f"Basic {KEY}"),), id="other scheme"),
        pytest.param((("Authorization", KEY),), id="key alone"),
        pytest.param((("Authorization", f"Bearer {KEY}"),) * 2, id="twice"),
    ],
)
async def test_api_refuses_without_the_key(headers):
    """401, WWW-Authenticate: Bearer and one fixed body, whatever is wrong."""
    chat = FakeChat()
    async with open_front(chat) as client:
        for method, target in [
            ("POST", "/api/publish"),
            ("GET", "/api/presence?room=lobby"),
            ("DELETE", "/api/messages/abcd1234-2?room=lobby"),
            ("GET", "/api/no-such-call"),  # the key comes before the path...
            ("PUT", "/api/publish"),  # ...and before the method
        ]:
            response = await client.request(method, target, publish_body(), headers=headers)
            assert response.status == 401, (method, target)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.body == UNAUTHORIZED_BODY
    assert json.loads(UNAUTHORIZED_BODY) == {
        "code": "unauthorized",
        "message": "a valid API key is needed",
    }
    assert chat.calls == []


async def test_api_scheme_is_case_insensitive():
    """``bearer`` is the Bearer scheme too (RFC 9110 11.1)."""
    async with open_front(FakeChat()) as client:
        lower = (("Authorization", f"bearer {KEY}"),)
        response = await client.request("GET", "/api/presence?room=lobby", headers=lower)
    assert response.status == 200


async def test_api_takes_a_key_that_is_not_ascii():
    """A non-ASCII key is sent as its UTF-8 bytes."""
    key = "clé-secrète-0123456789"
    async with open_front(FakeChat(), api_key=key) as client:
        headers = (("Authorization", f"Bearer {key}"),)
        response = await client.request("GET", "/api/presence?room=lobby", headers=headers)
    assert response.status == 200


# --- off, and elsewhere -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "wired", "routes"),
    [
        pytest.param(None, True, Routes.ALL, id="no --api-key"),
        pytest.param(KEY, False, Routes.ALL, id="not wired"),
        pytest.param(KEY, True, Routes.OPERATOR, id="operator listener"),
    ],
)
async def test_api_is_404_when_off(api_key, wired, routes):
    """Without the key, the chat side or a chat listener, /api/ is any unknown path."""
    chat = FakeChat()
    async with open_front(chat if wired else None, api_key=api_key, routes=routes) as client:
        unknown = await client.request("GET", "/no-such-page")
        for method, target in [
            ("POST", "/api/publish"),
            ("GET", "/api/presence?room=lobby"),
            ("DELETE", "/api/messages/abcd1234-2?room=lobby"),
        ]:
            response = await client.request(method, target, publish_body())
            assert response.status == 404
            assert response.body == unknown.body
            assert "www-authenticate" not in response.headers
    assert chat.calls == []


async def test_api_is_served_on_the_public_listener():
    """With --metrics-port the public listener serves the API."""
    async with open_front(FakeChat(), routes=Routes.PUBLIC) as client:
        response = await client.request("GET", "/api/presence?room=lobby")
    assert response.status == 200


@pytest.mark.parametrize("target", ["/api/", "/api/nothing", "/api/messages/a/b?room=lobby"])
async def test_api_unknown_call_is_404(target):
    """With the key, a path that is no call: 404 not_found (JSON)."""
    async with open_front(FakeChat()) as client:
        response = await client.request("GET", target)
    assert response.status == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("GET", "/api/publish", "POST"),
        ("HEAD", "/api/publish", "POST"),
        ("POST", "/api/presence?room=lobby", "GET, HEAD"),
        ("DELETE", "/api/history?room=lobby", "GET, HEAD"),
        ("GET", "/api/messages/abcd1234-2?room=lobby", "DELETE"),
        ("PUT", "/api/disconnect", "POST"),
    ],
)
async def test_api_wrong_method_is_405(method, target, allow):
    """A call with another method: 405 with the call's Allow."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request(method, target)
    assert response.status == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert response.json()["code"] == "method_not_allowed"
    assert chat.calls == []


# --- bad input --------------------------------------------------------------------------

LONG = 2001  # one over the default --max-msg-chars

BAD_INPUT = [
    ("POST", "/api/publish", "{not json", "bad_json"),
    ("POST", "/api/publish", "", "bad_json"),
    ("POST", "/api/publish", "[]", "bad_frame"),
    ("POST", "/api/publish", '{"room": "lobby", "msg": "hi"}', "bad_frame"),
    ("POST", "/api/publish", publish_body(msg=5), "bad_frame"),
    ("POST", "/api/publish", publish_body(name=None), "bad_frame"),
    ("POST", "/api/publish", publish_body(msg=""), "bad_frame"),
    ("POST", "/api/publish", publish_body(msg="x" * LONG), "too_long"),
    ("POST", "/api/publish", publish_body(name=" server"), "bad_name"),
    ("POST", "/api/publish", publish_body(name="Server"), "bad_name"),
    ("POST", "/api/publish", publish_body(name="  "), "bad_name"),
    ("POST", "/api/publish", publish_body(name="al\u200bice"), "bad_name"),
    ("POST", "/api/publish", publish_body(name="x" * 33), "bad_name"),
    ("POST", "/api/publish", publish_body(room="Lobby"), "bad_room"),
    ("POST", "/api/publish", publish_body(room=""), "bad_room"),
    # the frames' order: too_long before bad_name before bad_room
    ("POST", "/api/publish", publish_body(msg="x" * LONG, name="Server"), "too_long"),
    ("POST", "/api/publish", publish_body(name="Server", room="Lobby"), "bad_name"),
    ("GET", "/api/presence", None, "bad_frame"),
    ("GET", "/api/presence?room=", None, "bad_room"),
    ("GET", "/api/presence?room=Lobby", None, "bad_room"),
    ("GET", "/api/presence?room=a%20b", None, "bad_room"),
    ("GET", "/api/presence?room=lobby&room=other", None, "bad_frame"),
    ("GET", "/api/presence?room=%ff", None, "bad_frame"),
    ("GET", "/api/history", None, "bad_frame"),
    ("GET", "/api/history?room=lobby&limit=0", None, "bad_frame"),
    ("GET", f"/api/history?room=lobby&limit={MAX_HISTORY_LIMIT + 1}", None, "bad_frame"),
    ("GET", "/api/history?room=lobby&limit=-1", None, "bad_frame"),
    ("GET", "/api/history?room=lobby&limit=ten", None, "bad_frame"),
    ("GET", "/api/history?room=lobby&limit=", None, "bad_frame"),
    ("GET", "/api/history?room=lobby&limit=99999999999999999999", None, "bad_frame"),
    ("GET", "/api/history?room=Lobby", None, "bad_room"),
    ("GET", "/api/history?room=lobby&before=", None, "bad_id"),
    ("GET", "/api/history?room=lobby&before=a+b", None, "bad_id"),
    ("GET", "/api/history?room=lobby&before=" + "1" * 65, None, "bad_id"),
    ("DELETE", "/api/messages/abcd1234-2", None, "bad_frame"),
    ("DELETE", "/api/messages/abcd1234-2?room=Lobby", None, "bad_room"),
    ("DELETE", "/api/messages/?room=lobby", None, "bad_id"),
    ("DELETE", "/api/messages/" + "1" * 65 + "?room=lobby", None, "bad_id"),
    ("DELETE", "/api/messages/a%20b?room=lobby", None, "bad_id"),
    ("DELETE", "/api/messages/%ff?room=lobby", None, "bad_id"),
    ("POST", "/api/disconnect", "{}", "bad_frame"),
    ("POST", "/api/disconnect", '{"user": 42}', "bad_frame"),
    ("POST", "/api/disconnect", '"alice"', "bad_frame"),
    ("POST", "/api/disconnect", "alice", "bad_json"),
    ("POST", "/api/disconnect", '{"user": ""}', "bad_name"),
    ("POST", "/api/disconnect", json.dumps({"user": "u" * 65}), "bad_name"),
    ("POST", "/api/disconnect", '{"x": ' + "[" * 10_000 + "]" * 10_000 + "}", "bad_frame"),
]


@pytest.mark.parametrize(("method", "target", "body", "code"), BAD_INPUT)
async def test_api_bad_input_is_400(method, target, body, code):
    """Input the frames would refuse: 400 with the frames' code; the chat is not called."""
    chat = FakeChat()
    async with open_front(chat) as client:
        response = await client.request(method, target, body)
        assert response.status == 400, response
        answer = response.json()
        assert answer["code"] == code, answer
        assert isinstance(answer["message"], str)
        # the connection stays usable
        assert (await client.request("GET", "/api/presence?room=lobby")).status == 200
    assert chat.calls == [("presence", "lobby")]


# --- the chat side's errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", "/api/publish", publish_body()),
        ("GET", "/api/presence?room=lobby", None),
        ("GET", "/api/history?room=lobby", None),
        ("DELETE", "/api/messages/abcd1234-2?room=lobby", None),
        ("POST", "/api/disconnect", '{"user": "alice"}'),
    ],
)
async def test_api_chat_errors_pass_through(method, target, body):
    """An ApiError from the chat is answered with its status, code and message."""
    chat = FakeChat()
    chat.fail = ApiError(503, "unavailable", "the store is down")
    async with open_front(chat) as client:
        response = await client.request(method, target, body)
    assert response.status == 503
    assert response.json() == {"code": "unavailable", "message": "the store is down"}
    assert len(chat.calls) == 1


async def test_api_history_unknown_before_passes_through():
    """The chat's 400 bad_id for a ``before`` the room does not have."""
    chat = FakeChat()
    chat.fail = ApiError(400, "bad_id", "unknown `before` id")
    async with open_front(chat) as client:
        response = await client.request("GET", "/api/history?room=lobby&before=abcd1234-0")
    assert response.status == 400
    assert response.json() == {"code": "bad_id", "message": "unknown `before` id"}


async def test_api_bug_is_500_without_traceback(caplog):
    """Another exception from the chat: logged with its traceback, 500 internal without it."""
    chat = FakeChat()
    chat.fail = RuntimeError("secret detail")
    async with open_front(chat) as client:
        response = await client.request("POST", "/api/publish", publish_body())
        assert response.status == 500
        answer = response.json()
        assert answer["code"] == "internal"
        assert b"secret" not in response.body
        assert b"Traceback" not in response.body
        assert b"RuntimeError" not in response.body
        chat.fail = None  # the connection goes on
        assert (await client.request("GET", "/api/presence?room=lobby")).status == 200
    [record] = [r for r in caplog.records if r.name == "triochat.api"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


# --- bodies -----------------------------------------------------------------------------


async def test_api_declared_big_body_is_413():
    """A Content-Length over the front's body limit: 413 too_big, then the connection closes."""
    chat = FakeChat()
    async with open_front(chat) as client:
        await client.send(
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        response = await client.response()
        assert response.status == 413
        assert response.json()["code"] == "too_big"
        assert response.headers["connection"] == "close"
        assert await client.closed()
    assert chat.calls == []


async def test_api_chunked_big_body_is_413():
    """A chunked body that grows over the limit: 413 too_big, then the connection closes."""
    chat = FakeChat()
    size = MAX_BODY_BYTES + 1
    async with open_front(chat) as client:
        await client.send(
            b"POST /api/disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{size:x}\r\n".encode()
            + b"x" * size
            + b"\r\n0\r\n\r\n"
        )
        response = await client.response()
        assert response.status == 413
        assert await client.closed()
    assert chat.calls == []


async def test_api_chunked_body_is_read():
    """A chunked body within the limit is read like any other."""
    chat = FakeChat()
    body = b'{"user": "alice"}'
    async with open_front(chat) as client:
        await client.send(
            b"POST /api/disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        assert (await client.response()).status == 204
    assert chat.calls == [("disconnect", "alice")]


async def test_api_slow_body_is_408(autojump_clock):
    """A body that stops coming: 408 after --handshake-timeout, then the connection closes."""
    chat = FakeChat()
    async with open_front(chat, handshake_timeout=3.0) as client:
        await client.send(
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"room":'
        )
        started = trio.current_time()
        response = await client.response()
        assert response.status == 408
        assert trio.current_time() - started == pytest.approx(3.0)
        assert await client.closed()
    assert chat.calls == []


# --- logging ----------------------------------------------------------------------------


async def test_api_access_line_has_no_query(caplog):
    """The access line names the path without its query."""
    caplog.set_level(logging.INFO, logger="triochat.access")
    async with open_front(FakeChat()) as client:
        await client.request("GET", "/api/history?room=lobby&before=abcd1234-2")
    [record] = [r for r in caplog.records if r.name == "triochat.access"]
    assert record.path == "/api/history"
    assert record.status == 200


def test_fakes_satisfy_the_protocols():
    """The fakes are a ChatApi and a FrontContext (the annotations say so to mypy)."""
    chat: ChatApi = FakeChat()
    front: FrontContext = FakeFront(Config(api_key=KEY), chat)
    assert front.api is chat
