"""What the chat state hands the hub, besides the frames it delivers to peers.

Frames for connections leave at once through ``Peer.deliver``. Everything
else is for the hub to do with I/O: says to store, events to publish to the
other nodes, names to release, acks to time. The parts append it to one
`OutputBuffer`; the hub takes it as one `ChatOutput` (`ChatState.take_output`,
as websockets' ``data_to_send()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..events import Entry, Event, MemberState
from .model import PendingSay

__all__ = ["NOTHING", "ChatOutput", "OutputBuffer"]


@dataclass(frozen=True, slots=True)
class ChatOutput:
    """What the chat state asks of the hub since it last asked; each in order."""

    #: Says to store (`Backplane.append`), then `ChatState.stored` or `store_failed`.
    says: Sequence[PendingSay]
    #: Events for the other nodes (`Backplane.publish`), in order.
    events: Sequence[Event]
    #: Names this node no longer holds (`Backplane.release`).
    released: Sequence[str]
    #: Says acked (their ack was delivered): the hub times them (say-to-ack).
    acked: Sequence[PendingSay]


#: The answer when there is nothing: most calls, so no lists are made for it.
NOTHING: Final = ChatOutput((), (), (), ())


class OutputBuffer:
    """Where the parts of the chat state leave their output until the hub takes it."""

    __slots__ = ("_acked", "_events", "_released", "_says", "node")

    def __init__(self, node: str) -> None:
        #: This node's id: labels the `MemberState` events it publishes.
        self.node = node
        self._says: list[PendingSay] = []
        self._events: list[Event] = []
        self._released: list[str] = []
        self._acked: list[PendingSay] = []

    def take(self) -> ChatOutput:
        """Everything gathered since the last call; the buffer starts empty again."""
        if not (self._says or self._events or self._released or self._acked):
            return NOTHING
        output = ChatOutput(self._says, self._events, self._released, self._acked)
        self._says, self._events, self._released, self._acked = [], [], [], []
        return output

    def store(self, pending: PendingSay) -> None:
        self._says.append(pending)

    def acked(self, pending: PendingSay) -> None:
        self._acked.append(pending)

    def release(self, name: str) -> None:
        self._released.append(name)

    def publish(self, event: Event) -> None:
        self._events.append(event)

    def changed(self, *, add: Entry | None = None, remove: Entry | None = None) -> None:
        """Publish a change of this node's entries (merged with the one just before)."""
        events = self._events
        last = events[-1] if events else None
        # A receiver applies removes before adds: an entry that was just added
        # (or removed) must go into a new event to keep its order.
        if (
            not isinstance(last, MemberState)
            or (add is not None and add in last.remove)
            or (remove is not None and remove in last.add)
        ):
            last = MemberState(self.node, [], [])
            events.append(last)
        # (Its lists are ours until the hub takes it.)
        if add is not None:
            last.add.append(add)
        if remove is not None:
            last.remove.append(remove)
