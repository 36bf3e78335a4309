"""One connection's life, from opening the stream to its end: the client's I/O.

Rule 1: one reader task per connection takes every frame off the socket at
once and handles it without awaiting (`incoming`). trio-websocket's own
reader stops (pongs and close frames included) while its small queue is
full, so nothing may make ours wait (a full queue stalls the connection's
pongs). Events for the application go to a bounded buffer that drops its
oldest entry when full and says so (`EventsDropped`, `inbox`).

Beside the reader, each connection runs a keepalive task and, once it is
usable (and authenticated, with a token), the writer of Rule 3 (`outgoing`).
`ChatClient.typing` and `ChatClient.aclose` send on the current connection
through `Session` too.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, cast

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    wrap_client_stream,
)
from wsproto.utilities import LocalProtocolError

from .connection import CLOSE_ABNORMAL, CLOSE_NORMAL, Connection, End, Endpoint
from .errors import AuthenticationFailed, ConnectionEnded
from .events import Authed, encode
from .incoming import IncomingFrames
from .outgoing import OutgoingFrames
from .requests import Request, RequestBook
from .state import ClientState

__all__ = ["LIBRARY_QUEUE", "MAX_MESSAGE_CHARS", "Session"]

LOGGER = logging.getLogger("triochat.client")

#: trio-websocket's queue between its reader and ours. Ours drains it at
#: once (Rule 1), so a few frames suffice; its default of 1 is the gap.
LIBRARY_QUEUE: Final = 4
#: Largest server frame accepted, in characters (a `joined` or `history` of
#: 200 messages of 2000 characters is about 0.45 M).
MAX_MESSAGE_CHARS: Final = 4 << 20


class Session:
    """Runs one connection at a time: connect, authenticate, read, ping, write;
    sends ``typing`` and the closing handshake on the current one."""

    def __init__(
        self,
        endpoint: Endpoint,
        state: ClientState,
        book: RequestBook,
        incoming: IncomingFrames,
        outgoing: OutgoingFrames,
        *,
        ping_interval: float | None,
        ping_timeout: float,
        connect_timeout: float,
        close_timeout: float,
        ssl_context: ssl.SSLContext | None,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None,
    ) -> None:
        self._endpoint = endpoint
        self._state = state
        self._book = book
        self._incoming = incoming
        self._outgoing = outgoing
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._ssl_context = ssl_context
        self._open_stream = open_stream
        self._generation = 0

    async def run(self, ready: Callable[[], None]) -> End:
        """One connection, from connecting to its end; returns how it ended.

        Calls ``ready`` once the connection is usable (requests may go out).
        """
        self._generation += 1
        conn = Connection(self._generation)
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(self._connect_timeout):
            try:
                stream = await self._connect_stream()
            except OSError as exc:
                return End(None, f"cannot connect ({exc.strerror or exc})")
        if stream is None:
            return End(None, f"no connection within {self._connect_timeout} s")
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                await self._drive(conn, stream, nursery, ready)
        except* ConnectionRejected as group:
            status = cast("ConnectionRejected", group.exceptions[0]).status_code
            conn.finish(None, f"handshake refused with HTTP {status}", status=status)
        except* LocalProtocolError:
            # trio-websocket's closing race (its reader answers a ping after the
            # close went out); the connection was ending anyway.
            conn.finish(CLOSE_ABNORMAL, "connection closed")
        finally:
            if self._state.conn is conn:
                self._book.detach(conn)
            await trio.aclose_forcefully(stream)
        return conn.end or End(None, "connection ended")

    async def send_typing(self, room: str) -> bool:
        """Send ``typing`` for ``room`` if it may go now (`OutgoingFrames.typing_frame`)
        on the current connection; whether it went."""
        conn = self._state.conn
        if conn is None or conn.ws is None:
            return False
        text = self._outgoing.typing_frame(room, conn, trio.current_time())
        if text is None:
            return False
        try:
            await conn.ws.send_message(text)
        except ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        """Close the current connection (1000): at most ``close_timeout`` s, shielded
        from cancellation. The reader lives on to take the server's close frame."""
        conn = self._state.conn
        if conn is not None and conn.ws is not None:
            with trio.move_on_after(self._close_timeout, shield=True):
                await conn.ws.aclose(CLOSE_NORMAL, "bye")
        else:
            await trio.lowlevel.checkpoint()

    async def _connect_stream(self) -> trio.abc.Stream:
        if self._open_stream is not None:
            return await self._open_stream()
        endpoint = self._endpoint
        if endpoint.tls:
            context = self._ssl_context or ssl.create_default_context()
            return await trio.open_ssl_over_tcp_stream(
                endpoint.host, endpoint.port, ssl_context=context, https_compatible=True
            )
        return await trio.open_tcp_stream(endpoint.host, endpoint.port)

    async def _drive(
        self,
        conn: Connection,
        stream: trio.abc.Stream,
        nursery: trio.Nursery,
        ready: Callable[[], None],
    ) -> None:
        with trio.move_on_after(self._connect_timeout) as handshake:
            # Any Stream works; trio-websocket's annotation is narrower than its use.
            conn.ws = await wrap_client_stream(
                nursery,
                cast("trio.SocketStream", stream),
                self._endpoint.host_header,
                self._endpoint.resource,
                message_queue_size=LIBRARY_QUEUE,
                max_message_size=MAX_MESSAGE_CHARS,
            )
        if handshake.cancelled_caught:
            conn.finish(None, f"no handshake within {self._connect_timeout} s")
            return
        nursery.start_soon(self._reader, conn)
        nursery.start_soon(self._keepalive, conn)
        if self._state.token is not None and not await self._authenticate(conn):
            return
        self._book.attach(conn)
        ready()
        nursery.start_soon(self._writer, conn)

    async def _authenticate(self, conn: Connection) -> bool:
        """Send ``auth`` first and wait for ``authed`` (docs/protocol.md §15)."""
        assert conn.ws is not None
        source = self._state.token
        if isinstance(source, str) or source is None:
            token = source
        else:
            try:
                token = await source()
            except Exception as exc:  # the application's function: end, don't crash
                LOGGER.warning("the token function failed", exc_info=True)
                error = AuthenticationFailed(None, f"the token function failed: {exc!r}")
                conn.finish(None, str(error), error=error)
                return False
        request: Request[Authed] = Request("auth", self._book.next_ref())
        request.internal = True
        request.token = token
        request.sent_on = conn.generation
        self._book.track(request)
        try:
            await conn.ws.send_message(
                encode({"type": "auth", "token": token, "ref": request.ref})
            )
            with trio.move_on_after(self._connect_timeout):
                await request.done.wait()
        except ConnectionClosed:
            return False  # the reader records how
        finally:
            self._book.retire(request)
        if not request.done.is_set():
            conn.finish(None, f"no answer to auth within {self._connect_timeout} s")
            return False
        if request.error is not None:
            conn.finish(4003, str(request.error), error=cast("ConnectionEnded", request.error))
            return False
        conn.authed = self._state.authed = request.outcome()
        self._state.user = conn.authed.user
        self._state.name = conn.authed.name
        return True

    async def _reader(self, conn: Connection) -> None:
        """Drain the socket at once, for ever (Rule 1)."""
        assert conn.ws is not None
        while True:
            try:
                text = await conn.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                # During our own close the library's reader must live on
                # to take the server's close frame: no cancel then.
                cancel = not self._state.closed
                if reason is None:
                    conn.finish(None, "connection closed", cancel=cancel)
                else:
                    conn.finish(reason.code, reason.reason or reason.name, cancel=cancel)
                return
            if isinstance(text, str):
                self._incoming.dispatch(conn, text)

    async def _keepalive(self, conn: Connection) -> None:
        """Ping every ``ping_interval`` s; no pong within ``ping_timeout`` ends the
        connection (trio-websocket's ``ping`` would wait for ever)."""
        assert conn.ws is not None
        if self._ping_interval is None:
            return
        while True:
            await trio.sleep(self._ping_interval)
            with trio.move_on_after(self._ping_timeout) as waiting:
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return  # the reader records how
            if waiting.cancelled_caught:
                conn.finish(CLOSE_ABNORMAL, f"no pong within {self._ping_timeout} s")
                return

    async def _writer(self, conn: Connection) -> None:
        """Send requests in order, each when it may go (Rule 3)."""
        assert conn.ws is not None
        while True:
            wake = self._book.wake = trio.Event()
            now = trio.current_time()
            request, wait = self._outgoing.next_to_send(conn, now)
            if request is None:
                with trio.move_on_after(wait):
                    await wake.wait()
                continue
            text = self._outgoing.sending(request, conn, now)
            try:
                await conn.ws.send_message(text)
            except ConnectionClosed:
                return  # the reader records how
