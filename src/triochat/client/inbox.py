"""The events waiting for the application: a bounded buffer that never blocks.

The reader hands events over without awaiting (Rule 1, `session`), so the
buffer cannot push back: when full it drops its oldest entry and says so
with `EventsDropped` at the place of the gap.
"""

from __future__ import annotations

import collections

import trio

from .events import Event, EventsDropped
from .state import ClientState

__all__ = ["EventInbox"]


class EventInbox:
    """Events for `ChatClient.receive`, oldest first, at most ``size`` of them."""

    def __init__(self, size: int, state: ClientState) -> None:
        self._state = state
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self._dropped = 0
        self._lot = trio.lowlevel.ParkingLot()

    def emit(self, event: Event) -> None:
        """Buffer an event for `receive`; never blocks (Rule 1)."""
        if len(self._events) == self._events.maxlen:
            self._dropped += 1  # the deque drops its oldest entry
        self._events.append(event)
        self._lot.unpark_all()

    def wake_all(self) -> None:
        """Wake every waiting receiver to look again (the client ended or closed)."""
        self._lot.unpark_all()

    async def receive(self) -> Event:
        """The next event, waiting for one (see `ChatClient.receive`)."""
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()

    def receive_nowait(self) -> Event:
        """The next event if one is buffered (see `ChatClient.receive_nowait`).

        The events buffered before the end come out first; after them, why
        the client ended.
        """
        if self._dropped:
            count, self._dropped = self._dropped, 0
            return EventsDropped(count)
        if self._events:
            return self._events.popleft()
        if self._state.ended is not None:
            raise self._state.ended
        if self._state.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock
