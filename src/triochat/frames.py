"""Outbound frames, encoded once and framed once per transport.

A broadcast to N members builds one `OutFrame`; every recipient's writer
takes the same bytes (`ws` or `sse`), so the per-delivery cost is a list
append, not a JSON encode or a WebSocket frame build.
"""

from __future__ import annotations

import struct
from typing import Final

from .protocol import ServerFrame, encode

__all__ = ["OutFrame", "websocket_frame", "websocket_text_frame"]

_FIN: Final = 0x80  # a whole message in one frame; server frames are never masked
OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2


def websocket_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """One unmasked, unfragmented WebSocket data frame (RFC 6455 §5.2)."""
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
    """One server frame: its WebSocket framing, and lazily its SSE one.

    Only the WebSocket framing is kept: the JSON is its tail (`json`), so a
    queued frame (a history reply of a megabyte, say) is held once, not twice.
    """

    __slots__ = ("_sse", "_start", "event_id", "ws")

    def __init__(self, json: bytes, event_id: str | None = None, *, binary: bool = False) -> None:
        #: The message id, sent as the SSE ``id:`` field where there is one.
        self.event_id = event_id
        #: The WebSocket frame, built at once: a plain attribute is the cheapest
        #: read on the fan-out path, and nearly every frame goes out over WebSocket.
        self.ws = websocket_frame(json, OPCODE_BINARY if binary else OPCODE_TEXT)
        self._start = len(self.ws) - len(json)  # where the payload starts in ``ws``
        self._sse: bytes | None = None

    @property
    def json(self) -> bytes:
        """The payload: a server frame's JSON (or raw bytes when ``binary``); a copy."""
        return self.ws[self._start :]

    @classmethod
    def of(cls, frame: ServerFrame, event_id: str | None = None) -> OutFrame:
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
