"""What reaches the hub's dispatcher through its inbound channel.

The hub has one bounded inbound channel, and one task, the dispatcher,
takes from it (`Hub._dispatch_loop`). Whatever else has to change the chat
state is posted there as one of these items, so that task alone applies it:

- ``(client, frame)``: a connection's frame, decoded in its own task
  (`intake.Intake`), or the protocol error that decoding it gave;
- `Resolved`: the cluster's answer for a parked join, and the room history
  read for it (`joins.JoinResolver`);
- `Stored`: the store's verdict on a batch of says (`store.StorePipeline`);
- `StepDone` and a bare `trio.Event`: the barriers of `Hub.settle`;
- `Call`: a function of the chat state (`Hub.call`, the server API);
- `WAKE`: the backplane has events waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import trio

from .chat import ChatState, Client, PendingSay
from .errors import ClientProtocolError, StorageError
from .events import Claim
from .identity import TokenCheck
from .protocol import ClientFrame, Message

__all__ = [
    "WAKE",
    "Call",
    "ChatFrame",
    "ClientItem",
    "Inbound",
    "InboundSend",
    "Resolved",
    "StepDone",
    "Stored",
    "Wake",
]

T = TypeVar("T")

#: A frame as the chat state takes it: an `auth` frame as its verdict.
ChatFrame = ClientFrame | TokenCheck
#: What a connection posts: its frame, or why it could not be decoded.
ClientItem = ChatFrame | ClientProtocolError


class Wake:
    """Inbound marker: the backplane has events waiting."""

    __slots__ = ()


#: The one wake-up marker (an identity check costs less than a new object).
WAKE: Final = Wake()


class Resolved:
    """Inbound: the cluster's answer for a parked frame (`JoinResolver.park`)."""

    __slots__ = ("claimed", "client", "frame", "loaded")

    def __init__(
        self,
        client: Client,
        frame: ChatFrame,
        claimed: tuple[str, Claim] | None,
        loaded: tuple[str, list[Message] | None] | None = None,
    ) -> None:
        self.client = client
        self.frame = frame
        #: The name asked for and the answer, if the frame binds a name.
        self.claimed = claimed
        #: The room whose history was read for the frame, and what the store
        #: had (None: the read failed), if one was read (`ChatState.to_load`).
        self.loaded = loaded


class Stored:
    """Inbound: the store's verdict on a batch of says (`StorePipeline.run`)."""

    __slots__ = ("batch", "result")

    def __init__(self, batch: list[PendingSay], result: list[str] | StorageError) -> None:
        self.batch = batch
        #: The stored messages' ids, in order, or why none was stored.
        self.result = result


class StepDone:
    """Inbound: set ``done`` once the step that takes this has pumped and flushed."""

    __slots__ = ("done",)

    def __init__(self, done: trio.Event) -> None:
        self.done = done


class Call(Generic[T]):
    """Inbound: a function of the chat state for the dispatcher to run (`Hub.call`)."""

    __slots__ = ("done", "error", "function", "result")

    def __init__(self, function: Callable[[ChatState, float, int], T]) -> None:
        self.function = function
        self.done = trio.Event()
        self.result: T | None = None
        self.error: Exception | None = None

    def run(self, chat: ChatState, now: float, wall_ms: int) -> None:
        try:
            self.result = self.function(chat, now, wall_ms)
        except Exception as exc:  # the caller's to handle, never the hub's
            self.error = exc
        self.done.set()


#: Everything the dispatcher takes; a bare `trio.Event` is a barrier of
#: `Hub.settle`: set once the says queued before it are stored.
Inbound = tuple[Client, ClientItem] | trio.Event | Wake | Resolved | Stored | StepDone | Call[Any]
#: Where those who post to the dispatcher post.
InboundSend = trio.MemorySendChannel[Inbound]
