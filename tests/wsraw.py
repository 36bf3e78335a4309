"""A small, strict, synchronous raw WebSocket client (RFC 6455), stdlib only.

For conformance tests against a real server process: the opening handshake
(any request bytes, malformed ones included), any client frame (any opcode,
RSV bits, FIN, masked or not, forced 16/64-bit length encodings, a length
that lies about the payload, raw bytes), and a STRICT parser of what the
server sends. Every server frame must be unmasked, have RSV bits 0 (RSV1
is allowed on a data message's first frame where permessage-deflate was
agreed, RFC 7692: the message is then inflated), use the minimal payload-length encoding
and a known opcode; control frames must be <= 125 bytes with FIN set; text
messages must be valid UTF-8 (checked incrementally, frame by frame);
fragmentation must be well formed; a close frame's payload is empty or a
valid code plus a UTF-8 reason; and nothing may follow the close frame but
the end of the TCP connection (EOF, or a reset once the close frame is in).
A violation raises `ProtocolViolation` (an AssertionError).

Every read has a deadline (socket timeouts), so nothing hangs: a read that
gets nothing in time raises `NoFrame`; a connection the server ends before
its close frame raises `TcpClosed`. Both are AssertionErrors with messages
that say what happened.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RSV1",
    "RSV2",
    "RSV3",
    "CloseResult",
    "Frame",
    "HttpResponse",
    "NoFrame",
    "ProtocolViolation",
    "TcpClosed",
    "WsConn",
    "accept_for",
    "build_frame",
    "check_upgrade_response",
    "close_payload",
    "expect_close",
    "handshake_request",
    "http_exchange",
    "new_key",
    "open_websocket",
    "upgrade",
]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
KNOWN_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
OPCODE_NAMES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}

#: The RSV bits as they sit in the first header byte, shifted down by 4.
RSV1, RSV2, RSV3 = 0b100, 0b010, 0b001

#: Close codes a close frame may carry (RFC 6455 7.4.1 and the IANA registry);
#: 1004-1006 and 1015 must never appear in one. 1010 is meant for clients, but
#: a server echoing a client's 1010 (RFC 6455 5.5.1) sends a valid frame.
VALID_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

#: Larger server frames are taken as a broken length field, not read.
MAX_SERVER_FRAME = 16 * 1024 * 1024
#: The longest HTTP response head read before giving up.
MAX_HEAD = 64 * 1024

DEFAULT_TIMEOUT = 5.0


class ProtocolViolation(AssertionError):
    """The server sent something RFC 6455 forbids."""


class TcpClosed(AssertionError):
    """The server ended the TCP connection (FIN or RST) where a frame was due."""

    def __init__(self, message: str, *, how: str, pending: bytes = b"") -> None:
        super().__init__(message)
        self.how = how  # "FIN" or "RST"
        self.pending = pending  # the bytes of an incomplete frame, if any


class NoFrame(AssertionError):
    """Nothing (or not a complete frame) arrived before the deadline."""

    def __init__(self, message: str, *, pending: bytes = b"") -> None:
        super().__init__(message)
        self.pending = pending


def _opname(opcode: int) -> str:
    return OPCODE_NAMES.get(opcode, f"reserved opcode {opcode:#x}")


def _short(data: bytes, limit: int = 80) -> str:
    text = repr(data[:limit])
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


# --- the opening handshake ---------------------------------------------------------


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def handshake_request(
    path: str = "/ws",
    *,
    host: str = "127.0.0.1",
    key: str | None = None,
    method: str = "GET",
    http_version: str = "HTTP/1.1",
    replace: dict[str, str | None] | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The bytes of an opening handshake request, valid unless told otherwise.

    ``replace`` maps a default header (``Host``, ``Upgrade``, ``Connection``,
    ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version``; matched without case)
    to another value, or to None to leave it out. ``extra`` headers are
    appended as given (so a header can appear twice).
    """
    headers: list[tuple[str, str]] = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key if key is not None else new_key()),
        ("Sec-WebSocket-Version", "13"),
    ]
    replacements = {name.lower(): value for name, value in (replace or {}).items()}
    unknown = set(replacements) - {name.lower() for name, _ in headers}
    if unknown:
        raise ValueError(f"not a default header: {sorted(unknown)}")
    lines = [f"{method} {path} {http_version}"]
    for name, default in headers:
        value = replacements.get(name.lower(), default)
        if value is not None:
            lines.append(f"{name}: {value}")
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HttpResponse:
    """A server's HTTP response: status line, headers (in order) and what body was read."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (matched without case), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        """Header ``name``'s values joined with ", ", or None if absent."""
        found = self.values(name)
        return ", ".join(found) if found else None

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of header ``name``, lower-cased."""
        return [
            token.strip().lower()
            for value in self.values(name)
            for token in value.split(",")
            if token.strip()
        ]

    def __str__(self) -> str:
        head = "\n".join(f"  {key}: {value}" for key, value in self.headers)
        return f"{self.version} {self.status} {self.reason}\n{head}\n  body: {_short(self.body)}"


def _read_head(sock: socket.socket, buffer: bytearray, deadline: float) -> HttpResponse:
    """Read one HTTP response head from ``sock`` (bytes after it stay in ``buffer``)."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise ProtocolViolation(f"no end of the HTTP response head in {len(buffer)} bytes")
        data = _recv(sock, deadline, what="an HTTP response head", pending=bytes(buffer))
        if not data:
            raise TcpClosed(
                "server closed TCP before a complete HTTP response head; got "
                + _short(bytes(buffer)),
                how="FIN",
                pending=bytes(buffer),
            )
        buffer += data
    raw = bytes(buffer[:end]).decode("latin-1")
    del buffer[: end + 4]
    status_line, *lines = raw.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolViolation(f"not an HTTP status line: {status_line!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolViolation(f"malformed header line {line!r} in:\n{raw}")
        headers.append((name, value.strip()))
    return HttpResponse(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers)


def http_exchange(
    port: int,
    request: bytes,
    *,
    host: str = "127.0.0.1",
    timeout: float = DEFAULT_TIMEOUT,
) -> HttpResponse:
    """Send raw ``request`` bytes on a fresh connection and read the response.

    The body is read by ``Content-Length`` (or until the server closes, at
    most until ``timeout``); a 101 response's body is left unread. The
    connection is closed afterwards.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        buffer = bytearray()
        response = _read_head(sock, buffer, deadline)
        if response.status == 101:
            return response
        length = response.header("content-length")
        if length is not None:
            size = int(length)
            while len(buffer) < size:
                data = _recv(sock, deadline, what="the response body", pending=bytes(buffer))
                if not data:
                    break
                buffer += data
            response.body = bytes(buffer[:size])
        else:
            with contextlib.suppress(NoFrame, ConnectionResetError):
                while data := _recv(sock, deadline, what="the response body"):
                    buffer += data
            response.body = bytes(buffer)
        return response


def open_websocket(
    port: int,
    path: str = "/ws",
    *,
    host: str = "127.0.0.1",
    timeout: float = DEFAULT_TIMEOUT,
    extra: Iterable[tuple[str, str]] = (),
    extensions: str | None = None,
    rcvbuf: int | None = None,
) -> WsConn:
    """Connect and do a valid opening handshake; the open connection.

    Asserts a 101 with ``Upgrade: websocket``, ``Connection: upgrade``, the
    right ``Sec-WebSocket-Accept``, no subprotocol selected, and
    ``Sec-WebSocket-Extensions`` equal to ``extensions`` (None: absent).
    ``rcvbuf``: see `upgrade`.
    """
    key = new_key()
    request = handshake_request(path, host=f"{host}:{port}", key=key, extra=extra)
    return upgrade(
        port,
        request,
        key,
        path=path,
        host=host,
        timeout=timeout,
        extensions=extensions,
        rcvbuf=rcvbuf,
    )


def upgrade(
    port: int,
    request: bytes,
    key: str,
    *,
    path: str = "/ws",
    host: str = "127.0.0.1",
    timeout: float = DEFAULT_TIMEOUT,
    extensions: str | None = None,
    rcvbuf: int | None = None,
) -> WsConn:
    """Send the handshake ``request`` (made with ``key``); the connection once it got a valid 101.

    See `check_upgrade_response` for what a valid 101 is. With ``extensions``
    naming permessage-deflate, the connection reads compressed messages.
    ``rcvbuf``: SO_RCVBUF, set before connecting (the window the client
    offers is sized from it then), so a client that stops reading soon
    leaves the server's writes unfinished.
    """
    sock = _connect(host, port, timeout, rcvbuf)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        buffer = bytearray()
        response = _read_head(sock, buffer, time.monotonic() + timeout)
        check_upgrade_response(response, key, extensions=extensions)
    except BaseException:
        sock.close()
        raise
    deflate = extensions is not None and extensions.startswith("permessage-deflate")
    conn = WsConn(sock, path=path, deflate=deflate)
    conn.buffer += buffer  # frames the server sent right after the 101, if any
    return conn


def _connect(host: str, port: int, timeout: float, rcvbuf: int | None) -> socket.socket:
    """A connected TCP socket; with ``rcvbuf``, SO_RCVBUF is set before the SYN."""
    if rcvbuf is None:
        return socket.create_connection((host, port), timeout=timeout)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def check_upgrade_response(
    response: HttpResponse, key: str, *, extensions: str | None = None
) -> None:
    """Assert ``response`` accepts an opening handshake sent with ``key`` (RFC 6455 4.2.2),
    selecting exactly ``extensions`` (None: no extension)."""
    assert response.status == 101, f"expected 101 Switching Protocols, got:\n{response}"
    assert response.tokens("upgrade") == ["websocket"], f"bad Upgrade header:\n{response}"
    assert "upgrade" in response.tokens("connection"), f"bad Connection header:\n{response}"
    assert response.values("sec-websocket-accept") == [accept_for(key)], (
        f"wrong Sec-WebSocket-Accept (want {accept_for(key)!r}):\n{response}"
    )
    assert response.header("sec-websocket-extensions") == extensions, (
        f"Sec-WebSocket-Extensions is not {extensions!r}:\n{response}"
    )
    assert response.header("sec-websocket-protocol") is None, (
        f"a subprotocol was selected though none was offered:\n{response}"
    )


# --- client frames ------------------------------------------------------------------


def build_frame(
    opcode: int,
    payload: bytes | str = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
    length_bytes: int | None = None,
    declared_length: int | None = None,
) -> bytes:
    """The bytes of one client frame, as malformed as asked.

    Args:
        opcode: any value 0-15.
        payload: the payload (a str is UTF-8 encoded); masked with a random
            key unless ``mask`` is False.
        fin: the FIN bit.
        rsv: the RSV bits (``RSV1 | RSV2 | RSV3``).
        mask_key: the 4-byte masking key (default: random).
        length_bytes: force the length encoding: 0 (7-bit), 2 (16-bit) or 8
            (64-bit); default: the minimal one.
        declared_length: the length written in the header (default: the
            payload's); with a larger one only ``payload`` follows the header.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if not 0 <= opcode <= 0xF or not 0 <= rsv <= 0b111:
        raise ValueError(f"opcode {opcode} or rsv {rsv} out of range")
    size = len(payload) if declared_length is None else declared_length
    if length_bytes is None:
        length_bytes = 0 if size <= 125 else 2 if size <= 0xFFFF else 8
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if length_bytes == 0:
        if size > 125:
            raise ValueError(f"{size} does not fit a 7-bit length")
        head = struct.pack("!BB", first, mask_bit | size)
    elif length_bytes == 2:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    elif length_bytes == 8:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    else:
        raise ValueError(f"length_bytes must be 0, 2 or 8, not {length_bytes}")
    if not mask:
        return head + payload
    key = os.urandom(4) if mask_key is None else mask_key
    if len(key) != 4:
        raise ValueError("a masking key has 4 bytes")
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(data), "big"
    )


def close_payload(code: int | None = None, reason: bytes | str = b"") -> bytes:
    """A close frame's payload: a 2-byte code and a reason (any bytes), or empty."""
    if isinstance(reason, str):
        reason = reason.encode("utf-8")
    if code is None:
        return reason
    return struct.pack("!H", code) + reason


# --- server frames -------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One server frame, already checked."""

    fin: bool
    opcode: int
    payload: bytes
    #: The whole data message this frame completes: (opcode, payload), else None.
    #: (Inflated, when it was a compressed message.)
    completes: tuple[int, bytes] | None = None
    #: The RSV bits, and the frame's bytes as they came (header included).
    rsv: int = 0
    wire: bytes = b""

    @property
    def is_control(self) -> bool:
        return self.opcode >= 0x8

    def __str__(self) -> str:
        return f"<{_opname(self.opcode)}{'' if self.fin else ' FIN=0'} {_short(self.payload, 60)}>"


@dataclass
class CloseResult:
    """What `expect_close` saw: the close frame and everything before it."""

    code: int | None
    reason: str
    messages: list[str] = field(default_factory=list)  # text messages before the close
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    elapsed: float = 0.0  # seconds until the close frame was in

    def json_messages(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.messages]


def _recv(sock: socket.socket, deadline: float, *, what: str, pending: bytes = b"") -> bytes:
    """One recv before ``deadline``: data, or b"" on EOF.

    Raises NoFrame on timeout; ConnectionResetError propagates.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise NoFrame(f"timed out waiting for {what}", pending=pending)
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        raise NoFrame(f"timed out waiting for {what}", pending=pending) from None


class WsConn:
    """An open WebSocket connection (client side) with a strict reader.

    Use it as a context manager (the socket is closed at the end).
    """

    def __init__(self, sock: socket.socket, *, path: str = "/ws", deflate: bool = False) -> None:
        self.sock = sock
        self.path = path
        #: permessage-deflate was agreed (with server_no_context_takeover):
        #: RSV1 may mark a message compressed, each inflated on its own.
        self.deflate = deflate
        self._compressed = False  # the data message in progress has RSV1
        self.buffer = bytearray()
        #: Every server frame so far, in order (for failure messages).
        self.frames: list[Frame] = []
        #: The payloads of pings and pongs seen by `recv_message` and friends.
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        #: The server's close frame, once received: (code or None, reason).
        self.close_received: tuple[int | None, str] | None = None
        #: The first error a send got (the server may have gone already).
        self.send_error: OSError | None = None
        self._fragment_opcode: int | None = None  # the data message in progress
        self._fragments: list[bytes] = []
        self._utf8: codecs.IncrementalDecoder | None = None
        #: Data messages `expect_pong` read past, for `recv_message`.
        self.pending_messages: list[tuple[int, bytes]] = []

    def __enter__(self) -> WsConn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # --- sending

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are. A send to a server that has gone is recorded, not raised."""
        try:
            self.sock.settimeout(DEFAULT_TIMEOUT)
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.send_error = self.send_error or exc
        except TimeoutError as exc:
            raise AssertionError(
                f"the server did not read {len(data)} bytes within {DEFAULT_TIMEOUT} s"
            ) from exc

    def send_in_pieces(self, data: bytes, size: int = 1, pause: float = 0.002) -> None:
        """Send ``data`` ``size`` bytes per TCP send, pausing between sends so
        each piece is a segment (and most likely a read) of its own."""
        for at in range(0, len(data), size):
            self.send_raw(data[at : at + size])
            time.sleep(pause)

    def send_frame(self, opcode: int, payload: bytes | str = b"", **options: Any) -> None:
        """Send one frame; ``options`` as in `build_frame`."""
        self.send_raw(build_frame(opcode, payload, **options))

    def send_text(self, text: bytes | str, **options: Any) -> None:
        self.send_frame(OP_TEXT, text, **options)

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj, ensure_ascii=False))

    def send_close(self, code: int | None = 1000, reason: bytes | str = b"") -> None:
        self.send_frame(OP_CLOSE, close_payload(code, reason))

    # --- receiving

    def _need(self, size: int, deadline: float, what: str) -> None:
        while len(self.buffer) < size:
            try:
                data = _recv(self.sock, deadline, what=what, pending=bytes(self.buffer))
            except ConnectionResetError:
                raise TcpClosed(
                    self._closed_message("reset TCP (RST)"), how="RST", pending=bytes(self.buffer)
                ) from None
            if not data:
                raise TcpClosed(
                    self._closed_message("closed TCP (FIN)"), how="FIN", pending=bytes(self.buffer)
                )
            self.buffer += data

    def _closed_message(self, how: str) -> str:
        where = (
            f" in the middle of a frame ({len(self.buffer)} bytes of it)" if self.buffer else ""
        )
        return f"server {how}{where} without a close frame"

    def _take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The next server frame, checked strictly (see the module docstring).

        Raises:
            ProtocolViolation: the frame breaks RFC 6455, or a close frame was
                already received (nothing may follow it).
            TcpClosed: the server closed or reset TCP before a whole frame.
            NoFrame: no whole frame within ``timeout``.
        """
        if self.close_received is not None:
            raise ProtocolViolation("recv_frame after the server's close frame")
        deadline = time.monotonic() + timeout
        self._need(2, deadline, "a frame header")
        first, second = self.buffer[0], self.buffer[1]
        fin, rsv, opcode = bool(first & 0x80), (first >> 4) & 0b111, first & 0x0F
        masked, size = bool(second & 0x80), second & 0x7F
        header = 2
        if size == 126:
            self._need(4, deadline, "a 16-bit frame length")
            (size,) = struct.unpack("!H", self.buffer[2:4])
            header = 4
            if size <= 125:
                self._violation(f"16-bit length encoding for a {size}-byte payload (not minimal)")
        elif size == 127:
            self._need(10, deadline, "a 64-bit frame length")
            (size,) = struct.unpack("!Q", self.buffer[2:10])
            header = 10
            if size >> 63:
                self._violation(f"64-bit frame length with the most significant bit set ({size})")
            if size <= 0xFFFF:
                self._violation(f"64-bit length encoding for a {size}-byte payload (not minimal)")
        if masked:
            self._violation("masked server frame (RFC 6455 5.1: a server MUST NOT mask)")
        if rsv and not (self.deflate and rsv == RSV1):
            self._violation(f"RSV bits {rsv:03b} set, but no extension was negotiated")
        if opcode not in KNOWN_OPCODES:
            self._violation(f"{_opname(opcode)}")
        if opcode >= 0x8:
            if size > 125:
                self._violation(f"{_opname(opcode)} frame with a {size}-byte payload (max 125)")
            if not fin:
                self._violation(f"fragmented {_opname(opcode)} frame (FIN=0)")
        if size > MAX_SERVER_FRAME:
            self._violation(f"a {size}-byte frame (this client reads up to {MAX_SERVER_FRAME})")
        self._need(header + size, deadline, f"a {size}-byte {_opname(opcode)} payload")
        wire = bytes(self.buffer[: header + size])
        self._take(header)
        payload = self._take(size)
        completes = self._check_semantics(fin, opcode, payload, rsv)
        frame = Frame(fin, opcode, payload, completes, rsv, wire)
        self.frames.append(frame)
        return frame

    def _violation(self, what: str, frame: Frame | None = None) -> NoReturn:
        """Raise ProtocolViolation: ``what``, the frame (or its header bytes), earlier frames."""
        seen = ", ".join(str(earlier) for earlier in self.frames[-5:]) or "none"
        where = f"frame {frame}" if frame else f"header {_short(bytes(self.buffer[:14]))}"
        raise ProtocolViolation(
            f"server frame violates RFC 6455: {what}; {where}; earlier frames: {seen}"
        )

    def _check_semantics(
        self, fin: bool, opcode: int, payload: bytes, rsv: int = 0
    ) -> tuple[int, bytes] | None:
        """Check a frame in its context; the data message it completes, if any."""
        this = Frame(fin, opcode, payload, rsv=rsv)
        if rsv and (opcode >= 0x8 or opcode == OP_CONT):
            self._violation("RSV1 on a control or continuation frame (RFC 7692 section 6)", this)
        if opcode == OP_CLOSE:
            self.close_received = self._parse_close(this)
            return None
        if opcode >= 0x8:
            return None
        if opcode == OP_CONT:
            if self._fragment_opcode is None:
                self._violation("continuation frame with no fragmented message to continue", this)
        elif self._fragment_opcode is not None:
            self._violation(
                f"new {_opname(opcode)} frame inside a fragmented "
                f"{_opname(self._fragment_opcode)} message",
                this,
            )
        else:
            self._fragment_opcode = opcode
            self._fragments = []
            self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
            self._compressed = bool(rsv)
        if self._fragment_opcode == OP_TEXT and not self._compressed:
            assert self._utf8 is not None
            try:
                self._utf8.decode(payload, final=fin)
            except UnicodeDecodeError as exc:
                self._violation(f"text message is not valid UTF-8 ({exc})", this)
        self._fragments.append(payload)
        if not fin:
            return None
        message_opcode = self._fragment_opcode
        assert message_opcode is not None
        self._fragment_opcode = None
        message = b"".join(self._fragments)
        self._fragments = []
        if self._compressed:
            message = self._inflate(message, this)
            if message_opcode == OP_TEXT:
                try:
                    message.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self._violation(f"text message is not valid UTF-8 ({exc})", this)
        return message_opcode, message

    def _inflate(self, data: bytes, frame: Frame) -> bytes:
        """A compressed message's payload inflated (RFC 7692 7.2.2), by a fresh
        inflater: the server agreed to server_no_context_takeover."""
        inflater = zlib.decompressobj(-15)
        try:
            message = inflater.decompress(data + b"\x00\x00\xff\xff")
        except zlib.error as exc:
            self._violation(f"compressed message does not inflate ({exc})", frame)
        if inflater.unused_data:
            self._violation("data after the end of a compressed message's deflate stream", frame)
        return message

    def _parse_close(self, frame: Frame) -> tuple[int | None, str]:
        payload = frame.payload
        if not payload:
            return None, ""
        if len(payload) == 1:
            self._violation("close frame with a 1-byte payload", frame)
        (code,) = struct.unpack("!H", payload[:2])
        if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
            self._violation(f"close frame with invalid status code {code}", frame)
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError as exc:
            self._violation(f"close reason is not valid UTF-8 ({exc})", frame)
        return code, reason

    def recv_message(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
        """The next whole data message (opcode, payload); pings and pongs are collected.

        Messages `expect_pong` read past come first. Raises (besides
        `recv_frame`'s) AssertionError on a close frame.
        """
        if self.pending_messages:
            return self.pending_messages.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if frame.opcode == OP_PING:
                self.pings.append(frame.payload)
            elif frame.opcode == OP_PONG:
                self.pongs.append(frame.payload)
            elif frame.opcode == OP_CLOSE:
                code, reason = self.close_received or (None, "")
                raise AssertionError(
                    f"server sent close {code} {reason!r} while a data message was expected"
                )
            elif frame.completes is not None:
                return frame.completes

    def recv_text(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        opcode, payload = self.recv_message(timeout)
        assert opcode == OP_TEXT, f"server sent a {_opname(opcode)} message: {_short(payload)}"
        return payload.decode("utf-8")

    def recv_json(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        text = self.recv_text(timeout)
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"server text frame is not JSON: {text[:200]!r}") from exc
        assert isinstance(value, dict), f"server frame is not a JSON object: {text[:200]!r}"
        return value

    def expect(
        self,
        type_: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        skip: Collection[str] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """The next JSON frame (frames whose type is in ``skip`` are passed over).

        Asserts its ``type`` and the given ``fields``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.recv_json(max(deadline - time.monotonic(), 0.001))
            except NoFrame as exc:
                raise NoFrame(f"no {type_!r} frame within {timeout} s ({exc})") from None
            if frame.get("type") in skip:
                continue
            assert frame.get("type") == type_, f"expected a {type_!r} frame, got {frame}"
            for key, value in fields.items():
                assert frame.get(key) == value, (
                    f"{type_!r} frame: {key} is {frame.get(key)!r}, expected {value!r}: {frame}"
                )
            return frame

    def expect_pong(self, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Read until a pong arrives; assert it carries ``payload``.

        Data messages read past are kept for `recv_message`. The server
        answers each ping in order, so the first pong must be this one.
        """
        deadline = time.monotonic() + timeout
        while not self.pongs:
            try:
                frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            except NoFrame:
                raise NoFrame(f"no pong within {timeout} s") from None
            if frame.opcode == OP_PONG:
                self.pongs.append(frame.payload)
            elif frame.opcode == OP_PING:
                self.pings.append(frame.payload)
            elif frame.opcode == OP_CLOSE:
                raise AssertionError(f"server sent close {self.close_received} instead of a pong")
            elif frame.completes is not None:
                self.pending_messages.append(frame.completes)
        got = self.pongs.pop(0)
        assert got == payload, f"pong payload {_short(got)} != ping payload {_short(payload)}"

    def expect_eof(self, timeout: float = 3.0) -> None:
        """After the server's close frame: the server must close TCP, sending nothing more.

        EOF passes; a reset passes too (the close frame is in).
        """
        assert self.close_received is not None, "expect_eof before the server's close frame"
        if self.buffer:  # it came with the close frame
            raise ProtocolViolation(
                f"server sent data after its close frame: {_short(bytes(self.buffer))}"
            )
        try:
            data = _recv(self.sock, time.monotonic() + timeout, what="the end of TCP")
        except ConnectionResetError:
            return
        except NoFrame:
            raise AssertionError(
                f"server did not close TCP within {timeout} s after its close frame "
                f"{self.close_received}"
            ) from None
        if data:
            raise ProtocolViolation(f"server sent data after its close frame: {_short(data)}")

    def assert_open(self, timeout: float = 0.3) -> None:
        """Nothing at all arrives within ``timeout`` (no frame, no close, no EOF)."""
        try:
            frame = self.recv_frame(timeout)
        except NoFrame:
            return
        raise AssertionError(f"expected silence, got {frame}")


def _describe(result: CloseResult) -> str:
    parts = []
    if result.messages:
        shown = [message[:80] for message in result.messages[:3]]
        more = f" and {len(result.messages) - 3} more" if len(result.messages) > 3 else ""
        parts.append(f"{len(result.messages)} text message(s): {shown}{more}")
    if result.pongs:
        parts.append(f"pongs {result.pongs}")
    return "; ".join(parts) or "nothing"


def expect_close(
    conn: WsConn,
    code: int | Collection[int | None] | None,
    timeout: float = 3.0,
    *,
    allow_text: bool = True,
    reply: bool = True,
    eof_timeout: float = 3.0,
) -> CloseResult:
    """Read until the server's close frame; assert its code; then assert TCP closes.

    ``code`` is the expected status code, None for a close frame without a
    payload, or a collection of acceptable ones. Text messages before the
    close are collected (a failure if ``allow_text`` is False); pings and
    pongs are collected. Fails with a clear message when the server ends
    TCP without a close frame, sends the wrong code, sends nothing within
    ``timeout``, or breaks RFC 6455 on the way. With ``reply`` the client
    answers the close frame as a well-behaved client does; either way the
    server must then close TCP within ``eof_timeout``, sending nothing more.
    """
    wanted: set[int | None] = {code} if code is None or isinstance(code, int) else set(code)
    want = " or ".join("no code" if c is None else str(c) for c in sorted(wanted, key=str))
    start = time.monotonic()
    deadline = start + timeout
    result = CloseResult(code=None, reason="")
    while conn.close_received is None:
        try:
            frame = conn.recv_frame(max(deadline - time.monotonic(), 0.001))
        except TcpClosed as exc:
            raise AssertionError(
                f"{exc} (expected close {want}) after {time.monotonic() - start:.2f} s; "
                f"received before: {_describe(result)}"
            ) from None
        except NoFrame as exc:
            pending = f"; {len(exc.pending)} bytes of an incomplete frame" if exc.pending else ""
            raise AssertionError(
                f"no close frame within {timeout} s (expected close {want}); "
                f"received before: {_describe(result)}{pending}"
            ) from None
        if frame.opcode == OP_PING:
            result.pings.append(frame.payload)
        elif frame.opcode == OP_PONG:
            result.pongs.append(frame.payload)
        elif frame.completes is not None:
            opcode, payload = frame.completes
            assert opcode == OP_TEXT, f"server sent a binary message: {_short(payload)}"
            if not allow_text:
                raise AssertionError(
                    f"server sent a text message where close {want} was expected: "
                    f"{payload[:200]!r}"
                )
            result.messages.append(payload.decode("utf-8"))
    result.code, result.reason = conn.close_received
    result.elapsed = time.monotonic() - start
    assert result.code in wanted, (
        f"server closed with {result.code if result.code is not None else 'no code'} "
        f"{result.reason!r}, expected {want}; received before: {_describe(result)}"
    )
    if reply:
        conn.send_close(result.code if result.code is not None else None)
    conn.expect_eof(eof_timeout)
    return result
