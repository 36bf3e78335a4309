"""The bytes h11 refuses in a request head, found before h11 reads it
(`front.messages.screen_head`): the same verdict as h11's, in linear time
where h11's line pattern takes the square of a run of blanks."""

from __future__ import annotations

import time

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triochat.front.messages import screen_head
from triochat.front.wire import event_at_hand

from .test_quickhead import LOADGEN, heads

_ODD_BYTES = st.sampled_from([b"\x00", b"\x0b", b"\x0c", b"\r", b"\x01", b"\x7f", b"\xff", b" "])


@st.composite
def heads_with_odd_bytes(draw: st.DrawFn) -> bytes:
    """`heads`, with a few odd bytes put anywhere (head, end, body)."""
    data = bytearray(draw(heads()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(_ODD_BYTES)
    return bytes(data)


def h11_refuses(data: bytes) -> bool:
    """Whether h11 alone (no screen) refuses the request head at the start of ``data``."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(data) + 1)
    conn.receive_data(data)
    try:
        conn.next_event()
    except h11.RemoteProtocolError:
        return True
    return False


def test_screen_refuses_only_what_h11_refuses():
    refused: list[bytes] = []

    @settings(max_examples=3000, deadline=None, database=None)
    @given(heads_with_odd_bytes())
    def check(data: bytes) -> None:
        try:
            screen_head(data)
        except h11.RemoteProtocolError as exc:
            assert exc.error_status_hint == 400
            assert h11_refuses(data), "screened a head h11 takes"
            refused.append(data)

    check()
    assert len(refused) >= 100  # the property held over heads it refused


@pytest.mark.parametrize("byte", [b"\x00", b"\x0b", b"\x0c", b"\ra"])
def test_screen_refuses_each_byte_h11_refuses_in_a_complete_head(byte):
    head = LOADGEN.replace(b"Upgrade: websocket", b"Upgrade: web" + byte + b"socket")
    with pytest.raises(h11.RemoteProtocolError):
        screen_head(head)
    assert h11_refuses(head)


@pytest.mark.parametrize(
    "data",
    [
        LOADGEN,
        LOADGEN.replace(b"\r\n", b"\n"),  # bare LF lines, as h11 takes them
        LOADGEN[:-3],  # not complete yet: nothing to screen
        LOADGEN[:-1] + b"\x00",  # the same, the last byte odd
        LOADGEN + b"\x00\x0b\x0c\r binary body or frames",  # after the head: not the head's
        b"GET / HTTP/1.1\r",  # a CR whose LF has not arrived
    ],
    ids=["plain", "lf", "partial", "partial-odd", "after-head", "cr-last"],
)
def test_screen_leaves_the_rest_alone(data):
    screen_head(data)


def test_screen_makes_a_long_run_of_blanks_then_a_nul_cheap():
    """h11 alone takes seconds over 60,000 blanks and a NUL (0.8 s at 16,000,
    quadratic); through the front's `event_at_hand`, a 400 in milliseconds.
    The bound is two hundred times what it takes."""
    data = b"GET / HTTP/1.1\r\nHost: a\r\nx:" + b" " * 60_000 + b"\x00\r\n\r\n"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(data) + 1)
    conn.receive_data(data)
    started = time.perf_counter()
    with pytest.raises(h11.RemoteProtocolError) as refused:
        event_at_hand(conn, head_limit=None)
    assert time.perf_counter() - started < 1.0
    assert refused.value.error_status_hint == 400
