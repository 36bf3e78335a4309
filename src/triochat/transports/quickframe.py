"""A read that is one plain text frame, unmasked without wsproto (#16).

wsproto reads a frame in about twenty Python calls (its buffer, a header,
a masker, a frame, a message decoder, an event): on a slow machine 18 µs
for a join, a tenth of a connection's setup. Most reads of a chat are one
small message whose frame arrived whole: `quick_text` reads that case
alone, and only between two frames of wsproto's (nothing of a frame or a
fragmented message held), so wsproto's state after it is what it would
have been had wsproto read the frame.

The plain case: one final text frame (FIN, no RSV bits, opcode 1), masked,
its length in 7 bits or in 16 (used only from 126 on, as RFC 6455 §5.2
requires), the read exactly that frame, within the message size limit, and
valid UTF-8. Anything else (a control frame, a fragment, an unmasked or
reserved-bit frame, a second frame in the read, invalid UTF-8, compression)
returns None and is wsproto's, which answers what is broken as before.
tests/test_quickframe.py compares the two.

Rule: no I/O and no answers here: whatever is in doubt is wsproto's.
"""

from __future__ import annotations

from wsproto import WSConnection
from wsproto.connection import ConnectionState

__all__ = ["quick_text"]

_FIN_TEXT = 0x81  # FIN, no RSV bits, opcode 1 (text)


def quick_text(protocol: WSConnection, data: bytes | bytearray, max_size: int) -> str | None:
    """The message ``data`` holds when it is exactly one plain text frame (module
    docstring) and ``protocol`` (a server's, open) is between frames; None
    when wsproto must read ``data``."""
    size = len(data)
    if size < 6 or data[0] != _FIN_TEXT:
        return None
    length = data[1] ^ 0x80  # (the mask bit cleared; an unmasked frame stays >= 128)
    if length < 126:
        start = 6
    elif length == 126 and size >= 8:
        length = (data[2] << 8) | data[3]
        if length < 126:
            return None  # (wsproto refuses a length that 7 bits could hold)
        start = 8
    else:
        return None
    if size != start + length or length > max_size:
        return None
    # wsproto between frames: nothing of a frame buffered, no message begun,
    # no extension (permessage-deflate's frames are its own).
    connection = protocol.connection
    if connection is None or connection.client or connection.state is not ConnectionState.OPEN:
        return None  # (a client's wsproto refuses masked frames)
    frames = connection._proto
    decoder = frames._frame_decoder
    if (
        decoder.header is not None
        or len(decoder.buffer)
        or frames._message_decoder.opcode is not None
        or frames.extensions
    ):
        return None
    key = data[start - 4 : start]
    mask = (key * (length // 4 + 1))[:length]
    unmasked = int.from_bytes(data[start:], "little") ^ int.from_bytes(mask, "little")
    try:
        return unmasked.to_bytes(length, "little").decode("utf-8")
    except UnicodeDecodeError:
        return None
