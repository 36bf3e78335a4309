"""permessage-deflate (RFC 7692) on the chat endpoint (#13 part 5).

Two layers: the sans-I/O pieces (the offer negotiation, the inflating
extension driven by wsproto with no sockets, the compress-once framing of
`OutFrame`), then the real server process with ``--compression on`` (and
one with it off) through the strict raw client of `tests/wsraw.py`, which
inflates what the server compresses and checks every frame.
"""

from __future__ import annotations

import json
import os
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from triochat.cli import config_from_args
from triochat.errors import ConfigError
from triochat.frames import DEFLATE_MIN_BYTES, OutFrame, deflate_message
from triochat.front.handshake import vetted_upgrade
from triochat.front.messages import Request as FrontRequest
from triochat.transports.deflate import CLIENT_MAX_WINDOW_BITS, DeflateExtension, negotiate
from triochat.transports.wsopen import accept_upgrade

from .server_process import ServerProcess, run_server
from .test_browser import TIMEOUT
from .test_browser import browser as browser  # the fixture: Chromium, started once per module
from .test_browser import join as page_join
from .test_browser import say as page_say
from .wsraw import (
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RSV1,
    WsConn,
    build_frame,
    expect_close,
    open_websocket,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CLOSE_WAIT = 3.0  # seconds for a close frame to arrive
MAX_FRAME = 65536  # the server's default --max-frame-bytes
OFFER = "permessage-deflate; client_max_window_bits"  # what Chromium and websockets offer
#: What the server answers `OFFER` with.
ANSWER = f"permessage-deflate; server_no_context_takeover; client_max_window_bits={CLIENT_MAX_WINDOW_BITS}"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def deflate(data: bytes, compressor: Any = None) -> bytes:
    """One message compressed as RFC 7692 7.2.1 says (a fresh compressor unless given one)."""
    if compressor is None:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    out: bytes = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes, bits: int = 15) -> bytes:
    """A compressed message inflated alone (the server takes no context over)."""
    inflater = zlib.decompressobj(-bits)
    out = inflater.decompress(data + b"\x00\x00\xff\xff")
    assert not inflater.unused_data
    return out


# --- the option --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, False),
        (["--compression", "on"], {}, True),
        ([], {"TRIOCHAT_COMPRESSION": "on"}, True),
        (["--compression", "off"], {"TRIOCHAT_COMPRESSION": "on"}, False),
        (["--compression", "OFF"], {}, False),
    ],
)
def test_deflate_option_and_environment(
    argv: list[str], env: dict[str, str], expected: bool
) -> None:
    """--compression on|off (env TRIOCHAT_COMPRESSION; the command line wins); off by default."""
    assert config_from_args(argv, env).compression is expected


def test_deflate_option_bad_value() -> None:
    """Anything but on/off is refused: a usage error, or a ConfigError from the environment."""
    with pytest.raises(SystemExit):
        config_from_args(["--compression", "maybe"], {})
    with pytest.raises(ConfigError, match="TRIOCHAT_COMPRESSION"):
        config_from_args([], {"TRIOCHAT_COMPRESSION": "maybe"})


# --- negotiation (sans-I/O) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        pytest.param("permessage-deflate", "server_no_context_takeover", id="bare"),
        pytest.param(
            "permessage-deflate; client_max_window_bits",
            f"server_no_context_takeover; client_max_window_bits={CLIENT_MAX_WINDOW_BITS}",
            id="client-window-any",
        ),
        pytest.param(
            "permessage-deflate; client_max_window_bits=10",
            "server_no_context_takeover; client_max_window_bits=10",
            id="client-window-smaller",
        ),
        pytest.param(
            'permessage-deflate; client_max_window_bits="15"',
            f"server_no_context_takeover; client_max_window_bits={CLIENT_MAX_WINDOW_BITS}",
            id="client-window-quoted",
        ),
        pytest.param(
            "permessage-deflate; client_no_context_takeover",
            "server_no_context_takeover; client_no_context_takeover",
            id="client-no-context",
        ),
        pytest.param(
            "permessage-deflate; server_no_context_takeover",
            "server_no_context_takeover",
            id="server-no-context",
        ),
        pytest.param(
            "permessage-deflate; server_max_window_bits=9",
            "server_no_context_takeover; server_max_window_bits=9",
            id="server-window",
        ),
        pytest.param(
            "permessage-deflate;client_no_context_takeover;client_max_window_bits;"
            "server_no_context_takeover;server_max_window_bits=8",
            "server_no_context_takeover; server_max_window_bits=8; "
            f"client_no_context_takeover; client_max_window_bits={CLIENT_MAX_WINDOW_BITS}",
            id="everything",
        ),
    ],
)
def test_deflate_negotiate_accepts_valid_offer(offer: str, answer: str) -> None:
    """A valid offer is accepted; the answer always has server_no_context_takeover (RFC 7692 7.1)."""
    agreement = negotiate(offer)
    assert agreement is not None
    assert agreement.response() == answer


@pytest.mark.parametrize(
    "offer",
    [
        "x-webkit-deflate-frame",
        "permessage-deflate; unknown_param",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; client_max_window_bits=٩",
        "permessage-deflate;",
    ],
)
def test_deflate_negotiate_declines_invalid_offer(offer: str) -> None:
    """An offer with an unknown, repeated or invalid parameter is declined (RFC 7692 section 5)."""
    assert negotiate(offer) is None


def test_deflate_extension_takes_first_acceptable_offer() -> None:
    """wsproto asks about every offer; the first acceptable one is agreed, later ones declined."""
    extension = DeflateExtension(MAX_FRAME)
    assert not extension.enabled()
    assert extension.accept("permessage-deflate; bogus") is None
    assert extension.accept("permessage-deflate; client_no_context_takeover") == (
        "server_no_context_takeover; client_no_context_takeover"
    )
    assert extension.accept("permessage-deflate") is None
    assert extension.enabled()
    assert extension.agreement is not None
    assert extension.agreement.client_no_context_takeover


# --- the inflating extension, driven by wsproto (sans-I/O) -----------------------------


def _server_pair(
    limit: int = MAX_FRAME,
) -> tuple[WSConnection, WSConnection, DeflateExtension, str]:
    """A wsproto client offering its PerMessageDeflate, and our compressing server
    side (the request read by h11 and vetted as the front does, `accept_upgrade`),
    connected in memory; and the 101's head."""
    extension = DeflateExtension(limit)
    client = WSConnection(ConnectionType.CLIENT)
    front = h11.Connection(h11.SERVER)
    front.receive_data(
        client.send(Request(host="localhost", target="/ws", extensions=[PerMessageDeflate()]))
    )
    event = front.next_event()
    assert isinstance(event, h11.Request)
    upgrade = vetted_upgrade(FrontRequest.from_h11(event), "127.0.0.1", b"")
    response, server = accept_upgrade(upgrade.key, upgrade.offers, extension)
    client.receive_data(response)
    (accepted,) = list(client.events())
    assert isinstance(accepted, AcceptConnection)
    head = response.decode("latin-1").lower()
    return client, server, extension, head


def _messages(server: WSConnection) -> tuple[str, CloseConnection | None]:
    text, close = "", None
    for event in server.events():
        if isinstance(event, TextMessage):
            text += event.data
        elif isinstance(event, CloseConnection):
            close = event
    return text, close


def test_deflate_wsproto_handshake_and_context_takeover() -> None:
    """The 101 names the agreement; the client's compressed messages, with its context
    taken over from one message to the next, are inflated (RFC 7692 7.2.2)."""
    client, server, extension, head = _server_pair()
    assert "sec-websocket-extensions: permessage-deflate; server_no_context_takeover" in head
    assert extension.agreement is not None
    assert not extension.agreement.client_no_context_takeover
    said = ['{"type":"say","room":"lobby","msg":"hello hello hello"}'] * 3
    for text in said:
        server.receive_data(client.send(TextMessage(data=text)))
        got, close = _messages(server)
        assert close is None
        assert got == text
    # The client's compressor took its context over: later messages are tiny.
    assert len(client.send(TextMessage(data=said[0]))) < 20


def test_deflate_wsproto_zip_bomb_refused_while_inflating() -> None:
    """A message that inflates past the limit fails 1009 while it is inflated: the memory
    used stays far under what its deflate data would inflate to."""
    limit = 4096
    _, server, extension, _ = _server_pair(limit)
    bomb = deflate(b"a" * 20_000_000)  # about 20 KB of deflate: 20 MB inflated
    frame = build_frame(OP_TEXT, bomb, rsv=RSV1)
    tracemalloc.start()
    try:
        server.receive_data(frame)
        got, close = _messages(server)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert close is not None
    assert close.code == 1009
    assert len(got) <= limit
    assert extension.failure == (1009, "message too big")


def test_deflate_wsproto_bad_data_and_rsv1_misuse() -> None:
    """Deflate data that does not inflate is 1007; RSV1 on a continuation frame is 1002."""
    _, server, _, _ = _server_pair()
    server.receive_data(build_frame(OP_TEXT, b"\xff\xff\xff\xff", rsv=RSV1))
    _, close = _messages(server)
    assert close is not None
    assert close.code == 1007
    _, server, _, _ = _server_pair()
    payload = deflate(b'{"type":"say"}')
    server.receive_data(build_frame(OP_TEXT, payload[:3], rsv=RSV1, fin=False))
    server.receive_data(build_frame(OP_CONT, payload[3:], rsv=RSV1))
    _, close = _messages(server)
    assert close is not None
    assert close.code == 1002


def test_deflate_wsproto_ping_between_compressed_fragments() -> None:
    """A ping between two fragments of a compressed message leaves the message compressed
    (wsproto's own PerMessageDeflate forgets it there)."""
    _, server, _, _ = _server_pair()
    text = '{"type":"say","room":"lobby","msg":"' + "fragmented " * 20 + '"}'
    payload = deflate(text.encode())
    half = len(payload) // 2
    server.receive_data(build_frame(OP_TEXT, payload[:half], rsv=RSV1, fin=False))
    server.receive_data(build_frame(OP_PING, b"p"))
    server.receive_data(build_frame(OP_CONT, payload[half:]))
    got, close = _messages(server)
    assert close is None
    assert got == text


# --- compress once (sans-I/O) -----------------------------------------------------------


def test_deflate_outframe_compressed_once_and_shared() -> None:
    """`OutFrame.wsz` is computed once (the same object every time), has RSV1 and inflates,
    alone, to the frame's JSON."""
    json_bytes = json.dumps({"type": "message", "msg": "hello " * 40}).encode()
    frame = OutFrame(json_bytes)
    first = frame.wsz
    assert first is frame.wsz
    assert first[0] == 0x80 | 0x40 | 0x1  # FIN, RSV1, text
    assert len(first) < len(frame.ws)
    length = first[1] & 0x7F
    start = 2 if length < 126 else 4
    assert inflate(first[start:]) == json_bytes


def test_deflate_outframe_small_or_incompressible_stays_plain() -> None:
    """A payload under DEFLATE_MIN_BYTES, or one deflate does not shrink, goes out as is."""
    small = OutFrame(b'{"type":"typing","room":"lobby","name":"bob"}')
    assert small.payload_size < DEFLATE_MIN_BYTES
    assert small.wsz is small.ws
    random = OutFrame(os.urandom(400), binary=True)  # deflate cannot shrink it
    assert random.wsz is random.ws
    repetitive = OutFrame(bytes(range(256)) * 2, binary=True)
    assert repetitive.wsz[0] == 0x80 | 0x40 | 0x2  # FIN, RSV1, binary


def test_deflate_messages_independent() -> None:
    """Each message of the shared compressor inflates alone: no context is taken over."""
    first = b'{"type":"message","msg":"' + b"the same words again " * 10 + b'"}'
    deflate_message(first)
    second = deflate_message(first)
    assert inflate(second) == first
    assert inflate(second, bits=9) == first  # payload under 512 bytes: a 9-bit window will do


def test_deflate_messages_at_level_1() -> None:
    """The shared compressor runs at zlib level 1 (docs/performance.md, "Compression":
    the same CPU as the default level on chat frames, half of it on big ones):
    its output is level 1's, byte for byte, and not the default level's."""
    words = b" ".join(b"word%d of a longer chat line" % (i % 97) for i in range(400))
    payload = b'{"type":"message","msg":"' + words + b'"}'

    def raw_deflate(level: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 5)
        return (compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH))[:-4]

    assert raw_deflate(1) != raw_deflate(zlib.Z_DEFAULT_COMPRESSION)
    assert deflate_message(payload) == raw_deflate(1)
    assert inflate(deflate_message(payload)) == payload


# --- the real server, through the raw client -------------------------------------------


@pytest.fixture(scope="module")
def deflate_server() -> Iterator[ServerProcess]:
    """One server with --compression on for the module."""
    with run_server("--compression", "on", "--close-timeout", "2") as server:
        yield server


@pytest.fixture(scope="module")
def plain_server() -> Iterator[ServerProcess]:
    """One server with compression off (the default; said explicitly)."""
    with run_server("--close-timeout", "2", env={"TRIOCHAT_COMPRESSION": "off"}) as server:
        yield server


def offer(extensions: str = OFFER) -> list[tuple[str, str]]:
    return [("Sec-WebSocket-Extensions", extensions)]


def join(conn: WsConn, room: str | None = None, *, compressed: bool = False) -> tuple[str, str]:
    frame = {"type": "join", "room": room or unique("r"), "name": unique("u")}
    data = json.dumps(frame).encode()
    if compressed:
        conn.send_raw(build_frame(OP_TEXT, deflate(data), rsv=RSV1))
    else:
        conn.send_json(frame)
    conn.expect("joined", room=frame["room"], name=frame["name"], skip={"presence"})
    return frame["room"], frame["name"]


def test_deflate_negotiated_with_compression_on(deflate_server: ServerProcess) -> None:
    """--compression on: an offer gets permessage-deflate with server_no_context_takeover,
    and the log's open line says so."""
    with open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as conn:
        join(conn)
    assert "ws/ws permessage-deflate" in deflate_server.output_text()


@pytest.mark.parametrize(
    ("offered", "answer"),
    [
        pytest.param(
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            id="client-no-context",
        ),
        pytest.param(
            "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
            id="first-invalid-second-taken",
        ),
        pytest.param(
            "x-webkit-deflate-frame, permessage-deflate",
            "permessage-deflate; server_no_context_takeover",
            id="unknown-extension-skipped",
        ),
        pytest.param("permessage-deflate; server_max_window_bits=7", None, id="all-invalid"),
    ],
)
def test_deflate_offer_variants(deflate_server: ServerProcess, offered: str, answer: str) -> None:
    """Offers are answered per RFC 7692: the first valid one, its parameters echoed."""
    with open_websocket(deflate_server.port, extra=offer(offered), extensions=answer) as conn:
        join(conn)


def test_deflate_declined_with_compression_off(plain_server: ServerProcess) -> None:
    """--compression off (TRIOCHAT_COMPRESSION=off): the offer is declined, frames are plain."""
    with open_websocket(plain_server.port, extra=offer(), extensions=None) as conn:
        room, _ = join(conn)
        conn.send_json({"type": "say", "room": room, "msg": "x" * 300})
        conn.expect("message", room=room)
        assert all(frame.rsv == 0 for frame in conn.frames)


def test_deflate_no_offer_no_extension(deflate_server: ServerProcess) -> None:
    """With compression on, a client that offers nothing gets no extension."""
    with open_websocket(deflate_server.port, extensions=None) as conn:
        join(conn)


def test_deflate_compressed_client_messages_decoded(deflate_server: ServerProcess) -> None:
    """Compressed client messages are inflated, with the client's context taken over
    from one message to the next (it did not agree to client_no_context_takeover)."""
    with open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as conn:
        room, _ = join(conn, compressed=True)
        compressor = zlib.compressobj(6, zlib.DEFLATED, -CLIENT_MAX_WINDOW_BITS)
        sizes = []
        for index in range(3):
            say = {"type": "say", "room": room, "msg": "the same words again", "ref": f"r{index}"}
            payload = deflate(json.dumps(say).encode(), compressor)
            sizes.append(len(payload))
            conn.send_raw(build_frame(OP_TEXT, payload, rsv=RSV1))
            conn.expect("message", room=room, msg="the same words again")
            conn.expect("ack", ref=f"r{index}")
        assert sizes[1] < sizes[0] / 2  # the context was really taken over


def test_deflate_broadcast_identical_compressed_bytes_and_plain_for_others(
    deflate_server: ServerProcess,
) -> None:
    """A broadcast reaches two compressing members as the same compressed bytes (RSV1),
    and a member that did not offer compression as a plain frame of the same JSON."""
    text = "compressed once for every member: " + "na " * 60
    with (
        open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as alice,
        open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as bob,
        open_websocket(deflate_server.port) as carol,
    ):
        room, _ = join(alice)
        join(bob, room)
        join(carol, room)
        alice.send_json({"type": "say", "room": room, "msg": text})
        received = {}
        for name, conn in (("alice", alice), ("bob", bob), ("carol", carol)):
            message = conn.expect("message", room=room, msg=text, skip={"presence"})
            received[name] = (conn.frames[-1], message)
    (alice_frame, alice_msg), (bob_frame, bob_msg), (carol_frame, carol_msg) = received.values()
    assert alice_frame.rsv == bob_frame.rsv == RSV1
    assert alice_frame.wire == bob_frame.wire
    assert carol_frame.rsv == 0
    assert len(alice_frame.wire) < len(carol_frame.wire)
    assert alice_msg == bob_msg == carol_msg
    assert inflate(alice_frame.payload) == carol_frame.payload


def test_deflate_small_window_gets_long_frames_plain(deflate_server: ServerProcess) -> None:
    """server_max_window_bits=9: a payload over 512 bytes comes uncompressed, a shorter one
    compressed and inflatable with a 9-bit window (RFC 7692 7.1.2.1)."""
    answer = "permessage-deflate; server_no_context_takeover; server_max_window_bits=9"
    offered = "permessage-deflate; server_max_window_bits=9"
    with open_websocket(deflate_server.port, extra=offer(offered), extensions=answer) as conn:
        room, _ = join(conn)
        for size, compressed in ((300, True), (700, False)):
            msg = "ab" * (size // 2)
            conn.send_json({"type": "say", "room": room, "msg": msg})
            conn.expect("message", room=room, msg=msg)
            frame = conn.frames[-1]
            assert bool(frame.rsv) == compressed, (size, frame)
            if compressed:
                assert json.loads(inflate(frame.payload, bits=9))["msg"] == msg


def test_deflate_zip_bomb_closed_1009(deflate_server: ServerProcess) -> None:
    """A compressed frame well under --max-frame-bytes that inflates past it is closed 1009,
    decided while inflating: the first fragment already does it."""
    bomb = deflate(b"a" * (50 * MAX_FRAME))
    assert len(bomb) < MAX_FRAME // 2
    with open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as conn:
        join(conn)
        conn.send_raw(build_frame(OP_TEXT, bomb, rsv=RSV1, fin=False))  # the rest never comes
        expect_close(conn, 1009, CLOSE_WAIT, allow_text=False)


def test_deflate_announced_length_over_limit_still_1009_from_header(
    deflate_server: ServerProcess,
) -> None:
    """A compressed frame whose header announces more than --max-frame-bytes is refused at
    its header (FrameSizeGuard), as an uncompressed one."""
    with open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as conn:
        join(conn)
        conn.send_raw(build_frame(OP_TEXT, b"", rsv=RSV1, declared_length=16 * 1024 * 1024))
        expect_close(conn, 1009, CLOSE_WAIT, allow_text=False)


_RSV1_TEXT = [build_frame(OP_TEXT, deflate(b'{"type":"join"}'), rsv=RSV1)]
_RSV1_PING = [build_frame(OP_PING, b"p", rsv=RSV1)]
_RSV1_CONT = [
    build_frame(OP_TEXT, b'{"type":', fin=False),
    build_frame(OP_CONT, b'"join"}', rsv=RSV1),
]


@pytest.mark.parametrize(
    ("extensions", "frames"),
    [
        pytest.param(None, _RSV1_TEXT, id="text-not-negotiated"),
        pytest.param(None, _RSV1_PING, id="ping-not-negotiated"),
        pytest.param(None, _RSV1_CONT, id="continuation-not-negotiated"),
        pytest.param(ANSWER, _RSV1_PING, id="ping-negotiated"),
        pytest.param(ANSWER, _RSV1_CONT, id="continuation-negotiated"),
    ],
)
def test_deflate_rsv1_misuse_closes_1002(
    deflate_server: ServerProcess, extensions: str | None, frames: list[bytes]
) -> None:
    """RSV1 without negotiation (compression on, but nothing offered), or on a control or
    continuation frame, is closed 1002 (RFC 7692 section 6)."""
    extra = offer() if extensions else []
    with open_websocket(deflate_server.port, extra=extra, extensions=extensions) as conn:
        for data in frames:
            conn.send_raw(data)
        expect_close(conn, 1002, CLOSE_WAIT, allow_text=False)


def test_deflate_invalid_compressed_data_closes_1007(deflate_server: ServerProcess) -> None:
    """A compressed message that is not valid deflate data is closed 1007."""
    with open_websocket(deflate_server.port, extra=offer(), extensions=ANSWER) as conn:
        conn.send_raw(build_frame(OP_TEXT, b"\xff\xff\xff\xff", rsv=RSV1))
        expect_close(conn, 1007, CLOSE_WAIT, allow_text=False)


# --- Chromium, with compression on ------------------------------------------------------


@pytest.mark.browser
def test_deflate_browser_page_chats_compressed(browser: Browser) -> None:
    """Chromium's page chats with --compression on: both pages negotiate
    permessage-deflate (the 101 Chromium saw, and the server's open lines say
    so), Chromium's compressed messages are inflated with its context taken
    over, and a long broadcast (compressed once) shows on both pages."""
    from playwright.sync_api import expect  # importable: the fixture skips otherwise

    problems: list[str] = []
    with run_server("--compression", "on", "--presence-grace", "0.5") as server:
        handshakes: list[str] = []
        contexts = []
        pages = []
        for _ in range(2):
            context = browser.new_context()
            contexts.append(context)
            page = context.new_page()
            page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )
            # The handshake as Chromium saw it (its DevTools protocol).
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.on(
                "Network.webSocketHandshakeResponseReceived",
                lambda event: handshakes.append(
                    {k.lower(): v for k, v in event["response"]["headers"].items()}.get(
                        "sec-websocket-extensions", ""
                    )
                ),
            )
            page.goto(server.base_url + "/")
            pages.append(page)
        try:
            alice, bob = pages
            page_join(alice, "alice")
            page_join(bob, "bob")
            text = "a long line, compressed once for every member: " + "la " * 60
            for sender, receiver in ((alice, bob), (bob, alice), (alice, bob)):
                page_say(sender, text)
                row = receiver.locator("#messages .msg").last
                expect(row.locator(".msg-text")).to_have_text(text.strip(), timeout=TIMEOUT)
        finally:
            for context in contexts:
                context.close()
        opened = [line for line in server.output_text().splitlines() if " open " in line]
    assert problems == []
    assert len(handshakes) == 2
    assert all(h.startswith("permessage-deflate; server_no_context_takeover") for h in handshakes)
    assert sum("ws/ws permessage-deflate" in line for line in opened) == 2, opened
