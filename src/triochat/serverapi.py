"""The chat side of the server API (docs/protocol.md §16): `api.ChatApi` on a hub.

`api.py` answers the HTTP calls; this module does them. Reads (presence,
history) read the node's chat state between two steps of the hub (no await,
so nothing changes under them). Changes run inside a hub step (`Hub.call`),
as a client's frame does: a publish goes the way of a say (stored, then
broadcast, then acked, so ``200`` means stored), a delete removes the
message from the store first and then from every node, a disconnect closes
the user's connections on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, TypeVar

import msgspec
import trio

from .api import BAD_ID, ApiError
from .chat import ChatState
from .config import Config
from .errors import StorageError
from .frames import OutFrame
from .hub import Hub
from .protocol import ErrorCode, Message
from .ratelimit import RateLimiter
from .state.log import page_before
from .state.model import Client, Refused
from .waiting import WaitingRun

__all__ = ["ServerApi"]

LOGGER = logging.getLogger("triochat.api")

_T = TypeVar("_T")
#: What runs in a hub step (`Hub.call`): the chat state, the time, the wall clock in ms.
_StepFunction = Callable[[ChatState, float, int], _T]

STOPPING: Final = "the server is stopping: try another node or later"


class _Answer(msgspec.Struct):
    """The `ack` or `error` frame a publish gets, as far as it is read here."""

    type: str
    id: str = ""
    code: str = ""
    message: str = ""


_ANSWER: Final = msgspec.json.Decoder(_Answer)


class _Reply:
    """The peer of a publish: takes its one answer (a `Peer`, with no socket)."""

    def __init__(self) -> None:
        self.answer: OutFrame | None = None
        self.arrived = trio.Event()

    def deliver(self, frame: OutFrame) -> None:
        if self.answer is None:
            self.answer = frame
            self.arrived.set()

    def share(self, run: WaitingRun) -> None:
        """Never in a room: nothing is shared with it."""

    def unshare(self, run: WaitingRun) -> None:
        """Never in a room: nothing is shared with it."""

    def close_soon(self, code: int, reason: str) -> None:
        """Nothing to close."""

    def hold(self) -> None:
        """Nothing is written: nothing to hold."""

    def release(self) -> None:
        """Nothing is written: nothing to release."""


class ServerApi:
    """What `/api/` does to the chat of this node (and, through it, the cluster)."""

    def __init__(self, hub: Hub, config: Config) -> None:
        self._hub = hub
        # A publish waits for its ack as long as a say's store and broadcast may
        # take: the store's own wait, then the message's way back.
        self._ack_timeout = 2 * config.backplane_timeout + config.handshake_timeout

    async def publish(self, room: str, msg: str, name: str) -> tuple[str, int]:
        reply = _Reply()
        client = Client(reply, RateLimiter(0, 1, trio.current_time()))
        client.mode = "typed"

        def submit(chat: ChatState, now: float, wall_ms: int) -> int:
            chat.publish(client, room, name, msg, wall_ms)
            return wall_ms

        ts = await self._in_step(submit)
        with trio.move_on_after(self._ack_timeout):
            await reply.arrived.wait()
        if reply.answer is None:
            client.gone = True  # a late answer goes nowhere
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, "no answer from the store in time: it may be stored"
            )
        answer = _ANSWER.decode(reply.answer.json)
        if answer.type == "ack":
            return answer.id, ts
        status = 503 if answer.code == ErrorCode.UNAVAILABLE else 400
        raise ApiError(status, answer.code, answer.message)

    async def presence(self, room: str) -> list[str]:
        return self._hub.chat.members(room)

    async def history(
        self, room: str, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        chat = self._hub.chat
        if chat.history_in_memory(room):
            try:
                return chat.history_page(room, before, limit)
            except Refused:
                raise ApiError(400, BAD_ID, f"{room} keeps no message {before}") from None
        # An evicted room (docs/protocol.md §8): read from the store, as a join would.
        try:
            stored = await self._hub.backplane.recent(room)
        except StorageError as exc:
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, f"the store is unavailable: {exc}"
            ) from None
        end = len(stored)
        if before is not None:
            end = next((i for i, m in enumerate(stored) if m.id == before), -1)
            if end < 0:
                raise ApiError(400, BAD_ID, f"{room} keeps no message {before}")
        return page_before(stored, end, limit)

    async def delete(self, room: str, message_id: str) -> bool:
        # The store first: once it answers, no join, reload or gap fill brings
        # the message back; then every node forgets it and tells the room.
        try:
            stored = await self._hub.backplane.delete(room, message_id)
        except StorageError as exc:
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, f"the store is unavailable: {exc}"
            ) from None
        kept = await self._in_step(lambda chat, now, wall_ms: chat.delete(room, message_id))
        if stored or kept:
            LOGGER.info("deleted %s from %s (server API)", message_id, room)
        return stored or kept

    async def disconnect(self, user: str) -> None:
        await self._in_step(lambda chat, now, wall_ms: chat.disconnect_user(user))
        LOGGER.info("disconnected user %r (server API)", user)

    async def _in_step(self, function: _StepFunction[_T]) -> _T:
        try:
            return await self._hub.call(function)
        except trio.ClosedResourceError:
            raise ApiError(503, ErrorCode.UNAVAILABLE, STOPPING) from None
