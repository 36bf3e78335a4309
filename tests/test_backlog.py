"""The slow-consumer rule: a client that reads is never closed for a burst (#12 defect 4).

A slow consumer is one whose backlog stays over the bound (frames or bytes,
docs/protocol.md section 9) because it does not read; a client that sends
faster than it reads is slowed by its own backlog, not closed. Real sockets,
real time, the server's real write path.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from trio_websocket import ConnectionClosed
from websockets.sync.client import connect

from triochat import Config, Server
from triochat.history.memory import MemoryHistory
from triochat.hub import STORE_BATCH
from triochat.protocol import Message

from .chatclient import ChatClient
from .conftest import client_of, running_server
from .sseclient import SseStream, tcp
from .test_http import WS_KEY, ws_frame

SAYS = 1000
LONG = "x" * 6000  # 6 KB a message: 16 frames are about 96 KB


async def _read_all(client: ChatClient | SseStream, count: int, sender: str) -> list[str]:
    """The `msg` of ``sender``'s next ``count`` messages; anything else is skipped."""
    seen: list[str] = []
    while len(seen) < count:
        frame = await client.recv()
        if frame.get("type") == "message" and frame["name"] == sender:
            seen.append(frame["msg"][:12])
    return seen


@asynccontextmanager
async def never_reading_client(server: Server, join: bytes) -> AsyncIterator[trio.SocketStream]:
    """A WebSocket client that sends ``join`` and never reads again; its receive
    buffer is small, so the server's writes to it soon block."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        await stream.send_all(ws_frame(join))
        yield stream


def _texts() -> list[str]:
    return [f"{i:06d}".ljust(12, "-") for i in range(SAYS)]


def _flood(port: int, texts: list[str]) -> list[str]:
    """A client in its own thread (the `websockets` library, as a script would use it):
    joins, then sends every say as fast as it can from one thread while another
    reads everything; the texts of the messages it got back, in order."""
    url = f"ws://127.0.0.1:{port}/ws"
    with connect(url, max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "join", "room": "lobby", "name": "flooder"}))
        while json.loads(ws.recv(timeout=10))["type"] != "joined":
            pass

        def send_all() -> None:
            for text in texts:
                ws.send(json.dumps({"type": "say", "room": "lobby", "msg": text + LONG}))

        sender = threading.Thread(target=send_all)
        sender.start()
        seen: list[str] = []
        while len(seen) < len(texts):
            frame = json.loads(ws.recv(timeout=30))
            if frame["type"] == "message" and frame["name"] == "flooder":
                seen.append(frame["msg"][:12])
        sender.join()
    return seen


async def _flood_while_reading(
    server: Server, reader: ChatClient | SseStream
) -> dict[str, list[str]]:
    """`_flood` in a thread while ``reader`` reads at full speed: what each got."""
    results: dict[str, list[str]] = {}
    async with trio.open_nursery() as nursery:

        async def collect() -> None:
            results["reader"] = await _read_all(reader, SAYS, "flooder")

        nursery.start_soon(collect)
        results["flooder"] = await trio.to_thread.run_sync(_flood, server.port, _texts())
    return results


async def test_backlog_flooder_that_reads_and_a_full_speed_reader_get_everything():
    """With --rate 0 --outbox-frames 16, a client flooding 1000 says of 6 KB while its
    library reads everything, and a member reading at full speed, both get every message
    in order, and nobody is closed as a slow consumer."""
    with trio.fail_after(60):
        async with (
            running_server(rate=0, outbox_frames=16, max_msg_chars=6100) as server,
            client_of(server, timeout=30) as reader,
        ):
            await reader.join("lobby", "reader")
            results = await _flood_while_reading(server, reader)
            assert results == {"flooder": _texts(), "reader": _texts()}
            assert server.stats.slow_consumers == 0


async def test_backlog_full_speed_sse_reader_gets_everything():
    """The same flood reaches a member on SSE reading at full speed: every message, in order."""
    with trio.fail_after(60):
        async with running_server(rate=0, outbox_frames=16, max_msg_chars=6100) as server:
            sse = await SseStream.open(tcp(server.port), timeout=30)
            status, _ = await sse.post({"type": "join", "room": "lobby", "name": "sse"})
            assert status == 204
            await sse.expect("joined", room="lobby")
            results = await _flood_while_reading(server, sse)
            assert results == {"flooder": _texts(), "reader": _texts()}
            assert server.stats.slow_consumers == 0
            await sse.aclose()


async def test_backlog_member_that_stops_reading_is_closed_1013_and_others_go_on():
    """A member that stops reading while the room is busy is closed 1013 and freed; a
    member that reads gets every message meanwhile."""
    with trio.fail_after(60):
        async with (
            running_server(
                rate=0, outbox_frames=16, max_msg_chars=6100, close_timeout=1
            ) as server,
            client_of(server, timeout=30) as sender,
            client_of(server, timeout=30) as reader,
            never_reading_client(server, b'{"type":"join","room":"lobby","name":"stalled"}'),
        ):
            await reader.join("lobby", "reader")
            await sender.join("lobby", "sender")
            texts = _texts()[:300]
            async with trio.open_nursery() as nursery:
                results: list[str] = []

                async def collect() -> None:
                    results.extend(await _read_all(reader, len(texts), "sender"))

                nursery.start_soon(collect)
                nursery.start_soon(_read_all, sender, len(texts), "sender")
                for text in texts:
                    await sender.send({"type": "say", "room": "lobby", "msg": text + LONG})
            assert results == texts
            assert server.stats.slow_consumers == 1
            with trio.fail_after(server.config.close_timeout * 2 + 1):
                while len(server.connections) > 2:  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.05)
            assert server.stats.closes_by_code.get(1013) == 1


async def test_backlog_never_reading_client_asking_for_history_is_closed_within_the_bound():
    """A client that never reads asks 60 times for a history of 6 KB messages (#18's
    amplification): the server never holds more than four times --outbox-bytes for it,
    closes it 1013, and another client's say is answered meanwhile."""
    with trio.fail_after(60):
        async with (
            running_server(rate=0, max_msg_chars=2000, close_timeout=1) as server,
            client_of(server, timeout=30) as writer,
        ):
            await writer.join("lobby", "writer")
            big = "€" * 2000  # 2000 characters, 6 KB of UTF-8
            for i in range(120):
                await writer.say(f"{i:04d}{big}"[:2000], ref=f"r{i}")
                await writer.expect("message")
                await writer.expect("ack")
            held: list[int] = []

            def watch() -> None:
                held.append(max(c.outbound.outbox.size for c in server.connections))

            join = b'{"type":"join","room":"lobby","name":"hog"}'
            async with never_reading_client(server, join) as hog:
                request = ws_frame(b'{"type":"history","room":"lobby","limit":100}')
                with trio.move_on_after(2):  # the server may stop taking our bytes
                    for _ in range(60):
                        await hog.send_all(request)
                        watch()
                await writer.say("still answered", ref="last")
                kinds = []
                while "ack" not in kinds:
                    frame = await writer.recv()
                    if frame["type"] in ("message", "ack"):
                        kinds.append(frame["type"])
                assert kinds == ["message", "ack"]
                with trio.fail_after(server.config.close_timeout * 2 + 1):
                    while server.stats.closes_by_code.get(1013) != 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            # Four times the bound, and the reply that took it there (100 x 6 KB).
            assert max(held) <= 4 * server.config.outbox_bytes + 650_000
            assert server.stats.slow_consumers == 1


class GatedHistory(MemoryHistory):
    """A store on "disk" (its appends go through the hub's store loop) that holds
    its first append until `gate` is set, so the says sent meanwhile pile up and
    the next append stores a full batch at once."""

    append_nowait = None  # type: ignore[assignment]  # (the store loop's path)

    def __init__(self, history_size: int) -> None:
        super().__init__(history_size)
        self.entered = trio.Event()  # the first append waits at the gate
        self.gate = trio.Event()
        self.batches: list[int] = []

    async def append(self, batch: Sequence[Message]) -> None:
        self.batches.append(len(batch))
        if not self.gate.is_set():
            self.entered.set()
            await self.gate.wait()
        MemoryHistory.append_nowait(self, batch)


BURST_SENDERS = 16
BURST_SAYS = STORE_BATCH // BURST_SENDERS  # together one full store batch


def _burst_text(sender: int, n: int) -> str:
    return f"{sender:02d}-{n:03d}".ljust(8192, "x")  # 8 KB


async def _say_then_sync(client: ChatClient, sender: int) -> None:
    """``client``'s says, then a `history` request: its reply proves the hub took them."""
    for n in range(BURST_SAYS):
        await client.say(_burst_text(sender, n))
    await client.send({"type": "history", "room": "lobby", "limit": 1})
    while (await client.recv())["type"] != "history":
        pass  # (others' presence; no message can come before the store lets go)


async def _read_texts(client: ChatClient, count: int) -> list[str]:
    """The heads of the next ``count`` messages ``client`` gets, whoever said them;
    a close ends the list with ``closed <code>``."""
    seen: list[str] = []
    while len(seen) < count:
        try:
            frame = await client.recv()
        except ConnectionClosed as exc:
            seen.append(f"closed {exc.reason.code if exc.reason else None}")
            break
        if frame["type"] == "message":
            seen.append(frame["msg"][:6])
    return seen


async def test_backlog_full_speed_reader_is_not_closed_by_one_step_over_four_times_the_bound():
    """Gap 5 of #12: one hub step delivers a full store batch (512 messages of 8 KB,
    over 4 MiB: four times the default --outbox-bytes) to every member of a room of
    18; they all read at full speed, so each gets every message in the one order,
    and none is closed as a slow consumer. (The says pile up behind a store that is
    slow once; then one append stores them all and one step fans them out.)"""
    history = GatedHistory(1000)
    config = Config(port=0, rate=0, max_msg_chars=8192)
    expected = ["00-ope"] + [
        _burst_text(i, n)[:6] for i in range(BURST_SENDERS) for n in range(BURST_SAYS)
    ]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            server: Server = await nursery.start(Server(config, history=history).run)
            clients: dict[str, ChatClient] = {}
            for name in ["reader", "opener"] + [f"s{i}" for i in range(BURST_SENDERS)]:
                clients[name] = await stack.enter_async_context(client_of(server, timeout=30))
                await clients[name].join("lobby", name)
            # The first say takes the store's first append, which waits...
            await clients["opener"].say("00-open")
            await history.entered.wait()
            # ...while every sender's says queue behind it.
            async with trio.open_nursery() as sending:
                for i in range(BURST_SENDERS):
                    sending.start_soon(_say_then_sync, clients[f"s{i}"], i)
            results: dict[str, list[str]] = {}
            async with trio.open_nursery() as reading:

                async def collect(name: str) -> None:
                    results[name] = await _read_texts(clients[name], len(expected))

                for name in clients:
                    reading.start_soon(collect, name)
                history.gate.set()
            slow_consumers = server.stats.slow_consumers
            server.drain()
    # (Asserted out here, where a failure is not buried in nested exception groups.)
    assert history.batches == [1, STORE_BATCH]
    closed = {name: texts[-1] for name, texts in results.items() if texts[-1].startswith("closed")}
    assert closed == {}
    for name, texts in results.items():
        # Every message, in the one order of the hub (the senders interleave).
        assert sorted(texts) == sorted(expected), name
        assert texts == results["reader"], name
    assert results["reader"][0] == "00-ope"
    assert slow_consumers == 0
