"""`ChatClient`, the facade the application holds, and `connect`, which opens one.

The client's parts, each in its own module, share one `ClientState`:
`requests` (the pending requests), `outgoing` and `incoming` (the frames each
way, sans-I/O), `inbox` (the events), `session` (one connection's tasks) and
`reconnect` (the main task). `ChatClient` builds them, checks each call and
hands it over; it holds no state of its own and never touches the socket.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, Literal

import trio

from .connection import Endpoint
from .errors import ConnectionEnded
from .events import Authed, Event, HistoryPage, Joined
from .inbox import EventInbox
from .incoming import IncomingFrames
from .outgoing import OutgoingFrames
from .pacing import Backoff, SendBucket
from .reconnect import Reconnector
from .requests import Request, RequestBook
from .session import Session
from .state import ClientState, RoomState, TokenSource

__all__ = ["MAX_HISTORY_LIMIT", "ChatClient", "connect"]

#: The most a `history` request may ask for (docs/protocol.md §3).
MAX_HISTORY_LIMIT: Final = 200


class ChatClient:
    """A chat connection that survives reconnects. Made by `connect`.

    Every request method may be called from several tasks at once; answers
    are matched by ``ref``. While the connection is down, requests wait and
    go out once it is back and their room is joined again.

    Cancellation (every request method): cancelled before its frame went out,
    nothing is sent. Cancelled after, the request is still followed through:
    a say is still sent again after a reconnect until it is acked (so it is
    stored exactly once), its answer is just not returned to anyone.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None = None,
        resume_token: str | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        send_rate: float | Literal["auto"] | None = "auto",
        send_burst: int | Literal["auto"] = "auto",
        retries: int = 5,
        retry_delay: float = 1.5,
        event_buffer: int = 1000,
        max_pending: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        endpoint = Endpoint.parse(url)
        if event_buffer < 1 or max_pending < 1:
            raise ValueError("event_buffer and max_pending must be at least 1")
        self.url = url
        state = self._state = ClientState(token, resume_token)
        inbox = self._inbox = EventInbox(event_buffer, state)
        book = self._book = RequestBook(state, max_pending)
        bucket = SendBucket(send_rate, send_burst)
        incoming = IncomingFrames(
            state, book, inbox, bucket=bucket, retries=retries, retry_delay=retry_delay
        )
        outgoing = OutgoingFrames(state, book, bucket)
        session = self._session = Session(
            endpoint,
            state,
            book,
            incoming,
            outgoing,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            ssl_context=ssl_context,
            open_stream=open_stream,
        )
        backoff = backoff if backoff is not None else Backoff()
        self._reconnector = Reconnector(
            url, session, state, book, inbox, reconnect=reconnect, backoff=backoff
        )

    # --- what the application reads -----------------------------------------------

    @property
    def name(self) -> str | None:
        """The name the server bound (from the last `Joined` or `Authed`)."""
        return self._state.name

    @property
    def user(self) -> str | None:
        """The token's ``sub`` once authenticated; None when anonymous."""
        return self._state.user

    @property
    def authed(self) -> Authed | None:
        """The server's latest ``authed`` answer (``user``, ``name``, ``exp``): from
        the current connection's ``auth`` or a later `authenticate`; None when
        anonymous. ``exp`` says when to refresh."""
        return self._state.authed

    @property
    def resume_token(self) -> str | None:
        """The latest resume token (rotated on every reconnect)."""
        return self._state.resume_token

    @property
    def last_ids(self) -> dict[str, str | None]:
        """Per room, the last message id seen: what the next rejoin sends as ``since``."""
        return {room: state.last_id for room, state in self._state.rooms.items()}

    @property
    def rooms(self) -> tuple[str, ...]:
        """The rooms joined (or being joined again)."""
        return tuple(room for room, state in self._state.rooms.items() if not state.leaving)

    @property
    def connected(self) -> bool:
        """True while a connection is open (and authenticated, with a token)."""
        state = self._state
        return state.conn is not None and not state.closed and state.ended is None

    @property
    def ended(self) -> ConnectionEnded | None:
        """Why the client ended for good, or None while it runs."""
        return self._state.ended

    # --- requests -----------------------------------------------------------------

    async def join(
        self, room: str, *, name: str | None = None, since: str | None = None
    ) -> Joined:
        """Join ``room`` (again: catch up) and return the server's `Joined`.

        Args:
            room: the room.
            name: the name to claim; needed on the first join unless authenticated.
            since: the last message id seen in this room (e.g. saved by an earlier
                run): the server replays what came after it into `Joined.history`.

        Raises:
            ClientError: ``name_taken``, ``bad_name``, ``bad_room``, ``forbidden``, ...
            ConnectionEnded: the client ended.
        """
        self._state.check_usable()
        if name is not None and self._state.name is None:
            self._state.wanted_name = name
        rooms = self._state.rooms
        state = rooms.get(room)
        if state is None or state.leaving:
            state = rooms[room] = RoomState(since)
        elif since is not None:
            state.last_id = since
        request: Request[Joined] = Request("join", self._book.next_ref(), room=room)
        request.name = name
        return await self._book.call(request)

    async def say(self, room: str, msg: str) -> str:
        """Say ``msg`` in ``room``; return its id once the server stored it (the ack).

        Survives reconnects: sent again with the same ``ref`` until acked, never
        stored twice (Rule 4, `triochat.client.requests`). Our own `Message` also arrives
        as an event, like everybody's.

        Raises:
            ClientError: ``not_joined``, ``too_long``, or ``rate_limited`` /
                ``unavailable`` after ``retries`` attempts.
            ConnectionEnded: the client ended before the ack.
        """
        self._state.check_usable()
        request: Request[str] = Request("say", self._book.next_ref(), room=room)
        request.msg = msg
        return await self._book.call(request)

    async def whisper(self, to: str, msg: str) -> str:
        """Whisper ``msg`` to the user ``to``; return the whisper's id (the ack).

        Raises:
            ClientError: ``no_such_user``, ``not_joined`` (no name yet), ...
            DeliveryUnknown: the connection was lost after it was sent and before
                the ack; it is not sent again (whispers are not stored).
            ConnectionEnded: the client ended.
        """
        self._state.check_usable()
        request: Request[str] = Request("whisper", self._book.next_ref())
        request.to = to
        request.msg = msg
        return await self._book.call(request)

    async def leave(self, room: str) -> None:
        """Leave ``room``; returns once the server confirmed (or a reconnect dropped it).

        Raises:
            ClientError: ``not_joined``.
            ConnectionEnded: the client ended.
        """
        self._state.check_usable()
        state = self._state.rooms.get(room)
        if state is not None:
            state.leaving = True
        request: Request[None] = Request("leave", self._book.next_ref(), room=room)
        await self._book.call(request)

    async def history(
        self, room: str, *, before: str | None = None, limit: int = 50
    ) -> HistoryPage:
        """Up to ``limit`` (1-200) messages of ``room`` older than ``before``
        (or the newest), oldest first. The room must be joined.

        Raises:
            ClientError: ``not_joined``, ``bad_frame`` (an unknown ``before``), ...
            ConnectionEnded: the client ended.
        """
        self._state.check_usable()
        request: Request[HistoryPage] = Request("history", self._book.next_ref(), room=room)
        request.before = before
        request.limit = limit
        return await self._book.call(request)

    async def history_pages(
        self, room: str, *, before: str | None = None, limit: int = MAX_HISTORY_LIMIT
    ) -> AsyncIterator[HistoryPage]:
        """Every page older than ``before`` (or from the newest), newest page first.

        Each page's messages are oldest first; the iteration stops after the
        oldest message the server keeps. Holds no resources between pages.
        """
        while True:
            page = await self.history(room, before=before, limit=limit)
            if page.messages:
                yield page
            if not page.more or not page.messages:
                return
            before = page.messages[0].id

    async def typing(self, room: str) -> bool:
        """Tell ``room`` we are typing: a hint, sent only if the connection is up,
        the room joined on it and the send bucket has a token.

        Returns:
            Whether the frame was sent.
        """
        self._state.check_usable()
        await trio.lowlevel.checkpoint()
        return await self._session.send_typing(room)

    async def authenticate(self, token: str) -> Authed:
        """Send a fresh ``token`` for the same user before the old one expires.

        It is also the token of every later reconnect (unless `connect` was
        given a function, which is then asked each time).

        Raises:
            AuthenticationFailed: the server refused it (and closes with 4003).
            ValueError: `connect` was given no token: a connection cannot start
                authenticating later (docs/protocol.md §15).
        """
        self._state.check_usable()
        if self._state.token is None:
            raise ValueError("this client connected without a token")
        if isinstance(self._state.token, str):
            self._state.token = token
        request: Request[Authed] = Request("auth", self._book.next_ref())
        request.token = token
        return await self._book.call(request)

    # --- events ----------------------------------------------------------------------

    async def receive(self) -> Event:
        """The next event (messages, presence, typing, whispers, unsolicited errors,
        and the client's own `Disconnected`, `Rejoined`, `RejoinFailed`,
        `EventsDropped`).

        Raises:
            ConnectionEnded: the client ended (after the events buffered before it).
            trio.EndOfChannel: the client was closed by `aclose` (or the end of
                `connect`'s block).
        """
        return await self._inbox.receive()

    def receive_nowait(self) -> Event:
        """The next event if one is buffered already, without waiting.

        The reader buffers events in the order their frames arrived, so, for
        example, our own `Message` is here by the time `say` returns (the
        server sends it before the ``ack``).

        Raises:
            trio.WouldBlock: no event is buffered.
            ConnectionEnded: the client ended (after the events buffered before it).
            trio.EndOfChannel: the client was closed by `aclose`.
        """
        return self._inbox.receive_nowait()

    def __aiter__(self) -> ChatClient:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    # --- closing ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (code 1000) and end the client; idempotent.

        Requests still waiting fail with `trio.ClosedResourceError` (says not
        acked by then are not sent again). The close handshake gets at most
        ``close_timeout`` seconds, shielded from cancellation.
        """
        if self._state.closed:
            await trio.lowlevel.checkpoint()
            return
        self._state.closed = True
        self._book.fail_all(trio.ClosedResourceError("the chat client was closed"))
        self._inbox.wake_all()
        await self._session.close()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: TokenSource | None = None,
    resume_token: str | None = None,
    reconnect: bool = True,
    backoff: Backoff | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 20.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 5.0,
    send_rate: float | Literal["auto"] | None = "auto",
    send_burst: int | Literal["auto"] = "auto",
    retries: int = 5,
    retry_delay: float = 1.5,
    event_buffer: int = 1000,
    max_pending: int = 1000,
    ssl_context: ssl.SSLContext | None = None,
    open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
) -> AsyncIterator[ChatClient]:
    """Open a `ChatClient` to ``url`` (``ws://host:port/ws`` or ``wss://…``).

    Args:
        url: the server's WebSocket URL; an empty path means ``/ws``.
        token: a JWT (docs/protocol.md §15), or an async function returning one, asked
            before every connection (so a reconnect gets a fresh token, and a
            4003 "expired" reconnects instead of ending).
        resume_token: a resume token from an earlier run (`ChatClient.resume_token`):
            the first join takes the name back from that run's connection.
        reconnect: reconnect after a lost connection (with ``backoff``).
        backoff: the waits between attempts (`Backoff`).
        ping_interval: seconds between pings (None: no pings).
        ping_timeout: a pong not back within this many seconds ends the connection.
        connect_timeout: seconds for TCP, the handshake, and the ``authed`` answer.
        close_timeout: seconds the closing handshake may take at the end.
        send_rate: says and whispers per second the client sends at most;
            ``send_burst`` at once. ``"auto"`` (both by default) follows the
            server's ``joined.limits``: 80 % of its ``say_rate`` and half its
            ``say_burst`` (none with a ``say_rate`` of 0), and 8/s, 10 until it
            tells them (or from a server that does not), so a busy bot is slowed
            down, not refused. A number is a ceiling of the caller's own, kept
            under the server's figures too; a ``send_rate`` of None: no pacing.
        retries: times a say, join or history refused with ``rate_limited`` (say and
            join: or ``unavailable``) is sent again, ``retry_delay`` s apart.
        event_buffer: events kept for `ChatClient.receive`; when full the oldest
            are dropped (`EventsDropped` marks the place).
        max_pending: requests that may await answers at once; more wait for room.
        ssl_context: for ``wss://`` (default: the system's trust store).
        open_stream: connect through this instead of TCP (a Unix socket, a
            tunnel, an in-memory server in tests); the URL still gives the
            ``Host`` header and the path.

    Raises:
        ConnectFailed: the first connection failed (no retry for that one).
        AuthenticationFailed: the token was refused.

    Resource handling: the block owns the client's tasks; leaving it closes
    the connection (1000, bounded by ``close_timeout``). The block is not
    cancelled when the client ends for good: calls raise `ConnectionEnded`.
    """
    client = ChatClient(
        url,
        token=token,
        resume_token=resume_token,
        reconnect=reconnect,
        backoff=backoff,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        send_rate=send_rate,
        send_burst=send_burst,
        retries=retries,
        retry_delay=retry_delay,
        event_buffer=event_buffer,
        max_pending=max_pending,
        ssl_context=ssl_context,
        open_stream=open_stream,
    )
    # Errors are caught inside the nursery and raised after it, so the caller
    # gets them as they are, never wrapped in an ExceptionGroup (STYLE.md §4).
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._reconnector.run)
        except ConnectionEnded as exc:
            failure = exc
        if failure is None:
            try:
                yield client
            except BaseException as exc:
                failure = exc
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
