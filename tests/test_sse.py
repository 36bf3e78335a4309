"""The SSE fallback transport (docs/protocol.md §13), without a browser."""

from __future__ import annotations

import json
import logging

import trio

from .conftest import client_of, memory_server, running_server
from .sseclient import SseStream, post, tcp


async def test_sse_stream_starts_with_session_and_carries_chat():
    """GET /sse: a session event, then POSTed frames are answered on the stream (message ids as SSE ids)."""
    with trio.fail_after(10):
        async with running_server() as server:
            sse = await SseStream.open(tcp(server.port))
            assert sse.status == 200
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert len(sse.session) >= 20
            assert await sse.post({"type": "join", "room": "lobby", "name": "sue"}) == (204, None)
            joined = await sse.expect("joined", name="sue")
            assert joined["recovered"] is True
            assert (await sse.post({"type": "say", "room": "lobby", "msg": "hi", "ref": "r1"}))[
                0
            ] == 204
            event = await sse.next_event()
            assert event["data"]["type"] == "message"
            assert event["id"] == event["data"]["id"]
            await sse.expect("ack", ref="r1", id=event["id"])
            await sse.aclose()


async def test_sse_post_errors_are_4xx_json():
    """Unknown session 404, non-JSON 400, too big 413, foreign Origin 403, wrong method 405: JSON bodies."""
    with trio.fail_after(10):
        async with running_server(max_frame_bytes=100) as server:
            connect = tcp(server.port)
            sse = await SseStream.open(connect)
            status, body = await post(connect, "no-such-session", {"type": "leave", "room": "x"})
            assert status == 404
            assert body["code"]
            assert body["message"]
            status, body = await sse.post("this is not json")
            assert (status, body["code"]) == (400, "bad_json")
            status, body = await sse.post({"type": "say", "room": "lobby", "msg": "x" * 200})
            assert status == 413
            assert body["message"]
            status, body = await sse.post(
                {"type": "leave", "room": "x"}, origin="http://evil.example"
            )
            assert status == 403
            assert body["code"]
            stream = await connect()
            await stream.send_all(
                f"GET /sse/{sse.session} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            )
            assert b" 405 " in await stream.receive_some(1000)
            await stream.aclose()
            await sse.aclose()


async def test_sse_post_session_in_header_or_path_reaches_the_stream():
    """POST /sse with X-Triochat-Session (preferred) and POST /sse/<session> (kept) both deliver (#18)."""
    with trio.fail_after(10):
        async with running_server() as server:
            sse = await SseStream.open(tcp(server.port))
            join = {"type": "join", "room": "lobby", "name": "sue", "ref": "j"}
            assert await sse.post(join, form="header") == (204, None)
            await sse.expect("joined", name="sue", ref="j")
            say = {"type": "say", "room": "lobby", "msg": "by path", "ref": "p"}
            assert await sse.post(say, form="path") == (204, None)
            await sse.expect("message", msg="by path")
            await sse.expect("ack", ref="p")
            say = {"type": "say", "room": "lobby", "msg": "by header", "ref": "h"}
            assert await sse.post(say, form="header") == (204, None)
            await sse.expect("message", msg="by header")
            await sse.expect("ack", ref="h")
            await sse.aclose()


async def test_sse_post_missing_or_unknown_session_is_400_or_404():
    """POST /sse without the header: 400 no_session; an unknown id in either form: 404 no_such_session (#18)."""
    with trio.fail_after(10):
        async with running_server() as server:
            connect = tcp(server.port)
            sse = await SseStream.open(connect)
            frame = {"type": "leave", "room": "x"}
            status, body = await post(connect, "", frame, form="header")
            assert status == 400
            assert body is not None
            assert body["code"] == "no_session"
            assert body["message"]
            for form in ("header", "path"):
                status, body = await post(connect, "no-such-session", frame, form=form)
                assert status == 404, form
                assert body is not None
                assert body["code"] == "no_such_session"
            # Refused sessions touched nothing: the real one still works.
            assert (await sse.post({"type": "join", "room": "lobby", "name": "sue"}))[0] == 204
            await sse.expect("joined", name="sue")
            await sse.aclose()


async def test_sse_post_header_form_keeps_the_connection_alive():
    """Header-form POSTs on one keep-alive connection: each answered 204, in order (#18)."""
    with trio.fail_after(10):
        async with running_server() as server:
            sse = await SseStream.open(tcp(server.port))
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            frames = [{"type": "join", "room": "lobby", "name": "sue"}] + [
                {"type": "say", "room": "lobby", "msg": f"m{i}"} for i in range(3)
            ]
            request = b""
            for frame in frames:
                body = json.dumps(frame).encode()
                request += (
                    f"POST /sse HTTP/1.1\r\nHost: localhost\r\n"
                    f"X-Triochat-Session: {sse.session}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body
            await stream.send_all(request)
            answers = b""
            while answers.count(b"HTTP/1.1 204") < len(frames):
                chunk = await stream.receive_some(65536)
                assert chunk, answers
                answers += chunk
            await sse.expect("joined", name="sue")
            for i in range(3):
                await sse.expect("message", msg=f"m{i}")
            await stream.aclose()
            await sse.aclose()


async def test_sse_bad_frames_are_answered_on_the_stream():
    """A JSON body that is not a valid frame is taken (204) and answered with an error frame, ref echoed."""
    with trio.fail_after(10):
        async with running_server() as server:
            sse = await SseStream.open(tcp(server.port))
            assert (await sse.post({"type": "shout", "ref": "q"}))[0] == 204
            await sse.expect("error", code="bad_frame", ref="q")
            assert (await sse.post({"type": "say", "room": "lobby", "msg": "x", "ref": "n"}))[
                0
            ] == 204
            await sse.expect("error", code="not_joined", ref="n")
            await sse.aclose()


async def test_sse_foreign_origin_stream_refused_403():
    """GET /sse with a foreign Origin is refused with 403 before any chat state is touched."""
    with trio.fail_after(10):
        async with running_server() as server:
            sse = await SseStream.open(tcp(server.port), origin="http://evil.example")
            assert sse.status == 403
            assert not server.connections
            await sse.aclose()


async def test_sse_rate_limit_applies():
    """say over SSE is rate limited like on a WebSocket."""
    with trio.fail_after(10):
        async with running_server(rate=1, burst=1) as server:
            sse = await SseStream.open(tcp(server.port))
            await sse.post({"type": "join", "room": "lobby", "name": "sue"})
            await sse.expect("joined")
            await sse.post({"type": "say", "room": "lobby", "msg": "1"})
            await sse.post({"type": "say", "room": "lobby", "msg": "2", "ref": "r2"})
            await sse.expect("message", msg="1")
            await sse.expect("error", code="rate_limited", ref="r2")
            await sse.aclose()


async def test_sse_and_websocket_clients_share_a_room():
    """An SSE client and a WebSocket client see each other, their messages and presence."""
    with trio.fail_after(10):
        async with running_server() as server, client_of(server) as ws:
            await ws.join("lobby", "walt")
            sse = await SseStream.open(tcp(server.port))
            await sse.post({"type": "join", "room": "lobby", "name": "sue"})
            joined = await sse.expect("joined")
            assert joined["members"] == ["sue", "walt"]
            await ws.expect("presence", event="join", name="sue")
            await ws.say("hello sue")
            await ws.expect("message", name="walt", msg="hello sue")
            await sse.expect("message", name="walt", msg="hello sue")
            await sse.post({"type": "say", "room": "lobby", "msg": "hello walt"})
            await ws.expect("message", name="sue", msg="hello walt")
            await sse.aclose()


async def test_sse_broken_stream_resumes_with_token_and_since():
    """A new stream + join with token and since recovers exactly what was missed, with no presence flicker."""
    with trio.fail_after(10):
        async with running_server(presence_grace=5) as server, client_of(server) as ws:
            await ws.join("lobby", "walt")
            sse = await SseStream.open(tcp(server.port))
            await sse.post({"type": "join", "room": "lobby", "name": "sue"})
            token = (await sse.expect("joined"))["token"]
            await ws.expect("presence", event="join", name="sue")
            await ws.say("seen")
            last = (await sse.expect("message", msg="seen"))["id"]
            await sse.aclose()  # the stream breaks
            for i in range(3):
                await ws.say(f"missed {i}")
            sse = await SseStream.open(tcp(server.port))
            await sse.post(
                {"type": "join", "room": "lobby", "name": "sue", "token": token, "since": last}
            )
            joined = await sse.expect("joined")
            assert joined["recovered"] is True
            assert [m["msg"] for m in joined["history"]] == ["missed 0", "missed 1", "missed 2"]
            await ws.say("sentinel")
            frames = []
            while (frame := await ws.recv())["type"] != "message" or frame["msg"] != "sentinel":
                frames.append(frame)
            assert not [f for f in frames if f["type"] == "presence"]
            await sse.aclose()


async def test_sse_drain_ends_the_stream_and_refuses_new_ones(autojump_clock):
    """drain(): a stream gets a close event with 1001 and ends; while draining, GET /sse gets 503."""
    async with memory_server(drain_timeout=10) as net:
        connect = net.listener.connect
        sse = await SseStream.open(connect, timeout=60)
        await sse.post({"type": "join", "room": "lobby", "name": "sue"})
        await sse.expect("joined")
        # A stream that is not read keeps the drain busy until its deadline.
        stuck = await SseStream.open(lambda: connect(lockstep=True), timeout=60)
        await stuck.post({"type": "join", "room": "lobby", "name": "stuck"})
        await stuck.expect("joined")
        net.server.drain()
        while (event := await sse.next_event())["event"] == "message":
            assert event["data"]["type"] == "presence"  # stuck's join, queued before
        assert event["event"] == "close"
        assert event["data"] == {"code": 1001, "reason": "going away"}
        late = await SseStream.open(connect, timeout=60)
        assert late.status == 503
        for stream in (sse, stuck, late):
            await stream.aclose()


async def test_sse_heartbeat_comments_keep_an_idle_stream_alive(autojump_clock):
    """An idle stream gets a comment line every 15 s and stays open."""
    async with memory_server() as net:
        sse = await SseStream.open(net.listener.connect, timeout=120)
        await sse.post({"type": "join", "room": "lobby", "name": "sue"})
        await sse.expect("joined")
        start = trio.current_time()
        await trio.sleep(46)
        await sse.post({"type": "say", "room": "lobby", "msg": "still here"})
        await sse.expect("message", msg="still here")
        assert sse.comments == 3
        assert trio.current_time() - start < 47
        await sse.aclose()


async def test_sse_slow_consumer_stream_is_ended(autojump_clock):
    """An SSE client that stops reading is closed as a slow consumer; nobody else waits."""
    async with memory_server(rate=0, outbox_frames=8) as net:
        connect = net.listener.connect
        stalled = await SseStream.open(lambda: connect(lockstep=True), timeout=120)
        await stalled.post({"type": "join", "room": "lobby", "name": "stalled"})
        await stalled.expect("joined")
        healthy = await SseStream.open(connect, timeout=120)
        await healthy.post({"type": "join", "room": "lobby", "name": "healthy"})
        await healthy.expect("joined")
        for i in range(100):
            assert (await healthy.post({"type": "say", "room": "lobby", "msg": f"m{i}"}))[0] == 204
        seen = []
        while len(seen) < 100:
            frame = await healthy.recv()
            if frame["type"] == "message":
                seen.append(frame["msg"])
        assert seen == [f"m{i}" for i in range(100)]
        await trio.sleep(11)
        assert net.server.stats.closes_by_code.get(1013) == 1
        await stalled.aclose()
        await healthy.aclose()


async def test_sse_client_vanishing_mid_post_leaves_nothing_behind(caplog):
    """A POST cut off mid-body is dropped quietly: the session, the server and the log are unaffected."""
    with trio.fail_after(10):
        async with running_server() as server:
            connect = tcp(server.port)
            sse = await SseStream.open(connect)
            await sse.post({"type": "join", "room": "lobby", "name": "sue"})
            await sse.expect("joined")
            for cut in (b"", b'{"type": "say", "ro'):
                stream = await connect()
                await stream.send_all(
                    f"POST /sse/{sse.session} HTTP/1.1\r\nHost: localhost\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
                    + cut
                )
                await stream.aclose()  # vanishes mid-body
            assert (await sse.post({"type": "say", "room": "lobby", "msg": "still here"}))[
                0
            ] == 204
            await sse.expect("message", msg="still here")
            assert len(server.connections) == 1
            assert len(server.hub.chat.clients) == 1
            await sse.aclose()
    assert not [r for r in caplog.records if r.levelno > logging.INFO]
