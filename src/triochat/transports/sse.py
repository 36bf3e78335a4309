"""The Server-Sent Events transport (docs/protocol.md §13), for networks whose
proxies break WebSockets.

Server -> client: one long ``GET /sse`` response, one ``data:`` event per
frame (``id:`` set to the message id where there is one), a comment line as
heartbeat. Client -> server: each frame is a ``POST /sse`` naming the
session in an ``X-Triochat-Session`` header (or, the older form, a ``POST
/sse/<session>``) whose body the front hands to `SseTransport.post`. The chat logic is the same
`Connection` as on a WebSocket; only the framing differs.

The stream has no close frame, so `close` sends a last named event,
``event: close`` with ``{"code": …, "reason": …}`` (ignored by an
``onmessage`` handler, read by a client that listens for it), then ends the
response.

Errors: what trio raises on the stream and on the inbox of POSTed frames
becomes `TransportClosed` in one place, `SseErrors` (the boundary, as
httpcore's ``map_exceptions``; the WebSocket transport's is
`websocket.WebSocketErrors`): out of this module comes `TransportClosed`,
or a bug.

`SseSessions` is a node's registry of its streams: a POST finds its stream
here, or, when the stream is on another node of a cluster, is relayed there
through the backplane and waits for that node's answer (docs/protocol.md
§13, §14).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

import msgspec
import trio

from ..backplane import Backplane
from ..config import Config
from ..events import SsePost, SsePostResult
from ..frames import OutFrame
from . import TransportClosed

__all__ = ["HEARTBEAT", "PostAnswer", "SseErrors", "SseSessions", "SseTransport"]

#: How a POST is answered: (HTTP status, error code, message); 204 when taken.
PostAnswer = tuple[int, str, str]

_JSON = msgspec.json.Decoder()

HEARTBEAT = 15.0  # seconds between comment lines that keep proxies from timing out
INBOX_FRAMES = 16  # POSTed frames waiting for the connection's reader

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"x-accel-buffering: no\r\n"  # tell nginx not to buffer the stream
    b"connection: close\r\n"
    b"\r\n"
)


class SseErrors:
    """The error boundary of an SSE session: where trio's exceptions become
    triochat's, and nowhere else (as httpcore's ``map_exceptions``).
    ``with`` one around each call into trio: a session has one for its inbox
    of POSTed frames and one for its stream.

    ==========================================  ====================================
    raised                                      becomes
    ==========================================  ====================================
    the inbox: ``EndOfChannel``,                ``TransportClosed("event stream
    ``ClosedResourceError`` (the session        closed")``
    ended), ``BrokenResourceError``
    the stream: ``BrokenResourceError``,        ``TransportClosed("event stream
    ``ClosedResourceError`` (the client         lost")``, and the session ends
    went away, or we closed it)
    ==========================================  ====================================

    Anything else is a bug, and propagates.
    """

    __slots__ = ("_on_error", "_reason")

    def __init__(self, reason: str, on_error: Callable[[], None] | None = None) -> None:
        self._reason = reason
        #: Run before the error is raised (the stream's: the session ends).
        self._on_error = on_error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, _LIBRARY_ERRORS):
            if self._on_error is not None:
                self._on_error()
            raise TransportClosed(self._reason) from exc


#: What trio raises on a stream or a memory channel that means "this session is over".
_LIBRARY_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel)


class SseTransport:
    """The `Transport` of one SSE session (one ``GET /sse`` stream)."""

    #: The keepalive interval this transport wants (comments, not pings).
    heartbeat: float | None = HEARTBEAT
    #: Nothing answers a comment: only a write that cannot finish shows a dead peer.
    expects_pong = False
    #: Closing is our close event and the end of the response: nothing to read.
    reads_to_close = False
    last_receive = 0.0

    def __init__(self, stream: trio.abc.Stream, node: str = "") -> None:
        self._stream = stream
        #: The unguessable session id the client POSTs to.
        # ``<node>.<random>``: a POST that reaches another node of a cluster
        # knows where to relay it.
        self.session_id = (
            f"{node}.{secrets.token_urlsafe(24)}" if node else secrets.token_urlsafe(24)
        )
        self._write_lock = trio.Lock()
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[str](INBOX_FRAMES)
        self._ended = False
        #: The error boundary (`SseErrors`) of the inbox, and of the stream.
        self._inbox_errors = SseErrors("event stream closed")
        self._stream_errors = SseErrors("event stream lost", on_error=self._end)

    async def start(self) -> None:
        """Send the response head and the ``session`` event."""
        session = json.dumps(
            {"type": "session", "id": self.session_id}, separators=(",", ":")
        ).encode()
        await self._write(_HEAD + b"data: " + session + b"\n\n")

    async def watch_peer(self) -> None:
        """Return when the client closes the stream (it sends nothing else)."""
        try:
            with self._stream_errors:
                while await self._stream.receive_some(4096):
                    pass  # a client has nothing to say on this stream: ignore it
        except TransportClosed:
            pass
        self._end()

    async def post(self, text: str) -> bool:
        """Hand one POSTed frame to the connection; False when the session is gone.

        Waits while the connection's reader is behind, like a WebSocket
        client whose frames are not read yet.
        """
        try:
            with self._inbox_errors:
                await self._inbox_send.send(text)
        except TransportClosed:
            return False
        return True

    @property
    def ended(self) -> bool:
        return self._ended

    def _end(self) -> None:
        self._ended = True
        self._inbox_send.close()

    # --- Transport -------------------------------------------------------------

    async def receive_message(self) -> str:
        with self._inbox_errors:
            return await self._inbox_recv.receive()

    async def send(self, frames: list[OutFrame]) -> None:
        data = frames[0].sse if len(frames) == 1 else b"".join([frame.sse for frame in frames])
        await self._write(data)

    async def ping(self) -> None:
        await self._write(b": keepalive\n\n")

    async def close(self, code: int, reason: str) -> None:
        event = json.dumps({"code": code, "reason": reason}, separators=(",", ":")).encode()
        with contextlib.suppress(TransportClosed):
            await self._write(b"event: close\ndata: " + event + b"\n\n")
        self._end()

    async def abort(self) -> None:
        self._end()
        await trio.aclose_forcefully(self._stream)

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            with self._stream_errors:
                await self._stream.send_all(data)


class SseSessions:
    """This node's SSE streams by session id, and the relay of POSTs between nodes."""

    def __init__(self, backplane: Backplane, config: Config) -> None:
        self._backplane = backplane
        self._config = config
        self._sessions: dict[str, SseTransport] = {}
        #: POSTs relayed to the node that holds their stream, awaiting its answer.
        self._relay_ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[SsePostResult]]] = {}
        #: Where relayed POSTs are answered (set by `serve_relays`).
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    @contextlib.contextmanager
    def session(self, stream: trio.abc.Stream) -> Iterator[SseTransport]:
        """A new stream's transport, findable by its session id while in use."""
        transport = SseTransport(stream, self._backplane.node)
        self._sessions[transport.session_id] = transport
        try:
            yield transport
        finally:
            del self._sessions[transport.session_id]

    def serve_relays(self, nursery: trio.Nursery) -> None:
        """Answer POSTs other nodes relay here in ``nursery`` (from now on)."""
        self._nursery = nursery

    async def post(self, session_id: str, body: bytes) -> PostAnswer:
        """Deliver a POSTed frame to its stream, here or on the node that holds it."""
        transport = self._sessions.get(session_id)
        node = session_id.partition(".")[0] if "." in session_id else ""
        backplane = self._backplane
        remote = (
            transport is None and node not in ("", backplane.node) and backplane.node_alive(node)
        )
        if not remote and (transport is None or transport.ended):
            return 404, "no_such_session", "unknown or closed session: open a new stream"
        try:
            text = body.decode("utf-8")
            _JSON.decode(text)
        except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
            return 400, "bad_json", "the body is not a JSON value"
        if remote:
            return await self._relay(node, session_id, text)
        assert transport is not None
        return await self._post_local(transport, text)

    async def _post_local(self, transport: SseTransport, text: str) -> PostAnswer:
        with trio.move_on_after(self._config.handshake_timeout):
            if await transport.post(text):
                return 204, "", ""
            return 404, "no_such_session", "the session closed: open a new stream"
        return 503, "unavailable", "the session is not reading: try again"

    async def _relay(self, node: str, session_id: str, text: str) -> PostAnswer:
        """The stream is on ``node``: relay the POST there and wait for its answer."""
        request = next(self._relay_ids)
        done = trio.Event()
        answer: list[SsePostResult] = []
        self._waiting[request] = (done, answer)
        backplane = self._backplane
        try:
            backplane.publish(SsePost(node, session_id, text, backplane.node, request))
            with trio.move_on_after(self._config.backplane_timeout):
                await done.wait()
        finally:
            del self._waiting[request]
        if not answer:
            return 503, "unavailable", "the node holding the session did not answer: try again"
        return answer[0].status, answer[0].code, answer[0].message

    def relayed(self, event: SsePost | SsePostResult) -> None:
        """A relayed POST for a stream here, or the answer to one we relayed (the
        hub's relay hook: never blocks)."""
        if isinstance(event, SsePostResult):
            waiting = self._waiting.get(event.request)
            if waiting is not None:
                waiting[1].append(event)
                waiting[0].set()
            return
        if self._nursery is not None:
            self._nursery.start_soon(self._answer_relayed, event)

    async def _answer_relayed(self, post: SsePost) -> None:
        transport = self._sessions.get(post.session)
        if transport is None or transport.ended:
            status, code, message = 404, "no_such_session", "unknown or closed session"
        else:
            status, code, message = await self._post_local(transport, post.body)
        self._backplane.publish(SsePostResult(post.sender, post.request, status, code, message))
