"""Fault injection for tests: fakes, not mocks (STYLE.md §5).

What is here, and what each fake stands for:

- `FaultyStream` wraps any `trio.abc.Stream` and misbehaves on request:
  slow sends (`delay_sends`), a black hole (`drop_sends`), a peer that stops
  reading or writing (`stall_reads`, `stall_writes`), one failing write
  (`fail_next_send`), a connection cut mid-frame (`cut_after`) and a TCP
  reset (`reset`). It plays either end: wrap the client's end to misbehave
  as a client, the server's end to misbehave as the network or the kernel.
- `FaultyListener` is an in-memory listener (like tests/memnet.py) whose
  every connection has a `FaultyStream` at both ends, and
  `open_faulty_server` runs a whole `Server` on it (virtual time friendly).
- `RawClient` speaks just enough WebSocket by hand (handshake, masked text
  frames, unmasked server frames, pongs) to be cheap by the hundred and to
  do what a well-behaved library refuses to (half a frame, half a
  handshake). `NeverReadingClient` is one that never reads after the
  handshake: its outbox on the server fills up.
- `KillableServer` runs a real server process on a data dir and can SIGKILL
  it and start it again on the same data (tests/server_process.py does the
  starting).
- `task_count` and `live_instances` measure what a scenario left behind.
- `FaultyBroker` and `FaultyMemoryHistory` are the in-process broker and the
  memory store with a `fail_with` switch: set, every append (and claim)
  fails with `StorageError`; cleared, they work again.

Everything here is deterministic under ``autojump_clock`` when the streams
are in memory; nothing sleeps on the real clock.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import json
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import trio
import trio.testing

from triochat import Server
from triochat.backplane.local import LocalBroker
from triochat.errors import StorageError
from triochat.events import Claim, Draft
from triochat.history import History
from triochat.history.memory import MemoryHistory
from triochat.protocol import Message

from .chatclient import ChatClient, open_memory_client
from .memnet import ListenerBase, serving, stream_pair
from .server_process import ServerProcess, run_server

__all__ = [
    "FaultyBroker",
    "FaultyListener",
    "FaultyMemoryHistory",
    "FaultyNet",
    "FaultyStream",
    "KillableServer",
    "Link",
    "NeverReadingClient",
    "RawClient",
    "encode_client_frame",
    "handshake_request",
    "live_instances",
    "open_faulty_server",
    "task_count",
]

T = TypeVar("T")

WS_KEY: Final = base64.b64encode(b"triochat-faults!").decode()
MASK: Final = b"\x01\x02\x03\x04"  # any mask will do; the server must unmask
OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA


# --- FaultyStream ------------------------------------------------------------------


class FaultyStream(trio.abc.Stream):
    """A stream wrapper that injects faults into an otherwise healthy stream.

    Faults apply to the calls made while they are armed; each is documented
    with the real-world failure it stands for. Counters (`bytes_sent`,
    `bytes_received`) count what really went through.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        #: Bytes handed to the wrapped stream (dropped bytes not included).
        self.bytes_sent = 0
        #: Bytes returned by `receive_some`.
        self.bytes_received = 0
        #: Bytes `drop_sends` swallowed.
        self.bytes_dropped = 0
        #: `send_all` calls that wrote something (one per write the peer sees).
        self.writes = 0
        self._send_delay = 0.0
        self._dropping = False
        self._read_gate: trio.Event | None = None
        self._write_gate: trio.Event | None = None
        self._next_send_error: BaseException | None = None
        self._cut_budget: int | None = None
        self._reset = False

    # -- faults ----------------------------------------------------------------

    @contextlib.contextmanager
    def delay_sends(self, seconds: float) -> Iterator[None]:
        """Every write waits ``seconds`` first (a slow link; virtual time under autojump)."""
        previous, self._send_delay = self._send_delay, seconds
        try:
            yield
        finally:
            self._send_delay = previous

    @contextlib.contextmanager
    def drop_sends(self) -> Iterator[None]:
        """Writes succeed but their bytes vanish (a peer behind a black hole)."""
        previous, self._dropping = self._dropping, True
        try:
            yield
        finally:
            self._dropping = previous

    @contextlib.contextmanager
    def stall_reads(self) -> Iterator[None]:
        """Nothing is received until the block exits (no data, no FIN).

        A `receive_some` already waiting when the stall begins holds back what
        it gets until the stall ends.
        """
        gate = self._read_gate = trio.Event()
        try:
            yield
        finally:
            self._read_gate = None
            gate.set()

    @contextlib.contextmanager
    def stall_writes(self) -> Iterator[None]:
        """`send_all` blocks until the block exits (a full socket buffer)."""
        gate = self._write_gate = trio.Event()
        try:
            yield
        finally:
            self._write_gate = None
            gate.set()

    def fail_next_send(self, exc: BaseException) -> None:
        """The next `send_all` raises ``exc`` and writes nothing.

        A `trio.BrokenResourceError` is the network failing; any other
        exception stands for a bug in the writer path.
        """
        self._next_send_error = exc

    def cut_after(self, n_bytes: int) -> None:
        """Write ``n_bytes`` more, then drop the connection (a crash mid-frame).

        The write that crosses the limit delivers only its first part; the
        wrapped stream is then closed abruptly (the peer reads EOF) and this
        end raises `trio.BrokenResourceError` from then on.
        """
        if n_bytes < 0:
            raise ValueError("n_bytes must not be negative")
        self._cut_budget = n_bytes

    def reset(self) -> None:
        """A TCP reset seen from this end: every later call raises BrokenResourceError.

        Calls already blocked in `receive_some` are woken by the wrapped
        stream's close (which `reset` does not do: pair it with the peer's
        close, or close this end).
        """
        self._reset = True

    # -- trio.abc.Stream -------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._reset:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection reset (injected)")
        if self._write_gate is not None:
            await self._write_gate.wait()
        if self._send_delay:
            await trio.sleep(self._send_delay)
        error, self._next_send_error = self._next_send_error, None
        if error is not None:
            await trio.lowlevel.checkpoint()
            raise error
        if self._dropping:
            self.bytes_dropped += len(data)
            await trio.lowlevel.checkpoint()
            return
        budget = self._cut_budget
        if budget is not None and len(data) >= budget:
            if budget:
                await self.stream.send_all(bytes(data[:budget]))
                self.bytes_sent += budget
                self.writes += 1
            self._reset = True
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError(f"connection cut after {budget} more bytes (injected)")
        if budget is not None:
            self._cut_budget = budget - len(data)
        await self.stream.send_all(data)
        self.bytes_sent += len(data)
        self.writes += 1

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._reset:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection reset (injected)")
        if self._read_gate is not None:
            await self._read_gate.wait()
        data = await self.stream.receive_some(max_bytes)
        # A stall that began while we waited holds back what arrived, too.
        while self._read_gate is not None:
            await self._read_gate.wait()
        if self._reset:  # reset while we waited
            raise trio.BrokenResourceError("connection reset (injected)")
        self.bytes_received += len(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_eof(self) -> None:
        """Half-close, where the wrapped stream supports it (HalfCloseableStream)."""
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            raise TypeError(f"{type(self.stream).__name__} cannot half-close")
        await send_eof()


# --- an in-memory network with faulty links ----------------------------------------


@dataclasses.dataclass
class Link:
    """Both ends of one in-memory connection, each wrapped in a `FaultyStream`."""

    client: FaultyStream
    server: FaultyStream


class FaultyListener(ListenerBase):
    """Like tests/memnet.py's `MemoryListener`, with a `FaultyStream` at each end."""

    def __init__(self) -> None:
        super().__init__()
        #: Every link connected so far, oldest first.
        self.links: list[Link] = []

    async def connect(self, *, lockstep: bool = False) -> Link:
        """A new connection; ``lockstep``: no buffering, a non-reader blocks the writer."""
        client, server = stream_pair(lockstep=lockstep)
        link = Link(FaultyStream(client), FaultyStream(server))
        self.links.append(link)
        await self.offer(link.server)
        return link


@dataclasses.dataclass
class FaultyNet:
    """A server on a `FaultyListener`: for tests in virtual time."""

    server: Server
    listener: FaultyListener

    async def connect(self, *, lockstep: bool = False) -> Link:
        return await self.listener.connect(lockstep=lockstep)

    @contextlib.asynccontextmanager
    async def client(
        self, resource: str = "/ws", *, lockstep: bool = False, **kwargs: Any
    ) -> AsyncIterator[tuple[ChatClient, Link]]:
        """A `ChatClient` over a new link, and the link (to break it)."""
        link = await self.listener.connect(lockstep=lockstep)
        async with open_memory_client(link.client, resource, **kwargs) as client:
            yield client, link


@contextlib.asynccontextmanager
async def open_faulty_server(
    history: History | None = None, **options: Any
) -> AsyncIterator[FaultyNet]:
    """A whole server on a `FaultyListener` (``memory=True`` unless ``history``)."""
    listener = FaultyListener()
    async with serving(listener, history, **options) as server:
        yield FaultyNet(server, listener)


# --- a hand-written WebSocket client -----------------------------------------------


def handshake_request(resource: str = "/ws", host: str = "localhost") -> bytes:
    """A valid WebSocket upgrade request (RFC 6455 §4.1)."""
    return (
        f"GET {resource} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def encode_client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked, unfragmented client frame (RFC 6455 §5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return header + MASK + masked


class RawClient:
    """A minimal WebSocket client: handshake, masked text frames, pongs.

    Far cheaper than a full client (no tasks of its own), so hundreds fit in
    a fast test; and it can send what a library won't (half a frame).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        #: The close frame's (code, reason), once one arrived.
        self.close: tuple[int, str] | None = None

    @classmethod
    async def open(cls, stream: trio.abc.Stream, resource: str = "/ws") -> RawClient:
        """Send the upgrade request and read the ``101`` head.

        Raises:
            AssertionError: the server answered anything but 101.
        """
        client = cls(stream)
        await stream.send_all(handshake_request(resource))
        while (end := client._buffer.find(b"\r\n\r\n")) < 0:
            data = await stream.receive_some()
            assert data, "closed during the handshake"
            client._buffer += data
        head = bytes(client._buffer[:end])
        del client._buffer[: end + 4]
        assert head.startswith(b"HTTP/1.1 101 "), head
        return client

    async def send(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        await self.stream.send_all(encode_client_frame(text.encode()))

    async def join(self, room: str, name: str) -> None:
        """Send a join (the answer is left unread)."""
        await self.send({"type": "join", "room": room, "name": name})

    async def say(self, msg: str, room: str = "lobby", ref: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "say", "room": room, "msg": msg}
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)

    def _parse_one(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        opcode = buffer[0] & 0x0F
        length = buffer[1] & 0x7F
        start = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            start = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            start = 10
        assert not buffer[1] & 0x80, "server frames are never masked"
        if len(buffer) < start + length:
            return None
        payload = bytes(buffer[start : start + length])
        del buffer[: start + length]
        return opcode, payload

    async def recv(self) -> dict[str, Any] | None:
        """The next JSON frame; None once the server closed (see `close`).

        Answers pings on the way (like any client).
        """
        while True:
            parsed = self._parse_one()
            if parsed is None:
                try:
                    data = await self.stream.receive_some()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None
                self._buffer += data
                continue
            opcode, payload = parsed
            if opcode == OP_TEXT:
                frame: dict[str, Any] = json.loads(payload)
                return frame
            if opcode == OP_PING:
                await self.stream.send_all(encode_client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close = (code, payload[2:].decode())
                return None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class NeverReadingClient(RawClient):
    """A client that joins and then never reads again (no pongs either).

    Over a lockstep stream (``connect(lockstep=True)``) the server's writes to
    it block at once, like a peer whose socket buffers are full, so the
    frames for it pile up in its outbox on the server.
    """

    async def recv(self) -> dict[str, Any] | None:  # pragma: no cover - by design
        raise AssertionError("a NeverReadingClient does not read")


# --- a real server process that can be killed --------------------------------------


class KillableServer:
    """A real ``python -m triochat`` on ``data_dir`` that can be killed and restarted.

    The methods block (process start and stop); from async code call them
    with `trio.to_thread.run_sync` where the event loop must keep running.
    """

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self._stack: contextlib.ExitStack | None = None
        #: The running process (None when stopped).
        self.current: ServerProcess | None = None
        #: stderr of every run so far, oldest first.
        self.outputs: list[str] = []

    def __enter__(self) -> KillableServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def proc(self) -> subprocess.Popen[str]:
        if self.current is None:
            raise RuntimeError("the server is not running")
        return self.current.proc

    @property
    def port(self) -> int:
        if self.current is None:
            raise RuntimeError("the server is not running")
        return self.current.port

    def start(self) -> ServerProcess:
        """Start the server on ``data_dir`` (stops a running one first, gracefully)."""
        self.stop()
        stack = contextlib.ExitStack()
        self.current = stack.enter_context(
            run_server("--data-dir", str(self.data_dir), *self.args, memory=False)
        )
        self._stack = stack
        return self.current

    def kill(self) -> int:
        """SIGKILL the process (no drain, no flush) and reap it; its exit code."""
        proc = self.proc
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait()
        self.stop()
        return code

    def restart(self) -> ServerProcess:
        """Kill the running server with SIGKILL, then start again on the same data."""
        if self.current is not None:
            self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM and wait (run_server's exit); keeps the output. Idempotent."""
        stack, self._stack = self._stack, None
        current, self.current = self.current, None
        if stack is not None:
            stack.close()
        if current is not None:
            self.outputs.append(current.output_text())


# --- a broker and a store that fail on request ---------------------------------------


class FaultyBroker(LocalBroker):
    """A `LocalBroker` whose appends and claims fail while ``fail_with`` is set
    (and whose nodes are then unavailable, as over a Redis that is down)."""

    def __init__(self, history: History, history_size: int) -> None:
        super().__init__(history, history_size)
        self.fail_with: str | None = None

    def _check(self) -> None:
        if self.fail_with is not None:
            raise StorageError(self.fail_with)

    def available(self) -> bool:
        return self.fail_with is None

    def sequence(self, drafts: Sequence[Draft]) -> tuple[list[str], list[tuple[Message, Draft]]]:
        self._check()
        return super().sequence(drafts)

    def claim(
        self, node: str, name: str, token: str | None, rotate: bool = False, share: bool = False
    ) -> Claim:
        self._check()
        return super().claim(node, name, token, rotate, share)


class FaultyMemoryHistory(MemoryHistory):
    """A `MemoryHistory` whose appends fail, storing nothing, while ``fail_with`` is set."""

    def __init__(self, history_size: int) -> None:
        super().__init__(history_size)
        self.fail_with: str | None = None

    def append_nowait(self, batch: Sequence[Message]) -> None:
        if self.fail_with is not None:
            raise StorageError(self.fail_with)
        super().append_nowait(batch)


# --- what a scenario left behind ---------------------------------------------------


def task_count() -> int:
    """How many tasks run in this `trio.run`, system tasks included."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    if root is None:
        raise RuntimeError("task_count() needs a running trio.run")
    return count(root)


def live_instances(cls: type[T]) -> list[T]:
    """Every object of exactly ``cls`` still alive after a full garbage collection."""
    gc.collect()
    return [obj for obj in gc.get_objects() if type(obj) is cls]
