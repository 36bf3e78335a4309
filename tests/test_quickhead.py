"""A WebSocket upgrade read without h11 (src/triochat/front/quickhead.py):
the heads browsers send are read quickly, exactly as h11 reads them; any
head it takes, h11 takes the same way; anything odd is left to h11."""

from __future__ import annotations

import time

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triochat.front.messages import Request
from triochat.front.quickhead import quick_upgrade
from triochat.front.wire import event_at_hand

LIMIT = 8192

LOADGEN = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8181\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
CHROMIUM = (
    b"GET /ws HTTP/1.1\r\nHost: localhost:8181\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
    b"(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\nOrigin: http://localhost:8181\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: a=1; b=2\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)
FIREFOX = (
    b"GET /?room=lobby HTTP/1.1\r\nHost: chat.example:443\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: https://chat.example\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-Fetch-Dest: empty\r\nSec-Fetch-Mode: websocket\r\nSec-Fetch-Site: same-origin\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUpgrade: websocket\r\n\r\n"
)


def h11_reads(data: bytes) -> tuple[h11.Request, bytes] | None:
    """The request h11 (as the front drives it) reads at the start of ``data``
    and what follows it; None when it refuses or needs more."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    conn.receive_data(data)
    try:
        event = event_at_hand(conn, head_limit=LIMIT)
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return event, conn.trailing_data[0]


def assert_read_as_h11_reads(data: bytes) -> Request:
    quick = quick_upgrade(data, LIMIT)
    assert quick is not None
    read = h11_reads(data)
    assert read is not None, "the quick path took a head h11 refuses"
    event, rest = read
    by_h11 = Request.from_h11(event)
    assert (quick.method, quick.target, quick.http_version) == (
        by_h11.method,
        by_h11.target,
        by_h11.http_version,
    )
    assert list(quick.fields) == list(by_h11.fields)
    assert quick.headers == by_h11.headers
    assert quick.path == by_h11.path
    assert quick.early == rest
    assert by_h11.early is None
    return quick


@pytest.mark.parametrize(
    "head", [LOADGEN, CHROMIUM, FIREFOX], ids=["loadgen", "chromium", "firefox"]
)
def test_quickhead_reads_what_clients_send_as_h11_does(head):
    frames = b"\x81\x85abcd" + bytes(b ^ k for b, k in zip(b"hello", b"abcdabcd", strict=False))
    request = assert_read_as_h11_reads(head + frames)
    assert request.early == frames
    assert "websocket" in request.headers["upgrade"].lower()


def _with(head: bytes, old: bytes, new: bytes) -> bytes:
    assert old in head
    return head.replace(old, new, 1)


@pytest.mark.parametrize(
    "data",
    [
        LOADGEN[:-2],  # not all here yet
        _with(LOADGEN, b"GET ", b"POST "),
        _with(LOADGEN, b"GET ", b"get "),
        _with(LOADGEN, b"HTTP/1.1", b"HTTP/1.0"),
        _with(LOADGEN, b"Upgrade: websocket", b"Upgrade: h2c"),
        _with(LOADGEN, b"Upgrade: websocket\r\n", b""),
        _with(LOADGEN, b"Host: 127.0.0.1:8181\r\n", b""),
        _with(LOADGEN, b"Host: 127.0.0.1:8181\r\n", b"Host: a\r\nHost: b\r\n"),
        _with(LOADGEN, b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"),
        _with(LOADGEN, b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        _with(LOADGEN, b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
        _with(LOADGEN, b"Connection: Upgrade\r\n", b"Connection:\r\n Upgrade\r\n"),  # folded
        _with(LOADGEN, b"Connection: Upgrade\r\n", b"Connection: Upgrade\n"),  # bare LF
        _with(LOADGEN, b"Connection: Upgrade", b"Connection: Up\x01grade"),
        _with(LOADGEN, b"Connection: Upgrade", "Connection: Üpgrade".encode("latin-1")),
        _with(LOADGEN, b"Connection: Upgrade", b"Connection : Upgrade"),
        _with(LOADGEN, b"Connection: Upgrade", b"X-Big: " + b"x" * LIMIT),
        b"\r\n" + LOADGEN,
    ],
)
def test_quickhead_leaves_anything_odd_to_h11(data):
    assert quick_upgrade(data, LIMIT) is None


_ODD_NAMES = [b"Host", b"host", b"Upgrade", b"Content-Length", b"Transfer-Encoding", b"Expect"]
_NAMES = st.sampled_from(
    [b"Connection", b"Sec-WebSocket-Key", b"Origin", b"X-Thing", b"x-other"] * 6
    + _ODD_NAMES
    + [b"Bad Name", b""]
)
_PLAIN_VALUES = [b"websocket", b"WebSocket, h2c", b"localhost", b"Upgrade", b"a  b\tc", b"5", b""]
_VALUES = st.one_of(*[st.sampled_from(_PLAIN_VALUES)] * 6, st.binary(max_size=12))
_LINE_ENDS = st.sampled_from([b"\r\n"] * 12 + [b"\n"])
_SPACES = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Upgrade-ish heads: mostly well formed, with every kind of oddity mixed in."""
    method = draw(st.sampled_from([b"GET"] * 8 + [b"POST", b"get"]))
    target = draw(st.sampled_from([b"/ws", b"/", b"/ws?x=1", b"/w s", b"*", b"/\x7f"]))
    version = draw(st.sampled_from([b"1.1"] * 8 + [b"1.0"]))
    out = [method + b" " + target + b" HTTP/" + version + draw(_LINE_ENDS)]
    if draw(st.integers(0, 4)):
        out.append(b"Host: localhost\r\nUpgrade: websocket\r\n")
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 19)) == 0:
            out.append(draw(_SPACES) + b" folded" + draw(_LINE_ENDS))
            continue
        name, value = draw(_NAMES), draw(_VALUES)
        line = name + b":" + draw(_SPACES) + value + draw(_SPACES) + draw(_LINE_ENDS)
        out.append(line)
    out.append(draw(_LINE_ENDS))
    out.append(draw(st.binary(max_size=8)))
    return b"".join(out)


def test_quickhead_takes_only_what_h11_reads_the_same():
    taken: list[bytes] = []

    @settings(max_examples=3000, deadline=None, database=None)
    @given(heads())
    def check(data: bytes) -> None:
        if quick_upgrade(data, LIMIT) is not None:
            assert_read_as_h11_reads(data)
            taken.append(data)

    check()
    # The property held over heads it takes, not only over ones it leaves to h11.
    assert len(taken) >= 100


@pytest.mark.parametrize(
    "end", [b"\x01", b"", b"\r\n"], ids=["bad byte", "unfinished", "no blank line"]
)
def test_quickhead_fails_a_long_run_of_blanks_in_linear_time(end):
    """A header line of blanks that is not a valid head after all: one pass,
    not one per way of splitting the blanks (h11's own line pattern is
    quadratic there: 60,000 blanks would take seconds; here milliseconds).
    The bound is two hundred times what it takes."""
    data = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nx:" + b" " * 60_000 + end
    started = time.perf_counter()
    assert quick_upgrade(data, None) is None
    assert time.perf_counter() - started < 1.0


def test_quickhead_counts_the_head_limit_as_the_front_does():
    padding = b"X-Pad: " + b"p" * 100 + b"\r\n"
    head = _with(LOADGEN, b"\r\n\r\n", b"\r\n" + padding * 20 + b"\r\n")
    size = len(b"/ws") + sum(len(n) + len(v) + 4 for n, v in quick_upgrade(head, None).fields)
    assert quick_upgrade(head, size) is not None
    assert quick_upgrade(head, size - 1) is None
    # ...and h11's path refuses the same head with that limit (431).
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    with pytest.raises(h11.RemoteProtocolError) as refused:
        event_at_hand(conn, head_limit=size - 1)
    assert refused.value.error_status_hint == 431
