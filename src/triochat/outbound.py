"""One connection's way out: outbox, direct writes, writer task, slow consumers, close.

::

    Outbound.deliver / flush_nowait     called by the app (the hub) in its step:
                                        queue, and write what the socket takes now
    Outbound.ping_soon                  called by the keepalive: a ping, written
                                        the same way
    └── Outbound._write (in the         started only when those could not write
        connection's nursery)           at once (full socket, partial write, SSE,
                                        TLS), or to close; returns when done

It is the `Peer` the app delivers to; `Connection` (the reader) owns one, and
so does every connection of the conformance run's echo. Rules:

1. The app and the keepalive may write without blocking (`deliver`,
   `flush_nowait`, `ping_soon`, on a transport with a `DirectWrite`); only
   the writer task awaits a write.
2. Only the writer closes: `close_soon` records the close code (first one
   wins) and starts it. From then on everything left (a pending write, the
   queued frames unless it is a slow consumer, the close frame) must finish
   within ``close_timeout`` (the drain's own timeout while draining); then
   the connection ends (`end`), and its TCP connection is aborted.
3. The backlog and the slow-consumer rule are `Backlog`'s (backlog.py),
   which this class extends.

What one connection holds, then: its backlog, at most the larger of
``HARD_BOUND_FACTOR * outbox_bytes`` plus one frame and ``outbox_bytes``
plus what the current step delivers to it; and the write in progress, at
most one earlier backlog as one buffer of its own (the frames joined by
the transport, or `_unsent`). Broadcast frames are shared by every
member's outbox; the write in progress is a copy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import trio

from .backlog import BACKLOG_PAUSE, HARD_BOUND_FACTOR, Backlog
from .config import Config
from .frames import OutFrame
from .logformat import log_fields, set_task_log_fields
from .metrics import Stats
from .outbox import FlushSchedule
from .protocol import CloseCode
from .transports import Transport, TransportClosed, direct_write
from .waiting import Share, WaitingRun, take_shared

__all__ = ["BACKLOG_PAUSE", "HARD_BOUND_FACTOR", "Cancellable", "Outbound", "TaskGroup"]

LOGGER = logging.getLogger("triochat.outbound")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class TaskGroup(Protocol):
    """Where a connection's writer runs, and whose cancellation ends the
    connection (its reader and writer): a `trio.Nursery` of the connection's
    own, or a chat's `connection.SharedTasks`."""

    @property
    def cancel_scope(self) -> Cancellable: ...

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], /) -> None: ...


class Outbound(Backlog):
    """The outbound path of one connection; the `Peer` the app delivers to."""

    __slots__ = (
        "_broken",
        "_close_deadline",
        "_direct",
        "_held",
        "_lost",
        "_nursery",
        "_ping_due",
        "_schedule",
        "_send_scope",
        "_shares",
        "_soon",
        "_step",
        "_taken",
        "_transport",
        "_unsent",
        "_writing",
        "close_code",
        "close_request",
        "end_reason",
        "log_fields",
    )

    def __init__(
        self, transport: Transport, schedule: FlushSchedule, config: Config, stats: Stats
    ) -> None:
        super().__init__(config, stats)
        self._transport = transport
        #: The transport's direct write (the hub's hot path), if it has one.
        self._direct = direct_write(transport)
        #: The app's step policy: write at once, or flush at the end of the step.
        self._schedule = schedule
        #: (code, reason), set once by `close_soon`.
        self.close_request: tuple[int, str] | None = None
        #: Everything after a close request (flush, close frame) ends by then.
        self._close_deadline = math.inf
        #: How the connection ended, for the log line.
        self.end_reason = "closed"
        self.close_code: int | None = None
        self._send_scope: trio.CancelScope | None = None
        self._broken = False  # a write was cut short: no close frame possible
        #: The tail of a frame batch (or a ping) only half written at once; the
        #: writer sends it.
        self._unsent = b""
        self._lost: TransportClosed | None = None  # the hub's direct write found the peer gone
        self._ping_due = False  # a ping the socket did not take: the writer sends it
        self._writing = False  # the writer task is running
        self._step = -1  # the step of `_schedule` that last filed this connection
        self._soon = -1  # the round of `_schedule`'s waiting frames it was filed in
        self._held = False  # `hold`: frames are queued, not written, until `release`
        #: Its shares of rooms' runs of frames that wait (`share`), this round;
        #: None, not an empty list, between rounds (one object less to hold
        #: and for the collector to track per idle connection).
        self._shares: list[Share] | None = None
        #: `WaitingRun.produced` when it last took its shares: none has a
        #: frame to take while that has not moved.
        self._taken = 0
        #: Where the writer starts, and whose cancellation ends the connection
        #: (set between `start` and `stop`).
        self._nursery: TaskGroup | None = None
        #: The connection's log fields (`logformat.log_context`: id, peer,
        #: transport), set by its task: its writer's lines carry them whoever
        #: started it, and the hub's lines about it (`clientlog.ConnectionFields`).
        self.log_fields: Mapping[str, object] = log_fields()

    # --- lifecycle (the connection's task) -----------------------------------------

    def start(self, nursery: TaskGroup) -> None:
        """The writer runs in ``nursery``, and cancelling it ends the connection."""
        self._nursery = nursery
        if self.close_request is not None:
            self._want_writer()  # asked to close before it started (a drain)

    def stop(self) -> None:
        """No writer any more (the app may still flush: nothing starts)."""
        self._nursery = None

    def end(self) -> None:
        """End the connection: cancel its nursery (the reader, the writer)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def linger_deadline(self) -> float:
        """Until when the transport may linger after our close frame (`Transport.abort`)."""
        return min(self._close_deadline, trio.current_time() + self._config.close_timeout)

    # --- for the reader ------------------------------------------------------------

    @property
    def writing(self) -> bool:
        """The writer task is running (a write may be pending)."""
        return self._writing

    def ping_soon(self) -> None:
        """Send a keepalive: at once if the socket takes it (most of the time:
        an idle connection's), else by the writer.

        At once, with no task: 19,000 idle connections ping 950 times a
        second, and a writer task per ping cost more than the ping (#16). A
        control frame may go ahead of queued frames (RFC 6455 5.5).
        """
        direct = self._direct
        if (
            direct is not None
            and not self._writing
            and self.close_request is None
            and not self._broken  # (half a frame went: nothing may follow it)
            and self._lost is None
        ):
            try:
                rest = direct.ping_nowait()
            except TransportClosed as exc:
                self._lost = exc  # (the writer ends the connection)
            else:
                if rest is not None:
                    if rest:
                        self._unsent = rest
                        self._want_writer()
                    return
        self._ping_due = True
        self._want_writer()

    # --- Peer (sync, never blocks) ---------------------------------------------

    def deliver(self, frame: OutFrame) -> None:
        if self.close_request is not None:
            return
        if self._shares is not None and self._taken != WaitingRun.produced:
            # (`_take_shared`'s own test, inline: the hot path.)
            self._take_shared()  # the frames that waited go first (§6)
            if self.close_request is not None:
                return  # (they were too many: a slow consumer)
        outbox = self.outbox
        queued = outbox.put(frame)
        schedule = self._schedule
        if queued == 1:
            if schedule.write_through:
                self.flush_nowait()  # a lone message: nothing to coalesce it with
                return
        elif outbox.size > self._hard_bound and (self._over_at == self._writes or self._held):
            # Megabytes piling up on a client whose writer had its chance: it
            # was over the bound when last judged and has completed no write
            # since (its own `history` requests, say). Memory says no without
            # waiting for the step's end. A burst on a client that was within
            # its bounds is judged at the step's end instead, after the write
            # (docs/protocol.md section 9). (One frame alone may be bigger.)
            self._slow_consumer()
            return
        if self._step != schedule.step:
            self._step = schedule.step
            schedule.flush_later(self)  # `flush_nowait` at the end of this step

    def share(self, run: WaitingRun) -> None:
        """Every frame added to ``run`` from now until its round ends (or
        `unshare`, or a close) is this connection's too: frames that may wait
        up to `outbox.SOON` seconds (presence, typing), written with its next
        write, or when the round ends. They join its backlog when taken."""
        if self.close_request is not None:
            return
        if self._shares is None:
            self._shares = [Share(run)]
        else:
            self._shares.append(Share(run))
        schedule = self._schedule
        if not run.filed:
            schedule.close_at_round_end(run)
        if self._soon != schedule.soon_round:
            self._soon = schedule.soon_round
            schedule.flush_soon(self)

    def unshare(self, run: WaitingRun) -> None:
        """No frame added to ``run`` from now on is this connection's (those
        added so far are, and are queued)."""
        shares = self._shares or []
        for index, share in enumerate(shares):
            if share.run is run:
                self._take_shared()
                del shares[index]
                return

    def _take_shared(self) -> None:
        """Queue the frames added to its shares since they were last taken
        (none if no run has had a frame since: `WaitingRun.produced`)."""
        if not self._shares or self._taken == WaitingRun.produced:
            return
        self._taken = WaitingRun.produced
        frames, size = take_shared(self._shares)
        if not frames:
            return
        outbox = self.outbox
        outbox.extend(frames, size)
        if outbox.size > self._hard_bound and (self._over_at == self._writes or self._held):
            self._slow_consumer()  # (as in `deliver`)

    def flush_if_queued(self) -> None:
        """`flush_nowait`, when frames wait (they may have gone with a write
        since); the round is over, so its shares go too."""
        if self._shares:
            self._take_shared()
            self._shares = None
        if self.outbox:
            self.flush_nowait()

    def flush_nowait(self) -> None:
        """Send what is queued right now, from the hub, if the socket takes it.

        The hot path: most of the time the socket's buffer has room, so the
        frames queued during one hub step go out in one write without waking
        the writer task. Otherwise (a busy or full socket, a partial write,
        SSE, a close in progress) the writer is woken and does it, and the
        backlog left is judged (`_check_backlog`).
        """
        if self.close_request is not None:
            self._want_writer()
            return
        if self._held:
            return  # `release` flushes
        if self._shares:
            self._take_shared()
            if self.close_request is not None:  # it was too much: a slow consumer
                self._want_writer()
                return
        outbox = self.outbox
        frames = outbox.peek()
        direct = self._direct
        if frames and direct is not None:
            try:
                rest = direct.send_nowait(frames)
            except TransportClosed as exc:
                self._lost = exc
            else:
                if rest is not None:
                    stats = self._stats
                    stats.frames_sent += len(frames)
                    stats.writes += 1
                    outbox.clear()
                    self._writes += 1  # (`_written`, inlined: the hot path)
                    if self._drained is not None:
                        self._wake_reader()
                    if not rest:
                        return
                    self._unsent = rest
                elif direct.write_closed:
                    # Never to be written, and the reader is ending the
                    # connection: no writer to find that out (half of a
                    # churn's connections: a `left` after the close reply).
                    outbox.clear()
                    return
        self._want_writer()
        self._check_backlog()

    def hold(self) -> None:
        """Queue what is delivered without writing it, until `release` (the hub holds
        a joining client's `joined` until the cluster has seen the join)."""
        self._held = True

    def release(self) -> None:
        """Write what `hold` kept back. Never blocks."""
        self._held = False
        if self.outbox:
            self.flush_nowait()

    def _slow_consumer(self) -> None:
        self._stats.slow_consumers += 1
        self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer", flush=False)

    def close_soon(
        self, code: int, reason: str, *, flush: bool = True, timeout: float | None = None
    ) -> None:
        """Ask the writer to close with ``code``; the first request wins.

        Args:
            flush: send the frames already queued first (not for a slow
                consumer: its queue is what is wrong).
            timeout: seconds for the rest (pending write, flush, close frame)
                before the TCP connection is aborted; ``close_timeout`` by default.
        """
        if self.close_request is not None:
            return
        if flush and self._shares:
            self._take_shared()  # delivered before the close: sent with the rest
        self._shares = None
        if self.close_request is not None:
            return  # (taking them made it a slow consumer)
        self.close_request = (code, reason)
        if timeout is None:
            timeout = self._config.close_timeout
        self._close_deadline = trio.current_time() + timeout
        if not flush:
            self.outbox.clear()
        if self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, self._close_deadline)
        self._want_writer()

    def _want_writer(self) -> None:
        """Have the writer run: started unless it is running (or the connection is over)."""
        if not self._writing and self._nursery is not None:
            self._writing = True
            self._nursery.start_soon(self._write)

    # --- the writer ------------------------------------------------------------

    async def _write(self) -> None:
        """The writer: what the hub could not write, a ping, the close; then return.

        A write that fails ends the connection; a bug closes it with 1011.
        """
        # The connection's log fields, whoever started it (its task, the hub, the keepalive).
        set_task_log_fields(self.log_fields)
        try:
            await self._write_pending()
        except TransportClosed as exc:
            if self.close_request is None:
                self.end_reason = exc.reason
                self.close_code = exc.code
            else:  # the close we asked for, cut short: it still says why
                self.close_code, self.end_reason = self.close_request
            self.end()
        except Exception:
            LOGGER.exception("bug in a connection task; closing it with 1011")
            self.end_reason = "internal error"
            self.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
            await self._close_now()
            self.end()
        finally:
            self._writing = False

    async def _write_pending(self) -> None:
        outbox = self.outbox
        transport = self._transport
        stats = self._stats
        while True:
            if self._lost is not None:
                raise self._lost
            if self._unsent:
                rest, self._unsent = self._unsent, b""
                assert self._direct is not None  # only a direct write leaves a rest
                await self._bounded_send(self._direct.send_rest(rest))
                self._written()
            if self._shares and not self._held:
                self._take_shared()  # (the hub takes them otherwise, or the round's end)
            frames = outbox.take_all() if not self._held or self.close_request else []
            if frames:
                await self._bounded_send(transport.send(frames))
                stats.frames_sent += len(frames)
                stats.writes += 1
                self._written()
            elif self._ping_due:
                self._ping_due = False
                await self._bounded_send(transport.ping())
            elif self.close_request is not None:
                await self._close_now()
                self.end()
                return
            else:
                return  # nothing left: the hub writes directly again

    async def _bounded_send(self, sending: Awaitable[None]) -> None:
        """Await one write, cut off when the peer stops reading for too long.

        A write that cannot finish within a ping interval plus timeout (a
        frozen peer whose buffers are full), or by the close deadline once a
        close is requested, is cancelled: the stream is then broken and the
        connection ends without a close frame.
        """
        config = self._config
        stuck = trio.current_time() + config.ping_interval + config.ping_timeout
        with trio.CancelScope(deadline=min(stuck, self._close_deadline)) as scope:
            self._send_scope = scope
            await sending
        self._send_scope = None
        # Read after the block: the scope sets cancelled_caught on its way out.
        self._broken = scope.cancelled_caught
        if self._broken:
            raise TransportClosed("the peer stopped reading")

    async def _close_now(self) -> None:
        """Send the requested close frame (bounded), then end the connection."""
        code, reason = self.close_request or (CloseCode.INTERNAL_ERROR, "internal error")
        self.end_reason = reason
        self.close_code = code
        if not self._broken:
            with trio.move_on_at(self._close_deadline):
                await self._transport.close(code, reason)
