"""The global caps of docs/protocol.md §8 against ``python -m triochat`` on SQLite (#18):
idle rooms leave memory and come back with their history when joined, a
restart reads only the rooms written last, and the store stays within
``--max-stored-bytes``; /metrics shows each."""

from __future__ import annotations

import trio

from triochat import Config, Server

from .chatclient import ChatClient, open_client
from .redisserver import redis_server
from .server_process import ServerProcess, run_server
from .test_api_e2e import api_server, curl, url
from .test_metrics import _get, samples, total

ROOMS = [f"r{i}" for i in range(6)]


def metric(proc: ServerProcess, name: str) -> float:
    status, body = _get(f"{proc.base_url}/metrics")
    assert status == 200, body
    return total(samples(body), name)


async def say_acked(client: ChatClient, room: str, texts: list[str]) -> list[str]:
    """Say each text in ``room`` (read as they go); the acked ids, in order."""
    ids: list[str] = []
    for i, text in enumerate(texts):
        await client.send({"type": "say", "room": room, "msg": text, "ref": f"{room}-{i}"})
        frame = await client.recv()
        while frame["type"] != "ack":  # (its own message comes first)
            frame = await client.recv()
        assert frame["ref"] == f"{room}-{i}", frame
        ids.append(frame["id"])
    return ids


async def fill(url: str, rooms: list[str], count: int) -> dict[str, list[str]]:
    """``count`` messages in each room by one client that then leaves them all."""
    ids: dict[str, list[str]] = {}
    async with open_client(url) as alice:
        for room in rooms:
            await alice.join(room, "alice")
            ids[room] = await say_acked(alice, room, [f"{room} says {i}" for i in range(count)])
            await alice.send({"type": "leave", "room": room})
            await alice.expect("left", room=room)
    return ids


async def test_idle_rooms_leave_memory_and_come_back_with_their_history(tmp_path):
    """Past ``--room-cache`` idle rooms are evicted (metrics say so); a join of one
    reads its whole history from the store, and so does a `history` page; after
    a restart only the rooms written last are read at start."""
    data = str(tmp_path / "data")
    with trio.fail_after(60):
        with run_server("--data-dir", data, "--room-cache", "2", memory=False) as proc:
            url = f"ws://127.0.0.1:{proc.port}/ws"
            ids = await fill(url, ROOMS, 3)
            while metric(proc, "triochat_rooms_idle") != 2:  # noqa: ASYNC110 (leaves settle)
                await trio.sleep(0.1)
            assert metric(proc, "triochat_rooms") == 2
            assert metric(proc, "triochat_rooms_evicted_total") == len(ROOMS) - 2
            assert metric(proc, "triochat_room_cache_bytes") > 0
            async with open_client(url) as bob:
                joined = await bob.join("r0", "bob")
                assert [m["id"] for m in joined["history"]] == ids["r0"]
                await bob.send({"type": "history", "room": "r0", "limit": 2, "ref": "h"})
                page = await bob.expect("history", ref="h")
                assert [m["id"] for m in page["messages"]] == ids["r0"][1:]
                assert page["more"] is True
                # Live messages go on after the read, with ids after the old ones.
                (new_id,) = await say_acked(bob, "r0", ["after the read"])
                assert new_id not in ids["r0"]
            assert metric(proc, "triochat_rooms_loaded_total") == 1
            assert "Traceback" not in proc.output_text()
        with run_server(
            "--data-dir", data, "--room-cache", "2", memory=False, port=proc.port
        ) as proc:
            assert metric(proc, "triochat_rooms") == 2, "only the rooms written last are read"
            async with open_client(url) as carol:
                joined = await carol.join("r1", "carol")
                assert [m["id"] for m in joined["history"]] == ids["r1"]
                joined = await carol.join("r0", "carol")
                assert [m["id"] for m in joined["history"]][:3] == ids["r0"]
                assert [m["msg"] for m in joined["history"]][3:] == ["after the read"]


async def test_the_store_keeps_within_max_stored_bytes_oldest_first(tmp_path):
    """Long messages past ``--max-stored-bytes`` push the oldest out of the store;
    what is left is the newest, whole, after a restart too."""
    data = str(tmp_path / "data")
    limit = 1 << 20
    text = "x" * 2000
    args = ("--data-dir", data, "--max-stored-bytes", str(limit), "--rate", "0")
    with trio.fail_after(90):
        with run_server(*args, memory=False) as proc:
            url = f"ws://127.0.0.1:{proc.port}/ws"
            async with open_client(url) as alice:
                await alice.join("big", "alice")
                acked = await say_acked(alice, "big", [text] * 700)
            assert metric(proc, "triochat_stored_bytes") <= limit
            trimmed = metric(proc, "triochat_stored_trimmed_total")
            assert trimmed > 0
        with run_server(*args, memory=False, port=proc.port) as proc:
            async with open_client(url) as bob:
                joined = await bob.join("big", "bob")
                assert [m["id"] for m in joined["history"]] == acked[-100:]
                kept = 700 - int(trimmed)
                assert 0 < kept * len(text) <= limit
                before = joined["history"][0]["id"]
                await bob.send(
                    {"type": "history", "room": "big", "before": before, "limit": 200, "ref": "o"}
                )
                older = await bob.expect("history", ref="o")
                assert [m["id"] for m in older["messages"]] == acked[-300:-100]
                assert metric(proc, "triochat_stored_bytes") <= limit


async def test_a_cluster_node_reads_an_evicted_room_from_redis(tmp_path):
    """On a cluster node (real redis-server) an evicted room's join reads Redis:
    the history said on the other node is whole, and live messages go on."""
    with redis_server(tmp_path) as redis, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nodes: list[Server] = []
            for _ in range(2):
                config = Config(port=0, redis=redis.url, rate=0, room_cache=1)
                nodes.append(await nursery.start(Server(config).run))
            first, second = (f"ws://127.0.0.1:{node.port}/ws" for node in nodes)
            ids = await fill(first, ROOMS[:3], 3)
            # The second node heard every message and keeps one idle room at most.
            while nodes[1].hub.chat.room_cache.evicted < 2:  # noqa: ASYNC110 (leaves settle)
                await trio.sleep(0.1)
            assert not nodes[1].hub.chat.history_in_memory("r0")
            async with open_client(second) as bob, open_client(first) as carol:
                joined = await bob.join("r0", "bob")
                assert [m["id"] for m in joined["history"]] == ids["r0"]
                await carol.join("r0", "carol")
                (new_id,) = await say_acked(carol, "r0", ["across nodes"])
                frame = await bob.recv()
                while frame["type"] != "message":
                    frame = await bob.recv()
                assert frame["id"] == new_id
            assert nodes[1].hub.chat.room_cache.loads == 1
            for node in nodes:
                node.drain()


async def test_the_server_api_pages_an_evicted_room_from_the_store():
    """`GET /api/history` of a room evicted from memory reads the store (§8, §16):
    the same page as for a room in memory, and `before` an unknown id is 400."""
    with trio.fail_after(30):
        async with api_server(room_cache=1, rate=0) as server:
            ids = await fill(f"ws://127.0.0.1:{server.port}/ws", ROOMS[:3], 3)
            while server.hub.chat.room_cache.evicted < 2:  # noqa: ASYNC110 (leaves settle)
                await trio.sleep(0.1)
            assert not server.hub.chat.history_in_memory("r0")
            status, page = await curl(server.port, url("/api/history?room=r0&limit=2"))
            assert status == 200, page
            assert [m["id"] for m in page["messages"]] == ids["r0"][1:]
            assert page["more"] is True
            before = ids["r0"][1]
            status, page = await curl(server.port, url(f"/api/history?room=r0&before={before}"))
            assert status == 200, page
            assert [m["id"] for m in page["messages"]] == ids["r0"][:1]
            assert page["more"] is False
            status, page = await curl(server.port, url("/api/history?room=r0&before=x-1"))
            assert status == 400, page
            assert not server.hub.chat.history_in_memory("r0"), "a page does not load the room"
