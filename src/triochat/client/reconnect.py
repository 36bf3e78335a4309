"""The client's main task: a connection after each loss, until told not to.

After each connection ends, `Reconnector` decides from how it ended
(`connection.End`) whether the client ends for good (`ConnectionEnded` and
its kinds) or tries again after the `Backoff` wait, telling the application
with a `Disconnected` event.
"""

from __future__ import annotations

import logging
import random
from typing import Final

import trio

from .connection import End
from .errors import NO_RECONNECT, ConnectFailed, ConnectionEnded
from .events import Disconnected
from .inbox import EventInbox
from .pacing import Backoff
from .requests import RequestBook
from .session import Session
from .state import ClientState

__all__ = ["FINAL_STATUSES", "Reconnector"]

LOGGER = logging.getLogger("triochat.client")

#: HTTP answers to a handshake that another attempt will not change.
FINAL_STATUSES: Final = frozenset({400, 401, 403, 404, 405, 421, 426})


class Reconnector:
    """Runs `Session` after `Session` with backoff; ends the client when it must."""

    def __init__(
        self,
        url: str,
        session: Session,
        state: ClientState,
        book: RequestBook,
        inbox: EventInbox,
        *,
        reconnect: bool,
        backoff: Backoff,
    ) -> None:
        self._url = url
        self._session = session
        self._state = state
        self._book = book
        self._inbox = inbox
        self._reconnect = reconnect
        self._backoff = backoff
        self._random = random.Random()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect after each loss until told not to.

        Reports started once the first connection is open (and authenticated);
        a failure before that is raised (`ConnectFailed`, `AuthenticationFailed`).
        """
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        state = self._state
        while True:
            end = await self._session.run(ready)
            if state.closed:
                return
            error = self._final_error(end, started)
            attempts = self._backoff.max_attempts
            if error is None and attempts is not None and state.attempt >= attempts:
                error = ConnectionEnded(
                    end.code, f"{end.reason}; gave up after {attempts} attempts"
                )
            if error is not None:
                self._terminate(error)
                if not started:
                    raise error
                return
            delay = self._backoff.delay(state.attempt, self._random.random())
            state.attempt += 1
            LOGGER.info(
                "chat connection lost (%s, code %s); reconnecting in %.2f s",
                end.reason,
                end.code,
                delay,
            )
            self._inbox.emit(Disconnected(end.code, end.reason, delay, state.attempt))
            await trio.sleep(delay)

    def _final_error(self, end: End, started: bool) -> ConnectionEnded | None:
        """The error that ends the client after ``end``, or None to reconnect."""
        if end.error is not None:
            return end.error
        code = end.code
        if code is not None and code in NO_RECONNECT:
            if code == 4003 and end.authed and callable(self._state.token):
                return None  # expired: the token function gives a fresh one
            return NO_RECONNECT[code](code, end.reason)
        if not started:
            return ConnectFailed(code, f"could not connect to {self._url}: {end.reason}")
        if end.status in FINAL_STATUSES:
            return ConnectFailed(code, f"could not reconnect to {self._url}: {end.reason}")
        if not self._reconnect:
            return ConnectionEnded(code, end.reason)
        return None

    def _terminate(self, error: ConnectionEnded) -> None:
        """End the client for good: every pending and later call raises ``error``."""
        if self._state.ended is None and not self._state.closed:
            self._state.ended = error
            LOGGER.info("chat client ended: %s", error)
            self._book.fail_all(error)
            self._inbox.wake_all()
