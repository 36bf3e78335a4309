"""The say pipeline: a `say` becomes a message only once it is stored.

A say is not broadcast here (docs/protocol.md §8, §14):

1. `submit` makes it a `PendingSay` for the hub to store (`ChatOutput.says`),
   unless it retries one this user sent with the same ``ref`` (same room and
   text): that one is acked instead, and nothing is stored twice.
2. The hub has the backplane give it an id and store it, then calls `stored`
   (or `store_failed`: the sender gets `unavailable`, nothing is acked).
3. The message comes back from the backplane, in the one order every node
   sees (`message`: kept in the room's log, broadcast), and then the says it
   stores are acked. So nothing is seen or acked before it is stored, and the
   sender's ack follows its message. Every node's messages come this way,
   the server API's too (`submit_as`).
4. A gap the backplane could not fill comes as a snapshot of the store
   (`reload`): what is new in it is delivered the same way; says stored under
   a lost epoch are answered `unavailable`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from ..events import Draft
from ..frames import OutFrame
from ..protocol import AckFrame, ErrorCode, Message
from ..recent import Snapshot
from .log import RoomLog
from .model import Client, PendingSay, send_error
from .output import OutputBuffer
from .rooms import Rooms

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
    """Says between the sender and their ack, and the stored messages that ack them."""

    __slots__ = ("_awaiting", "_log", "_output", "_rooms")

    def __init__(self, rooms: Rooms, log: RoomLog, output: OutputBuffer) -> None:
        self._rooms = rooms
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

    # --- what the backplane brings back ---------------------------------------------

    def message(self, message: Message) -> None:
        """A stored message, in the chat's one order: keep it, broadcast it, ack
        the says it stores. One already here is skipped."""
        log = self._log
        seq = log.new_seq(message)
        if seq is None:
            return
        room = log.keep(message, seq)
        if room is not None:
            self._rooms.broadcast(room, OutFrame.of(message, message.id))
        awaiting = self._awaiting.pop(message.id, None)
        if awaiting is not None:
            for pending in awaiting:
                self._answer(pending)

    def reload(self, snapshot: Snapshot) -> None:
        """The backplane could not fill a gap (or its store lost everything and
        started a new epoch): deliver what is stored and new here, in order."""
        log = self._log
        if log.start_epoch(snapshot.epoch):
            # Says stored under the old epoch were lost with it: not acked, say so.
            lost = [pending for waiting in self._awaiting.values() for pending in waiting]
            self._awaiting = {}
            self.store_failed(lost, "the history was lost (new epoch): send it again")
        for message in log.unseen(snapshot):
            self.message(message)  # (skips what is here already)
        log.caught_up(snapshot.next_seq)
        # A say whose message fell into the gap is stored all the same: ack it.
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
