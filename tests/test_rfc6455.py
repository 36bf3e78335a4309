"""RFC 6455 conformance of the chat endpoint, byte by byte, against the real server process.

A raw client (`tests/wsraw.py`, stdlib sockets only) speaks to one
``python -m triochat`` process: the opening handshake (RFC 6455 4.2.1),
Autobahn-style valid traffic (groups 1-7 and 9, adapted to a chat endpoint
instead of an echo server: a JSON `join` or `say` stands in for the echoed
message), and every protocol error the chat endpoint must fail with an
exact close code (docs/protocol.md §11, RFC 6455 7.4.1): a close frame with
that code, then the end of the TCP connection. Every server frame is parsed
strictly on the way (unmasked, RSV 0, minimal lengths, valid UTF-8, nothing
after the close frame).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple

import pytest

from .server_process import ServerProcess, run_server
from .wsraw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV2,
    RSV3,
    CloseResult,
    WsConn,
    build_frame,
    close_payload,
    handshake_request,
    http_exchange,
    new_key,
    open_websocket,
    upgrade,
)
from .wsraw import expect_close as wsraw_expect_close

MAX_FRAME = 65536  # the server's default --max-frame-bytes
MAX_MSG_CHARS = 2000  # the server's default --max-msg-chars
SERVER_CLOSE_TIMEOUT = 2  # passed as --close-timeout
CLOSE_WAIT = 3.0  # seconds for a close frame to arrive
#: After its close frame the server must end TCP within --close-timeout
#: (docs/protocol.md §11); the margin is for scheduling, not for waiting.
EOF_MARGIN = 0.5
EOF_WAIT = SERVER_CLOSE_TIMEOUT + EOF_MARGIN
HEADER_DECISION_WAIT = 2.0  # a too-large announced length must be refused this fast

#: Invalid UTF-8 (Autobahn 6.x): a 4-byte lead of a code point above U+10FFFF,
#: and "κόσμε" followed by an encoded surrogate (U+D800), then "edited".
INVALID_UTF8 = {
    "f7bfbfbf": bytes.fromhex("f7bfbfbf"),
    "kosme-surrogate": bytes.fromhex("cebae1bdb9cf83cebcceb5eda080656469746564"),
    "overlong-slash": bytes.fromhex("c0af"),
    "lone-continuation": bytes.fromhex("80"),
    "truncated-4-byte": bytes.fromhex("f09f98"),
    # overlong encodings (Autobahn 6.8-6.9): "/" in 3 and 4 bytes, NUL in 2, U+007F in 2
    "overlong-slash-3-byte": bytes.fromhex("e080af"),
    "overlong-slash-4-byte": bytes.fromhex("f08080af"),
    "overlong-nul": bytes.fromhex("c080"),
    "overlong-7f": bytes.fromhex("c1bf"),
    # UTF-16 surrogates (6.10-6.11) and code points above U+10FFFF (6.3, 6.6)
    "surrogate-d800": bytes.fromhex("eda080"),
    "surrogate-dfff": bytes.fromhex("edbfbf"),
    "surrogate-pair": bytes.fromhex("eda0bdedb880"),
    "above-10ffff": bytes.fromhex("f4908080"),
    "5-byte-sequence": bytes.fromhex("f888808080"),
    "byte-fe": bytes.fromhex("fe"),
    "byte-ff": bytes.fromhex("ff"),
    # a lead byte with too few continuations, then ASCII (6.14)
    "truncated-3-byte-then-ascii": bytes.fromhex("e282") + b"x",
}


# --- fixtures and helpers -----------------------------------------------------------


def expect_close(
    conn: WsConn,
    code: int | Collection[int | None] | None,
    timeout: float = CLOSE_WAIT,
    **options: Any,
) -> CloseResult:
    """wsraw's `expect_close`, with the server's FIN due within --close-timeout plus a margin."""
    options.setdefault("eof_timeout", EOF_WAIT)
    return wsraw_expect_close(conn, code, timeout, **options)


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ServerProcess]:
    """One server process for the whole module (a short close timeout bounds every close)."""
    with run_server("--close-timeout", str(SERVER_CLOSE_TIMEOUT)) as server:
        yield server


@pytest.fixture(scope="module")
def unlimited_server() -> Iterator[ServerProcess]:
    """A server without rate limits (``--rate 0``): one client can fill another's socket at once."""
    with run_server("--close-timeout", str(SERVER_CLOSE_TIMEOUT), "--rate", "0") as server:
        yield server


def unique(prefix: str) -> str:
    """A name or room no other test uses (names are unique per server)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def join_frame(name: str | None = None, room: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "join",
        "room": room or unique("r"),
        "name": name or unique("u"),
        **extra,
    }


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def join(conn: WsConn) -> tuple[str, str]:
    """Join a fresh room under a fresh name; (room, name)."""
    frame = join_frame()
    conn.send_json(frame)
    conn.expect("joined", room=frame["room"], name=frame["name"])
    return frame["room"], frame["name"]


def say_frame(room: str, msg: str, ref: str) -> dict[str, Any]:
    return {"type": "say", "room": room, "msg": msg, "ref": ref}


def padded_say(room: str, size: int, ref: str) -> bytes:
    """A ``say`` whose JSON is exactly ``size`` bytes (ASCII padding in ``msg``)."""
    bare = len(encode(say_frame(room, "", ref)))
    data = encode(say_frame(room, "x" * (size - bare), ref))
    assert len(data) == size
    return data


def assert_still_works(conn: WsConn, room: str) -> None:
    """The connection still chats: a say is answered with its message and ack."""
    ref = unique("still-")
    conn.send_json(say_frame(room, "still here", ref))
    conn.expect("message", room=room, msg="still here")
    conn.expect("ack", ref=ref)


def text(payload: bytes | str, **options: Any) -> bytes:
    return build_frame(OP_TEXT, payload, **options)


def cont(payload: bytes | str, **options: Any) -> bytes:
    return build_frame(OP_CONT, payload, **options)


def fragments(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` as a text message in fragments of the given sizes (the rest in the last)."""
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    pieces.append(data[at:])
    frames = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        frames.append(build_frame(OP_TEXT if index == 0 else OP_CONT, piece, fin=last))
    return frames


def fails_with(
    server: ServerProcess,
    frames: list[bytes],
    code: int | set[int],
    *,
    path: str = "/ws",
    client_sent_close: bool = False,
) -> None:
    """On a fresh connection, ``frames`` must get a close frame with ``code``, then TCP closes."""
    with open_websocket(server.port, path) as conn:
        for data in frames:
            conn.send_raw(data)
        expect_close(conn, code, CLOSE_WAIT, allow_text=False, reply=not client_sent_close)


# --- the opening handshake (RFC 6455 4.2.1, 4.2.2) -----------------------------------------


@pytest.mark.parametrize(
    ("path", "replace", "extra"),
    [
        pytest.param("/ws", {}, [], id="plain"),
        pytest.param("/", {}, [], id="root-path"),
        pytest.param("/ws", {"Upgrade": "WebSocket"}, [], id="upgrade-mixed-case"),
        pytest.param("/ws", {"Connection": "keep-alive, Upgrade"}, [], id="connection-list"),
        pytest.param("/ws", {"Connection": "UPGRADE"}, [], id="connection-upper-case"),
        pytest.param("/ws", {}, [("Origin", "http://127.0.0.1:{port}")], id="same-origin"),
        pytest.param(
            "/ws",
            {},
            [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")],
            id="deflate-offer-declined",
        ),
    ],
)
def test_rfc6455_valid_handshake_gets_101_with_accept(chat_server, path, replace, extra):
    """A valid opening handshake gets 101 with the right Sec-WebSocket-Accept, no extension, and then chats."""
    key = new_key()
    extra = [(name, value.format(port=chat_server.port)) for name, value in extra]
    request = handshake_request(
        path, host=f"127.0.0.1:{chat_server.port}", key=key, replace=replace, extra=extra
    )
    with upgrade(chat_server.port, request, key, path=path) as conn:
        join(conn)


def test_rfc6455_frames_sent_with_the_handshake_are_read(chat_server):
    """A client may send its first frames right behind the request, in the same
    write: the front has read them with the head, and they are answered, in order,
    after the 101 (nothing of them is lost to the handshake)."""
    key = new_key()
    first = join_frame()
    second = join_frame(name=first["name"])
    request = handshake_request(host=f"127.0.0.1:{chat_server.port}", key=key)
    early = build_frame(1, encode(first)) + build_frame(1, encode(second))
    with upgrade(chat_server.port, request + early, key) as conn:
        conn.expect("joined", room=first["room"], name=first["name"])
        conn.expect("joined", room=second["room"], name=first["name"])


def test_rfc6455_rsv1_after_declined_deflate_offer_closes_1002(chat_server):
    """RSV1 on a connection whose permessage-deflate offer was declined is a protocol error: 1002."""
    key = new_key()
    request = handshake_request(
        host=f"127.0.0.1:{chat_server.port}",
        key=key,
        extra=[("Sec-WebSocket-Extensions", "permessage-deflate")],
    )
    with upgrade(chat_server.port, request, key) as conn:
        conn.send_raw(text(encode(join_frame()), rsv=RSV1))
        expect_close(conn, 1002, CLOSE_WAIT, allow_text=False)


KEY_16 = "Sec-WebSocket-Key must be 16 bytes"
ONE_KEY = "exactly one Sec-WebSocket-Key"


@pytest.mark.parametrize(
    ("request_options", "reason"),
    [
        pytest.param({"http_version": "HTTP/1.0"}, "needs HTTP/1.1", id="http-1.0"),
        pytest.param({"method": "POST"}, "is a GET", id="post"),
        pytest.param({"key": base64.b64encode(os.urandom(8)).decode()}, KEY_16, id="key-8-bytes"),
        pytest.param(
            {"key": base64.b64encode(os.urandom(17)).decode()}, KEY_16, id="key-17-bytes"
        ),
        pytest.param({"key": "this is not base64!!!!=="}, KEY_16, id="key-not-base64"),
        pytest.param({"extra": [("Sec-WebSocket-Key", new_key())]}, ONE_KEY, id="two-keys"),
        pytest.param({"replace": {"Sec-WebSocket-Key": None}}, ONE_KEY, id="no-key"),
        pytest.param(
            {"replace": {"Upgrade": "websocketx"}},
            "Upgrade must be websocket",
            id="upgrade-websocketx",
        ),
        pytest.param(
            {"replace": {"Connection": "keep-alive"}},
            "Connection must include upgrade",
            id="connection-without-upgrade",
        ),
        pytest.param(
            {"replace": {"Connection": None}},
            "Connection must include upgrade",
            id="no-connection-header",
        ),
        pytest.param(
            {"extra": [("Sec-WebSocket-Extensions", "permessage-deflate; x=\u00e9")]},
            "sec-websocket-extensions must be ASCII",
            id="extensions-not-ascii",
        ),
        pytest.param(
            {"extra": [("Sec-WebSocket-Protocol", "chat\u00e9")]},
            "sec-websocket-protocol must be ASCII",
            id="protocol-not-ascii",
        ),
    ],
)
def test_rfc6455_bad_handshake_gets_400(chat_server, request_options, reason):
    """A malformed opening handshake to /ws gets 400 saying what is wrong, never 101 (RFC 6455 4.2.1, docs/protocol.md §1.1)."""
    request = handshake_request(host=f"127.0.0.1:{chat_server.port}", **request_options)
    response = http_exchange(chat_server.port, request)
    assert response.status == 400, (
        f"expected 400, got {response.status} for {request!r}:\n{response}"
    )
    assert response.reason == "Bad Request", response
    assert reason in response.body.decode("utf-8"), f"the 400 does not say {reason!r}:\n{response}"
    assert response.tokens("connection") == ["close"], response


def test_rfc6455_handshake_without_host_gets_400(chat_server):
    """An HTTP/1.1 upgrade without Host is malformed HTTP (RFC 9112 §3.2): 400 and a close, never 101."""
    request = handshake_request(replace={"Host": None})
    assert b"host:" not in request.lower()
    response = http_exchange(chat_server.port, request)
    assert response.status == 400, f"expected 400, got:\n{response}"
    assert response.tokens("connection") == ["close"], response


@pytest.mark.parametrize(
    ("replace", "extra"),
    [
        pytest.param({"Sec-WebSocket-Version": None}, [], id="missing"),
        pytest.param({}, [("Sec-WebSocket-Version", "13")], id="repeated-13"),
        pytest.param({}, [("Sec-WebSocket-Version", "8")], id="repeated-13-and-8"),
        pytest.param(
            {"Sec-WebSocket-Version": "8"}, [("Sec-WebSocket-Version", "13")], id="8-then-13"
        ),
    ],
)
def test_rfc6455_missing_or_repeated_version_gets_426(chat_server, replace, extra):
    """Anything but exactly one `Sec-WebSocket-Version: 13` (docs/protocol.md §1.1, check 3) gets 426 naming 13."""
    request = handshake_request(host=f"127.0.0.1:{chat_server.port}", replace=replace, extra=extra)
    response = http_exchange(chat_server.port, request)
    assert response.status == 426, f"expected 426, got {response.status}:\n{response}"
    assert response.tokens("sec-websocket-version") == ["13"], f"want version 13:\n{response}"
    assert "version 13" in response.body.decode("utf-8"), response


@pytest.mark.parametrize("version", ["8", "12", "14"])
def test_rfc6455_wrong_version_gets_426_naming_13(chat_server, version):
    """An unsupported Sec-WebSocket-Version gets 426 with Sec-WebSocket-Version: 13 (RFC 6455 4.4)."""
    request = handshake_request(
        host=f"127.0.0.1:{chat_server.port}", replace={"Sec-WebSocket-Version": version}
    )
    response = http_exchange(chat_server.port, request)
    assert response.status == 426, f"expected 426, got {response.status}:\n{response}"
    assert response.tokens("sec-websocket-version") == ["13"], f"want version 13:\n{response}"


# --- protocol errors on a fresh connection ------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: text(encode(join_frame()), rsv=RSV1), id="rsv1-text"),
        pytest.param(lambda: text(encode(join_frame()), rsv=RSV2), id="rsv2-text"),
        pytest.param(lambda: text(encode(join_frame()), rsv=RSV3), id="rsv3-text"),
        pytest.param(lambda: text(b"{}", rsv=RSV1 | RSV2 | RSV3), id="rsv-all-text"),
        pytest.param(lambda: build_frame(OP_BINARY, b"\x00\xff", rsv=RSV2), id="rsv2-binary"),
        pytest.param(lambda: build_frame(OP_PING, b"ping", rsv=RSV3), id="rsv3-ping"),
        pytest.param(
            lambda: build_frame(OP_CLOSE, close_payload(1000), rsv=RSV1), id="rsv1-close"
        ),
    ],
)
def test_rfc6455_reserved_bits_close_1002(chat_server, frame):
    """A frame with an RSV bit set, no extension negotiated, fails the connection with 1002."""
    fails_with(chat_server, [frame()], 1002)


@pytest.mark.parametrize(
    "frames",
    [
        *(
            pytest.param(lambda data=data: [text(data)], id=f"one-frame-{name}")
            for name, data in INVALID_UTF8.items()
        ),
        pytest.param(
            lambda: [text(b'{"type":"join","name":"\xce', fin=False), cont(b'\xba\xed\xa0\x80"}')],
            id="fragments-invalid-in-second",
        ),
        pytest.param(
            lambda: [text(b'{"msg":"\xed', fin=False), cont(b'\xa0\x80"}')],
            id="fragments-surrogate-split",
        ),
        pytest.param(
            lambda: [
                text(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", fin=False),
                cont(b"\xf4\x90\x80\x80", fin=False),
                cont(b"}"),
            ],
            id="fragments-above-10ffff-in-middle",
        ),
        # A sequence cut short by the end of the message, its bytes in two fragments:
        # only the final fragment shows it is invalid.
        pytest.param(
            lambda: [text(b'{"msg":"\xf0\x9f', fin=False), cont(b"\x98")],
            id="fragments-truncated-4-byte-at-end",
        ),
        pytest.param(
            lambda: [text(b'{"msg":"\xe2', fin=False), cont(b"\x82")],
            id="fragments-truncated-3-byte-at-end",
        ),
        pytest.param(
            lambda: [text(b"\xf0", fin=False), cont(b"\x9f\x98", fin=False), cont(b"")],
            id="fragments-truncated-then-empty-final",
        ),
        pytest.param(
            lambda: [text(b'{"msg":"\xe0', fin=False), cont(b'\x80\xaf"}')],
            id="fragments-overlong-split",
        ),
        pytest.param(
            lambda: [text(b'{"msg":"\xf4', fin=False), cont(b'\x90\x80\x80"}')],
            id="fragments-above-10ffff-split",
        ),
        # Fail fast (RFC 6455 8.1: an endpoint that finds invalid UTF-8 MUST fail
        # the connection; Autobahn 6.4): the message is never finished here.
        pytest.param(
            lambda: [text(b'{"a":"\xf7', fin=False)],
            id="fail-fast-in-unfinished-message",
        ),
    ],
)
def test_rfc6455_invalid_utf8_text_closes_1007(chat_server, frames):
    """A text message that is not valid UTF-8, in one frame or across fragments, closes with 1007."""
    fails_with(chat_server, frames(), 1007)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: [cont(b'{"type":"join"}')], id="continuation-first"),
        pytest.param(lambda: [cont(b"{", fin=False)], id="unfinished-continuation-first"),
        pytest.param(
            lambda: [text(b'{"type":', fin=False), text(b'"join"}')], id="text-inside-fragmented"
        ),
        pytest.param(
            lambda: [text(b'{"type":', fin=False), build_frame(OP_BINARY, b"\x00")],
            id="binary-inside-fragmented",
        ),
    ],
)
def test_rfc6455_bad_fragmentation_closes_1002(chat_server, frames):
    """A continuation with nothing to continue, or a new data frame mid-message, closes with 1002."""
    fails_with(chat_server, frames(), 1002)


def test_rfc6455_continuation_after_finished_message_closes_1002(chat_server):
    """A continuation after a fragmented message was finished has nothing to continue: 1002."""
    frame = join_frame()
    with open_websocket(chat_server.port) as conn:
        for raw in fragments(encode(frame), [10]):
            conn.send_raw(raw)
        conn.expect("joined", room=frame["room"])
        conn.send_raw(cont(encode(say_frame(frame["room"], "orphan", "o1"))))
        expect_close(conn, 1002, CLOSE_WAIT, allow_text=False)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_rfc6455_reserved_opcode_closes_1002(chat_server, opcode):
    """A frame with a reserved opcode (non-control 3-7, control 11-15) closes with 1002."""
    fails_with(chat_server, [build_frame(opcode, b"reserved")], 1002)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: build_frame(OP_PING, b"*" * 126), id="ping-126-bytes"),
        pytest.param(lambda: build_frame(OP_PONG, b"*" * 126), id="pong-126-bytes"),
        pytest.param(lambda: build_frame(OP_PING, b"frag", fin=False), id="fragmented-ping"),
        pytest.param(lambda: build_frame(OP_PONG, b"frag", fin=False), id="fragmented-pong"),
    ],
)
def test_rfc6455_bad_control_frame_closes_1002(chat_server, frame):
    """A control frame over 125 bytes, or a fragmented one (FIN=0), closes with 1002."""
    fails_with(chat_server, [frame()], 1002)


@pytest.mark.parametrize("reason_bytes", [124, 200])
def test_rfc6455_close_over_125_bytes_closes_1002(chat_server, reason_bytes):
    """A close frame whose payload is over 125 bytes (a control frame, RFC 6455 5.5) closes with 1002."""
    payload = close_payload(1000, "r" * reason_bytes)
    assert len(payload) > 125
    fails_with(chat_server, [build_frame(OP_CLOSE, payload)], 1002, client_sent_close=True)


def test_rfc6455_close_with_1_byte_payload_closes_1002(chat_server):
    """A close frame whose payload is a single byte closes with 1002."""
    fails_with(chat_server, [build_frame(OP_CLOSE, b"\x03")], 1002, client_sent_close=True)


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_rfc6455_close_with_invalid_code_closes_1002(chat_server, code):
    """A close frame with a code that may not be sent (RFC 6455 7.4; above 4999: undefined,
    Autobahn 7.13.1-2) closes with 1002."""
    frame = build_frame(OP_CLOSE, close_payload(code, "bad code"))
    fails_with(chat_server, [frame], 1002, client_sent_close=True)


def test_rfc6455_close_with_invalid_utf8_reason_closes_1007(chat_server):
    """A close frame whose reason is not valid UTF-8 closes with 1007."""
    frame = build_frame(OP_CLOSE, close_payload(1000, INVALID_UTF8["kosme-surrogate"]))
    fails_with(chat_server, [frame], 1007, client_sent_close=True)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: text(encode(join_frame()), mask=False), id="text"),
        pytest.param(lambda: build_frame(OP_PING, b"hello", mask=False), id="ping"),
        pytest.param(lambda: text(b"", mask=False), id="empty-text"),
    ],
)
def test_rfc6455_unmasked_client_frame_closes_1002(chat_server, frame):
    """A client frame without a mask (RFC 6455 5.1) closes with 1002."""
    fails_with(chat_server, [frame()], 1002)


def test_rfc6455_64_bit_length_with_top_bit_closes_1002_or_1009(chat_server):
    """A 64-bit payload length with the most significant bit set closes with 1002 (or 1009)."""
    frame = text(b"x" * 16, length_bytes=8, declared_length=(1 << 63) | 16)
    fails_with(chat_server, [frame], {1002, 1009})


@pytest.mark.parametrize("announced", [MAX_FRAME + 1, 16 * 1024 * 1024])
def test_rfc6455_announced_length_over_limit_closes_1009_from_header(chat_server, announced):
    """A header announcing more than --max-frame-bytes is refused with 1009 at once, before the payload."""
    with open_websocket(chat_server.port) as conn:
        conn.send_raw(text(b'{"type":"say","msg":"', declared_length=announced))
        result = expect_close(conn, 1009, HEADER_DECISION_WAIT, allow_text=False)
        assert result.elapsed < HEADER_DECISION_WAIT


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: [build_frame(OP_BINARY, encode(join_frame()))], id="binary"),
        pytest.param(lambda: [build_frame(OP_BINARY, b"")], id="empty-binary"),
        pytest.param(
            lambda: [
                build_frame(OP_BINARY, b"\x00\x01", fin=False),
                cont(b"\x02\x03"),
            ],
            id="fragmented-binary",
        ),
    ],
)
def test_rfc6455_binary_message_closes_1003(chat_server, frames):
    """A binary message (the chat speaks JSON text only) closes with 1003."""
    fails_with(chat_server, frames(), 1003)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: [text(b" " * (MAX_FRAME + 1))], id="one-frame"),
        pytest.param(
            lambda: [text(b" " * 40000, fin=False), cont(b" " * (MAX_FRAME + 1 - 40000))],
            id="two-fragments",
        ),
        pytest.param(lambda: fragments(b" " * (MAX_FRAME + 1), [16384] * 4), id="five-fragments"),
    ],
)
def test_rfc6455_message_over_frame_limit_closes_1009(chat_server, frames):
    """A text message over --max-frame-bytes (65536), whole or in fragments, closes with 1009."""
    fails_with(chat_server, frames(), 1009)


# --- the same errors in other connection states -------------------------------------------


class BadFrame(NamedTuple):
    """A protocol error to send; ``data_opcode`` is OP_CONT inside a fragmented message."""

    make: Callable[[int], bytes]
    code: int
    sends_close: bool = False


BAD_FRAMES = {
    "rsv1": BadFrame(lambda op: build_frame(op, b'"x"}', rsv=RSV1), 1002),
    "reserved-opcode-3": BadFrame(lambda op: build_frame(3, b"x"), 1002),
    "reserved-opcode-11": BadFrame(lambda op: build_frame(11, b"x"), 1002),
    "invalid-utf8": BadFrame(lambda op: build_frame(op, b"\xf7\xbf\xbf\xbf"), 1007),
    "unmasked": BadFrame(lambda op: build_frame(op, b'"x"}', mask=False), 1002),
    "ping-126": BadFrame(lambda op: build_frame(OP_PING, b"p" * 126), 1002),
    "close-1-byte": BadFrame(lambda op: build_frame(OP_CLOSE, b"\x03"), 1002, sends_close=True),
    "close-code-1005": BadFrame(
        lambda op: build_frame(OP_CLOSE, close_payload(1005)), 1002, sends_close=True
    ),
    "over-frame-limit": BadFrame(lambda op: build_frame(op, b" " * (MAX_FRAME + 1)), 1009),
    "binary": BadFrame(lambda op: build_frame(OP_BINARY, b"\x00"), 1003),
}


def _mid_fragment(conn: WsConn) -> int:
    conn.send_raw(text(b'{"type":"join","room":', fin=False))
    return OP_CONT


def _after_ping(conn: WsConn) -> int:
    conn.send_frame(OP_PING, b"state-ping")
    return OP_TEXT


def _queued(conn: WsConn) -> int:
    frame = join_frame()
    conn.send_json(frame)
    conn.send_json(say_frame(frame["room"], "queued 😀", "q1"))
    return OP_TEXT


UNREAD_ERRORS = 40


def _many_unread(conn: WsConn) -> int:
    conn.send_raw(b"".join(text(f"not json {i}") for i in range(UNREAD_ERRORS)))
    return OP_TEXT


STATES: dict[str, Callable[[WsConn], int]] = {
    "mid-fragmented-message": _mid_fragment,
    "right-after-ping": _after_ping,
    "replies-queued": _queued,
    "many-replies-unread": _many_unread,
}


@pytest.mark.parametrize(
    ("state", "bad"),
    [
        pytest.param(state, bad, id=f"{state}-{bad}")
        for state in STATES
        for bad in BAD_FRAMES
        # a binary frame inside a fragmented text message is a fragmentation error
        # (1002), tested above
        if not (state == "mid-fragmented-message" and bad == "binary")
    ],
)
def test_rfc6455_protocol_error_in_other_states_exact_code(chat_server, state, bad):
    """The same error mid-fragment, right after a ping, or with replies queued still gets its exact code."""
    case = BAD_FRAMES[bad]
    with open_websocket(chat_server.port) as conn:
        data_opcode = STATES[state](conn)
        conn.send_raw(case.make(data_opcode))
        result = expect_close(conn, case.code, CLOSE_WAIT, reply=not case.sends_close)
    for pong in result.pongs:
        assert pong == b"state-ping", f"a pong that answers no ping: {pong!r}"
    kinds = [message["type"] for message in result.json_messages()]
    if state == "replies-queued":
        assert kinds == ["joined", "message", "ack"][: len(kinds)], (
            f"queued replies out of order or unexpected: {kinds}"
        )
    elif state == "many-replies-unread":
        assert kinds == ["error"] * len(kinds), f"unexpected replies: {kinds}"
        assert len(kinds) <= UNREAD_ERRORS
    else:
        assert not kinds, f"unexpected text frames before the close: {result.messages}"


def kernel_queues(sock: socket.socket) -> tuple[int, int]:
    """What the kernels hold of a connection to the server on 127.0.0.1, in bytes: (sent by
    the server, not yet taken by our socket; taken by our socket, not yet read by us).

    From Linux's /proc/net/tcp: tx_queue of the server's end, rx_queue of ours.
    """
    ours, theirs = sock.getsockname()[1], sock.getpeername()[1]
    found: dict[tuple[int, int], tuple[int, int]] = {}
    with open("/proc/net/tcp") as table:
        next(table)  # the column names
        for line in table:
            fields = line.split()
            local, remote = (int(field.rsplit(":", 1)[1], 16) for field in fields[1:3])
            tx, rx = (int(queue, 16) for queue in fields[4].split(":"))
            found[local, remote] = (tx, rx)
    for key in ((theirs, ours), (ours, theirs)):
        assert key in found, f"no 127.0.0.1:{key[0]} -> :{key[1]} in /proc/net/tcp"
    return found[theirs, ours][0], found[ours, theirs][1]


def settled_kernel_queues(sock: socket.socket, timeout: float = 2.0) -> tuple[int, int]:
    """`kernel_queues` once two readings 50 ms apart agree (the server has written what
    the socket takes)."""
    deadline = time.monotonic() + timeout
    last = kernel_queues(sock)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = kernel_queues(sock)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the kernel queues never settled: {last}")


#: Says of about 8 KB per phase: one phase is far over what the kernels take,
#: both together (about 320 KB, 41 frames) under the bounds of docs/protocol.md §9.
OUTBOX_SAYS = 20


def test_rfc6455_protocol_error_while_outbox_holds_refused_frames(unlimited_server):
    """A member that stopped reading (a small receive buffer, so the server's writes to it
    stall) while another fills its room, then sends RSV1: it gets every frame queued for it,
    in order, then close 1002, all within --close-timeout (docs/protocol.md §11: frames
    still queued go out first).

    Two phases: after the first, the kernels' buffers are full and the server holds more
    of it (a write the socket refused); the second's frames then wait behind that write,
    in the outbox itself. The bad frame's first byte goes out between the phases and the
    rest before the reader reads again, so nothing the reader sends or reads can let that
    write finish before the server has failed the connection.
    """
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux's /proc/net/tcp to tell the outbox from the kernel's buffers")
    port = unlimited_server.port
    room = unique("r")
    msgs = [f"{i:04d}" + "😀" * (MAX_MSG_CHARS - 10) for i in range(2 * OUTBOX_SAYS)]
    with open_websocket(port, rcvbuf=4096) as reader, open_websocket(port) as sender:
        rcvbuf = reader.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        reader.send_json(join_frame(room=room))
        reader.expect("joined", room=room)
        sender.send_json(join_frame(room=room))
        sender.expect("joined", room=room)
        seen = len(reader.frames)
        bad = text(b'{"type":"say"}', rsv=RSV1)
        for phase in range(2):
            for i in range(phase * OUTBOX_SAYS, (phase + 1) * OUTBOX_SAYS):
                sender.send_json(say_frame(room, msgs[i], f"o{i}"))
                sender.expect("message", room=room, msg=msgs[i])
                sender.expect("ack", ref=f"o{i}")
            if phase == 0:
                # A segment from the reader carries its window: any update it
                # owes the server goes out now (one byte: no frame header yet).
                reader.send_raw(bad[:1])
                # Every say of phase 1 has been delivered: what the reader has
                # not read is in the kernels' buffers (both ends), in its
                # client-side buffer, or still in the server's process.
                server_kernel, client_kernel = settled_kernel_queues(reader.sock)
                outside_server = server_kernel + client_kernel + len(reader.buffer)
        reader.send_raw(bad[1:])
        time.sleep(0.3)  # the server fails the connection while the socket is still full
        result = expect_close(reader, 1002, SERVER_CLOSE_TIMEOUT)
    kinds = [message["type"] for message in result.json_messages()]
    assert set(kinds) <= {"message", "presence"}, kinds
    got = [m["msg"][:4] for m in result.json_messages() if m["type"] == "message"]
    assert got == [msg[:4] for msg in msgs], f"{len(got)} of {len(msgs)} messages: {got}"
    assert result.elapsed < SERVER_CLOSE_TIMEOUT
    # The state was the one wanted: phase 1 alone was more than the kernels took.
    phase_1 = 0
    for frame in reader.frames[seen:]:
        phase_1 += len(frame.wire)
        if frame.completes and json.loads(frame.completes[1]).get("msg") == msgs[OUTBOX_SAYS - 1]:
            break
    # (More than a window the reader could still open: its whole receive buffer.)
    one_message = len(encode({"type": "message", "msg": msgs[0]}))
    assert phase_1 - outside_server >= one_message + rcvbuf, (
        f"the server held {phase_1 - outside_server} bytes of phase 1 ({phase_1}; kernels "
        f"{server_kernel} + {client_kernel}, client {len(reader.buffer)}): its socket "
        "refused nothing, so phase 2 did not wait in the outbox"
    )
    bad = [line for line in unlimited_server.output_text().splitlines() if " ERROR " in line]
    assert not bad, bad


# --- the classic endpoint `/` ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param(lambda: [text(b'{"name":"x","msg":"y"}', rsv=RSV1)], 1002, id="rsv1"),
        pytest.param(lambda: [text(INVALID_UTF8["kosme-surrogate"])], 1007, id="invalid-utf8"),
        pytest.param(lambda: [build_frame(5, b"x")], 1002, id="reserved-opcode-5"),
        pytest.param(lambda: [cont(b"{}")], 1002, id="continuation-first"),
        pytest.param(lambda: [build_frame(OP_PING, b"p", fin=False)], 1002, id="fragmented-ping"),
        pytest.param(lambda: [text(b"{}", mask=False)], 1002, id="unmasked"),
        pytest.param(lambda: [build_frame(OP_BINARY, b"\x00")], 1003, id="binary"),
        pytest.param(lambda: [text(b" " * (MAX_FRAME + 1))], 1009, id="over-frame-limit"),
        pytest.param(
            lambda: [text(b"x", declared_length=16 * 1024 * 1024)], 1009, id="announced-16-mib"
        ),
    ],
)
def test_rfc6455_protocol_error_on_root_path_exact_code(chat_server, frames, code):
    """The classic endpoint `/` fails protocol errors with the same exact close codes."""
    fails_with(chat_server, frames(), code, path="/")


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        pytest.param(1002, b"\x03", id="close-1-byte"),
        pytest.param(1002, close_payload(1006), id="close-code-1006"),
        pytest.param(1007, close_payload(1000, b"\xff"), id="close-reason-invalid-utf8"),
    ],
)
def test_rfc6455_bad_close_on_root_path_exact_code(chat_server, code, payload):
    """A malformed close frame on `/` fails the connection with the exact close code."""
    fails_with(
        chat_server, [build_frame(OP_CLOSE, payload)], code, path="/", client_sent_close=True
    )


# --- valid traffic (Autobahn groups 1-7 and 9, adapted to the chat) -----------------------------


@pytest.mark.parametrize("path", ["/ws", "/"])
def test_rfc6455_join_in_one_frame_answered(chat_server, path):
    """A join sent as one text frame is answered with `joined`, then a say with message and ack."""
    with open_websocket(chat_server.port, path) as conn:
        room, name = join(conn)
        conn.send_json(say_frame(room, "hi", "1"))
        conn.expect("message", room=room, name=name, msg="hi")
        conn.expect("ack", ref="1")


@pytest.mark.parametrize(
    ("path", "split"),
    [
        pytest.param("/ws", lambda size: [10], id="two-fragments"),
        pytest.param("/ws", lambda size: [1] * (size - 1), id="one-byte-fragments"),
        pytest.param("/ws", lambda size: [0, 5, 0, 5, 0], id="empty-fragments-between"),
        pytest.param("/ws", lambda size: [size], id="empty-last-fragment"),
        pytest.param("/", lambda size: [3, 3, 3], id="root-path-fragments"),
        pytest.param("/", lambda size: [1] * (size - 1), id="root-path-one-byte-fragments"),
    ],
)
def test_rfc6455_join_in_fragments_answered(chat_server, path, split):
    """A join sent in fragments (down to 1-byte and empty fragments) is reassembled and answered."""
    frame = join_frame()
    data = encode(frame)
    with open_websocket(chat_server.port, path) as conn:
        for raw in fragments(data, split(len(data))):
            conn.send_raw(raw)
        conn.expect("joined", room=frame["room"], name=frame["name"])
        assert_still_works(conn, frame["room"])


def test_rfc6455_multibyte_utf8_split_across_fragments_accepted(chat_server):
    """Valid UTF-8 with code points split between fragments is reassembled (message-level validity)."""
    room = unique("r")
    name = "κόσμε" + uuid.uuid4().hex[:8]
    data = encode({"type": "join", "room": room, "name": name})
    split = data.index("ό".encode()) + 1  # inside the 2-byte sequence
    with open_websocket(chat_server.port) as conn:
        conn.send_raw(text(data[:split], fin=False))
        conn.send_raw(cont(data[split:]))
        conn.expect("joined", room=room, name=name)
        msg = "𝄞 4-byte split"
        say = encode(say_frame(room, msg, "s1"))
        cut = say.index("𝄞".encode()) + 2  # inside the 4-byte sequence
        for raw in fragments(say, [cut, 1]):
            conn.send_raw(raw)
        conn.expect("message", msg=msg)
        conn.expect("ack", ref="s1")


def test_rfc6455_4_byte_utf8_one_byte_per_fragment_accepted(chat_server):
    """A 4-byte code point with each byte in a fragment of its own is valid: the say is answered."""
    with open_websocket(chat_server.port) as conn:
        room, _ = join(conn)
        msg = "😀 one byte a fragment 😀"
        data = encode(say_frame(room, msg, "e1"))
        at = data.index("😀".encode())
        for raw in fragments(data, [at, 1, 1, 1]):
            conn.send_raw(raw)
        conn.expect("message", room=room, msg=msg)
        conn.expect("ack", ref="e1")


def test_rfc6455_64_kib_message_in_1000_byte_fragments_answered(chat_server):
    """A message of exactly --max-frame-bytes in 66 fragments (Autobahn 9.x) is reassembled and answered."""
    with open_websocket(chat_server.port) as conn:
        room, name = join(conn)
        msg = "κόσμε 😀 " * 200  # 1800 characters, under --max-msg-chars
        say = encode(say_frame(room, msg, "big"))
        data = say + b" " * (MAX_FRAME - len(say))  # JSON allows whitespace after the value
        pieces = fragments(data, [1000] * (MAX_FRAME // 1000))
        assert len(pieces) == 66
        conn.send_raw(b"".join(pieces))
        conn.expect("message", room=room, name=name, msg=msg)
        conn.expect("ack", ref="big")
        assert_still_works(conn, room)


def test_rfc6455_frames_sent_one_byte_per_tcp_send_handled(chat_server):
    """Frames written one byte per TCP send (a 7-bit and a 16-bit length, headers and masks
    split everywhere) are handled; so is invalid UTF-8 sent that way: 1007."""
    frame = join_frame()
    with open_websocket(chat_server.port) as conn:
        conn.send_in_pieces(text(encode(frame)))
        conn.expect("joined", room=frame["room"], name=frame["name"])
        say = padded_say(frame["room"], 300, "bytewise")
        conn.send_in_pieces(text(say))
        conn.expect("message", room=frame["room"])
        conn.expect("ack", ref="bytewise")
        conn.send_in_pieces(text(b'{"msg":"' + INVALID_UTF8["surrogate-d800"] + b'"}'))
        expect_close(conn, 1007, allow_text=False)


def test_rfc6455_ping_between_fragments_answered_and_message_handled(chat_server):
    """Pings interleaved with a fragmented join each get a pong with their payload, and the join is answered."""
    frame = join_frame()
    data = encode(frame)
    with open_websocket(chat_server.port) as conn:
        conn.send_raw(text(data[:10], fin=False))
        conn.send_frame(OP_PING, b"between-1")
        conn.send_raw(cont(data[10:20], fin=False))
        conn.send_frame(OP_PING, b"between-2")
        conn.send_raw(cont(data[20:]))
        conn.expect_pong(b"between-1")
        conn.expect_pong(b"between-2")
        conn.expect("joined", room=frame["room"], name=frame["name"])
        assert_still_works(conn, frame["room"])


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x", id="1-byte"),
        pytest.param(b"*" * 125, id="125-bytes"),
        pytest.param(bytes(range(256))[:125], id="125-binary-bytes"),
        pytest.param("κόσμε".encode(), id="utf8"),
    ],
)
def test_rfc6455_ping_gets_pong_with_same_payload(chat_server, payload):
    """A ping (0 to 125 bytes, any content) is answered with a pong carrying the same payload."""
    with open_websocket(chat_server.port) as conn:
        conn.send_frame(OP_PING, payload)
        conn.expect_pong(payload)
        join(conn)


def test_rfc6455_ten_pings_answered_in_order(chat_server):
    """Ten pings in a row get ten pongs, in order."""
    with open_websocket(chat_server.port) as conn:
        payloads = [f"ping-{i}".encode() for i in range(10)]
        conn.send_raw(b"".join(build_frame(OP_PING, payload) for payload in payloads))
        for payload in payloads:
            conn.expect_pong(payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"unsolicited", id="11-bytes"),
        pytest.param(b"u" * 125, id="125-bytes"),
    ],
)
def test_rfc6455_unsolicited_pong_ignored(chat_server, payload):
    """An unsolicited pong is ignored: no answer, no close, the chat goes on."""
    with open_websocket(chat_server.port) as conn:
        conn.send_frame(OP_PONG, payload)
        conn.assert_open(0.3)
        room, _ = join(conn)
        assert_still_works(conn, room)
        assert not conn.pongs, f"pong(s) answered a pong: {conn.pongs}"


@pytest.mark.parametrize(
    ("length_bytes", "size"),
    [
        pytest.param(2, 100, id="16-bit-for-100-bytes"),
        pytest.param(8, 100, id="64-bit-for-100-bytes"),
        pytest.param(8, 300, id="64-bit-for-300-bytes"),
    ],
)
def test_rfc6455_non_minimal_length_encoding_closes_1002(chat_server, length_bytes, size):
    """A payload length not in its minimal encoding is malformed (RFC 6455 5.2: MUST be minimal): 1002."""
    # RFC 6455 5.2: "in all cases, the minimal number of bytes MUST be used to
    # encode the length". A frame that breaks a MUST of the framing is not a
    # valid frame, so failing the connection with 1002 is the RFC-correct
    # answer (wsproto, under trio-websocket, rejects it this way too); the
    # Autobahn suite has no case that requires accepting it.
    room = unique("r")
    with open_websocket(chat_server.port) as conn:
        frame = encode(join_frame(room=room))
        conn.send_raw(text(frame))
        conn.expect("joined", room=room)
        data = padded_say(room, size, "nm")
        conn.send_raw(text(data, length_bytes=length_bytes))
        expect_close(conn, 1002, CLOSE_WAIT, allow_text=False)


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param("hello κόσμε", id="2-byte"),
        pytest.param("€ ₿ ∑ 中文", id="3-byte"),
        pytest.param("𝄞 😀 🏳️‍🌈 𐍈", id="4-byte"),
        pytest.param("\U0010ffff \U00010000 \uffff \ue000", id="edge-code-points"),
        pytest.param("😀" * MAX_MSG_CHARS, id="2000-4-byte-chars"),
    ],
)
def test_rfc6455_valid_utf8_round_trips_in_message(chat_server, msg):
    """Valid UTF-8 in a say (up to 4-byte sequences) comes back unchanged in the `message` frame."""
    with open_websocket(chat_server.port) as conn:
        room, name = join(conn)
        conn.send_json(say_frame(room, msg, "u1"))
        message = conn.expect("message", room=room, name=name)
        assert message["msg"] == msg
        conn.expect("ack", ref="u1")


@pytest.mark.parametrize(
    ("size", "split"),
    [
        pytest.param(MAX_FRAME, [], id="one-frame-at-limit-64-bit-length"),
        pytest.param(MAX_FRAME, [30000, 30000], id="fragments-at-limit"),
        pytest.param(MAX_FRAME - 1, [], id="one-frame-16-bit-max-length"),
        pytest.param(MAX_FRAME - 1000, [1] * 10, id="near-limit-after-1-byte-fragments"),
    ],
)
def test_rfc6455_say_near_frame_limit_answered_too_long(chat_server, size, split):
    """A say of up to --max-frame-bytes (in a 16- or 64-bit length, or fragments) gets its answer (too_long); the connection stays open."""
    with open_websocket(chat_server.port) as conn:
        room, _ = join(conn)
        for raw in fragments(padded_say(room, size, "big"), split):
            conn.send_raw(raw)
        conn.expect("error", code="too_long", ref="big")
        assert_still_works(conn, room)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"not json", id="words"),
        pytest.param("κόσμε".encode(), id="utf8-words"),
    ],
)
def test_rfc6455_invalid_json_gets_error_frame_and_stays_open(chat_server, payload):
    """A valid text frame that is not JSON gets an `error` frame (bad_json); the connection stays open."""
    with open_websocket(chat_server.port) as conn:
        conn.send_raw(text(payload))
        conn.expect("error", code="bad_json")
        room, _ = join(conn)
        assert_still_works(conn, room)


# --- the closing handshake (Autobahn group 7) --------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        pytest.param(1000, "bye", id="1000-bye"),
        pytest.param(1000, "", id="1000-no-reason"),
        pytest.param(1001, "going", id="1001"),
        pytest.param(1002, "", id="1002"),
        pytest.param(1003, "", id="1003"),
        pytest.param(1007, "", id="1007"),
        pytest.param(1008, "", id="1008"),
        pytest.param(1009, "", id="1009"),
        pytest.param(1010, "", id="1010"),
        pytest.param(1011, "", id="1011"),
        pytest.param(3000, "custom", id="3000"),
        pytest.param(3999, "", id="3999"),
        pytest.param(4000, "", id="4000"),
        pytest.param(4999, "κόσμε 😀", id="4999-utf8-reason"),
        pytest.param(1000, "r" * 123, id="1000-123-byte-reason"),
    ],
)
def test_rfc6455_client_close_answered_then_tcp_closed(chat_server, code, reason):
    """A client close (valid code, valid reason) gets a close frame echoing the code (or 1000), then the server closes TCP."""
    with open_websocket(chat_server.port) as conn:
        join(conn)
        conn.send_close(code, reason)
        expect_close(conn, {code, 1000}, CLOSE_WAIT, allow_text=False, reply=False)


@pytest.mark.parametrize("path", ["/ws", "/"])
def test_rfc6455_client_close_without_payload_answered(chat_server, path):
    """A client close with an empty payload gets a close frame with no code (or 1000), then TCP closes."""
    with open_websocket(chat_server.port, path) as conn:
        conn.send_close(None)
        expect_close(conn, {None, 1000}, CLOSE_WAIT, allow_text=False, reply=False)


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda room: text(encode(say_frame(room, "late", "late"))), id="text"),
        pytest.param(lambda room: build_frame(OP_CLOSE, close_payload(1000)), id="second-close"),
        pytest.param(lambda room: build_frame(OP_PING, b"late-ping"), id="ping"),
        pytest.param(lambda room: build_frame(OP_BINARY, b"\x00"), id="binary"),
    ],
)
def test_rfc6455_frames_after_client_close_ignored(chat_server, after):
    """Frames after the client's close are not processed: one close 1000 back, no data frame, then TCP closes."""
    with open_websocket(chat_server.port) as conn:
        room, _ = join(conn)
        conn.send_raw(build_frame(OP_CLOSE, close_payload(1000)) + after(room))
        expect_close(conn, 1000, CLOSE_WAIT, allow_text=False, reply=False)


def test_rfc6455_no_data_frames_after_server_close(chat_server):
    """While others keep talking in its room, a closing client gets no data frame after the server's close frame."""
    with open_websocket(chat_server.port) as alice, open_websocket(chat_server.port) as bob:
        room, _ = join(alice)
        bob_name = unique("u")
        bob.send_json({"type": "join", "room": room, "name": bob_name})
        bob.expect("joined", room=room)
        alice.expect("presence", event="join", name=bob_name)
        for i in range(5):
            bob.send_json(say_frame(room, f"before {i}", f"b{i}"))
        alice.send_close(1000, "leaving")
        for i in range(5, 15):
            bob.send_json(say_frame(room, f"after {i}", f"b{i}"))
        result = expect_close(alice, 1000, CLOSE_WAIT, reply=False)
        for message in result.json_messages():
            assert message["type"] in ("message", "presence"), message
        for i in range(15):
            bob.expect("message", msg=f"{'before' if i < 5 else 'after'} {i}", skip=("presence",))
            bob.expect("ack", ref=f"b{i}", skip=("presence",))


def assert_reset(sock: socket.socket, timeout: float) -> None:
    """The server's end of ``sock`` is gone: data we send now is answered with a reset.

    (A socket the server still reads takes the data; a closed one answers RST,
    after which our next send fails with EPIPE or ECONNRESET.)
    """
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.sendall(build_frame(OP_PING, b"anyone?"))
            time.sleep(0.02)
    except (ConnectionResetError, BrokenPipeError):
        return
    raise AssertionError(
        f"no reset within {timeout} s: the server still held the connection open "
        f"past --close-timeout ({SERVER_CLOSE_TIMEOUT} s)"
    )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(lambda: text(b"{}", rsv=RSV1), 1002, id="rsv1-1002"),
        pytest.param(lambda: text(INVALID_UTF8["f7bfbfbf"]), 1007, id="invalid-utf8-1007"),
        pytest.param(
            lambda: text(b"{", declared_length=16 * 1024 * 1024), 1009, id="announced-16-mib-1009"
        ),
    ],
)
def test_rfc6455_silent_client_after_failure_gets_fin_within_close_timeout(
    chat_server, frame, code
):
    """After the server fails a connection, a client that never answers the close frame nor
    closes gets the server's FIN within --close-timeout (plus a margin), and by then the
    server's socket is gone: a frame sent afterwards gets a reset, not a reader."""
    with open_websocket(chat_server.port) as conn:
        join(conn)
        start = time.monotonic()
        conn.send_raw(frame())
        expect_close(conn, code, allow_text=False, reply=False)  # FIN within EOF_WAIT
        assert time.monotonic() - start < EOF_WAIT
        # The server lingers for our FIN, but only until --close-timeout.
        time.sleep(max(0.0, start + EOF_WAIT - time.monotonic()))
        assert_reset(conn.sock, EOF_MARGIN)


LINGER_ROUNDS = 6  # connections per case: the scheduling order that skipped the linger varied


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(lambda: text(b"{}", rsv=RSV1), 1002, id="rsv1-1002"),
        pytest.param(lambda: text(INVALID_UTF8["f7bfbfbf"]), 1007, id="invalid-utf8-1007"),
    ],
)
def test_rfc6455_close_reply_after_failure_is_read_not_reset(chat_server, frame, code):
    """After the server's close frame and FIN, the client's close reply (RFC 6455 5.5.1) is
    read by the server, which waits for the client's FIN: no reset. (A reset can destroy
    the close frame before a peer reads it, on stacks that drop unread data on one.)"""
    for _ in range(LINGER_ROUNDS):
        with open_websocket(chat_server.port) as conn:
            join(conn)
            conn.send_raw(frame())
            expect_close(conn, code, allow_text=False, reply=False)  # the frame, then FIN
            conn.send_close(code)  # what a browser does on reading them
            time.sleep(0.1)
            error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert error == 0, (
                f"the server reset the connection ({os.strerror(error)}) instead of reading "
                "the client's close reply until its FIN"
            )


def test_rfc6455_closing_handshake_done_closes_tcp_without_lingering(chat_server):
    """Once both close frames went by (the client's, then the server's reply), the server
    sends FIN and drops its socket at once, without waiting for the client's FIN: a frame
    the client sends afterwards gets a reset well within --close-timeout (RFC 6455 5.5.1:
    nothing follows a close frame, so there is nothing to linger for)."""
    with open_websocket(chat_server.port) as conn:
        join(conn)
        conn.send_close(1000)
        expect_close(conn, 1000, reply=False)  # the reply, then FIN
        assert_reset(conn.sock, SERVER_CLOSE_TIMEOUT / 2)


# --- the server stayed healthy ------------------------------------------------------------------


def test_rfc6455_server_logged_no_errors(chat_server):
    """After everything above (it runs last), the server is still up and logged no ERROR or traceback."""
    with open_websocket(chat_server.port) as conn:
        join(conn)
    assert chat_server.proc.poll() is None, "the server process died"
    output = chat_server.output_text()
    bad = [line for line in output.splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "server logged errors:\n" + "\n".join(bad[:20])
