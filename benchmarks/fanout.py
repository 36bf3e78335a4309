"""What triochat's fan-out costs on top of the system call it cannot avoid.

    python benchmarks/fanout.py [--conns 1000] [--rounds 100] [--repeats 5]

One process, pinned to one CPU when it can be: ``--conns`` loopback TCP
connections; each round sends one message frame (a 95-byte WebSocket text frame:
2-byte header, 93-byte JSON payload) to every one of them, five ways, in turn:

- ``os.write``: a bare loop of ``os.write(fd, frame)``: one system call per
  recipient (on loopback it also runs the receiving side's TCP stack, so it
  is most of the cost);
- ``socket.send``: the same with the stdlib socket's ``send``, the floor:
  send(2) skips write(2)'s VFS layer;
- ``triochat``: the chat's own path for a broadcast among several in one hub
  step: `Outbound.deliver` to every member (outbox, dirty list), then the
  end of the step, where each connection's `flush_nowait` writes its frames
  through `WebSocketTransport.send_nowait` and `ReplayStream.write_nowait`
  (which uses ``send`` too);
- ``triochat, lone message``: the path of a step that broadcasts one message
  (`FlushSchedule.write_through`): each `deliver` writes at once, no dirty list;
- ``websockets broadcast``: the reference peer's path (``peer_websockets.py``):
  `websockets.asyncio.server.broadcast` of the same JSON as a `str` (so the
  same frame on the wire) to ``--conns`` open `ServerConnection` objects of
  a `websockets` asyncio server, on their own loopback connections (no
  compression, no keepalive pings; asyncio's transports set TCP_NODELAY, as
  trio does, and this checks it). The clients are raw sockets that did a
  minimal WebSocket handshake and only receive.

The asyncio side has its own event loop (an `asyncio.Runner`): it runs to
open the server and its connections, then it is idle while ``trio.run``
measures all five ways, interleaved, and runs again to close them.
`broadcast` needs no running loop: it frames the message and writes it with
``transport.write``, which sends right away when the transport's buffer is
empty (as it is here: every round's bytes are drained), so the loop is not
on the timed path. Before measuring, a broadcast with the loop idle is
checked to leave every transport's buffer empty and to have put the exact
frame on every socket; after measuring, each way is checked to have
delivered all its bytes.

Only the sending is timed (CPU time of this process); the receiving ends are
drained between rounds. It prints µs per delivery (median of the repeats),
the overhead over the floor, and triochat's cost relative to `websockets`'
broadcast. Scenario 2 of ``run.py`` (one sender, 1000 recipients) is this
fan-out plus the network to a load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve

from triochat.config import Config
from triochat.frames import OutFrame
from triochat.metrics import Stats
from triochat.outbound import Outbound
from triochat.outbox import FlushSchedule
from triochat.transports.websocket import ReplayStream, WebSocketTransport

MESSAGE = b'{"type":"message","room":"lobby","name":"x","msg":"' + b"y" * 40 + b'"}'


@dataclass
class Peer:
    """A `websockets` asyncio server's open connections and their raw clients."""

    server: Server
    connections: list[ServerConnection]
    receivers: list[socket.socket]


async def open_peer(conns: int) -> Peer:
    """Serve `websockets` on loopback and open ``conns`` connections to it."""
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
        compression=None,  # as peer_websockets.py: triochat does not negotiate it
        ping_interval=None,  # no keepalive frames among the measured ones
        close_timeout=1,
        backlog=conns,
    )
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
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
        if not response.startswith(b"HTTP/1.1 101 ") or not response.endswith(b"\r\n\r\n"):
            raise ConnectionError(f"unexpected handshake response: {response!r}")
        return sock

    receivers = list(await asyncio.gather(*(client() for _ in range(conns))))
    await all_open.wait()
    for connection in connections:
        sock = connection.transport.get_extra_info("socket")
        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # asyncio does set it
    return Peer(server, connections, receivers)


async def close_peer(peer: Peer) -> None:
    for sock in peer.receivers:
        sock.close()
    peer.server.close()
    await peer.server.wait_closed()


def check_peer_writes_now(peer: Peer, text: str, frame: bytes) -> None:
    """Check that `broadcast` puts the frame on every socket with the loop idle."""
    broadcast(peer.connections, text)
    if any(connection.transport.get_write_buffer_size() for connection in peer.connections):
        raise RuntimeError("broadcast left bytes for the event loop to write")
    for sock in peer.receivers:
        sock.settimeout(5)
        got = b""
        while len(got) < len(frame):
            got += sock.recv(len(frame) - len(got))
        sock.settimeout(None)
        if got != frame:
            raise RuntimeError(f"websockets sent {got!r}, not triochat's frame {frame!r}")


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


async def measure(conns: int, rounds: int, repeats: int, peer: Peer) -> dict[str, list[float]]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=conns)
    receivers = [socket.create_connection(listener.getsockname()) for _ in range(conns)]
    senders = [listener.accept()[0] for _ in range(conns)]
    for sock in senders:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio does
    step = FlushSchedule()  # the hub's step policy (`Hub.schedule`)
    config, stats = Config(), Stats()
    connections = []
    for sock in senders:
        stream = ReplayStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), b"")
        transport = WebSocketTransport(None, stream)  # type: ignore[arg-type]  # sends only
        connections.append(Outbound(transport, step, config, stats))
    frame = OutFrame(MESSAGE)
    data = frame.ws
    fds = [sock.fileno() for sock in senders]
    sends = [sock.send for sock in senders]
    peers, text = peer.connections, MESSAGE.decode()
    check_peer_writes_now(peer, text, data)

    def by_write() -> None:
        for fd in fds:
            os.write(fd, data)

    def by_send() -> None:
        for send in sends:
            send(data)

    def by_triochat() -> None:
        for connection in connections:
            connection.deliver(frame)
        step.end_step(0.0)  # (no frame waits here: the time is not read)

    def by_triochat_lone() -> None:
        step.write_through = True
        for connection in connections:
            connection.deliver(frame)
        step.write_through = False

    def by_websockets() -> None:
        broadcast(peers, text)

    ways: dict[str, tuple[Callable[[], None], list[socket.socket]]] = {
        "os.write": (by_write, receivers),
        "socket.send": (by_send, receivers),
        "triochat": (by_triochat, receivers),
        "triochat, lone message": (by_triochat_lone, receivers),
        "websockets broadcast": (by_websockets, peer.receivers),
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    received = dict.fromkeys(ways, 0)
    for _ in range(repeats):
        for name, (fan_out, ends) in ways.items():
            spent = 0.0
            for _ in range(rounds):
                started = time.process_time()
                fan_out()
                spent += time.process_time() - started
                received[name] += drain(ends)
            results[name].append(spent / (rounds * conns) * 1e6)
    expected = repeats * rounds * conns * len(data)
    for name, (_, ends) in ways.items():
        deadline = time.monotonic() + 5
        while received[name] < expected and time.monotonic() < deadline:
            await trio.sleep(0.01)
            received[name] += drain(ends)
        if received[name] != expected:
            raise RuntimeError(f"{name}: received {received[name]} bytes, not {expected}")
    for sock in [*receivers, *senders, listener]:
        sock.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 4 sockets a connection
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with asyncio.Runner() as runner:
        peer = runner.run(open_peer(args.conns))
        try:
            results = trio.run(measure, args.conns, args.rounds, args.repeats, peer)
        finally:
            runner.run(close_peer(peer))
    floor = statistics.median(results["socket.send"])
    print(f"{args.conns} loopback TCP connections, {args.rounds} rounds x {args.repeats}")
    print("| fan-out | µs per delivery (median) | runs | over socket.send (the floor) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        median = statistics.median(runs)
        print(
            f"| {name} | {median:.2f} | {' '.join(f'{x:.2f}' for x in runs)} "
            f"| {median - floor:+.2f} µs ({median / floor:.2f}x) |"
        )
    ratio = statistics.median(results["triochat"]) / statistics.median(
        results["websockets broadcast"]
    )
    print(f"triochat / websockets broadcast: {ratio:.2f}x")


if __name__ == "__main__":
    main()
