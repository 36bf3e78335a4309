"""What each server frame does: answers requests, moves rooms on, makes events.

Everything here runs in the connection's reader task and never awaits
(Rule 1, `session`). Answers are matched to requests by ``ref`` alone
(Rule 2, `requests`); a message of ours, live or replayed, is noted as the
stored copy of the say it came from, so a reconnect does not send that say
again (Rule 4, `requests`). Sans-I/O.
"""

from __future__ import annotations

import logging
from typing import Final

import msgspec
import trio

from .connection import Connection
from .errors import AuthenticationFailed, ClientError
from .events import (
    ANSWERS,
    Ack,
    Authed,
    Deleted,
    HistoryPage,
    Joined,
    Left,
    Message,
    Rejoined,
    RejoinFailed,
    ServerError,
    decode_any,
    decode_frame,
)
from .inbox import EventInbox
from .pacing import SendBucket
from .requests import RequestBook
from .state import ClientState, RoomState

__all__ = ["RETRYABLE", "IncomingFrames"]

LOGGER = logging.getLogger("triochat.client")

#: Error codes after which nothing was stored or done: the request is sent
#: again (same ``ref``) after ``retry_delay``. A whisper is not sent again
#: after ``unavailable``: that one may have been delivered (§3).
RETRYABLE: Final = {
    "say": frozenset({"rate_limited", "unavailable"}),
    "join": frozenset({"rate_limited", "unavailable"}),
    "history": frozenset({"rate_limited"}),
    "whisper": frozenset({"rate_limited"}),
    "leave": frozenset({"rate_limited"}),
}


class IncomingFrames:
    """Handles each frame the server sends, as it arrives (Rule 1)."""

    def __init__(
        self,
        state: ClientState,
        book: RequestBook,
        inbox: EventInbox,
        *,
        bucket: SendBucket,
        retries: int,
        retry_delay: float,
    ) -> None:
        self._state = state
        self._book = book
        self._inbox = inbox
        self._bucket = bucket
        self._retries = retries
        self._retry_delay = retry_delay

    def dispatch(self, conn: Connection, text: str) -> None:
        """Handle the frame ``text`` that came on ``conn``."""
        try:
            frame = decode_frame(text)
        except msgspec.ValidationError as exc:
            self._undecodable(text, exc)
            return
        except msgspec.DecodeError:
            LOGGER.debug("skipped a server frame that is not JSON: %.80r", text)
            return
        if isinstance(frame, Message):
            self._on_message(conn, frame)
        elif isinstance(frame, Joined):
            self._on_joined(conn, frame)
        elif isinstance(frame, Ack):
            self._on_ack(frame)
        elif isinstance(frame, ServerError):
            self._on_error(frame)
        elif isinstance(frame, HistoryPage | Left | Authed):
            request = self._book.get(frame.ref)
            if request is None or request.kind != ANSWERS[type(frame)]:
                LOGGER.debug("skipped an answer to no pending request: %.80r", text)
                return
            if isinstance(frame, Left):
                state = self._state.rooms.get(frame.room)
                if state is not None and state.leaving:
                    del self._state.rooms[frame.room]
                self._book.answer(request, None)
            else:
                if isinstance(frame, Authed):
                    # A refresh: its exp applies now.
                    conn.authed = self._state.authed = frame
                self._book.answer(request, frame)
        else:  # Presence, Typing, Whisper, Deleted
            if isinstance(frame, Deleted):
                self._on_deleted(frame)
            self._inbox.emit(frame)

    def _undecodable(self, text: str, exc: msgspec.ValidationError) -> None:
        """A frame of an unknown type (skipped) or a known one of the wrong shape
        (its request, if any, fails)."""
        try:
            raw = decode_any(text)
        except msgspec.DecodeError:  # pragma: no cover - it decoded once already
            return
        request = self._book.get(raw.get("ref")) if isinstance(raw, dict) else None
        if request is None or request.internal:
            LOGGER.debug("skipped a server frame the client does not know (%s): %.80r", exc, text)
            return
        self._book.refuse(
            request, ClientError("bad_answer", f"the server's answer did not decode: {exc}")
        )

    def _on_message(self, conn: Connection, message: Message) -> None:
        state = self._state.rooms.get(message.room)
        if state is not None:
            state.last_id = message.id
            if not state.remember(message.id):
                return  # seen already (a replay)
        if message.name == self._state.name and self._state.user is None:
            # Anonymous: one connection per name, so our name is this connection.
            self._bind(message, conn.generation)
        self._inbox.emit(message)

    def _on_deleted(self, deleted: Deleted) -> None:
        """A deleted message's id is no ``since`` any more: the server forgot it and
        would answer the next rejoin ``recovered: false`` (docs/protocol.md §16).
        Step back to the newest message seen before it."""
        state = self._state.rooms.get(deleted.room)
        if state is None:
            return
        state.seen.pop(deleted.id, None)
        if state.last_id == deleted.id and state.seen:
            state.last_id = next(reversed(state.seen))

    def _bind(self, message: Message, generation: int | None = None) -> None:
        """Note ``message`` as the stored copy of our oldest pending say like it."""
        for request in self._book:
            if (
                request.kind == "say"
                and request.tries
                and request.bound_id is None
                and request.room == message.room
                and request.msg == message.msg
                and (generation is None or request.sent_on == generation)
            ):
                request.bound_id = message.id
                return

    def _on_joined(self, conn: Connection, joined: Joined) -> None:
        request = self._book.get(joined.ref)
        if request is None or request.kind != "join":
            LOGGER.debug("skipped a joined that answers no pending join (%s)", joined.room)
            return
        conn.named = True
        self._state.name = joined.name
        if joined.token is not None:
            self._state.resume_token = joined.token
        self._state.attempt = 0  # a working connection: the backoff starts afresh
        # The send bucket follows the server's rate limit (the defaults if untold).
        limits = joined.limits
        if limits is None:
            self._bucket.follow(None, None)
        else:
            self._bucket.follow(limits.say_rate, limits.say_burst)
        state = self._state.rooms.get(joined.room)
        if state is None:  # left while joining (the leave will follow)
            state = RoomState(None)
        state.joined_on = conn.generation
        state.ever_joined = True
        if request.internal:
            self._inbox.emit(Rejoined(joined))
        for message in joined.history:
            if message.name == self._state.name:
                self._bind(message)
            if state.remember(message.id) and request.internal:
                self._inbox.emit(message)
        if joined.history:
            state.last_id = joined.history[-1].id
        elif not joined.recovered:
            state.last_id = None  # the old one means nothing to this server
        # A replay may have shown says that were stored but never acked.
        for pending in list(self._book):
            if (
                pending.kind == "say"
                and pending.bound_id is not None
                and pending.sent_on != conn.generation
            ):
                self._book.answer(pending, pending.bound_id)
        self._book.answer(request, joined)
        self._book.kick()

    def _on_ack(self, ack: Ack) -> None:
        request = self._book.get(ack.ref)
        if request is None or request.kind not in ("say", "whisper"):
            LOGGER.debug("skipped an ack of no pending request (%s)", ack.ref)
            return
        self._book.answer(request, ack.id)

    def _on_error(self, error: ServerError) -> None:
        request = self._book.get(error.ref)
        if request is None:
            self._inbox.emit(error)
            return
        if request.kind == "auth":
            self._book.refuse(
                request, AuthenticationFailed(4003, f"{error.code}: {error.message}")
            )
            return
        retryable = RETRYABLE.get(request.kind, frozenset())
        if request.kind == "join" and request.with_token:
            # The resume token may be dead (rotated by a takeover whose answer
            # was lost): then our own lost connection holds the name until its
            # grace period ends, and it is free again after that.
            retryable = retryable | {"name_taken"}
        if error.code in retryable and request.tries <= self._retries:
            request.sent_on = 0
            request.hold_until = trio.current_time() + self._retry_delay
            self._book.kick()
            return
        self._book.refuse(request, ClientError(error.code, error.message, error.ref))
        self._settle_refused_room(request.kind, request.room, request.internal, error)
        self._book.kick()

    def _settle_refused_room(
        self, kind: str, room: str | None, internal: bool, error: ServerError
    ) -> None:
        """Drop a room whose join or leave the server refused, as its word says."""
        if room is None:
            return
        state = self._state.rooms.get(room)
        if kind == "leave":
            if state is not None and state.leaving:
                del self._state.rooms[room]  # not in it, by the server's word
        elif kind == "join":
            if state is not None and (internal or not state.ever_joined):
                del self._state.rooms[room]
            if internal:
                self._inbox.emit(RejoinFailed(room, error.code, error.message))
