"""A cluster of real processes on a real redis-server (docs/protocol.md §14), and its faults.

The conformance suite (tests/test_backplane.py) shows two nodes form one
chat; these tests kill things: a node process with SIGKILL, and the
redis-server itself in the middle of traffic.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from triochat import Config, Server

from .chatclient import ChatClient, open_client
from .conftest import client_of
from .redisserver import RedisServer, redis_server
from .server_process import run_server

NODE_TIMEOUT = 2.0


async def test_cluster_killed_node_users_leave_within_node_timeout(tmp_path: Path) -> None:
    """kill -9 of a node process: its users leave the other node's member lists
    within --node-timeout (their connections die with the process; nobody says goodbye)."""
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        args = ("--redis", redis.url, "--node-timeout", str(NODE_TIMEOUT))
        doomed = stack.enter_context(run_server(*args))
        survivor = stack.enter_context(run_server(*args))
        with trio.fail_after(30):
            async with (
                open_client(f"ws://127.0.0.1:{survivor.port}/ws") as bob,
                open_client(f"ws://127.0.0.1:{doomed.port}/ws") as alice,
            ):
                await bob.join(name="bob")
                await alice.join(name="alice", room="lobby")
                await bob.expect("presence", event="join", name="alice")
                killed_at = time.monotonic()
                doomed.kill()
                with trio.fail_after(NODE_TIMEOUT + 1.0):  # +1 s: scheduling slack
                    await bob.expect("presence", event="leave", name="alice")
                took = time.monotonic() - killed_at
                async with open_client(f"ws://127.0.0.1:{survivor.port}/ws") as alice_again:
                    joined = await alice_again.join(name="alice")
                    assert joined["members"] == ["alice", "bob"]
    assert took <= NODE_TIMEOUT + 1.0


async def test_cluster_drained_node_users_move_to_another_node_without_flicker(
    tmp_path: Path,
) -> None:
    """SIGTERM on a node: its clients get 1001 and reconnect to another node with their
    token; as after any disconnect their users are held for the grace period, so the
    other members see no leave/join, and a user who does not come back leaves after it."""
    grace = 1.0
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        args = ("--redis", redis.url, "--node-timeout", str(NODE_TIMEOUT))
        args += ("--presence-grace", str(grace))
        drained = stack.enter_context(run_server(*args))
        survivor = stack.enter_context(run_server(*args))
        with trio.fail_after(30):
            async with (
                open_client(f"ws://127.0.0.1:{survivor.port}/ws") as bob,
                open_client(f"ws://127.0.0.1:{drained.port}/ws") as alice,
                open_client(f"ws://127.0.0.1:{drained.port}/ws") as carol,
            ):
                await bob.join(name="bob")
                joined = await alice.join(name="alice")
                await carol.join(name="carol")
                await bob.expect("presence", event="join", name="alice")
                await bob.expect("presence", event="join", name="carol")
                drained.proc.terminate()
                assert (await alice.closed())[0] == 1001
                async with open_client(f"ws://127.0.0.1:{survivor.port}/ws") as alice2:
                    again = await alice2.join(name="alice", token=joined["token"])
                    assert again["members"] == ["alice", "bob", "carol"]
                    # carol did not come back: she leaves once the grace period is over;
                    # alice, who did, never left.
                    await bob.expect("presence", event="leave", name="carol")
                    await alice2.say("moved", ref="m")
                    await bob.expect("message", name="alice", msg="moved")
                    assert drained.proc.wait(timeout=10) == 0


@asynccontextmanager
async def two_nodes(redis: RedisServer) -> AsyncIterator[tuple[Server, Server]]:
    async with trio.open_nursery() as nursery:
        nodes = []
        for _ in range(2):
            config = Config(
                port=0, redis=redis.url, node_timeout=NODE_TIMEOUT, history_size=2000, rate=0
            )
            nodes.append(await nursery.start(Server(config).run))
        yield nodes[0], nodes[1]
        for node in nodes:
            node.drain()


async def say_until_acked(client: ChatClient, text: str, ref: str) -> str:
    """Say ``text`` until it is acked, again with the same ref after each `unavailable`
    (what the page does): the id it was acked with."""
    while True:
        await client.say(text, ref=ref)
        while True:
            frame = await client.recv()
            if frame.get("ref") != ref:
                continue
            if frame["type"] == "ack":
                return str(frame["id"])
            assert frame["type"] == "error", frame
            assert frame["code"] == "unavailable", frame
            break
        await trio.sleep(0.05)


async def collect_messages(
    client: ChatClient, into: list[dict[str, Any]], stop: trio.Event
) -> None:
    while not stop.is_set():
        with trio.move_on_after(0.2):
            frame = await client.recv()
            if frame["type"] == "message":
                into.append(frame)


async def test_fault_redis_killed_and_restarted_mid_traffic_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    """Fault scenario 7. redis-server is killed (SIGKILL) and restarted while two nodes
    carry traffic. Guarantee: every acked message is stored and reaches a member on
    each node exactly once, in the same order on both; says during the outage get
    `unavailable` (never a false ack); both nodes recover by themselves."""
    per_sender = 60
    with redis_server(tmp_path / "redis") as redis:
        with trio.fail_after(60):
            async with two_nodes(redis) as (one, two):
                async with (
                    client_of(one) as alice,
                    client_of(two) as bob,
                    client_of(one) as watch_one,
                    client_of(two) as watch_two,
                ):
                    for client, name in (
                        (watch_one, "w1"),
                        (watch_two, "w2"),
                        (alice, "alice"),
                        (bob, "bob"),
                    ):
                        await client.join(name=name)
                    seen_one: list[dict[str, Any]] = []
                    seen_two: list[dict[str, Any]] = []
                    acked: dict[str, str] = {}
                    stop = trio.Event()
                    refused_before = one.stats.storage_failures + two.stats.storage_failures

                    async def sender(client: ChatClient, name: str) -> None:
                        for i in range(per_sender):
                            text = f"{name}-{i}"
                            acked[text] = await say_until_acked(client, text, f"{name}{i}")
                            if i == per_sender // 3 and name == "alice":
                                redis.kill()  # mid-traffic, between two of alice's says
                                await trio.sleep(0.5)
                                redis.start()
                            await trio.sleep(0.005)

                    async with trio.open_nursery() as watchers:
                        watchers.start_soon(collect_messages, watch_one, seen_one, stop)
                        watchers.start_soon(collect_messages, watch_two, seen_two, stop)
                        async with trio.open_nursery() as senders:
                            senders.start_soon(sender, alice, "alice")
                            senders.start_soon(sender, bob, "bob")
                        with trio.fail_after(10):
                            while min(len(seen_one), len(seen_two)) < len(acked):  # noqa: ASYNC110
                                await trio.sleep(0.05)
                        await trio.sleep(0.3)  # a duplicate would arrive now
                        stop.set()
                    refused = one.stats.storage_failures + two.stats.storage_failures
                    await watch_one.send({"type": "history", "room": "lobby", "limit": 200})
                    stored = (await watch_one.expect("history"))["messages"]
                    ready = one.ready() and two.ready()

    assert len(acked) == 2 * per_sender
    for seen in (seen_one, seen_two):
        ids = [m["id"] for m in seen]
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        assert {m["msg"]: m["id"] for m in seen} == acked, "an acked message is missing"
    assert [m["id"] for m in seen_one] == [m["id"] for m in seen_two]
    assert {m["msg"]: m["id"] for m in stored} == acked
    assert refused > refused_before, "the outage was never seen: the test proved nothing"
    assert ready


async def test_cluster_redis_that_lost_its_data_starts_a_new_epoch(tmp_path: Path) -> None:
    """redis-server restarted *without* its data (no persistence): the nodes notice the
    new epoch and start over from what Redis has. Old ids are never reused: a `since`
    from before answers `recovered: false`; new says are stored and delivered."""
    with redis_server(tmp_path / "redis") as redis:
        with trio.fail_after(30):
            async with two_nodes(redis) as (one, two):
                async with client_of(one) as alice, client_of(two) as bob:
                    joined = await alice.join(name="alice")
                    await bob.join(name="bob smith")
                    await alice.expect("presence", event="join", name="bob smith")
                    await alice.say("before", ref="b")
                    old = await alice.expect("message", msg="before")
                    await alice.expect("ack", ref="b")
                    await bob.expect("message", msg="before")
                    redis.kill()
                    for leftover in redis.directory.glob("appendonly*"):
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                    redis.start()
                    new_id = await say_until_acked(alice, "after", "a")
                    assert new_id.rpartition("-")[0] != old["id"].rpartition("-")[0]
                    got = await bob.recv()
                    while got["type"] != "message":
                        got = await bob.recv()
                    assert (got["msg"], got["id"]) == ("after", new_id)
                    # The nodes wrote their users back: names are still taken.
                    async with client_of(one) as impostor:
                        await impostor.send(
                            {"type": "join", "room": "lobby", "name": "bob smith", "ref": "j"}
                        )
                        await impostor.expect("error", code="name_taken", ref="j")
                    # Both nodes wrote their members back and each learned the other's,
                    # whichever of them reconciled first.
                    async with client_of(one) as dave, client_of(two) as erin:
                        everyone = ["alice", "bob smith", "dave", "erin"]
                        assert (await dave.join(name="dave"))["members"] == everyone[:3]
                        assert (await erin.join(name="erin"))["members"] == everyone
                async with client_of(two) as back:
                    rejoined = await back.join(name="carol", since=old["id"])
                    assert rejoined["recovered"] is False
                    assert [m["msg"] for m in rejoined["history"]] == ["after"]

                    del joined


async def test_cluster_redis_outage_waits_for_the_other_node_before_its_users_leave(
    tmp_path: Path,
) -> None:
    """redis-server down longer than a heartbeat lasts, and node one gets back first:
    it waits for node two instead of dropping its users, so alice sees no `presence`
    of bob; once node two is back, says flow. Then the same outage with node two
    never back: its users leave when node one's wait is over, not at once
    (docs/protocol.md §14, "Redis down")."""
    from triochat.backplane.redis_liveness import wait_after_reconnect

    from .tcpproxy import TcpProxy
    from .test_backplane import readiness_becomes

    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        proxy = stack.enter_context(TcpProxy(redis.port))
        settings: dict[str, Any] = {
            "port": 0,
            "memory": True,
            "node_timeout": NODE_TIMEOUT,
            "backplane_timeout": 1.0,
        }
        direct = Config(redis=redis.url, **settings)
        behind = Config(redis=f"redis://127.0.0.1:{proxy.port}/0", **settings)
        wait = wait_after_reconnect(direct)

        async def outage_with_node_two_behind() -> None:
            proxy.refuse()
            redis.kill()
            proxy.cut()
            await trio.sleep(NODE_TIMEOUT * 2 / 3 + 0.5)  # every heartbeat key has expired
            redis.start()
            await readiness_becomes(one, 200, within=10)
            assert not two.ready()

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                one: Server = await nursery.start(Server(direct).run)
                two: Server = await nursery.start(Server(behind).run)
                async with client_of(one) as alice, client_of(two) as bob:
                    await alice.join(name="alice")
                    await bob.join(name="bob")
                    await alice.expect("presence", event="join", name="bob")

                    await outage_with_node_two_behind()
                    # Node one looks for dead nodes twice meanwhile (four times
                    # per node timeout); node two's reconnect pause is then at
                    # most 3.2 s, well within node one's wait.
                    await trio.sleep(NODE_TIMEOUT / 2)
                    proxy.accept()
                    await readiness_becomes(two, 200, within=wait)
                    await bob.send({"type": "say", "room": "lobby", "msg": "back", "ref": "y"})
                    await alice.expect("message", msg="back", name="bob")  # no leave, no join

                    await outage_with_node_two_behind()
                    back_at = trio.current_time()
                    alice.timeout = wait + 5.0
                    await alice.expect("presence", event="leave", name="bob")
                    waited = trio.current_time() - back_at
                one.drain()
                two.drain()
    # The whole wait, then gone at the next look (four per node timeout), plus slack.
    assert wait - 0.5 <= waited <= wait + NODE_TIMEOUT / 4 + 1.0, (waited, wait)


async def test_cluster_slow_redis_holds_up_only_the_join_that_waits_for_it(
    tmp_path: Path,
) -> None:
    """Redis answers a node 1 s late (a proxy holds its replies): a new client's join on
    that node waits for it, but meanwhile another client's `history` (from the node's
    cache), its pings and a whisper between two clients of the node are answered at
    once; the join completes when Redis answers (#12 defect 2)."""
    from .tcpproxy import TcpProxy

    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        proxy = stack.enter_context(TcpProxy(redis.port))
        config = Config(
            port=0, memory=True, redis=f"redis://127.0.0.1:{proxy.port}/0", node_timeout=10
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(Server(config).run)
                async with client_of(server) as carol, client_of(server) as erin:
                    await carol.join(name="carol")
                    await erin.join(name="erin")
                    await carol.expect("presence", event="join", name="erin")
                    await carol.say("before", ref="b")
                    await carol.expect("message", msg="before")
                    await carol.expect("ack", ref="b")
                    proxy.hold_replies()
                    held_at = trio.current_time()
                    async with client_of(server) as alice:
                        await alice.send({"type": "join", "room": "lobby", "name": "alice"})
                        with trio.fail_after(0.3):
                            await carol.send({"type": "history", "room": "lobby", "ref": "h"})
                            history = await carol.expect("history", room="lobby")
                            await carol.ws.ping(b"still there?")
                            await carol.send(
                                {"type": "whisper", "to": "erin", "msg": "psst", "ref": "w"}
                            )
                            while (frame := await erin.recv())["type"] != "whisper":
                                pass
                        assert frame["msg"] == "psst"
                        assert [m["msg"] for m in history["messages"]] == ["before"]
                        with trio.move_on_after(0.3):
                            frame = await alice.recv()
                            raise AssertionError(f"the join did not wait for Redis: {frame}")
                        await trio.sleep(max(0.0, held_at + 1.0 - trio.current_time()))
                        proxy.release_replies()
                        joined = await alice.expect("joined", room="lobby")
                        assert joined["members"] == ["alice", "carol", "erin"]
                server.drain()


class CommandsOnlyProxy:
    """A TCP proxy in front of Redis, in the test's own trio run, that can hold back
    Redis's replies on every connection but a subscription (one whose client sent
    SUBSCRIBE): a node's commands then wait as on a slow Redis, while what the
    other nodes publish still reaches it (tests/tcpproxy.py holds every link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._held = False
        self._released = trio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_replies(self) -> None:
        self._held = True
        self._released = trio.Event()

    def release_replies(self) -> None:
        self._held = False
        self._released.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._link, listeners)

    async def _link(self, client: trio.SocketStream) -> None:
        subscriber = False
        lost = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as redis:
            async with trio.open_nursery() as nursery:

                async def requests() -> None:
                    nonlocal subscriber
                    with contextlib.suppress(*lost):
                        async for data in client:
                            subscriber = subscriber or b"SUBSCRIBE" in data
                            await redis.send_all(data)
                    nursery.cancel_scope.cancel()

                async def replies() -> None:
                    with contextlib.suppress(*lost):
                        async for data in redis:
                            while self._held and not subscriber:
                                await self._released.wait()
                            await client.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(requests)
                nursery.start_soon(replies)


async def test_cluster_slow_redis_does_not_hold_up_messages_from_another_node(
    tmp_path: Path,
) -> None:
    """Redis answers node A's commands 1 s late, while its subscription flows: a new
    client's join on A waits for its name claim, and A has just published (a typing
    indicator: the old hub waited for that to reach Redis), yet a message said on
    node B reaches both of A's members at once; the join completes when Redis answers
    (#12 defect 2: only the client that needs the answer waits)."""
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(30):
        proxy = CommandsOnlyProxy(redis.port)
        async with trio.open_nursery() as outer:
            await outer.start(proxy.run)
            async with trio.open_nursery() as nursery:
                a: Server = await nursery.start(
                    Server(Config(port=0, redis=proxy.url, node_timeout=10)).run
                )
                b: Server = await nursery.start(
                    Server(Config(port=0, redis=redis.url, node_timeout=10)).run
                )
                async with (
                    client_of(a) as carol,
                    client_of(a) as erin,
                    client_of(b) as bob,
                ):
                    await carol.join(name="carol")
                    await erin.join(name="erin")
                    await bob.join(name="bob")
                    for member in carol, erin:
                        while (await member.recv()).get("name") != "bob":
                            pass  # bob's presence came over Redis: the cluster is one chat
                    proxy.hold_replies()
                    held_at = trio.current_time()
                    async with client_of(a) as alice:
                        await alice.send({"type": "join", "room": "lobby", "name": "alice"})
                        await carol.send({"type": "typing", "room": "lobby"})
                        await erin.expect("typing", name="carol")
                        with trio.fail_after(0.3):
                            await bob.say("from b", ref="b")
                            for member in carol, erin:
                                while (frame := await member.recv())["type"] != "message":
                                    pass
                                assert frame["msg"] == "from b"
                        with trio.move_on_after(0.3):
                            frame = await alice.recv()
                            raise AssertionError(f"the join did not wait for Redis: {frame}")
                        await trio.sleep(max(0.0, held_at + 1.0 - trio.current_time()))
                        proxy.release_replies()
                        joined = await alice.expect("joined", room="lobby")
                        assert joined["members"] == ["alice", "bob", "carol", "erin"]
                a.drain()
                b.drain()
            outer.cancel_scope.cancel()


async def test_cluster_look_alike_of_a_name_on_another_node_is_name_taken(
    tmp_path: Path,
) -> None:
    """Names are claimed in Redis by their keys (#18): with "Alice" on node one, node two
    answers name_taken to "alice", a Cyrillic "\\u0430lice", "ALICE" and "AIice" (a TR39
    skeleton match); a whisper to "ALICE" from node two reaches Alice, named as bound; a
    takeover on node two with the token and another form of the name keeps "Alice"."""
    with redis_server(tmp_path / "redis") as redis:
        with trio.fail_after(30):
            async with two_nodes(redis) as (one, two):
                async with client_of(one) as alice, client_of(two) as mallory:
                    joined = await alice.join(name="Alice")
                    for i, name in enumerate(["alice", "\u0430lice", "ALICE", "AIice"]):
                        await mallory.send(
                            {"type": "join", "room": "lobby", "name": name, "ref": f"j{i}"}
                        )
                        await mallory.expect("error", code="name_taken", ref=f"j{i}")
                    await mallory.join(name="mallory")
                    await alice.expect("presence", event="join", name="mallory")
                    await mallory.send({"type": "whisper", "to": "ALICE", "msg": "psst"})
                    whisper = await alice.expect("whisper", msg="psst")
                    assert (whisper["from"], whisper["to"]) == ("mallory", "Alice")
                    await mallory.expect("whisper", msg="psst")  # its own copy
                    async with client_of(two) as again, client_of(one) as eve:
                        rejoined = await again.join(name="alice", token=joined["token"])
                        assert rejoined["name"] == "Alice"
                        assert rejoined["members"] == ["Alice", "mallory"]
                        assert (await alice.closed())[0] == 4001
                        # The claim (both keys) moved to node two: node one refuses too.
                        for i, name in enumerate(["\u0430lice", "AIice"]):
                            await eve.send(
                                {"type": "join", "room": "lobby", "name": name, "ref": f"k{i}"}
                            )
                            await eve.expect("error", code="name_taken", ref=f"k{i}")
