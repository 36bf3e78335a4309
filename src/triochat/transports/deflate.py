"""permessage-deflate (RFC 7692) on the chat endpoint: negotiation and the inbound side.

Sans-I/O (no trio): `DeflateExtension` is the wsproto `Extension` that
`transports/websocket.py` puts into the 101 response when ``--compression
on``. Rules:

1. What is agreed (`negotiate`, RFC 7692 sections 5 and 7.1): the first
   ``permessage-deflate`` offer that is valid. The response always carries
   ``server_no_context_takeover``: the server compresses each message once,
   for every connection that negotiated compression (frames.py,
   `OutFrame.wsz`), so no message may refer back to an earlier one. An
   offered ``server_max_window_bits=N`` is echoed (7.1.2.1); frames whose
   payload is longer than 2^N bytes then go out uncompressed, since a shared
   compressed payload only fits a smaller window if it is shorter than it
   (`DeflateWebSocketTransport`). ``client_no_context_takeover`` is echoed
   when offered (7.1.1.2); ``client_max_window_bits`` is answered with at
   most `CLIENT_MAX_WINDOW_BITS` (7.1.2.2), which bounds the window the
   server keeps per connection.
2. Inbound, a compressed message is inflated with the client's context
   taken over from its previous message unless ``client_no_context_takeover``
   was agreed (7.2.2), and never beyond ``--max-frame-bytes``: the inflater
   is asked for at most one byte more than the rest of the limit, so a zip
   bomb is refused (1009) while it is being inflated, having produced at
   most that.
3. RSV1 is allowed on the first frame of a data message only: on a
   continuation or a control frame it is a protocol error (1002, RFC 7692
   section 6). Without the extension wsproto refuses any RSV1 (1002).
4. Frames wsproto writes (pongs, close frames) are control frames and stay
   uncompressed; data frames never go through wsproto.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Final

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits

from ..frames import DEFLATE_TAIL

if TYPE_CHECKING:
    from wsproto.frame_protocol import FrameDecoder, FrameProtocol

__all__ = [
    "CLIENT_MAX_WINDOW_BITS",
    "EXTENSION_NAME",
    "DeflateAgreement",
    "DeflateExtension",
    "negotiate",
]

EXTENSION_NAME: Final = "permessage-deflate"
#: The largest client window the server agrees to when the client lets it
#: choose (RFC 7692 7.1.2.2): 4 KiB of window per connection that takes its
#: context over, rather than 32 KiB (websockets' default too).
CLIENT_MAX_WINDOW_BITS: Final = 12
#: The window sizes RFC 7692 7.1.2 allows: 2^8 to 2^15 bytes.
_WINDOW_BITS: Final = range(8, 16)
#: The parameters an offer may have (RFC 7692 section 7.1), and whether each
#: takes a value: True required, None optional, False none.
_OFFER_PARAMS: Final[dict[str, bool | None]] = {
    "server_no_context_takeover": False,
    "client_no_context_takeover": False,
    "server_max_window_bits": True,
    "client_max_window_bits": None,
}
_NO_RSV: Final = RsvBits(False, False, False)
_RSV1: Final = RsvBits(True, False, False)


@dataclasses.dataclass(frozen=True, slots=True)
class DeflateAgreement:
    """What the server agreed to for one connection."""

    #: The server's window, 2^bits bytes: 15 unless the client asked for less.
    server_max_window_bits: int = 15
    #: The client keeps no context from one message to the next.
    client_no_context_takeover: bool = False
    #: The client's window as answered, or None when its offer did not name
    #: the parameter (then it may use 15, and the response must not name it).
    client_max_window_bits: int | None = None
    #: The offer named ``server_max_window_bits``: the response must too.
    server_window_offered: bool = False

    def response(self) -> str:
        """The response's parameters (without the extension name), RFC 7692 section 7."""
        params = ["server_no_context_takeover"]
        if self.server_window_offered:
            params.append(f"server_max_window_bits={self.server_max_window_bits}")
        if self.client_no_context_takeover:
            params.append("client_no_context_takeover")
        if self.client_max_window_bits is not None:
            params.append(f"client_max_window_bits={self.client_max_window_bits}")
        return "; ".join(params)

    @property
    def inflate_window_bits(self) -> int:
        """The window to inflate the client's messages with: its agreed one, but
        at least 9 (zlib's smallest deflate window is 9: a client told 8 may
        use 9)."""
        bits = 15 if self.client_max_window_bits is None else self.client_max_window_bits
        return max(bits, 9)


def _window_bits(value: str | None) -> int | None:
    """A window-bits value (RFC 7692 7.1.2: 1*DIGIT, 8-15, no leading zero), or None."""
    if value is None or not value.isascii() or not value.isdigit() or value.startswith("0"):
        return None
    bits = int(value)
    return bits if bits in _WINDOW_BITS else None


def negotiate(offer: str) -> DeflateAgreement | None:
    """The agreement for one extension offer (one comma-separated element of
    ``Sec-WebSocket-Extensions``), or None to decline it.

    An offer is declined (RFC 7692 section 5) when it is not
    ``permessage-deflate``, or has a parameter RFC 7692 does not define for
    an offer, one with an invalid value, or the same parameter twice. A
    value may be quoted (RFC 6455 section 9.1).
    """
    name, *params = (part.strip() for part in offer.split(";"))
    if name.lower() != EXTENSION_NAME:
        return None
    seen: dict[str, str | None] = {}
    for param in params:
        key, equals, raw = param.partition("=")
        key = key.strip().lower()
        value: str | None = raw.strip() if equals else None
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        takes_value = _OFFER_PARAMS.get(key, "unknown")
        if (
            takes_value == "unknown"
            or key in seen
            or (takes_value is False and value is not None)
            or (takes_value is True and value is None)
        ):
            return None
        seen[key] = value
    server_bits = 15
    if "server_max_window_bits" in seen:
        bits = _window_bits(seen["server_max_window_bits"])
        if bits is None:
            return None
        server_bits = bits
    client_bits: int | None = None
    if "client_max_window_bits" in seen:
        value = seen["client_max_window_bits"]
        bits = 15 if value is None else _window_bits(value)
        if bits is None:
            return None
        client_bits = min(bits, CLIENT_MAX_WINDOW_BITS)
    return DeflateAgreement(
        server_max_window_bits=server_bits,
        client_no_context_takeover="client_no_context_takeover" in seen,
        client_max_window_bits=client_bits,
        server_window_offered="server_max_window_bits" in seen,
    )


class DeflateExtension(Extension):
    """permessage-deflate for one server connection, as a wsproto `Extension`.

    wsproto calls `accept` with each offer of the handshake in order; the
    first acceptable one is agreed (`agreement`), later ones are declined.
    The inbound hooks then inflate compressed messages (rule 2 above).
    """

    name = EXTENSION_NAME

    def __init__(self, max_message_bytes: int) -> None:
        """Args:
        max_message_bytes: the most an inflated message may be (``--max-frame-bytes``).
        """
        self._limit = max_message_bytes
        #: What was agreed, once `accept` took an offer.
        self.agreement: DeflateAgreement | None = None
        #: Why inflating failed the connection (code, reason), for the log.
        self.failure: tuple[int, str] | None = None
        self._inflater: zlib._Decompress | None = None
        self._compressed = False  # the data message in progress has RSV1
        self._control = False  # the frame in progress is a control frame
        self._inflated = 0  # bytes the message in progress inflated to so far

    # --- the handshake

    def enabled(self) -> bool:
        return self.agreement is not None

    def offer(self) -> bool:
        return False  # a server never offers

    def accept(self, offer: str) -> str | None:
        """The response parameters for ``offer``, or None (declined, or one was agreed already)."""
        if self.agreement is not None:
            return None  # the first acceptable offer wins (RFC 7692 section 5)
        agreement = negotiate(offer)
        if agreement is None:
            return None
        self.agreement = agreement
        return agreement.response()

    # --- inbound frames (wsproto's FrameDecoder calls these, in this order)

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # It may come between two fragments: the message's state stays.
            # RSV1 on it is not ours (wsproto refuses it: 1002).
            self._control = True
            return _NO_RSV
        self._control = False
        if opcode is Opcode.CONTINUATION:
            # Only a message's first frame says whether it is compressed (section 6).
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else _NO_RSV
        self._compressed = rsv.rsv1
        self._inflated = 0
        if rsv.rsv1 and self._inflater is None:
            assert self.agreement is not None  # enabled, so agreed
            self._inflater = zlib.decompressobj(-self.agreement.inflate_window_bits)
        return _RSV1

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._control or not self._compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._control or not fin or not self._compressed:
            return None
        self._compressed = False
        # RFC 7692 7.2.2: the sender removed the flush's empty block; put it back.
        tail = self._inflate(DEFLATE_TAIL)
        inflater = self._inflater
        assert self.agreement is not None
        assert inflater is not None
        if self.agreement.client_no_context_takeover or inflater.eof:
            # No context to keep: agreed so, or the client ended its deflate
            # stream (BFINAL, 7.2.3.3) and a new message starts a new one.
            self._inflater = None
        return tail

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        """``data`` inflated, at most to the message limit (rule 2)."""
        inflater = self._inflater
        assert inflater is not None
        room = self._limit - self._inflated
        try:
            # At most one byte over the limit: proof enough, and no more memory.
            out = inflater.decompress(data, room + 1)
        except zlib.error:
            # RFC 7692 leaves the code open: 1007 (invalid payload data), as in wsproto.
            self.failure = (CloseReason.INVALID_FRAME_PAYLOAD_DATA, "invalid compressed data")
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > room:
            self.failure = (CloseReason.MESSAGE_TOO_BIG, "message too big")
            return CloseReason.MESSAGE_TOO_BIG
        self._inflated += len(out)
        return out

    def __repr__(self) -> str:
        return f"DeflateExtension({self.agreement!r})"
