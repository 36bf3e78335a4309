"""The WebSocket transport: trio-websocket behind the HTTP front.

`accept_websocket` answers an upgrade the front vetted, over a
`ReplayStream` (transports/replay.py: what the client sent after the head
replayed, every write through one gate, the frame-size guard, the lingering
close), and returns the connection's `WebSocketTransport`.

One task per connection (issue #16: memory per idle connection): the
handshake and the reading run in the connection's own task. The 101 is
ours, from what the front vetted (transports/wsopen.py: `accept_upgrade`);
trio-websocket does the protocol from there (its `WebSocketConnection`:
pongs, the closing handshake, message assembly), but its reader task loop
runs in `WebSocketTransport.receive_message`, which returns each message
instead of queueing it on a memory channel.

Errors: trio's, trio-websocket's and wsproto's exceptions become triochat's
in one place, `WebSocketErrors` (the boundary, as httpcore's
``map_exceptions``): out of this module comes `TransportClosed`, or a bug.

Failing a connection (RFC 6455 7.1.7, docs/protocol.md section 11): when
wsproto finds a protocol error (1002, or 1007 for invalid UTF-8)
trio-websocket records the code but sends no close frame, and a frame header
that announces more than ``--max-frame-bytes`` is only noticed by it once
that many bytes have arrived. So the stream reads every client frame header
as it goes by (`FrameSizeGuard`: over the limit ends the read at once, 1009),
`receive_message` reports such ends as `TransportClosed` with ``failed``
set, and `close` then writes the close frame itself.

permessage-deflate (RFC 7692, ``--compression on``): the 101 agrees to an
offer through wsproto's own negotiation with our `DeflateExtension`
(negotiation and inflating: transports/deflate.py). A connection
that agreed to it gets a `DeflateWebSocketTransport`, which writes each
frame's compressed framing (`OutFrame.wsz`, compressed once for all).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Final, cast

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..config import Config
from ..frames import OutFrame
from ..protocol import CloseCode
from . import TransportClosed
from .deflate import DeflateExtension
from .quickframe import quick_text
from .replay import CLOSE_FRAME_BYTE, FrameSizeGuard, ReplayStream
from .wsopen import RECEIVE_BYTES, EstablishedWebSocket, accept_upgrade

__all__ = [
    "ClosingRace",
    "DeflateWebSocketTransport",
    "FrameSizeGuard",
    "ReplayStream",
    "WebSocketErrors",
    "WebSocketTransport",
    "accept_websocket",
    "close_frame",
    "log_safe",
]

PING_FRAME = b"\x89\x00"  # FIN + opcode 9 (ping), no payload, unmasked

ABNORMAL_CLOSURE = 1006  # trio-websocket's code for a TCP connection lost without a close
MAX_CLOSE_REASON = 123  # bytes: a control frame's payload is at most 125 (RFC 6455 5.5)

#: trio-websocket's known closing race: its reader task answers a ping that
#: arrives after our close frame went out, wsproto refuses to send that pong,
#: and the reader task raises this. The server's reader
#: (`WebSocketTransport.receive_message`) does not answer such a ping, so it
#: never meets it; a trio-websocket client's reader task still does (the
#: tests' chat client catches it).
ClosingRace = LocalProtocolError

#: What trio and trio-websocket raise that means "this connection is over".
_LIBRARY_ERRORS: Final = (
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


def log_safe(text: str, limit: int = 80) -> str:
    """A peer's text for a log line: quoted, cut to ``limit``, every character
    outside printable ASCII escaped (no newline, ANSI escape or bidi control
    reaches the log raw)."""
    shown = [
        c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text[:limit]
    ]
    return '"' + "".join(shown) + ('..."' if len(text) > limit else '"')


def close_frame(code: int, reason: str) -> bytes:
    """A close frame (RFC 6455 5.5.1) with ``reason`` cut to fit, on a character boundary."""
    data = reason.encode()[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()
    payload = struct.pack("!H", code) + data
    return bytes((CLOSE_FRAME_BYTE, len(payload))) + payload


class WebSocketErrors:
    """The error boundary of one WebSocket connection: where the libraries'
    exceptions become triochat's, and nowhere else (as httpcore's
    ``map_exceptions``). ``with errors:`` around each call into trio's streams
    or trio-websocket; `translate` where a ``try`` is cheaper (the hot path).

    ======================================  =======================================
    raised                                  becomes
    ======================================  =======================================
    any of them (``TooSlowError`` too),     ``TransportClosed("handshake failed: …")``
    while ``handshaking``
    ``ConnectionClosed``                    how the reading ended (`closed`)
    ``BrokenResourceError``,                ``TransportClosed("connection lost")``
    ``ClosedResourceError``
    ======================================  =======================================

    Anything else is a bug, and propagates.
    """

    __slots__ = ("_stream", "extension", "handshaking")

    def __init__(self, stream: ReplayStream, extension: DeflateExtension | None = None) -> None:
        self._stream = stream
        #: The permessage-deflate agreed to (its inflating failures fail the connection).
        self.extension = extension
        #: Every error is the handshake's (while `accept_websocket` runs it).
        self.handshaking = False

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, _LIBRARY_ERRORS):
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> TransportClosed:
        """The `TransportClosed` for one of the libraries' errors (the table above)."""
        if self.handshaking:
            return TransportClosed(f"handshake failed: {exc!r}")
        if isinstance(exc, ConnectionClosed):
            return self.closed(exc)
        return TransportClosed("connection lost")

    def closed(self, exc: ConnectionClosed) -> TransportClosed:
        """How the reading ended: a close received, the TCP connection lost, or a failure.

        A failure (``failed``: our close frame is owed) is a message over the
        limit (the stream's guard), inflating that failed (a zip bomb, bad
        deflate data: wsproto's own reason says only "error in extension"),
        or a code trio-websocket recorded without any close frame on the
        wire: wsproto failed the connection.
        """
        stream = self._stream
        reason = exc.reason
        failure = stream.failure
        if failure is None and not stream.close_sent:
            inflating = self.extension.failure if self.extension is not None else None
            if inflating is not None:
                failure = inflating
            elif reason is not None and reason.code != ABNORMAL_CLOSURE:
                failure = (reason.code, reason.reason or "protocol error")
        if failure is not None:
            return TransportClosed(failure[1], failure[0], failed=True)
        if reason is None:
            return TransportClosed("closed")
        if reason.code == ABNORMAL_CLOSURE:
            # The TCP connection ended without a close frame: no code was
            # exchanged (1006 is trio-websocket's word for that, never sent), so
            # the close line and triochat_closes_total say "none" (#11 §4).
            return TransportClosed("connection lost")
        # The peer's reason goes into the log: escaped and cut, never raw.
        # The code is not repeated here: the close line states it once (#11 §4).
        said = f" {log_safe(reason.reason)}" if reason.reason else ""
        return TransportClosed(f"closed by the peer{said}", reason.code)


async def _message(
    ws: WebSocketConnection, event: TextMessage | BytesMessage
) -> str | bytes | None:
    """trio-websocket's ``_handle_message_event``, returning a finished message
    instead of queueing it: the parts so far, their size limit (1009)."""
    ws._message_size += len(event.data)
    ws._message_parts.append(cast("bytes | str", event.data))  # (or a bytearray)
    if ws._message_size > ws._max_message_size:
        reason = f"Exceeded maximum message size: {ws._max_message_size} bytes"
        ws._message_size = 0
        ws._message_parts = []
        ws._close_reason = CloseReason(CloseCode.MESSAGE_TOO_BIG, reason)
        await ws._send(CloseConnection(code=CloseCode.MESSAGE_TOO_BIG, reason=reason))
        ws._reader_running = False
        return None
    if not event.message_finished:
        return None
    parts = ws._message_parts
    ws._message_size = 0
    ws._message_parts = []
    if isinstance(event, BytesMessage):
        return b"".join(cast("list[bytes]", parts))
    return "".join(cast("list[str]", parts))


async def accept_websocket(
    stream: ReplayStream,
    key: bytes,
    offers: Sequence[str],
    config: Config,
    *,
    path: str,
    errors: WebSocketErrors | None = None,
) -> WebSocketTransport:
    """Answer the upgrade the front vetted (its Sec-WebSocket-Key ``key`` and
    extension ``offers``) with the 101, in the caller's task.

    With ``config.compression`` a permessage-deflate offer is taken (the
    first acceptable one), and the transport is a `DeflateWebSocketTransport`.

    Args:
        path: the request's path, without its query string (trio-websocket's
            ``path``; nothing here reads it).
        errors: the connection's boundary, when the caller has one; by
            default a new one.

    Raises:
        TransportClosed: the client was gone, or did not take the 101 in time.
    """
    extension = DeflateExtension(config.max_frame_bytes) if config.compression else None
    if errors is None:
        errors = WebSocketErrors(stream)
    errors.handshaking = True
    response, protocol = accept_upgrade(key, offers, extension)
    # A fresh socket's buffer takes the 101 at once: written without a task
    # switch or a cancel scope (#16: connection setup). Else bounded.
    with errors:
        written = stream.write_nowait(response)
    if written != len(response):
        rest = response if written is None else response[written:]
        with errors:  # (the TooSlowError raised below is mapped too)
            deadline = trio.current_time() + config.handshake_timeout
            with trio.CancelScope(deadline=deadline) as scope:
                if written is None:
                    await stream.send_all(rest)
                else:
                    # (The gate is ours: see write_nowait.)
                    await stream.send_reserved(rest, tail=True)
            if scope.cancelled_caught:
                raise trio.TooSlowError
    errors.handshaking = False
    ws = EstablishedWebSocket(stream, protocol, path=path, max_message_size=config.max_frame_bytes)
    if extension is not None and extension.agreement is not None:
        return DeflateWebSocketTransport(ws, stream, extension, errors)
    return WebSocketTransport(ws, stream, errors)


class WebSocketTransport:
    """The `Transport` of a WebSocket connection."""

    __slots__ = ("_errors", "_stream", "_ws")

    heartbeat: float | None = None  # the configured ping interval
    expects_pong = True
    reads_to_close = True  # the peer's close frame is read by `receive_message`
    #: The compression negotiated (for the log), or None.
    compression: str | None = None

    def __init__(
        self, ws: WebSocketConnection, stream: ReplayStream, errors: WebSocketErrors | None = None
    ) -> None:
        """``errors``: the connection's boundary (by default one for ``stream``)."""
        self._ws = ws
        self._stream = stream
        self._errors = errors if errors is not None else WebSocketErrors(stream)

    @property
    def last_receive(self) -> float:
        return self._stream.last_receive

    async def receive_message(self) -> str | bytes:
        """The next whole message, text or binary. Raises TransportClosed.

        The connection's reader: trio-websocket's reader task loop, run here,
        in the connection's own task (one task per idle connection, and no
        message channel; issue #16). Each event gets trio-websocket's own
        handling (its handlers for a ping and a close frame, its message
        assembly and size limit), with one difference: a ping that arrives
        after our close frame is not answered (wsproto refuses to, and
        trio-websocket's reader then dies of it: the old closing race).
        Pongs need nothing: any bytes prove the peer is there (`last_receive`).
        A read that is one plain text frame, while wsproto is between frames,
        is read without it (`quick_text`; the same message, and wsproto's
        state as if it had read it). Cancelled only when the connection ends.
        """
        ws = self._ws
        protocol = ws._wsproto
        with self._errors:
            while ws._reader_running:
                for event in protocol.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        message = await _message(ws, event)
                        if message is not None:
                            return message
                    elif isinstance(event, Ping):
                        if protocol.state is ConnectionState.OPEN:
                            await ws._handle_ping_event(event)
                    elif isinstance(event, CloseConnection):
                        await ws._handle_close_connection_event(event)
                    if not ws._reader_running:
                        break
                else:
                    # Read the socket once into wsproto (inline: a frame less held).
                    try:
                        data = await self._stream.receive_some(RECEIVE_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await ws._abort_web_socket()
                        break
                    if not data:  # the TCP connection closed (before the WebSocket did: 1006)
                        if protocol.state is not ConnectionState.CLOSED:
                            await ws._abort_web_socket()
                        ws._reader_running = False
                        break
                    text = quick_text(protocol, data, ws._max_message_size)
                    if text is not None:
                        return text  # (wsproto's state is as if it had read it)
                    if protocol.state is not ConnectionState.CLOSED:
                        try:
                            protocol.receive_data(data)  # type: ignore[arg-type]  # (or a bytearray)
                        except RemoteProtocolError as exc:
                            if exc.event_hint is not None:
                                await ws._send(exc.event_hint)
                            await ws._close_stream()
                    del data  # wsproto has it: not kept while the next read waits
            raise ConnectionClosed(ws._close_reason)

    async def send(self, frames: list[OutFrame]) -> None:
        data = frames[0].ws if len(frames) == 1 else b"".join([frame.ws for frame in frames])
        with self._errors:
            await self._stream.send_all(data)

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        """Write ``frames`` as far as the socket takes them now; the unsent rest.

        None when nothing may be written now (see `ReplayStream.write_nowait`).
        A non-empty rest must be finished with `send_rest` before anything
        else is written (the write gate stays taken until then).
        """
        data = frames[0].ws if len(frames) == 1 else b"".join([frame.ws for frame in frames])
        # The hub's hot path: a ``try`` costs nothing, a ``with`` 0.1 µs a delivery.
        try:
            written = self._stream.write_nowait(data)
        except trio.BrokenResourceError as exc:
            raise self._errors.translate(exc) from exc
        return None if written is None else data[written:]

    async def send_rest(self, data: bytes) -> None:
        with self._errors:
            await self._stream.send_reserved(data, tail=True)

    @property
    def write_closed(self) -> bool:
        return self._stream.close_sent

    def ping_nowait(self) -> bytes | None:
        # (A control frame: never compressed, the same for `DeflateWebSocketTransport`.)
        try:
            written = self._stream.write_nowait(PING_FRAME)
        except trio.BrokenResourceError as exc:
            raise self._errors.translate(exc) from exc
        return None if written is None else PING_FRAME[written:]

    async def ping(self) -> None:
        # A raw ping frame (not trio-websocket's ping(), which needs a task
        # waiting for each pong): any bytes the peer sends, the pong
        # included, update `last_receive`.
        with self._errors:
            await self._stream.send_all(PING_FRAME)

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(TransportClosed), self._errors:
            if self._ws.closed is None:
                await self._ws.aclose(code, reason)  # the closing handshake
            elif not self._stream.close_sent:
                # trio-websocket gave up without a close frame (a failure): ours.
                await self._stream.send_all(close_frame(code, reason))

    async def abort(self) -> None:
        closed = self._ws._wsproto.state is ConnectionState.CLOSED  # both close frames went by
        await self._stream.close_now(handshake_done=closed)


class DeflateWebSocketTransport(WebSocketTransport):
    """A `WebSocketTransport` that agreed to permessage-deflate (RFC 7692).

    It writes each frame's compressed framing, `OutFrame.wsz`: compressed
    once, shared by every connection that compresses (uncompressed when
    small, RSV1 clear). With ``server_max_window_bits=N`` under 15, a
    payload longer than 2^N bytes goes out uncompressed: the shared
    compression uses a 32 KiB window, and its back-references fit the
    client's 2^N-byte window only when the payload itself does (RFC 7692
    7.1.2.1). `send` and `send_nowait` repeat the base class's rather than
    share a helper with it: the uncompressed path stays exactly as fast.
    Inflating that fails fails the connection (`WebSocketErrors.closed`).
    """

    __slots__ = ("_window",)

    compression = "permessage-deflate"

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: ReplayStream,
        extension: DeflateExtension,
        errors: WebSocketErrors | None = None,
    ) -> None:
        if errors is None:
            errors = WebSocketErrors(stream)
        errors.extension = extension
        super().__init__(ws, stream, errors)
        agreement = extension.agreement
        assert agreement is not None
        #: Payloads up to this many bytes may go compressed; None: any.
        self._window: int | None = (
            None
            if agreement.server_max_window_bits == 15
            else 1 << agreement.server_max_window_bits
        )

    def _wire(self, frames: list[OutFrame]) -> bytes:
        window = self._window
        if window is None:
            return frames[0].wsz if len(frames) == 1 else b"".join([f.wsz for f in frames])
        return b"".join([f.wsz if f.payload_size <= window else f.ws for f in frames])

    async def send(self, frames: list[OutFrame]) -> None:
        data = self._wire(frames)
        with self._errors:
            await self._stream.send_all(data)

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        data = self._wire(frames)
        try:
            written = self._stream.write_nowait(data)
        except trio.BrokenResourceError as exc:
            raise self._errors.translate(exc) from exc
        return None if written is None else data[written:]
