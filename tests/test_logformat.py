"""Logs an operator can use (#11 §4): JSON lines with a chat's fields, one
access line per plain request, a close line that states its code once."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from triochat import Config, Identity, SayInfo, Server
from triochat.logformat import JsonFormatter, log_context

from .conftest import client_of, running_server
from .sseclient import SseStream, post, tcp
from .test_http import fetch, handshake_bytes, open_tcp, request_bytes


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """Every ``triochat`` record at INFO and above, as the JSON formatter writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("triochat")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def records(out: io.StringIO) -> list[dict[str, Any]]:
    """Each line parsed: one JSON object per line, nothing else."""
    return [json.loads(line) for line in out.getvalue().splitlines()]


def access_lines(caplog: Any) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "triochat.access"]


def test_logformat_json_record_fields_context_and_exception():
    """A JSON line has time, level, logger, message, the log_context fields, the
    ``extra`` fields (which win) and a traceback; it is one line whatever the text."""
    formatter = JsonFormatter()
    logger = logging.getLogger("triochat.test")
    with log_context(conn=7, peer="192.0.2.1:5000", transport="sse", user=None):
        try:
            raise ValueError("boom")
        except ValueError:
            record = logger.makeRecord(
                logger.name,
                logging.ERROR,
                __file__,
                1,
                "bad %s",
                ("line\nbreak\x1b[31m",),
                sys.exc_info(),
                extra={"transport": "websocket", "room": "lobby"},
            )
        line = formatter.format(record)
    assert "\n" not in line
    assert "\x1b" not in line
    parsed = json.loads(line)
    assert parsed["time"].endswith("Z")
    assert "T" in parsed["time"]
    assert parsed["level"] == "ERROR"
    assert parsed["logger"] == "triochat.test"
    assert parsed["message"] == "bad line\nbreak\x1b[31m"
    assert (parsed["conn"], parsed["peer"]) == (7, "192.0.2.1:5000")
    assert parsed["transport"] == "websocket"  # extra= over the context
    assert parsed["room"] == "lobby"
    assert "user" not in parsed  # None fields are left out of the context
    assert "ValueError: boom" in parsed["exception"]
    # Outside the block the context is gone.
    plain = json.loads(formatter.format(logger.makeRecord(logger.name, 20, "", 1, "x", (), None)))
    assert "conn" not in plain


async def test_logformat_chat_lines_carry_connection_fields_in_json():
    """A chat's open and close lines, as JSON, carry its id, peer, transport and
    user; the close line also its code, reason and duration (#11 §4)."""
    with json_log() as out, trio.fail_after(10):
        async with running_server() as server:
            async with client_of(server) as alice:
                await alice.join(name="alice")
                await alice.ws.aclose(1000, "bye\n\x1b[2J")
            stream = await SseStream.open(tcp(server.port))
            await stream.aclose()
            assert (await fetch(server, "GET", "/healthz")).status == 200
    lines = records(out)
    chats = [r for r in lines if r["message"].startswith(("open ", "close "))]
    assert [r["message"].split()[0] for r in chats] == ["open", "close", "open", "close"]
    ws_open, ws_close, sse_open, sse_close = chats
    assert ws_open["conn"] == ws_close["conn"] != sse_open["conn"] == sse_close["conn"]
    assert ws_open["transport"] == ws_close["transport"] == "websocket"
    assert sse_open["transport"] == sse_close["transport"] == "sse"
    assert ws_open["peer"] == ws_close["peer"]
    assert ws_open["peer"].startswith("127.0.0.1:")
    assert ws_close["user"] == "alice"
    assert ws_close["code"] == 1000
    assert ws_close["reason"] == 'closed by the peer "bye\\n\\x1b[2J"'  # escaped, as before
    assert isinstance(ws_close["duration_s"], float)
    assert sse_close["code"] is None
    for record in lines:
        assert {"time", "level", "logger", "message"} <= record.keys()
    (health,) = [r for r in lines if r["logger"] == "triochat.access"][-1:]
    assert (health["method"], health["path"], health["status"], health["bytes"]) == (
        "GET",
        "/healthz",
        200,
        3,
    )


async def test_logformat_close_line_states_the_code_once(caplog):
    """The close line names the peer's code once: 'closed by the peer "bye" (code 1000)'."""
    caplog.set_level(logging.INFO, logger="triochat.server")
    with trio.fail_after(10):
        async with running_server() as server:
            async with client_of(server) as alice:
                await alice.join(name="alice")
                await alice.ws.aclose(1000, "bye")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("close ")]
    assert 'closed by the peer "bye" (code 1000) after' in line
    assert line.count("1000") == 1


async def test_logformat_access_line_per_plain_request(caplog):
    """One access line per plain request (keep-alive ones each, refusals too),
    with the path and never the query; none for a WebSocket upgrade; one for an
    SSE stream when it ends; an SSE session id in a path is not logged (#11 §4)."""
    caplog.set_level(logging.INFO, logger="triochat.access")
    with trio.fail_after(10):
        async with running_server() as server:
            assert (await fetch(server, "GET", "/healthz?token=s3cret")).status == 200
            assert (await fetch(server, "HEAD", "/static/app.js")).status == 200
            assert (await fetch(server, "GET", "/nope")).status == 404
            async with open_tcp(server) as conn:  # two requests on one connection
                await conn.send(request_bytes(server, "GET", "/healthz"))
                await conn.response()
                await conn.send(request_bytes(server, "GET", "/readyz"))
                await conn.response()
            async with open_tcp(server) as conn:
                await conn.send(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
                assert (await conn.response()).status == 421
            async with client_of(server) as alice:
                await alice.join(name="alice")
            stream = await SseStream.open(tcp(server.port))
            status, _ = await post(tcp(server.port), stream.session, "{", form="path")
            assert status == 400
            await stream.aclose()
            # The server's side of the stream's end has no event to await: poll.
            while not any(r.path == "/sse" for r in access_lines(caplog)):  # noqa: ASYNC110
                await trio.sleep(0.01)
            before_drain = len(access_lines(caplog))
            upgrade = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with upgrade:
                await upgrade.send_all(handshake_bytes(server))
                assert (await upgrade.receive_some(4096)).startswith(b"HTTP/1.1 101")
    seen = [(r.method, r.path, r.status) for r in access_lines(caplog)]  # type: ignore[attr-defined]
    assert seen[:6] == [
        ("GET", "/healthz", 200),
        ("HEAD", "/static/app.js", 200),
        ("GET", "/nope", 404),
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/", 421),
    ]
    # Then the SSE POST (answered at once) and the stream (when it ended).
    assert sorted(seen[6:before_drain]) == [("GET", "/sse", 200), ("POST", "/sse/*", 400)]
    assert len(seen) == before_drain  # the upgrades logged no access line
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "s3cret" not in text
    assert stream.session not in text
    head = access_lines(caplog)[1]
    assert head.getMessage().startswith("127.0.0.1 HEAD /static/app.js 200 0 ")
    assert head.getMessage().endswith(" ms")
    sse = next(r for r in access_lines(caplog) if r.path == "/sse")  # type: ignore[attr-defined]
    assert sse.bytes is None  # type: ignore[attr-defined]


async def test_logformat_hub_and_hook_failure_lines_carry_the_connections_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub's "bug while handling a frame" line (logged in the hub's own task)
    and the hook failure lines carry, as JSON, the connection's id, peer and
    transport as its open line does, and the user and room where known (#11 §4)."""

    async def authenticate(token: str, peer: str) -> Identity:
        if token == "boom":
            raise RuntimeError("the user database is down")
        return Identity(sub="id-" + token, name=token, exp=int(time.time()) + 600)

    async def on_say(say: SayInfo) -> str:
        if say.msg == "hook boom":
            raise RuntimeError("the filter service is down")
        return say.msg

    config = Config(port=0, memory=True)
    with json_log() as out, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(config, authenticate=authenticate, on_say=on_say)
            await nursery.start(server.run)
            handle = server.hub.chat.handle

            def buggy_handle(client: Any, frame: Any, *args: Any) -> None:
                if getattr(frame, "msg", None) == "hub boom":
                    raise RuntimeError("a bug in the chat state")
                handle(client, frame, *args)

            monkeypatch.setattr(server.hub.chat, "handle", buggy_handle)
            async with client_of(server) as alice:
                await alice.send({"type": "auth", "token": "alice", "ref": "a"})
                await alice.expect("authed", ref="a")
                await alice.join("kitchen")
                await alice.say("hook boom", room="kitchen", ref="1")
                await alice.expect("error", code="internal", ref="1")
                await alice.say("hub boom", room="kitchen", ref="2")
                await alice.expect("error", code="internal", ref="2")
                assert (await alice.closed())[0] == 1011
            async with client_of(server) as mallory:
                await mallory.send({"type": "auth", "token": "boom", "ref": "a"})
                await mallory.expect("error", code="unauthorized", ref="a")
                assert (await mallory.closed())[0] == 4003
            server.drain()
    lines = records(out)

    def only(start: str) -> dict[str, Any]:
        (record,) = [r for r in lines if r["message"].startswith(start)]
        return record

    alice_open, mallory_open = [r for r in lines if r["message"].startswith("open ")]
    hook, bug = only("the say hook failed"), only("bug while handling a frame")
    for record in (hook, bug):
        assert record["level"] == "ERROR"
        assert (record["conn"], record["peer"], record["transport"]) == (
            alice_open["conn"],
            alice_open["peer"],
            "websocket",
        )
        assert (record["user"], record["room"]) == ("alice", "kitchen")
    assert "RuntimeError: the filter service is down" in hook["exception"]
    assert "RuntimeError: a bug in the chat state" in bug["exception"]
    refused = only("the authenticator failed")
    assert (refused["conn"], refused["peer"], refused["transport"]) == (
        mallory_open["conn"],
        mallory_open["peer"],
        "websocket",
    )
    assert "user" not in refused  # not known yet: that is what failed
    assert "room" not in refused
