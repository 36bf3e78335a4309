"""``--workers N``: N processes on the one port, one chat through Redis.

The process the operator starts becomes a supervisor that serves no chat
itself (`supervise`)::

    supervise                      the parent's nursery
    ├── Supervisor._watch_signals  SIGTERM/SIGINT: drain every worker (again:
    │                              stop them now); SIGHUP: forwarded to each
    └── Supervisor._keep (each i)  start worker i, wait until it listens, and
                                   when it dies start it again (backoff; one
                                   that keeps dying at once stops them all)

A worker is ``python -m triochat`` with the parent's own arguments plus
``--port`` (the one port, chosen by the parent when it was 0) and, with
``--metrics-port M``, ``--metrics-port M+i``; the environment tells it that
it is worker i (TRIOCHAT_WORKER_INDEX) and which descriptor is its end of
a socket pair with the parent (TRIOCHAT_WORKER_CONTROL_FD). It is a node
of the cluster like any other (worker.py, `serve_worker`: `serve_until_signalled`,
its own node id), its public port bound with SO_REUSEPORT (ports.py), so
the kernel spreads new connections over the workers.

The socket pair, one per worker:

- worker -> parent: one JSON line once it listens (`Ready`);
- parent -> worker: ``drain`` (as a first SIGTERM, but not counted as one:
  a signal sent to the whole process group, a terminal's Ctrl-C or
  systemd's ``KillMode=control-group``, reaches the worker too, and the two
  together must still drain, not stop at once), ``stop`` (stop now: the
  parent got a second signal);
- the end of it: the parent is gone (SIGKILL); the worker drains and exits,
  so no orphan keeps the port.

Rules:

1. Every process started here is waited for before `supervise` returns:
   past ``--drain-timeout`` plus `STOP_GRACE` a draining worker is killed.
2. Only workers that have said they listen get SIGHUP: before its signal
   handlers exist, SIGHUP would kill a starting Python process.
3. A restart waits (`RESTART_BACKOFF`, doubling while a worker keeps dying
   within `STABLE_AFTER` of its start); `MAX_QUICK_DEATHS` such deaths in
   a row stop everything with status 1, rather than spinning. A worker
   that fails its very first start fails the start-up instead, with its
   own status (2: a bad option or file, 1: Redis or a port): it has said why.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final

import trio

from .config import Config
from .ports import bind_shared
from .server import summary_line
from .worker import CONTROL_FD_ENV, INDEX_ENV, Ready, read_lines

__all__ = [
    "MAX_QUICK_DEATHS",
    "RESTART_BACKOFF",
    "STABLE_AFTER",
    "START_TIMEOUT",
    "STOP_GRACE",
    "Supervisor",
    "describe_exit",
    "supervise",
]

LOGGER = logging.getLogger("triochat.workers")

START_TIMEOUT: Final = 60.0  # seconds for a worker to listen, or it is killed
STABLE_AFTER: Final = 10.0  # seconds: a worker up this long did not die "at once"
RESTART_BACKOFF: Final = (0.1, 5.0)  # seconds: first and longest wait before a restart
MAX_QUICK_DEATHS: Final = 5  # deaths in a row, each within STABLE_AFTER: give up
STOP_GRACE: Final = 10.0  # seconds past --drain-timeout before a draining worker is killed


# --- the supervisor ----------------------------------------------------------------


def describe_exit(returncode: int | None) -> str:
    """``exit status 1`` or ``killed by SIGKILL``, for the log."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class _Worker:
    """One started worker process and our end of its socket pair."""

    def __init__(self, index: int, process: trio.Process, control: trio.SocketStream) -> None:
        self.index = index
        self.process = process
        self.control = control
        #: Its report once it listens (then, and only then, it may get SIGHUP).
        self.ready: Ready | None = None
        self._sending = trio.Lock()  # the signal task and a failing slot may both send

    @property
    def pid(self) -> int:
        return self.process.pid

    async def tell(self, word: bytes) -> None:
        """Send ``word`` to the worker; one that is gone is no error."""
        async with self._sending:
            # Its socket buffer is empty unless the worker is frozen: do not wait on one.
            with (
                trio.move_on_after(1.0),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await self.control.send_all(word + b"\n")

    async def read_report(self) -> Ready | None:
        """Its `Ready` line, or None if it ended (or said something else) first."""
        async for line in read_lines(self.control):
            try:
                return Ready.decode(line)
            except (ValueError, KeyError, TypeError):
                LOGGER.error("worker %d said %r, not that it listens", self.index, line[:80])
                return None
        return None


class Supervisor:
    """Runs ``config.workers`` workers of ``argv`` (the parent's own options)."""

    def __init__(self, config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        self.config = config
        self._argv = list(argv)
        self._environ = dict(environ)
        #: The process's exit status: 0 unless a start, a drain or a restart failed.
        self.status = 0
        self._port = config.port  # the one port, once reserved
        self._workers: dict[int, _Worker] = {}  # running now, by index
        self._first: dict[int, Ready] = {}  # each index's first report
        self._stopping = trio.Event()
        self._stop_deadline = float("inf")
        self._signals = 0  # SIGTERM/SIGINT so far
        self._nursery: trio.Nursery | None = None

    async def run(self) -> int:
        """Start every worker, announce the port once all listen, keep them
        running until a signal (or a failure) stops them; the exit status.

        Raises:
            OSError: the port cannot be bound.
        """
        with (
            await self._reserve_port(),
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals,
        ):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as slots:
                    for index in range(self.config.workers):
                        slots.start_soon(self._keep, index)
                nursery.cancel_scope.cancel()  # every worker is done: the signal task too
        LOGGER.info("stopped (%s)", describe_exit(self.status))
        return self.status

    async def _reserve_port(self) -> socket.socket:
        """Bind (not listen on) the port with SO_REUSEPORT, and keep it for
        the parent's whole life: with ``--port 0`` that picks the one port
        every worker binds, and no other program can take it while a worker
        is being restarted."""
        config = self.config
        found = await trio.socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = found[0]
        sock = bind_shared(family, kind, proto, address)
        self._port = int(sock.getsockname()[1])
        return sock

    def _command(self, index: int) -> list[str]:
        """Worker ``index``'s command line: ours, then what is its own (the
        last of an option wins, over the environment too)."""
        argv = [sys.executable, "-m", "triochat", *self._argv, "--port", str(self._port)]
        metrics_port = self.config.metrics_port
        if metrics_port:  # 0 stays 0: each worker takes a free port of its own
            argv += ["--metrics-port", str(metrics_port + index)]
        return argv

    async def _spawn(self, index: int) -> _Worker:
        """Start worker ``index`` (it inherits our stdout and stderr). Raises OSError."""
        ours, theirs = socket.socketpair()
        try:
            env = {
                **self._environ,
                INDEX_ENV: str(index),
                CONTROL_FD_ENV: str(theirs.fileno()),
            }
            process = await trio.lowlevel.open_process(
                self._command(index), env=env, pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its copy
        return _Worker(index, process, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))

    async def _keep(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops (rule 3)."""
        quick_deaths = 0
        while not self._stopping.is_set():
            started = trio.current_time()
            try:
                worker = await self._spawn(index)
            except OSError as exc:
                LOGGER.error("cannot start worker %d: %s", index, exc)
                who, returncode, ready = f"worker {index}", None, False
            else:
                await self._run_one(worker)
                who = f"worker {index} (pid {worker.pid})"
                returncode, ready = worker.process.returncode, worker.ready is not None
            ended = describe_exit(returncode)
            if self._stopping.is_set():
                if returncode:
                    LOGGER.warning("%s ended while stopping: %s", who, ended)
                    self.status = 1
                return
            if index not in self._first:
                LOGGER.error("%s failed to start (%s): stopping", who, ended)
                # Its own status says why (2: an option or a file; 1: Redis, a port).
                self._stop(returncode if returncode in (1, 2) else 1)
                return
            if ready and trio.current_time() - started >= STABLE_AFTER:
                quick_deaths = 0
            quick_deaths += 1
            if quick_deaths >= MAX_QUICK_DEATHS:
                LOGGER.error(
                    "%s ended (%s): that is %d times in a row within %g s of a start; "
                    "stopping every worker",
                    who,
                    ended,
                    quick_deaths,
                    STABLE_AFTER,
                )
                self._stop(1)
                return
            delay = min(RESTART_BACKOFF[1], RESTART_BACKOFF[0] * 2 ** (quick_deaths - 1))
            LOGGER.warning("%s ended (%s): starting it again in %.1f s", who, ended, delay)
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _run_one(self, worker: _Worker) -> None:
        """Worker ``worker`` from its start to its exit (``process.returncode``;
        ``ready`` if it ever listened). Reaps it whatever happens."""
        process = worker.process
        self._workers[worker.index] = worker
        if self._stopping.is_set():  # started while `_stop` told the others
            assert self._nursery is not None
            self._nursery.start_soon(worker.tell, b"drain")
        try:
            with trio.move_on_after(START_TIMEOUT) as waited:
                worker.ready = await worker.read_report()
            if worker.ready is not None:
                self._listening(worker, worker.ready)
            elif waited.cancelled_caught:
                LOGGER.error(
                    "worker %d (pid %d) did not listen within %g s: killed",
                    worker.index,
                    worker.pid,
                    START_TIMEOUT,
                )
                process.kill()
            else:
                # It closed its end: it is on its way out, writing why (a bad
                # certificate, Redis unreachable); let it, within bounds.
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                process.kill()  # a no-op once it has exited
            await process.wait()
        finally:
            del self._workers[worker.index]
            if process.returncode is None:  # cancelled: never leave one behind (rule 1)
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            with trio.CancelScope(shield=True):
                await worker.control.aclose()

    def _listening(self, worker: _Worker, ready: Ready) -> None:
        """Worker ``worker`` listens: the start-up lines once all do, or its restart."""
        if worker.index in self._first:
            LOGGER.info("worker %d is back: pid %d, node %s", worker.index, ready.pid, ready.node)
            return
        self._first[worker.index] = ready
        if len(self._first) < self.config.workers or self._stopping.is_set():
            return
        reports = [self._first[i] for i in range(self.config.workers)]
        # The one "listening on" line per address, as a single process writes
        # it: scripts and tests connect on it, and every worker listens now.
        for url in reports[0].urls:
            LOGGER.info("listening on %s", url)
        metrics_urls = [url for report in reports for url in report.metrics_urls]
        line = summary_line(self.config, reports[0].urls, metrics_urls)
        pids = ", ".join(str(report.pid) for report in reports)
        LOGGER.info("%s; workers: %d (pids %s)", line, len(reports), pids)

    def _stop(self, status: int = 0) -> None:
        """Drain every worker (first call only); ``status`` is kept if it is worse."""
        self.status = max(self.status, status)
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Rule 1: a drain takes --drain-timeout; the grace covers storing and
        # closing after it, and a worker still starting when asked.
        self._stop_deadline = trio.current_time() + self.config.drain_timeout + STOP_GRACE
        assert self._nursery is not None
        self._nursery.start_soon(self._tell_all, b"drain")
        self._nursery.start_soon(self._kill_at_deadline)

    async def _tell_all(self, word: bytes) -> None:
        async with trio.open_nursery() as nursery:
            for worker in list(self._workers.values()):
                nursery.start_soon(worker.tell, word)

    async def _kill_at_deadline(self) -> None:
        await trio.sleep_until(self._stop_deadline)
        for worker in list(self._workers.values()):
            if worker.process.returncode is None:
                LOGGER.error(
                    "worker %d (pid %d) did not exit within %g s: killed",
                    worker.index,
                    worker.pid,
                    self.config.drain_timeout + STOP_GRACE,
                )
                worker.process.kill()
                self.status = 1

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                listening = [w for w in self._workers.values() if w.ready is not None]
                LOGGER.info("SIGHUP: forwarded to %d workers", len(listening))
                for worker in listening:  # rule 2
                    worker.process.send_signal(signal.SIGHUP)
                continue
            self._signals += 1
            if self._signals == 1:
                LOGGER.info(
                    "%s: draining %d workers (again to stop now)", name, len(self._workers)
                )
                self._stop()
            else:
                LOGGER.warning("%s again: stopping the workers now", name)
                assert self._nursery is not None
                self._nursery.start_soon(self._tell_all, b"stop")


async def supervise(config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run ``config.workers`` workers of ``argv`` until a signal; the exit
    status (0 when every worker drained and exited 0).

    Raises:
        OSError: the port cannot be bound.
    """
    return await Supervisor(config, argv, environ).run()
