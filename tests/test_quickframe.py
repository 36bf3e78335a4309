"""A read that is one plain text frame, read without wsproto
(src/triochat/transports/quickframe.py): what it takes, wsproto would have
read as exactly that message, leaving its state as it found it; anything
odd, or any read while wsproto is inside a frame or a message, is left to
wsproto."""

from __future__ import annotations

import itertools
import json
import struct

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import ParseFailed
from wsproto.utilities import RemoteProtocolError

from triochat.transports import websocket
from triochat.transports.deflate import DeflateExtension
from triochat.transports.quickframe import quick_text
from triochat.transports.wsopen import EstablishedProtocol

from .test_http import open_handshake, read_ws_frame, ws_frame
from .wsraw import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, RSV1, build_frame

LIMIT = 65536
JOIN = b'{"type":"join","room":"lobby","name":"alice"}'


def established(*before: bytes) -> EstablishedProtocol:
    """A server's established wsproto that has read ``before`` (and handed its events out)."""
    protocol = EstablishedProtocol([])
    for data in before:
        protocol.receive_data(data)
        list(protocol.events())
    return protocol


def wsproto_reads(protocol: EstablishedProtocol, data: bytes) -> list[object]:
    """What wsproto makes of ``data``: its events, or the error it fails with."""
    protocol.receive_data(data)
    try:
        return list(protocol.events())
    except (ParseFailed, RemoteProtocolError) as exc:
        return [exc]


def between_frames(protocol: EstablishedProtocol) -> bool:
    connection = protocol.connection
    assert connection is not None
    frames = connection._proto
    decoder = frames._frame_decoder
    return (
        connection.state is ConnectionState.OPEN
        and decoder.header is None
        and not len(decoder.buffer)
        and frames._message_decoder.opcode is None
    )


def test_quickframe_reads_a_join_as_wsproto_does():
    data = build_frame(OP_TEXT, JOIN)
    protocol = established()
    assert quick_text(protocol, data, LIMIT) == JOIN.decode()
    [event] = wsproto_reads(established(), data)
    assert isinstance(event, TextMessage)
    assert event.data == JOIN.decode()
    assert between_frames(protocol)  # (quick_text changed nothing)


def test_quickframe_reads_a_16_bit_length_and_unicode():
    text = '{"type":"say","msg":"' + "héllo wörld ✓ 🙂 " * 20 + '"}'
    data = build_frame(OP_TEXT, text)
    assert data[1] & 0x7F == 126
    assert quick_text(established(), data, LIMIT) == text


def test_quickframe_leaves_what_is_not_one_plain_text_frame_to_wsproto():
    protocol = established()
    plain = build_frame(OP_TEXT, JOIN)
    odd = {
        "binary": build_frame(OP_BINARY, JOIN),
        "continuation": build_frame(OP_CONT, JOIN),
        "not final": build_frame(OP_TEXT, JOIN, fin=False),
        "ping": build_frame(OP_PING, b"hi"),
        "close": build_frame(OP_CLOSE, b"\x03\xe8"),
        "rsv1": build_frame(OP_TEXT, JOIN, rsv=RSV1),
        "unmasked": build_frame(OP_TEXT, JOIN, mask=False),
        "16-bit length for a short one": build_frame(OP_TEXT, JOIN, length_bytes=2),
        "64-bit length": build_frame(OP_TEXT, b"x" * 200, length_bytes=8),
        "two frames": plain + plain,
        "a frame and a half": plain + plain[:5],
        "half a frame": plain[:-1],
        "a header alone": plain[:6],
        "invalid utf-8": build_frame(OP_TEXT, b'{"msg":"\xff"}'),
        "a lone surrogate": build_frame(OP_TEXT, b'{"msg":"\xed\xa0\x80"}'),
        "an overlong form": build_frame(OP_TEXT, b'{"msg":"\xc0\x80"}'),
        "above U+10FFFF": build_frame(OP_TEXT, b'{"msg":"\xf4\x90\x80\x80"}'),
        # Unmasked, and the read one byte longer than a masked frame would be.
        "unmasked, masked-frame size": build_frame(OP_TEXT, b"x" * 10, mask=False)
        + build_frame(OP_PING, b"hi", mask=False),
        "a truncated code point": build_frame(OP_TEXT, b'{"msg":"\xe2\x82'),
        "over the size limit": build_frame(OP_TEXT, b"x" * (LIMIT + 1)),
        "empty": b"",
    }
    for why, data in odd.items():
        assert quick_text(protocol, data, LIMIT) is None, why
    assert between_frames(protocol)


def test_quickframe_holds_to_the_message_size_limit():
    data = build_frame(OP_TEXT, JOIN)
    assert quick_text(established(), data, len(JOIN)) == JOIN.decode()
    assert quick_text(established(), data, len(JOIN) - 1) is None  # (wsproto's 1009)


def test_quickframe_reads_nothing_for_a_client():
    client = EstablishedProtocol([])
    client.connection = Connection(ConnectionType.CLIENT)
    assert quick_text(client, build_frame(OP_TEXT, JOIN), LIMIT) is None


def test_quickframe_reads_nothing_while_wsproto_is_inside_a_frame_or_message():
    plain = build_frame(OP_TEXT, JOIN)
    inside = {
        # A fragmented message begun: a final text frame now is wsproto's 1002.
        "a message begun": established(build_frame(OP_TEXT, b'{"type":', fin=False)),
        # A frame's first bytes buffered: this read is the rest of that frame.
        "a frame begun": established(build_frame(OP_TEXT, JOIN)[:3]),
        # A frame's header read (its 16-bit length and mask key), no payload yet.
        "a header read": established(build_frame(OP_TEXT, b"x" * 300)[:8]),
        # Part of a frame's payload read.
        "a payload begun": established(build_frame(OP_TEXT, b"x" * 300)[:10]),
    }
    for why, protocol in inside.items():
        assert not between_frames(protocol), why
        assert quick_text(protocol, plain, LIMIT) is None, why


def test_quickframe_reads_nothing_once_the_close_handshake_began():
    plain = build_frame(OP_TEXT, JOIN)
    ours = established()
    ours.send(CloseConnection(code=1000))  # our close frame is out
    assert quick_text(ours, plain, LIMIT) is None
    theirs = established(build_frame(OP_CLOSE, b"\x03\xe8"))
    assert quick_text(theirs, plain, LIMIT) is None


def test_quickframe_reads_nothing_with_compression_agreed():
    extension = DeflateExtension(LIMIT)
    assert extension.accept("permessage-deflate") is not None
    assert extension.enabled()
    protocol = EstablishedProtocol([extension])
    assert quick_text(protocol, build_frame(OP_TEXT, JOIN), LIMIT) is None


@st.composite
def reads(draw: st.DrawFn) -> bytes:
    """One read from a client: mostly a plain text frame, often an odd one."""
    if draw(st.booleans()):
        payload = draw(st.text(max_size=300)).encode()
    else:
        payload = draw(st.binary(max_size=300))
    opcode = draw(st.sampled_from([OP_TEXT] * 6 + [OP_CONT, OP_BINARY, OP_PING, 3, 11]))
    fin = draw(st.sampled_from([True] * 6 + [False]))
    rsv = draw(st.sampled_from([0] * 8 + [1, 2, 4]))
    mask = draw(st.sampled_from([True] * 8 + [False]))
    minimal = 0 if len(payload) <= 125 else 2
    length_bytes = draw(st.sampled_from([minimal] * 6 + [2, 8]))
    if opcode in (OP_PING, 11) and len(payload) > 125:
        payload = payload[:125]
        length_bytes = 0
    data = build_frame(
        opcode,
        payload,
        fin=fin,
        rsv=rsv,
        mask=mask,
        mask_key=draw(st.binary(min_size=4, max_size=4)),
        length_bytes=length_bytes,
    )
    cut = draw(st.sampled_from(["whole"] * 6 + ["short", "more"]))
    if cut == "short":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif cut == "more":
        data += draw(st.binary(min_size=1, max_size=20))
    return data


def test_quickframe_takes_only_what_wsproto_reads_the_same():
    taken: list[bytes] = []

    @settings(max_examples=3000, deadline=None, database=None)
    @given(reads(), st.integers(16, 400))
    def check(data: bytes, limit: int) -> None:
        protocol = established()
        text = quick_text(protocol, data, limit)
        assert between_frames(protocol)
        if text is None:
            return
        twin = established()
        events = wsproto_reads(twin, data)
        assert len(events) == 1, events
        [event] = events
        assert isinstance(event, TextMessage), event
        assert isinstance(event, Message)
        assert event.message_finished
        assert event.data == text
        assert len(data) - (8 if len(text.encode()) >= 126 else 6) <= limit
        assert between_frames(twin)  # so skipping wsproto left it where it would be
        taken.append(data)

    check()
    # The property held over reads it takes, not only over ones it leaves to wsproto.
    assert len(taken) >= 150


def reader(
    reads: list[bytes], *, quick: bool, limit: int, taken: list[str] | None = None
) -> list[object]:
    """What `WebSocketTransport.receive_message`'s loop makes of ``reads`` (one
    socket read each): messages (trio-websocket's size limit applied), pings,
    the close, and where wsproto stands at the end."""
    protocol = established()
    out: list[object] = []
    parts: list[str | bytes] = []
    size = 0
    pending = iter(reads)
    while True:
        for event in protocol.events():
            if isinstance(event, TextMessage | BytesMessage):
                size += len(event.data)
                parts.append(event.data)
                if size > limit:
                    return [*out, 1009]
                if event.message_finished:
                    joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                    out.append(joined)
                    parts, size = [], 0
            elif isinstance(event, Ping):
                out.append(("ping", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                return [*out, ("close", int(event.code))]
        data = next(pending, None)
        if data is None:
            return [*out, ("end", between_frames(protocol))]
        if quick and (text := quick_text(protocol, data, limit)) is not None:
            out.append(text)
            if taken is not None:
                taken.append(text)
            continue
        try:
            protocol.receive_data(data)
        except (ParseFailed, RemoteProtocolError):
            return [*out, "refused"]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A client's frames (plain, fragmented around a ping, binary, control,
    broken) and the same bytes as socket reads: one frame each, or cut anywhere."""
    keys = st.binary(min_size=4, max_size=4)
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        text = draw(st.text(max_size=200)).encode()
        kind = draw(
            st.sampled_from(["plain"] * 6 + ["fragments", "binary", "ping", "close", "bad"])
        )
        if kind == "plain":
            frames.append(build_frame(OP_TEXT, text, mask_key=draw(keys)))
        elif kind == "fragments":
            cut = draw(st.integers(0, len(text)))
            frames.append(build_frame(OP_TEXT, text[:cut], fin=False, mask_key=draw(keys)))
            frames.append(build_frame(OP_PING, b"p", mask_key=draw(keys)))
            frames.append(build_frame(OP_CONT, text[cut:], mask_key=draw(keys)))
        elif kind == "binary":
            frames.append(build_frame(OP_BINARY, text, mask_key=draw(keys)))
        elif kind == "ping":
            frames.append(build_frame(OP_PING, text[:125], mask_key=draw(keys)))
        elif kind == "close":
            frames.append(build_frame(OP_CLOSE, b"\x03\xe8", mask_key=draw(keys)))
        else:
            frames.append(build_frame(OP_TEXT, text + b"\xc0\x80", mask_key=draw(keys)))
    if draw(st.booleans()):
        return frames, frames
    stream = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8))))
    bounds = [0, *cuts, len(stream)]
    return frames, [stream[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def test_quickframe_leaves_a_stream_of_reads_as_wsproto_reads_it():
    """Over many reads in a row (fragments, pings, broken frames between plain
    ones): the same messages, in the same order, and the same end."""
    taken: list[str] = []

    @settings(max_examples=1500, deadline=None, database=None)
    @given(streams(), st.sampled_from([16, 100, 65536]))
    def check(stream: tuple[list[bytes], list[bytes]], limit: int) -> None:
        _, reads = stream
        quick = reader(reads, quick=True, limit=limit, taken=taken)
        assert quick == reader(reads, quick=False, limit=limit)

    check()
    # Reads were taken quickly, between the others, not only left to wsproto.
    assert len(taken) >= 300


async def test_quickframe_on_the_real_endpoint(server, monkeypatch):
    """Through the server's socket: a join and a say arrive as one plain frame
    each and are read quickly; fragments, then a text frame inside a
    fragmented message (wsproto's 1002), go to wsproto as before."""
    results: list[str | None] = []

    def counted(protocol: object, data: bytes, max_size: int) -> str | None:
        text = quick_text(protocol, data, max_size)
        results.append(text)
        return text

    monkeypatch.setattr(websocket, "quick_text", counted)
    join = json.dumps({"type": "join", "room": "lobby", "name": "alice"}).encode()
    say = json.dumps({"type": "say", "room": "lobby", "msg": "héllo 🙂", "ref": "s1"}).encode()
    with trio.fail_after(10):
        async with open_handshake(server) as (response, conn):
            assert response.status == 101
            await conn.send(ws_frame(join))
            _, payload = await read_ws_frame(conn)
            assert json.loads(payload)["type"] == "joined"
            await conn.send(ws_frame(say))
            seen = {json.loads((await read_ws_frame(conn))[1])["type"] for _ in range(2)}
            assert seen == {"message", "ack"}
            assert results == [join.decode(), say.decode()]
            # A fragmented say: the first fragment is wsproto's, and so is what follows.
            await conn.send(ws_frame(say[:10], fin=False))
            await trio.sleep(0.05)  # (its own read)
            await conn.send(ws_frame(say))  # a new text frame mid-message: 1002
            first, payload = await read_ws_frame(conn)
    # (One read or two: the server may read both frames at once.)
    assert len(results) >= 3
    assert results[2:] == [None] * (len(results) - 2)
    assert first & 0x0F == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1002
