"""`StorePipeline`: the says the chat state accepted, on their way into the store.

::

    dispatcher --queue--> store queue --run--> Backplane.flush, Backplane.append
        ^                                                  |
        +-------------- Stored (the verdict) --------------+

Rules:

1. A message is broadcast and acked only after `Backplane.append` returned
   and the message came back from the backplane: nothing acked is ever lost,
   and every member on every node sees the one order of the sequencer. The
   verdict (`stored`) only tells the chat state which say became which id
   (`ChatState.stored`), or refuses the batch (`ChatState.store_failed`).
2. The store loop (`run`) never touches the chat state: its verdicts go back
   through the hub's inbound channel (`Stored`), so the dispatcher alone
   applies them, whichever storage is behind the backplane. Only once the
   dispatcher has stopped does the loop apply what is left itself.
3. What the hub published before a batch of says (their senders' joins) is
   flushed to the other nodes before the batch is appended: every node sees
   a member join before it speaks.
4. A backplane over an in-memory store offers `append_nowait`: the says are
   stored in the dispatcher's own step, with no task hop and no await (and no
   wake-up: `quiet`); the step's pump applies what comes back.
5. Bounded: at most `STORE_QUEUE` says wait to be stored; the rest of a step's
   are refused ``unavailable`` at once (the server is busy), never queued
   without limit. A barrier (`trio.Event`, of `Hub.settle`) that finds the
   queue full is set at once: settle as far as it can.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .backplane import Backplane
from .chat import ChatState, PendingSay
from .config import Config
from .errors import StorageError
from .inbound import InboundSend, StepDone, Stored
from .metrics import Stats

__all__ = ["STORE_BATCH", "STORE_QUEUE", "StorePipeline"]

# The hub's logger: operators know these lines by it (docs/operations.md).
LOGGER: Final = logging.getLogger("triochat.hub")

STORE_QUEUE: Final = 4096  # says accepted but not yet stored; full = `unavailable`
STORE_BATCH: Final = 512  # most says per Backplane.append (one transaction or script call)


class StorePipeline:
    """Queues the dispatcher's says, stores them a batch at a time, applies the verdicts.

    Every method but `run` is called by the dispatcher and never awaits.
    """

    def __init__(
        self, config: Config, backplane: Backplane, stats: Stats, inbound: InboundSend
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._stats = stats
        self._inbound = inbound
        # An Event in the queue is a barrier: set once all before it is done.
        self._send, self._receive = trio.open_memory_channel[PendingSay | trio.Event](STORE_QUEUE)
        # A backplane over an in-memory store may offer a synchronous append.
        self._append_nowait = backplane.append_nowait
        # What the chat state gave back (`Pump.take_output` extends these, as
        # cheap as a list in the hub): says for `queue`, acked says for
        # `observe_acks`.
        #: Says accepted and not yet queued or stored (`queue` takes them).
        self.pending: list[PendingSay] = []
        #: Says acked since the last `observe_acks`.
        self.acked: list[PendingSay] = []
        #: True while our own synchronous append runs: the backplane's wake-up
        #: is not needed (the step's pump applies what it hands back).
        self.quiet = False
        self._storage_down = False

    def queue(self, chat: ChatState, taken: float) -> None:
        """Store the `pending` says (stamped ``taken``, the step's start, for
        the say-to-ack histogram): at once on an in-memory store, else through
        the store loop."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for say in pending:
            say.taken = taken
        append_nowait = self._append_nowait
        if append_nowait is not None:
            # An in-memory store: commit in this step, with no task hop (and
            # no wake-up: the pump at the end of this step applies them).
            self.quiet = True
            try:
                result: list[str] | StorageError
                began = trio.current_time()
                try:
                    result = append_nowait([say.draft for say in pending])
                except StorageError as exc:
                    result = exc
                self._stats.store_commit.observe(trio.current_time() - began)
                self.stored(chat, pending, result)
            finally:
                self.quiet = False
            return
        for index, say in enumerate(pending):
            try:
                self._send.send_nowait(say)
            except trio.WouldBlock:
                chat.store_failed(pending[index:], "the server is busy: try again")
                return

    def barrier(self, done: trio.Event) -> None:
        """Set ``done`` once the says queued before it are stored (call `queue` first)."""
        try:
            self._send.send_nowait(done)
        except trio.WouldBlock:
            done.set()  # the store is overloaded: settle as far as it can

    def observe_acks(self, ended: float) -> None:
        """Time the says acked since the last call (their acks are in the sockets
        now, at ``ended``). Per step and per ack, never per delivery."""
        if self.acked:
            acked, self.acked = self.acked, []
            say_ack = self._stats.say_ack
            for say in acked:
                say_ack.observe(ended - say.taken)

    def close(self) -> None:
        """No more says: `run` stores what is queued, then returns."""
        self._send.close()

    async def run(self, chat: ChatState) -> None:
        """Store the says the dispatcher queued, a batch at a time; the verdicts go
        back inbound, so the dispatcher alone applies them (acks, refusals)."""
        receive = self._receive
        barrier: trio.Event | None = None
        async for first in receive:
            if isinstance(first, trio.Event):
                await self._post(chat, StepDone(first))
                continue
            batch = [first]
            while len(batch) < STORE_BATCH:
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(item, trio.Event):
                    barrier = item
                    break
                batch.append(item)
            # Everything the hub published before these says (their senders'
            # joins) reaches the other nodes first.
            with trio.move_on_after(self._config.backplane_timeout):
                await self._backplane.flush()
            result: list[str] | StorageError
            began = trio.current_time()
            try:
                result = await self._backplane.append([say.draft for say in batch])
            except StorageError as exc:
                result = exc
            self._stats.store_commit.observe(trio.current_time() - began)
            await self._post(chat, Stored(batch, result))
            if barrier is not None:
                await self._post(chat, StepDone(barrier))
                barrier = None

    async def _post(self, chat: ChatState, item: Stored | StepDone) -> None:
        """Hand a store result to the dispatcher (or, once it has stopped, apply it here)."""
        try:
            await self._inbound.send(item)
        except trio.ClosedResourceError:
            # Stopping: the dispatcher has returned, so nothing else applies to
            # the chat state; store what is left as before (no one waits for acks).
            if isinstance(item, Stored):
                self.stored(chat, item.batch, item.result)
            else:
                item.done.set()

    def stored(
        self, chat: ChatState, batch: list[PendingSay], result: list[str] | StorageError
    ) -> None:
        """The store's verdict on a batch: ack each when it comes back, or refuse it."""
        if isinstance(result, StorageError):
            self._stats.storage_failures += 1
            if not self._storage_down:  # log once per outage, not per batch
                LOGGER.warning("history unavailable: %s", result)
                self._storage_down = True
            chat.store_failed(batch, "the message could not be stored: try again")
            return
        if self._storage_down:
            LOGGER.warning("history available again")
            self._storage_down = False
        self._stats.messages_stored += len(batch)
        chat.stored(batch, result)
