"""``--workers N`` (#16 goal 6): N processes on one port, one chat through Redis.

Real ``python -m triochat --workers 2 --redis …`` processes, a real
redis-server (each test its own, tests/redisserver.py), real sockets. Which
worker serves a connection is told by ``/healthz`` (``X-Triochat-Worker``,
``X-Triochat-Pid``), asked on the connection itself before it upgrades
(`stream_to_worker`): a keep-alive connection stays with the process that
accepted it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from triochat import Config
from triochat.client import Backoff, Disconnected, Message, Rejoined, connect
from triochat.client import ChatClient as PyClient
from triochat.errors import ConfigError
from triochat.workers import Supervisor

from .chatclient import ChatClient, open_memory_client
from .redisserver import RedisServer, redis_server
from .server_process import ServerProcess, run_server

WORKERS = 2


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@contextlib.asynccontextmanager
async def workers(redis: RedisServer, *extra: str) -> AsyncIterator[ServerProcess]:
    """``python -m triochat --workers 2 --redis …`` on a free port, once it
    says ``listening on``; on exit SIGTERM and a bounded wait (run_server)."""
    with contextlib.ExitStack() as stack:
        started = run_server("--workers", str(WORKERS), "--redis", redis.url, *extra, memory=False)
        yield await trio.to_thread.run_sync(stack.enter_context, started)


async def wait_for_output(server: ServerProcess, pattern: str, count: int = 1) -> None:
    """Wait until ``pattern`` (a regex) is in ``count`` lines of the output.

    A poll: the output is read by run_server's thread, which trio cannot await.
    """
    while sum(1 for line in list(server.output) if re.search(pattern, line)) < count:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def read_health(stream: trio.abc.Stream) -> tuple[int, int]:
    """Ask ``GET /healthz`` on ``stream``: (worker index, pid) from its headers.

    Reads exactly the answer (head, then its 3-byte body), so the connection
    can go on with a WebSocket upgrade.
    """
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < len(b"ok\n"):
        chunk = await stream.receive_some(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert body == b"ok\n", data
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    return int(headers[b"x-triochat-worker"]), int(headers[b"x-triochat-pid"])


async def stream_to_worker(
    port: int,
    worker: int | None = None,
    *,
    pid: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[trio.abc.Stream, int, int]:
    """A connection to the workers' port served by ``worker`` (any if None;
    by process ``pid`` if given): (stream, worker index, pid). The kernel
    picks the worker: connect until it is the one asked for."""
    for _ in range(200):
        if tls is None:
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        else:
            stream = await trio.open_ssl_over_tcp_stream(
                "localhost", port, ssl_context=tls, https_compatible=True
            )
        index, served_by = await read_health(stream)
        if (worker is None or index == worker) and (pid is None or served_by == pid):
            return stream, index, served_by
        await stream.aclose()
    raise AssertionError(f"no connection to worker {worker} (pid {pid}) in 200 attempts")


@contextlib.asynccontextmanager
async def client_on(port: int, worker: int) -> AsyncIterator[tuple[ChatClient, int]]:
    """A test WebSocket client served by ``worker``, and that worker's pid."""
    stream, _, pid = await stream_to_worker(port, worker)
    try:
        async with open_memory_client(stream, timeout=10, host=f"127.0.0.1:{port}") as client:
            yield client, pid
    finally:
        await trio.aclose_forcefully(stream)


async def pid_of(port: int, worker: int, tls: ssl.SSLContext | None = None) -> int:
    """The pid of the process serving as ``worker`` now."""
    stream, _, pid = await stream_to_worker(port, worker, tls=tls)
    await stream.aclose()
    return pid


async def next_frame(client: ChatClient, kind: str) -> dict[str, Any]:
    """The next frame of ``kind``, skipping others (presence, typing)."""
    while True:
        frame = await client.recv()
        if frame.get("type") == kind:
            return frame


async def next_event(client: PyClient, kind: type[Any]) -> Any:
    while True:
        event = await client.receive()
        if isinstance(event, kind):
            return event


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie that init has not reaped yet
    counts: an orphan's reaping is init's business, not ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_workers_without_redis_exit_2_naming_the_fix() -> None:
    """--workers 2 without --redis (option or environment) is refused at start-up:
    exit 2, one line that says to add --redis (docs/protocol.md §9)."""
    for argv, env in (
        (["--workers", "2"], {}),
        ([], {"TRIOCHAT_WORKERS": "2"}),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "triochat", "--port", "0", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "--workers 2 needs --redis" in lines[0]
        assert "--redis redis://host:port/db" in lines[0]
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "workers must be positive" in result.stderr


async def test_workers_share_one_port_and_form_one_chat(redis: RedisServer) -> None:
    """Two workers accept on the one port (each its own pid and cluster node);
    a say on one is delivered to a member on the other, and acked."""
    with trio.fail_after(40):
        async with workers(redis) as server:
            await wait_for_output(server, r"workers: 2 \(pids \d+, \d+\)")
            assert sum("listening on" in line for line in server.output) == 1
            nodes = re.findall(r"worker \d ready: pid \d+, node (\w+)", server.output_text())
            assert len(set(nodes)) == WORKERS, server.output_text()  # a cluster node each
            async with (
                client_on(server.port, 0) as (alice, pid0),
                client_on(server.port, 1) as (bob, pid1),
            ):
                assert pid0 != pid1
                assert parent_of(pid0) == parent_of(pid1) == server.proc.pid
                await alice.join("lobby", "alice")
                await bob.join("lobby", "bob")
                await alice.say("hello from worker 0", ref="r1")
                said = await next_frame(alice, "message")
                assert said["msg"] == "hello from worker 0"
                ack = await next_frame(alice, "ack")
                assert (ack["ref"], ack["id"]) == ("r1", said["id"])
                heard = await next_frame(bob, "message")
                assert (heard["msg"], heard["id"], heard["name"]) == (
                    "hello from worker 0",
                    said["id"],
                    "alice",
                )
                await bob.say("and back from worker 1", ref="r2")
                assert (await next_frame(alice, "message"))["msg"] == "and back from worker 1"
        assert server.proc.returncode == 0, server.output_text()


def parent_of(pid: int) -> int:
    """Process ``pid``'s parent (Linux: the 4th field of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


async def test_workers_killed_worker_is_restarted_and_its_clients_recover(
    redis: RedisServer,
) -> None:
    """SIGKILL one worker: the parent stays up and starts another (a new pid
    serves as that worker); its clients reconnect (the project's Python
    client) and get, with `since`, the messages said meanwhile, each once."""
    with trio.fail_after(60):
        async with workers(redis) as server:
            await wait_for_output(server, "workers: 2")
            victim_pid = 0
            opened = 0

            async def open_stream() -> trio.abc.Stream:
                # The first connection goes to worker 1 (the victim); reconnects
                # go wherever the kernel sends them.
                nonlocal victim_pid, opened
                opened += 1
                if opened > 1:
                    return await trio.open_tcp_stream("127.0.0.1", server.port)
                stream, _, victim_pid = await stream_to_worker(server.port, 1)
                return stream

            url = f"ws://127.0.0.1:{server.port}/ws"
            slow = Backoff(initial=1.0, jitter=0)  # away for 1 s: the says below miss it
            async with (
                connect(url, open_stream=open_stream, backoff=slow) as alice,
                connect(
                    f"ws://127.0.0.1:{server.port}/ws", open_stream=_to_worker_0(server.port)
                ) as bob,
            ):
                await alice.join("lobby", name="alice")
                await bob.join("lobby", name="bob")
                before = await bob.say("lobby", "before")
                assert (await next_event(alice, Message)).id == before
                os.kill(victim_pid, signal.SIGKILL)
                disconnected = await next_event(alice, Disconnected)
                assert disconnected.code == 1006
                missed = [await bob.say("lobby", f"missed {i}") for i in range(3)]
                rejoined = await next_event(alice, Rejoined)
                assert rejoined.joined.recovered is True
                replayed = [await next_event(alice, Message) for _ in missed]
                assert [m.id for m in replayed] == missed
                after = await alice.say("lobby", "alice is back")
                heard = [(await next_event(bob, Message)).id for _ in range(5)]
                assert heard == [before, *missed, after]  # his own too, each once
            await wait_for_output(
                server, rf"worker 1 \(pid {victim_pid}\) ended \(killed by SIGKILL\)"
            )
            await wait_for_output(server, r"worker 1 is back: pid \d+")
            assert await pid_of(server.port, 1) != victim_pid
            assert process_gone(victim_pid)
            assert server.proc.poll() is None  # the parent stayed up
        assert server.proc.returncode == 0, server.output_text()


def _to_worker_0(port: int) -> Any:
    async def open_stream() -> trio.abc.Stream:
        stream, _, _ = await stream_to_worker(port, 0)
        return stream

    return open_stream


async def test_workers_sigterm_drains_every_worker_and_exits_0(redis: RedisServer) -> None:
    """SIGTERM to the parent: every client on every worker gets 1001, the parent
    exits 0 within --drain-timeout, and no worker process is left."""
    drain_timeout = 5.0
    with trio.fail_after(40):
        async with workers(redis, "--drain-timeout", str(drain_timeout)) as server:
            await wait_for_output(server, "workers: 2")
            pids = []
            async with contextlib.AsyncExitStack() as stack:
                clients = []
                for worker in range(WORKERS):
                    for _ in range(2):
                        client, pid = await stack.enter_async_context(
                            client_on(server.port, worker)
                        )
                        await client.join("lobby", f"user{len(clients)}")
                        clients.append(client)
                        pids.append(pid)
                started = trio.current_time()
                server.proc.send_signal(signal.SIGTERM)
                codes = [await client.closed() for client in clients]
                assert {code for code, _ in codes} == {1001}, codes
            # (Out of the block the clients' sockets are closed, as a real client's are.)
            status = await trio.to_thread.run_sync(server.proc.wait, drain_timeout)
            assert trio.current_time() - started < drain_timeout
            assert status == 0, server.output_text()
            assert len(set(pids)) == WORKERS
            assert all(process_gone(pid) for pid in pids), server.output_text()
            assert "Traceback" not in server.output_text()


async def test_workers_drain_when_the_supervisor_is_killed(redis: RedisServer) -> None:
    """SIGKILL to the parent: each worker sees its socket pair close and drains
    (its clients get 1001), so no orphan keeps the port."""
    with trio.fail_after(40):
        async with workers(redis) as server:
            await wait_for_output(server, "workers: 2")
            async with (
                client_on(server.port, 0) as (alice, pid0),
                client_on(server.port, 1) as (bob, pid1),
            ):
                await alice.join("lobby", "alice")
                await bob.join("lobby", "bob")
                server.proc.kill()
                assert (await alice.closed())[0] == 1001
                assert (await bob.closed())[0] == 1001
            await wait_for_output(server, "the supervisor is gone: draining", count=WORKERS)
            await wait_for_output(server, r"worker \d triochat.server: stopped", count=WORKERS)
            with trio.fail_after(10):
                while not (process_gone(pid0) and process_gone(pid1)):  # noqa: ASYNC110
                    await trio.sleep(0.05)  # (reaped by init, which trio cannot await)


def test_workers_metrics_ports_one_per_worker() -> None:
    """--metrics-port M: worker i serves its metrics on M+i; the range is checked."""
    config = Config(workers=2, redis="redis://127.0.0.1:6379/0", metrics_port=9100)
    supervisor = Supervisor(config, ["--metrics-port", "9100"], {})
    for index in range(2):
        command = supervisor._command(index)
        assert command[command.index("-m") + 1] == "triochat"
        assert command[-2:] == ["--metrics-port", str(9100 + index)]  # the last one wins
    with pytest.raises(ConfigError, match="metrics ports 9100-9101"):
        Config(workers=2, redis="redis://h/0", metrics_port=9100, port=9101)
    with pytest.raises(ConfigError, match="65535 at most"):
        Config(workers=2, redis="redis://h/0", metrics_port=65535)
    zero = Supervisor(Config(workers=2, redis="redis://h/0", metrics_port=0), [], {})
    assert "--metrics-port" not in zero._command(1)  # 0: each worker a free port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost from ``ca`` (as tests/test_tls.py makes them)."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = directory / "server.pem", directory / "server.key"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    return certfile, keyfile


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def certificate_of(port: int, worker: int, ca: trustme.CA) -> bytes:
    """The certificate worker ``worker`` presents to a new connection (DER)."""
    stream, _, _ = await stream_to_worker(port, worker, tls=client_context(ca))
    assert isinstance(stream, trio.SSLStream)
    served: bytes = stream.getpeercert(binary_form=True)
    await stream.aclose()
    return served


async def test_workers_sighup_is_forwarded_and_reloads_every_workers_certificate(
    redis: RedisServer, ca: trustme.CA, tmp_path: Path
) -> None:
    """SIGHUP to the parent reaches every worker: each reloads --certfile, new
    connections to either get the new pair, and all stay up."""
    certfile, keyfile = write_pair(ca, tmp_path)
    with trio.fail_after(40):
        async with workers(
            redis, "--certfile", str(certfile), "--keyfile", str(keyfile)
        ) as server:
            assert server.base_url.startswith("https://")
            await wait_for_output(server, "tls: on; workers: 2")
            old = [await certificate_of(server.port, w, ca) for w in range(WORKERS)]
            assert old[0] == old[1]
            write_pair(ca, tmp_path)
            server.proc.send_signal(signal.SIGHUP)
            await wait_for_output(server, "SIGHUP: forwarded to 2 workers")
            for worker in range(WORKERS):
                await wait_for_output(
                    server, rf"worker {worker} \S+: reloaded the TLS certificate"
                )
            new = [await certificate_of(server.port, w, ca) for w in range(WORKERS)]
            assert new[0] == new[1] != old[0]
            assert server.proc.poll() is None
            assert not re.search(r"triochat.workers: worker \d .*ended", server.output_text())
        assert server.proc.returncode == 0, server.output_text()


async def test_workers_worker_dying_at_every_start_stops_all_with_exit_1(
    redis: RedisServer, ca: trustme.CA, tmp_path: Path
) -> None:
    """A worker that dies at once on every restart (here its key file went bad)
    does not spin: after a bounded number of tries, with growing waits, the
    parent drains the others and exits 1 with a clear message."""
    certfile, keyfile = write_pair(ca, tmp_path)
    with trio.fail_after(60):
        async with workers(
            redis, "--certfile", str(certfile), "--keyfile", str(keyfile)
        ) as server:
            await wait_for_output(server, "workers: 2")
            pid = await pid_of(server.port, 1, tls=client_context(ca))
            keyfile.write_text("not a key")
            os.kill(pid, signal.SIGKILL)
            status = await trio.to_thread.run_sync(server.proc.wait, 45)
            output = server.output_text()
            assert status == 1, output
            assert (
                "that is 5 times in a row within 10 s of a start; stopping every worker" in output
            )
            waits = re.findall(r"worker 1 .*starting it again in ([\d.]+) s", output)
            assert [float(w) for w in waits] == [0.1, 0.2, 0.4, 0.8], output
            assert output.count("cannot use the certificate") == 4
            assert "worker 0 triochat.server: stopped" in output
            assert not _children_left(output)


def _children_left(output: str) -> list[int]:
    """Workers named in the output whose process still exists."""
    pids = {int(pid) for pid in re.findall(r"ready: pid (\d+)", output)}
    return [pid for pid in pids if not process_gone(pid)]
