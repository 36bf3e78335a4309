"""Outbound frames, encoded once and framed once per transport.

A broadcast to N members builds one `OutFrame`; every recipient's writer
takes the same bytes (`ws` or `sse`), so the per-delivery cost is a list
append, not a JSON encode or a WebSocket frame build.

permessage-deflate (RFC 7692) keeps that: a frame is compressed at most once
(`OutFrame.wsz`, when the first connection that negotiated compression needs
it), without context takeover, so every such connection gets the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from .protocol import JoinedReply, ServerFrame, encode

__all__ = [
    "DEFLATE_MIN_BYTES",
    "OutFrame",
    "deflate_message",
    "websocket_frame",
    "websocket_text_frame",
]

_FIN: Final = 0x80  # a whole message in one frame; server frames are never masked
OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2
#: RSV1 on a message's first frame: "Per-Message Compressed" (RFC 7692 section 6).
RSV1: Final = 0x40

#: Payloads shorter than this go out uncompressed even on a compressing
#: connection (RSV1 clear: allowed per message, RFC 7692 section 6). Without
#: context takeover deflate saves little on them (measured: 5 bytes on a
#: 45-62 byte typing or presence frame, 13 on a 100-byte message) for about 10 µs of
#: CPU each (docs/performance.md, "Compression").
DEFLATE_MIN_BYTES: Final = 128
#: The empty stored block a sync or full flush ends with; RFC 7692 7.2.1 has
#: the sender remove it and 7.2.2 the receiver put it back.
DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"
#: zlib's settings for the one shared compressor: level 1 (fastest; as
#: gorilla/websocket and Centrifugo default to), a 32 KiB window (wbits -15:
#: raw deflate, no zlib header) and memLevel 5, whose smaller hash table is
#: cheaper to clear after each message. Against the default level 6 on
#: chat frames: the same CPU up to 300 characters (0.1-1.3 % more bytes),
#: half the CPU at 4000 (10 % more bytes): docs/performance.md, "Compression".
_DEFLATE_SETTINGS: Final = (zlib.Z_BEST_SPEED, zlib.DEFLATED, -15, 5)


def _new_compressor() -> zlib._Compress:
    return zlib.compressobj(*_DEFLATE_SETTINGS)


_compressor = _new_compressor()


def deflate_message(payload: bytes | memoryview) -> bytes:
    """``payload`` compressed as one message without context takeover (RFC 7692 7.2.1).

    One compressor serves every message: ``Z_FULL_FLUSH`` ends each one on a
    byte boundary with the empty stored block, and resets the compressor's
    history, so no message refers back to an earlier one (which is what
    ``server_no_context_takeover`` promises) and each is decodable alone by a
    fresh inflater. Cheaper than a new compressor per message, which
    allocates and clears over 100 KiB of tables.
    """
    global _compressor
    compressor = _compressor
    try:
        data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    except BaseException:
        # Cut short (MemoryError, say): its history may hold part of this
        # message, so it must not compress the next one.
        _compressor = _new_compressor()
        raise
    assert data.endswith(DEFLATE_TAIL)  # a full flush always ends so
    return data[: -len(DEFLATE_TAIL)]


def websocket_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """One unmasked, unfragmented WebSocket data frame (RFC 6455 §5.2).

    ``opcode`` is the first byte without FIN: the opcode, plus `RSV1` for a
    compressed message.
    """
    first = _FIN | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def websocket_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame."""
    return websocket_frame(payload, OPCODE_TEXT)


class OutFrame:
    """One server frame: its WebSocket framing, and lazily its SSE one and its
    compressed WebSocket one.

    Only the WebSocket framing is kept: the JSON is its tail (`json`), so a
    queued frame (a history reply of a megabyte, say) is held once, not twice.
    """

    __slots__ = ("_sse", "_start", "_wsz", "event_id", "ws")

    def __init__(self, json: bytes, event_id: str | None = None, *, binary: bool = False) -> None:
        #: The message id, sent as the SSE ``id:`` field where there is one.
        self.event_id = event_id
        #: The WebSocket frame, built at once: a plain attribute is the cheapest
        #: read on the fan-out path, and nearly every frame goes out over WebSocket.
        self.ws = websocket_frame(json, OPCODE_BINARY if binary else OPCODE_TEXT)
        self._start = len(self.ws) - len(json)  # where the payload starts in ``ws``
        self._sse: bytes | None = None
        self._wsz: bytes | None = None

    @property
    def json(self) -> bytes:
        """The payload: a server frame's JSON (or raw bytes when ``binary``); a copy."""
        return self.ws[self._start :]

    @property
    def payload_size(self) -> int:
        """The payload's length in bytes (uncompressed)."""
        return len(self.ws) - self._start

    @property
    def wsz(self) -> bytes:
        """The frame for a connection that negotiated permessage-deflate.

        Compressed once, on first use, and kept: every such connection gets
        these same bytes (RSV1 set, RFC 7692 section 6). A payload under
        `DEFLATE_MIN_BYTES`, or one that deflate does not make smaller, stays
        as it is: `wsz` is then `ws` itself.
        """
        framed = self._wsz
        if framed is None:
            framed = self.ws
            start = self._start
            if len(framed) - start >= DEFLATE_MIN_BYTES:
                compressed = deflate_message(memoryview(framed)[start:])
                # The opcode's bits, with RSV1 added (FIN is added by `websocket_frame`).
                deflated = websocket_frame(compressed, RSV1 | (framed[0] & 0x0F))
                if len(deflated) < len(framed):
                    framed = deflated
            self._wsz = framed
        return framed

    @classmethod
    def of(cls, frame: ServerFrame | JoinedReply, event_id: str | None = None) -> OutFrame:
        return cls(encode(frame), event_id)

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            # JSON from msgspec never contains a raw newline, so one data line.
            head = b"id: " + self.event_id.encode() + b"\n" if self.event_id else b""
            self._sse = head + b"data: " + self.ws[self._start :] + b"\n\n"
        return self._sse

    def __repr__(self) -> str:
        return f"OutFrame({self.json[:60]!r})"
