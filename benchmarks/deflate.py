"""permessage-deflate's cost and gain on chat-sized JSON: bytes on the wire and CPU per delivery.

    python benchmarks/deflate.py [--rooms 1,10,200] [--chars 20,40,100,300] [--rounds 50]

One process, pinned to one CPU when it can be, as ``fanout.py``: for each
room size (``--rooms``: the members a message is delivered to, on that many
loopback TCP connections) and each message length (``--chars``: the chat
text of a ``message`` frame; the frame is about 70 bytes more), every round
broadcasts one new message frame to every member, four ways in turn:

- ``triochat off``: the chat's fan-out path (`Outbound.deliver` to every
  member, then the end of the hub step: `flush_nowait`, one write each),
  over `WebSocketTransport`: the frame as encoded once (``OutFrame.ws``);
- ``triochat on``: the same over `DeflateWebSocketTransport`, as a
  connection that negotiated permessage-deflate gets: the frame compressed
  once per message, without context takeover, shared by every member
  (``OutFrame.wsz``; under `DEFLATE_MIN_BYTES` it stays uncompressed). The
  compression is in the timed fan-out, so a room of 1 pays it per delivery;
- ``websockets off`` / ``websockets on``: the reference peer's path,
  `websockets.asyncio.server.broadcast` of the same JSON to a `websockets`
  asyncio server's connections, without and with its default
  permessage-deflate (context takeover, a 12-bit window and memLevel 5, one
  compressor per connection: `broadcast` compresses for every member).

A new frame each round, so each way pays its encode or compression per
message. Messages are chat lines of the given length, each different. Only
the fan-out is timed (this process's CPU time); the receiving sockets are
drained between rounds, and what they got is the "bytes on the wire"
(WebSocket bytes: frame headers and payloads, not TCP/IP headers).

Then the inbound side: the CPU wsproto (trio-websocket's parser) takes per
client message of the same length, sent plain or compressed (with context
takeover, as browsers do) through `DeflateExtension`.

Prints one table per room size, with the ratios on/off and triochat/websockets.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import socket
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import trio
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from triochat.config import Config
from triochat.frames import DEFLATE_MIN_BYTES, OutFrame
from triochat.metrics import Stats
from triochat.outbound import Outbound
from triochat.outbox import FlushSchedule
from triochat.transports.deflate import DeflateExtension
from triochat.transports.websocket import (
    DeflateWebSocketTransport,
    ReplayStream,
    WebSocketTransport,
)
from triochat.transports.wsopen import accept_upgrade

OFFER = "permessage-deflate; client_max_window_bits"  # what Chromium and websockets offer
#: Chat lines the messages are cut from, a word at a time.
SENTENCES = (
    "ok so I think we should ship the new build today unless anyone objects",
    "did you see the message from the ops team about the database migration",
    "lunch at noon? the usual place, I will book a table for six people",
    "the tests are green now, the flaky one was a race in the reconnect logic",
    "can someone review my pull request before the standup tomorrow morning",
    "haha yes exactly, that is what I meant, thanks for the quick answer",
)
WORDS = [word for sentence in SENTENCES for word in sentence.split(" ")]


def chat_line(chars: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(" ".join(words)) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def message_json(chars: int, seq: int, rng: random.Random) -> bytes:
    """A chat `message` frame as triochat encodes it (docs/protocol.md §4)."""
    frame = {
        "type": "message",
        "room": "lobby",
        "id": f"5f1c9a2e-{seq}",
        "name": rng.choice(["alice", "bob", "carol", "dave"]),
        "msg": chat_line(chars, rng),
        "ts": 1795800000123 + seq * 37,
    }
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Peer:
    """A `websockets` asyncio server's open connections and their raw clients."""

    server: Server
    connections: list[ServerConnection]
    receivers: list[socket.socket]


async def open_peer(conns: int, compression: bool) -> Peer:
    """Serve `websockets` on loopback (compression as asked) and open ``conns`` connections."""
    connections: list[ServerConnection] = []
    all_open = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        if len(connections) == conns:
            all_open.set()
        await ws.wait_closed()

    server = await serve(
        handler,
        "127.0.0.1",
        0,
        compression="deflate" if compression else None,
        ping_interval=None,
        close_timeout=1,
        backlog=conns,
    )
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    offer = f"Sec-WebSocket-Extensions: {OFFER}\r\n" if compression else ""
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
    ).encode()

    async def client() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionError("websockets closed the handshake")
            response += chunk
        agreed = b"permessage-deflate" in response.lower()
        if not response.startswith(b"HTTP/1.1 101 ") or agreed != compression:
            raise ConnectionError(f"unexpected handshake response: {response!r}")
        return sock

    receivers = list(await asyncio.gather(*(client() for _ in range(conns))))
    await all_open.wait()
    return Peer(server, connections, receivers)


async def close_peer(peer: Peer) -> None:
    for sock in peer.receivers:
        sock.close()
    peer.server.close()
    await peer.server.wait_closed()


def drain(receivers: list[socket.socket]) -> int:
    """Read whatever the receivers have; return how many bytes that was."""
    got = 0
    for sock in receivers:
        try:
            while chunk := sock.recv(1 << 20, socket.MSG_DONTWAIT):
                got += len(chunk)
        except BlockingIOError:
            pass
    return got


def triochat_members(
    conns: int, compression: bool, step: FlushSchedule
) -> tuple[list[Outbound], list[socket.socket], list[socket.socket]]:
    """``conns`` `Outbound`s over loopback sockets, as the hub sees its members."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=conns)
    receivers = [socket.create_connection(listener.getsockname()) for _ in range(conns)]
    senders = [listener.accept()[0] for _ in range(conns)]
    listener.close()
    config, stats = Config(), Stats()
    members = []
    for sock in senders:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio does
        stream = ReplayStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), b"")
        transport: WebSocketTransport
        if compression:
            extension = DeflateExtension(config.max_frame_bytes)
            extension.accept(OFFER)
            transport = DeflateWebSocketTransport(None, stream, extension)  # type: ignore[arg-type]
        else:
            transport = WebSocketTransport(None, stream)  # type: ignore[arg-type]  # sends only
        members.append(Outbound(transport, step, config, stats))
    return members, receivers, senders


@dataclass
class Way:
    fan_out: Callable[[int], None]  # broadcast message ``seq`` to every member
    receivers: list[socket.socket]


async def measure_room(
    conns: int, chars: int, rounds: int, repeats: int, peers: dict[bool, Peer]
) -> dict[str, tuple[float, float]]:
    """{way: (µs of CPU per delivery, bytes on the wire per delivery)} for one room size."""
    rng = random.Random(chars)
    messages = [message_json(chars, seq, rng) for seq in range(rounds * repeats * 4 + 1)]
    step = FlushSchedule()
    plain, plain_recv, plain_send = triochat_members(conns, False, step)
    packed, packed_recv, packed_send = triochat_members(conns, True, step)

    def triochat(members: list[Outbound]) -> Callable[[int], None]:
        def fan_out(seq: int) -> None:
            frame = OutFrame(messages[seq])  # a new frame: encoded (and compressed) once
            for member in members:
                member.deliver(frame)
            step.end_step(0.0)  # (no frame waits here: the time is not read)

        return fan_out

    def websockets(peer: Peer) -> Callable[[int], None]:
        def fan_out(seq: int) -> None:
            broadcast(peer.connections, messages[seq].decode())

        return fan_out

    ways = {
        "triochat off": Way(triochat(plain), plain_recv),
        "triochat on": Way(triochat(packed), packed_recv),
        "websockets off": Way(websockets(peers[False]), peers[False].receivers),
        "websockets on": Way(websockets(peers[True]), peers[True].receivers),
    }
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    received = dict.fromkeys(ways, 0)
    seq = 0
    for _ in range(repeats):
        for name, way in ways.items():
            spent = 0.0
            for _ in range(rounds):
                seq += 1
                started = time.process_time()
                way.fan_out(seq)
                spent += time.process_time() - started
                received[name] += drain(way.receivers)
            cpu[name].append(spent / (rounds * conns) * 1e6)
    deliveries = rounds * repeats * conns
    for name, way in ways.items():
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # what the kernel still holds
            await trio.sleep(0.01)
            received[name] += drain(way.receivers)
    for sock in [*plain_recv, *plain_send, *packed_recv, *packed_send]:
        sock.close()
    return {name: (statistics.median(cpu[name]), received[name] / deliveries) for name in ways}


def measure_inbound(chars: int, messages: int = 2000) -> tuple[float, float, float, float]:
    """(µs plain, µs compressed, bytes plain, bytes compressed) per client message, in wsproto."""
    rng = random.Random(chars)
    says = [
        json.dumps({"type": "say", "room": "lobby", "msg": chat_line(chars, rng), "ref": str(i)})
        for i in range(messages)
    ]
    results = []
    for compression in (False, True):
        extension = DeflateExtension(65536)
        client = WSConnection(ConnectionType.CLIENT)
        offers = [PerMessageDeflate()] if compression else []
        head = client.send(Request(host="localhost", target="/", extensions=offers))
        key = re.search(rb"(?i)sec-websocket-key: (\S+)", head)
        offer = re.search(rb"(?i)sec-websocket-extensions: ([^\r]+)", head)
        assert key is not None
        response, server = accept_upgrade(
            key.group(1), [offer.group(1).decode()] if offer else [], extension
        )
        client.receive_data(response)
        list(client.events())
        wire = [client.send(TextMessage(data=text)) for text in says]
        started = time.process_time()
        for data in wire:
            server.receive_data(data)
            for _ in server.events():
                pass
        spent = time.process_time() - started
        results.append((spent / messages * 1e6, sum(map(len, wire)) / messages))
    (plain_us, plain_bytes), (packed_us, packed_bytes) = results
    return plain_us, packed_us, plain_bytes, packed_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rooms", default="1,10,200", help="room sizes, comma-separated")
    parser.add_argument("--chars", default="20,40,100,300", help="chat text lengths")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rooms = [int(x) for x in args.rooms.split(",")]
    lengths = [int(x) for x in args.chars.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}; triochat compresses payloads of "
        f"{DEFLATE_MIN_BYTES} bytes and more; {args.rounds} rounds x {args.repeats}, "
        "median µs of CPU per delivery; bytes: WebSocket bytes received per delivery"
    )
    for conns in rooms:
        with asyncio.Runner() as runner:
            peers = {c: runner.run(open_peer(conns, c)) for c in (False, True)}
            try:
                print(f"\n### room of {conns}\n")
                print(
                    "| text chars | way | µs/delivery | bytes/delivery "
                    "| on/off CPU | on/off bytes | triochat/websockets CPU |"
                )
                print("|---|---|---|---|---|---|---|")
                for chars in lengths:
                    got = trio.run(measure_room, conns, chars, args.rounds, args.repeats, peers)
                    for name, (us, size) in got.items():
                        server, mode = name.split()
                        off_us, off_size = got[f"{server} off"]
                        other = "websockets" if server == "triochat" else "triochat"
                        ratio = (
                            f"{us / got[f'{other} {mode}'][0]:.2f}" if server == "triochat" else ""
                        )
                        print(
                            f"| {chars} | {name} | {us:.2f} | {size:.1f} "
                            f"| {us / off_us:.2f} | {size / off_size:.2f} | {ratio} |"
                        )
            finally:
                for peer in peers.values():
                    runner.run(close_peer(peer))
    print("\n### inbound: wsproto per client `say` (compressed: context takeover)\n")
    print("| text chars | µs plain | µs compressed | bytes plain | bytes compressed |")
    print("|---|---|---|---|---|")
    for chars in lengths:
        plain_us, packed_us, plain_bytes, packed_bytes = measure_inbound(chars)
        print(
            f"| {chars} | {plain_us:.2f} | {packed_us:.2f} | {plain_bytes:.1f} "
            f"| {packed_bytes:.1f} |"
        )


if __name__ == "__main__":
    main()
