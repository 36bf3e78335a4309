"""Taking connections off a plain TCP listener (`ports.PlainAccept`): each with
its peer's address, each started before the next is taken, errors as trio's."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing

from triochat.ports import PlainAccept
from triochat.transports.replay import stdlib_socket

from .conftest import counting_steps


async def _listener() -> tuple[trio.SocketListener, PlainAccept, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    raw = stdlib_socket(listener.socket)
    assert raw is not None
    return listener, PlainAccept(raw), listener.socket.getsockname()[1]


async def test_accept_gives_each_connection_with_its_peer_address():
    listener, plain, port = await _listener()
    async with listener:
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for client in clients:
                stream, ip = await plain.accept()
                async with stream:
                    assert ip == "127.0.0.1"
                    assert stream.socket.getpeername() == client.getsockname()
                    # trio's own settings for a stream socket are there too.
                    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    await stream.send_all(b"hi")
                    assert client.recv(2) == b"hi"
        finally:
            for client in clients:
                client.close()


async def test_accept_waits_for_a_connection_then_takes_it():
    listener, plain, port = await _listener()
    got: list[str] = []
    taken = trio.Event()

    async def take() -> None:
        stream, ip = await plain.accept()
        got.append(ip)
        taken.set()
        await stream.aclose()

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # parked, not spinning
        client = socket.create_connection(("127.0.0.1", port))
        with trio.fail_after(5):
            await taken.wait()
        client.close()
    assert got == ["127.0.0.1"]


async def test_accept_lets_each_connection_start_before_taking_many_more():
    """A burst queued on the listener: each connection's handler gets to run
    (and read its head) about as soon as it is taken, as with trio's accept,
    not after the whole burst (which a pending cap would count)."""
    listener, plain, port = await _listener()
    count = 8
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    await trio.sleep(0.2)  # every connection queued on the listener
    waiting = 0  # taken, its handler not run yet
    most_waiting = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal waiting
        waiting -= 1
        await stream.aclose()

    async with listener, trio.open_nursery() as nursery:
        for _ in range(count):
            stream, _ip = await plain.accept()
            waiting += 1
            most_waiting = max(most_waiting, waiting)
            nursery.start_soon(handler, stream)
    for client in clients:
        client.close()
    assert waiting == 0
    # trio runs the tasks that are ready in either order, so one handler may
    # still wait when the next connection is taken; never more.
    assert most_waiting <= 2


async def test_accept_of_a_closed_listener_is_closed_resource_error():
    listener, plain, _port = await _listener()
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await plain.accept()


class _FailingSocket:
    """A listening socket whose accept() fails as told, then has nothing queued."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, "injected")
        raise BlockingIOError


async def test_accept_skips_one_connections_errors_and_raises_the_servers():
    failing = _FailingSocket(errno.ECONNABORTED, errno.EPROTO, errno.EMFILE)
    with pytest.raises(OSError, match="injected") as raised:
        await PlainAccept(failing).accept()  # type: ignore[arg-type]
    assert raised.value.errno == errno.EMFILE  # the accept loop's back-off handles it
    assert failing.calls == 3


async def test_accept_switches_tasks_only_to_wait_when_connections_come_one_by_one():
    """A connection queued, then the next one later: the accepting task takes
    the first and waits in the same step (no switch before waiting, as trio's
    when nothing was queued) and runs once more when the next arrives."""
    listener, plain, port = await _listener()
    taken: list[trio.SocketStream] = []

    async def accept_two() -> None:
        for _ in range(2):
            taken.append((await plain.accept())[0])

    first = socket.create_connection(("127.0.0.1", port))
    await trio.sleep(0.1)  # queued before the acceptor starts
    with counting_steps(lambda task: task.coro.cr_code is accept_two.__code__) as acceptor:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(accept_two)
            await trio.testing.wait_all_tasks_blocked()
            assert len(taken) == 1
            second = socket.create_connection(("127.0.0.1", port))
    for stream in taken:
        await stream.aclose()
    first.close()
    second.close()
    assert len(taken) == 2
    # Its first step takes the first connection and waits; the second connection wakes it.
    assert acceptor.steps == 2
