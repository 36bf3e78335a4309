"""One conformance suite over both backplanes (docs/protocol.md §14): nodes form one chat.

Every test runs twice: ``local`` (two servers on one in-process `LocalBroker`)
and ``redis`` (two servers on a real ``redis-server`` started on a free port).
Real sockets, real time, every wait bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from triochat import Config, Server
from triochat.backplane.local import LocalBackplane
from triochat.history.memory import MemoryHistory

from .chatclient import ChatClient
from .conftest import client_of
from .faults import FaultyBroker
from .redisserver import RedisServer, redis_server
from .sseclient import Form, SseStream, tcp
from .test_http import fetch

HISTORY = 50


class Cluster:
    """Start and stop the nodes of one chat, over either backplane."""

    def __init__(self, kind: str, nursery: trio.Nursery, redis: RedisServer | None) -> None:
        self.kind = kind
        self.redis = redis
        self._nursery = nursery
        self._broker = FaultyBroker(MemoryHistory(HISTORY), HISTORY)
        self._stopped: dict[Server, trio.Event] = {}

    async def node(self, **options: Any) -> Server:
        """A new node, listening on a free port."""
        settings: dict[str, Any] = {
            "port": 0,
            "memory": True,
            "history_size": HISTORY,
            "presence_grace": 0.5,
            **options,
        }
        if self.redis is not None:
            server = Server(Config(redis=self.redis.url, node_timeout=1.5, **settings))
        else:
            server = Server(Config(**settings), backplane=LocalBackplane(self._broker))
        stopped = self._stopped[server] = trio.Event()

        async def run(task_status: trio.TaskStatus[Server]) -> None:
            try:
                await server.run(task_status=task_status)
            finally:
                stopped.set()

        return await self._nursery.start(run)

    async def stop(self, server: Server) -> None:
        """Drain ``server`` and wait until it has left."""
        server.drain()
        await self._stopped[server].wait()

    def break_backplane(self) -> None:
        if self.redis is not None:
            self.redis.kill()
        else:
            self._broker.fail_with = "the broker is down (injected)"

    def mend_backplane(self) -> None:
        if self.redis is not None:
            self.redis.start()
        else:
            self._broker.fail_with = None


@pytest.fixture(params=["local", "redis"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    with ExitStack() as stack:
        redis = (
            stack.enter_context(redis_server(tmp_path / "redis"))
            if request.param == "redis"
            else None
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                yield Cluster(request.param, nursery, redis)
                nursery.cancel_scope.cancel()


async def frames_until(
    client: ChatClient, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not done(frames):
        frames.append(await client.recv())
    return frames


async def readiness_becomes(server: Server, status: int, *, within: float) -> None:
    """Poll /readyz (as a load balancer does) until it answers ``status``."""
    with trio.fail_after(within):
        while (await fetch(server, "GET", "/readyz")).status != status:  # noqa: ASYNC110
            await trio.sleep(0.05)


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


async def test_backplane_messages_reach_every_node_in_one_order(cluster: Cluster) -> None:
    """Says from both nodes reach members on both in the same order; acks follow messages."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as bob:
        await alice.join(name="alice")
        await bob.join(name="bob")
        await alice.expect("presence", event="join", name="bob")
        for i in range(20):
            await alice.say(f"a{i}", ref=f"a{i}")
            await bob.say(f"b{i}", ref=f"b{i}")

        def all_in(frames: list[dict[str, Any]]) -> bool:
            return len(of_type(frames, "message")) == 40 and len(of_type(frames, "ack")) == 20

        seen_by_alice = await frames_until(alice, all_in)
        seen_by_bob = await frames_until(bob, all_in)
    order_alice = [m["id"] for m in of_type(seen_by_alice, "message")]
    order_bob = [m["id"] for m in of_type(seen_by_bob, "message")]
    assert order_alice == order_bob
    seqs = [int(i.rpartition("-")[2]) for i in order_alice]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 40
    for frames, name in ((seen_by_alice, "alice"), (seen_by_bob, "bob")):
        position = {f["id"]: n for n, f in enumerate(frames) if f["type"] == "message"}
        own = {f["msg"]: f["id"] for f in of_type(frames, "message") if f["name"] == name}
        for n, ack in enumerate(frames):
            if ack["type"] == "ack":
                assert ack["id"] == own[ack["ref"]]
                assert position[ack["id"]] < n  # the message first, then its ack


async def test_backplane_members_and_presence_span_nodes(cluster: Cluster) -> None:
    """`joined.members` lists users of every node; join and leave reach the other node."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as bob:
        await alice.join(name="alice")
        joined = await bob.join(name="bob")
        assert joined["members"] == ["alice", "bob"]
        await alice.expect("presence", event="join", name="bob")
        await bob.send({"type": "leave", "room": "lobby"})
        await bob.expect("left", room="lobby")
        await alice.expect("presence", event="leave", name="bob")


async def test_backplane_typing_reaches_the_other_node(cluster: Cluster) -> None:
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as bob:
        await alice.join(name="alice")
        await bob.join(name="bob")
        await alice.expect("presence", event="join", name="bob")
        await bob.send({"type": "typing", "room": "lobby"})
        await alice.expect("typing", room="lobby", name="bob")


async def test_backplane_whisper_reaches_a_user_on_the_other_node(cluster: Cluster) -> None:
    """A whisper finds its user on any node; the sender gets its copy and the ack."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as bob:
        await alice.join(name="alice")
        await bob.join(name="bob")
        await alice.expect("presence", event="join", name="bob")
        await alice.send({"type": "whisper", "to": "bob", "msg": "psst", "ref": "w1"})
        copy = await alice.expect("whisper", to="bob", msg="psst")
        ack = await alice.expect("ack", ref="w1")
        got = await bob.expect("whisper", msg="psst")
        assert got["from"] == "alice"
        assert got["id"] == copy["id"] == ack["id"]
        await alice.send({"type": "whisper", "to": "nobody", "msg": "x", "ref": "w2"})
        await alice.expect("error", code="no_such_user", ref="w2")


async def test_backplane_whisper_to_a_user_in_grace_on_another_node_is_never_acked(
    cluster: Cluster,
) -> None:
    """A whisper for a user whose connection just ended on another node (still in its
    grace period, so still listed there) is answered no_such_user, never acked and
    dropped; once the user is back, whispers are acked after they were delivered (#12)."""
    one, two = await cluster.node(), await cluster.node(presence_grace=30)
    async with client_of(one) as alice:
        await alice.join(name="alice")
        async with client_of(two) as bob:
            joined = await bob.join(name="bob")
            await alice.expect("presence", event="join", name="bob")
        # bob's connection is gone; node two holds his name for 30 s.
        await trio.sleep(0.2)
        await alice.send({"type": "whisper", "to": "bob", "msg": "lost?", "ref": "w1"})
        answer = await alice.recv()
        assert answer["type"] == "error", answer
        assert (answer["code"], answer["ref"]) == ("no_such_user", "w1")
        async with client_of(two) as bob:
            await bob.join(name="bob", token=joined["token"])
            await trio.sleep(0.2)  # node one hears that bob is back (no presence: no flicker)
            await alice.send({"type": "whisper", "to": "bob", "msg": "back", "ref": "w2"})
            copy = await alice.expect("whisper", to="bob", msg="back")
            ack = await alice.expect("ack", ref="w2")
            got = await bob.expect("whisper", msg="back")
            assert got["id"] == copy["id"] == ack["id"]


async def test_backplane_classic_clients_span_nodes(cluster: Cluster) -> None:
    """A 2012-style client on `/` of one node hears lobby messages said on the other,
    and its classic `{name, msg}` frames reach members there."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one, "/") as classic, client_of(two) as bob:
        await bob.join(name="bob")
        await bob.say("hi from two", ref="b")
        await bob.expect("message", msg="hi from two")
        await bob.expect("ack", ref="b")
        heard = await classic.expect("message", msg="hi from two")
        assert heard["name"] == "bob"
        await classic.send({"name": "carl", "msg": "hi from one"})
        await bob.expect("presence", event="join", name="carl")
        got = await bob.expect("message", msg="hi from one")
        assert got["name"] == "carl"


async def test_backplane_name_is_unique_across_nodes(cluster: Cluster) -> None:
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as impostor:
        await alice.join(name="alice")
        await impostor.send({"type": "join", "room": "lobby", "name": "alice", "ref": "j"})
        await impostor.expect("error", code="name_taken", ref="j")


async def test_backplane_look_alike_names_are_unique_across_nodes(cluster: Cluster) -> None:
    """Names are claimed by their keys (#18): "Alice" on one node makes its look-alikes
    name_taken on the other; once Alice's name is released, a look-alike is free."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(two) as impostor, client_of(two) as bob:
        await bob.join(name="bob")
        async with client_of(one) as alice:
            await alice.join(name="Alice")
            await bob.expect("presence", event="join", name="Alice")
            for i, name in enumerate(["\u0430lice", "ALICE", "AIice", "\uff21lice"]):
                await impostor.send(
                    {"type": "join", "room": "lobby", "name": name, "ref": f"j{i}"}
                )
                await impostor.expect("error", code="name_taken", ref=f"j{i}")
        # The grace period (0.5 s) ends: the leave and the release go out together.
        await bob.expect("presence", event="leave", name="Alice")
        joined = await impostor.join(name="AIice")
        assert joined["members"] == ["AIice", "bob"]


async def test_backplane_token_rotates_on_a_takeover_that_asks_across_nodes(
    cluster: Cluster,
) -> None:
    """A takeover with `rotate` on either node gets a new token, and the one it used no
    longer works on any node (#18); without `rotate` the token stays (docs/protocol.md §6)."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as first:
        token = (await first.join(name="alice"))["token"]
        async with client_of(two) as second:
            rotated = (await second.join(name="alice", token=token, rotate=True))["token"]
            assert rotated != token
            assert (await first.closed())[0] == 4001
            for node in (one, two):
                async with client_of(node) as thief:
                    await thief.send(
                        {
                            "type": "join",
                            "room": "lobby",
                            "name": "alice",
                            "token": token,
                            "ref": "t",
                        }
                    )
                    await thief.expect("error", code="name_taken", ref="t")
            async with client_of(two) as third:  # a takeover on the same node rotates too
                again = (await third.join(name="alice", token=rotated, rotate=True))["token"]
                assert again not in (token, rotated)
                assert (await second.closed())[0] == 4001
                async with client_of(one) as fourth:  # no `rotate`: the token stays
                    assert (await fourth.join(name="alice", token=again))["token"] == again
                    assert (await third.closed())[0] == 4001


async def test_backplane_since_on_the_other_node_recovers_exactly(cluster: Cluster) -> None:
    """History lives in the backplane: a reconnect to the other node with `since` is exact."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice:
        joined = await alice.join(name="alice")
        ids = []
        for i in range(5):
            await alice.say(f"m{i}", ref=f"r{i}")
            await alice.expect("message", msg=f"m{i}")
            ids.append((await alice.expect("ack", ref=f"r{i}"))["id"])
    async with client_of(two) as back:
        rejoined = await back.join(name="alice", token=joined["token"], since=ids[1])
        assert [m["id"] for m in rejoined["history"]] == ids[2:]
        assert rejoined["recovered"] is True
        await back.send({"type": "history", "room": "lobby", "ref": "h"})
        page = await back.expect("history", ref="h")
        assert [m["msg"] for m in page["messages"]] == [f"m{i}" for i in range(5)]


async def test_backplane_takeover_on_the_other_node_closes_4001_without_flicker(
    cluster: Cluster,
) -> None:
    """A token takeover from another node closes the old connection with 4001; observers
    on both nodes see no leave/join, and the user keeps its rooms."""
    one, two = await cluster.node(), await cluster.node()
    async with (
        client_of(one) as alice,
        client_of(one) as carol,
        client_of(two) as dave,
    ):
        joined = await alice.join(name="alice")
        await carol.join(name="carol")
        await dave.join(name="dave")
        await alice.expect("presence", event="join", name="carol")
        await alice.expect("presence", event="join", name="dave")
        await alice.send({"type": "join", "room": "side"})
        await alice.expect("joined", room="side")
        await carol.expect("presence", event="join", name="dave")
        async with client_of(two) as alice2:
            again = await alice2.join(name="alice", token=joined["token"])
            assert again["members"] == ["alice", "carol", "dave"]
            assert (await alice.closed())[0] == 4001
            await alice2.send({"type": "join", "room": "side"})
            assert (await alice2.expect("joined", room="side"))["members"] == ["alice"]
            await alice2.say("still here", ref="s")
            for observer in (carol, dave):
                # The next frame is the message: no presence flicker before it.
                await observer.expect("message", msg="still here", name="alice")


async def test_backplane_retried_say_on_the_other_node_is_stored_once(cluster: Cluster) -> None:
    """A say retried with its ref after moving node is acked with the first id, stored once."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(two) as watcher:
        await watcher.join(name="watcher")
        async with client_of(one) as alice:
            joined = await alice.join(name="alice")
            await alice.say("once", ref="r1")
            await alice.expect("message", msg="once")
            first = await alice.expect("ack", ref="r1")
        await watcher.expect("presence", event="join", name="alice")
        await watcher.expect("message", msg="once")
        async with client_of(two) as alice2:
            await alice2.join(name="alice", token=joined["token"])
            await alice2.say("once", ref="r1")
            assert (await alice2.expect("ack", ref="r1"))["id"] == first["id"]
            await alice2.send({"type": "history", "room": "lobby", "ref": "h"})
            page = await alice2.expect("history", ref="h")
            assert [m["msg"] for m in page["messages"]] == ["once"]


async def test_backplane_stopped_node_users_leave_the_others(cluster: Cluster) -> None:
    """A node that stops takes its users out of every other node's member lists."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(two) as bob:
        await bob.join(name="bob")
        async with client_of(one) as alice:
            await alice.join(name="alice")
            await bob.expect("presence", event="join", name="alice")
            await cluster.stop(one)
        await bob.expect("presence", event="leave", name="alice")
        async with client_of(two) as alice_again:
            joined = await alice_again.join(name="alice")  # the name is free again
            assert joined["members"] == ["alice", "bob"]


@pytest.mark.parametrize("form", ["header", "path"])
async def test_backplane_sse_post_to_the_other_node_reaches_the_stream(
    cluster: Cluster, form: Form
) -> None:
    """A POST (session in X-Triochat-Session, or in the path) may land on any node:
    it is relayed to the stream's node (#18)."""
    one, two = await cluster.node(), await cluster.node()
    stream = await SseStream.open(tcp(one.port))
    try:
        on_two = SseStream(stream.stream, tcp(two.port))
        on_two.session = stream.session
        join = {"type": "join", "room": "lobby", "name": "sam", "ref": "j"}
        status, _ = await on_two.post(join, form=form)
        assert status == 204
        await stream.expect("joined", room="lobby", name="sam", ref="j")
        status, _ = await on_two.post(
            {"type": "say", "room": "lobby", "msg": "via two", "ref": "s"}, form=form
        )
        assert status == 204
        await stream.expect("message", msg="via two")
        await stream.expect("ack", ref="s")
        gone = f"{one.hub.backplane.node}.nope"
        status, body = await _post(two, gone, form)
        assert status == 404
        assert body is not None
        assert body["code"] == "no_such_session"
    finally:
        await stream.aclose()


async def _post(
    server: Server, session: str, form: Form = "header"
) -> tuple[int, dict[str, Any] | None]:
    from .sseclient import post

    frame = {"type": "say", "room": "lobby", "msg": "x"}
    return await post(tcp(server.port), session, frame, form=form)


async def test_backplane_outage_refuses_says_then_recovers(cluster: Cluster) -> None:
    """While the backplane is down: connections stay, `say` gets `unavailable`, /readyz
    is 503. When it is back the node recovers by itself and says are stored again."""
    one, two = await cluster.node(), await cluster.node()
    async with client_of(one) as alice, client_of(two) as bob:
        await alice.join(name="alice")
        await bob.join(name="bob")
        await alice.expect("presence", event="join", name="bob")
        cluster.break_backplane()
        await readiness_becomes(one, 503, within=10)
        await alice.say("lost?", ref="x")
        await alice.expect("error", code="unavailable", ref="x")
        # A whisper for another node cannot get there: refused, not acked.
        await alice.send({"type": "whisper", "to": "bob", "msg": "psst", "ref": "w"})
        await alice.expect("error", code="unavailable", ref="w")
        cluster.mend_backplane()
        await readiness_becomes(one, 200, within=20)
        await readiness_becomes(two, 200, within=20)
        await alice.say("back", ref="y")
        await alice.expect("message", msg="back")
        await alice.expect("ack", ref="y")
        await bob.expect("message", msg="back")
