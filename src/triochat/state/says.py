"""The say pipeline: a `say` becomes a message only once it is stored.

A say is not broadcast here (docs/protocol.md §8, §14):

1. `submit` makes it a `PendingSay` for the hub to store (`ChatOutput.says`),
   unless it retries one this user sent with the same ``ref`` (same room and
   text): that one is acked instead, and nothing is stored twice.
2. The hub has the backplane give it an id and store it, then calls `stored`
   (or `store_failed`: the sender gets `unavailable`, nothing is acked).
3. The message comes back from the backplane, in the one order every node
   sees, and is broadcast; then `arrived` acks it. So nothing is seen or
   acked before it is stored, and the sender's ack follows its message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from ..events import Draft
from ..frames import OutFrame
from ..protocol import AckFrame, ErrorCode
from .log import RoomLog
from .model import Client, PendingSay, send_error
from .output import OutputBuffer

__all__ = ["MAX_REFS_PER_USER", "Says"]

MAX_REFS_PER_USER: Final = 256  # recent say refs remembered per user, for retries
#: The ref of a server API say: its ack carries the id back (`submit_as`).
API_REF: Final = "api"


def _answer_to(pending: PendingSay) -> list[Client]:
    """The live connections waiting for ``pending``'s answer; forgets them all."""
    clients = [c for c in (pending.client, *pending.waiting) if c is not None and not c.gone]
    pending.client = None
    pending.waiting = []
    return clients


class Says:
    """Says between the sender and their ack."""

    __slots__ = ("_awaiting", "_log", "_output")

    def __init__(self, log: RoomLog, output: OutputBuffer) -> None:
        self._log = log
        self._output = output
        #: Stored says whose message has not come back yet, by id.
        self._awaiting: dict[str, list[PendingSay]] = {}

    def submit(self, client: Client, room: str, text: str, ref: str | None, wall_ms: int) -> None:
        """Queue a say for the store, unless it retries one already taken.

        A client that lost its connection cannot know whether an unacked say
        got through; it sends it again with the same ``ref`` after taking its
        name back. Same user, ref, room and text: the first one is acked
        (now, or when it is stored) and nothing is stored twice.
        """
        user = client.user
        assert user is not None  # joined implies named
        assert client.name is not None
        if ref is not None:
            earlier = user.refs.get(ref)
            if earlier is not None and (earlier.draft.room, earlier.draft.msg) == (room, text):
                if not earlier.committed:
                    earlier.waiting.append(client)
                elif not client.classic:
                    client.peer.deliver(OutFrame.of(AckFrame(ref, earlier.id)))
                return
        pending = PendingSay(client, Draft(room, client.name, text, wall_ms, ref), user)
        if ref is not None:
            refs = user.refs
            refs.pop(ref, None)  # re-inserted: now the newest
            refs[ref] = pending
            if len(refs) > MAX_REFS_PER_USER:
                del refs[next(iter(refs))]
        self._output.store(pending)

    def submit_as(self, client: Client, room: str, name: str, text: str, wall_ms: int) -> None:
        """A say of the server API (docs/protocol.md §16) as ``name``: ``client``
        (no connection: its peer takes the answer) gets the ack or the error,
        as a say's sender does. No retries: nothing remembers its ref."""
        self._output.store(PendingSay(client, Draft(room, name, text, wall_ms, API_REF)))

    def stored(self, batch: Sequence[PendingSay], ids: Sequence[str]) -> None:
        """The backplane stored ``batch`` as ``ids``: ack each when its message is here."""
        log = self._log
        for pending, message_id in zip(batch, ids, strict=True):
            pending.id = message_id
            seq = log.seq_of(message_id)
            if seq is not None and seq <= log.last_seq:
                self._answer(pending)  # a retry of a say delivered long ago
            else:
                self._awaiting.setdefault(message_id, []).append(pending)

    def store_failed(self, batch: Iterable[PendingSay], reason: str) -> None:
        """Nothing in the batch was stored: tell each sender, ack nothing."""
        for pending in batch:
            user, ref = pending.user, pending.ref
            pending.user = None
            if user is not None and ref is not None and user.refs.get(ref) is pending:
                del user.refs[ref]  # a retry must be stored for real
            for client in _answer_to(pending):
                send_error(client, ErrorCode.UNAVAILABLE, reason, ref)

    def arrived(self, message_id: str) -> None:
        """The message ``message_id`` was broadcast here: ack the says it stores."""
        awaiting = self._awaiting.pop(message_id, None)
        if awaiting is not None:
            for pending in awaiting:
                self._answer(pending)

    def lost(self, reason: str) -> None:
        """The store lost what it had (a new epoch): no stored say comes back."""
        lost = [pending for waiting in self._awaiting.values() for pending in waiting]
        self._awaiting = {}
        self.store_failed(lost, reason)

    def caught_up(self) -> None:
        """Ack the says whose message the log knows is stored (a gap it could not fill)."""
        log = self._log
        for message_id in list(self._awaiting):
            seq = log.seq_of(message_id)
            if seq is not None and seq <= log.last_seq:
                for pending in self._awaiting.pop(message_id):
                    self._answer(pending)

    def _answer(self, pending: PendingSay) -> None:
        pending.committed = True
        pending.user = None  # (user.refs -> pending -> user would be a cycle)
        if pending.ref is not None:
            ack = OutFrame.of(AckFrame(pending.ref, pending.id))
            for client in _answer_to(pending):
                if not client.classic:
                    client.peer.deliver(ack)
            self._output.acked(pending)
