"""`FrameSizeGuard`: a message over the limit is refused at its header (#13).

The guard reads client frame headers as the bytes go by, however the reads
split them, so the server can close with 1009 before a huge payload arrives.
"""

from __future__ import annotations

import os
import struct

from hypothesis import given
from hypothesis import strategies as st

from triochat.transports.websocket import FrameSizeGuard, close_frame, log_safe

LIMIT = 1000


def frame(opcode: int, length: int, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame header for ``length`` payload bytes, plus that payload."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    return header + (os.urandom(4) if masked else b"") + b"x" * length


def feed_in_pieces(guard: FrameSizeGuard, data: bytes, cuts: list[int]) -> int | None:
    """Feed ``data`` split at ``cuts``; the offset in ``data`` the guard reports, or None."""
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        found = guard.feed(data[start:end])
        if found is not None:
            return start + found
        start = end
    return None


def test_frame_guard_refuses_at_the_header_before_the_payload():
    """A header announcing 16 MiB is refused with only the header read."""
    guard = FrameSizeGuard(65536)
    header = frame(1, 16 << 20)[:14]
    assert guard.feed(header) == 0


def test_frame_guard_passes_messages_up_to_the_limit():
    """A message of exactly the limit, and control frames, pass."""
    guard = FrameSizeGuard(LIMIT)
    data = frame(1, LIMIT) + frame(9, 125) + frame(10, 0) + frame(2, 10)
    assert guard.feed(data) is None


def test_frame_guard_adds_up_fragments():
    """Fragments count together: the one that takes the message over is refused,
    and a new message starts the count again."""
    guard = FrameSizeGuard(LIMIT)
    ok = frame(1, 600, fin=False) + frame(9, 4) + frame(0, 400) + frame(1, 900, fin=False)
    over = frame(0, 101)
    assert guard.feed(ok + over) == len(ok)


def test_frame_guard_reports_a_header_begun_in_an_earlier_read_at_zero():
    """A header split over two reads is still read; its start in the later read is 0."""
    guard = FrameSizeGuard(LIMIT)
    data = frame(1, 5) + frame(1, 70000)[:14]
    assert guard.feed(data[:8]) is None
    assert guard.feed(data[8:13]) is None
    assert guard.feed(data[13:]) == 0


@given(
    lengths=st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 9, 10]), st.integers(0, 1500), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 20000), max_size=8),
)
def test_frame_guard_answer_does_not_depend_on_how_reads_split(lengths, cuts):
    """Any frames, split anywhere: the guard finds the first over-limit header, and only it."""
    data = b""
    over: tuple[int, int] | None = None  # where the refused header starts and ends
    message = 0
    for opcode, length, fin in lengths:
        if opcode >= 8:
            length = min(length, 125)
        else:
            message = length if opcode else message + length
        encoded = frame(opcode, length, fin=fin)
        if opcode < 8 and message > LIMIT:
            over = (len(data), len(data) + len(encoded) - length)
        data += encoded
        if over is not None:
            break
    cuts = [cut % (len(data) + 1) for cut in cuts]
    found = feed_in_pieces(FrameSizeGuard(LIMIT), data, cuts)
    if over is None:
        assert found is None
    else:
        # The start of the header, or of the read that completed a header split over reads.
        completing_read = max([cut for cut in cuts if cut < over[1]], default=0)
        assert found == max(over[0], completing_read)


def test_close_frame_cuts_a_long_reason_on_a_character_boundary():
    """A close frame's payload stays within 125 bytes and valid UTF-8."""
    data = close_frame(1002, "é" * 100)
    assert data[0] == 0x88
    assert data[1] == len(data) - 2 <= 125
    assert struct.unpack("!H", data[2:4]) == (1002,)
    data[4:].decode("utf-8")


def test_log_safe_escapes_what_could_forge_a_log_line():
    """A peer's text in a log line: no newline, ANSI escape or bidi control raw, and cut."""
    shown = log_safe("bye\nERROR triochat.hub: fake\x1b[31m\u202e")
    assert "\n" not in shown
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert shown == '"bye\\nERROR triochat.hub: fake\\x1b[31m\\u202e"'
    assert log_safe("a" * 100, limit=10) == '"aaaaaaaaaa..."'
