"""The room cache (docs/protocol.md §8, #18): idle rooms are evicted past
``--room-cache`` / ``--room-cache-bytes`` and their history is read from the
store again when they are joined; the store keeps at most ``--max-stored-bytes``.

The chat state's rules here, sans-I/O; tests/test_room_cache_e2e.py runs the
same against ``python -m triochat``.
"""

from __future__ import annotations

import json

from triochat.protocol import Message, decode_client_frame
from triochat.recent import cached_bytes

from .test_chat import GRACE, Chat


def fill_rooms(chat: Chat, rooms: list[str], says: int = 1) -> dict[str, list[str]]:
    """``alice`` says ``says`` messages in each room, then goes (her grace runs
    out): the rooms are left with nothing but their history, idle in that order.
    The ids said, by room."""
    alice = chat.connect()
    ids: dict[str, list[str]] = {}
    for room in rooms:
        alice.join(room, "alice")
        for i in range(says):
            alice.send(type_="say", room=room, msg=f"{room} {i}")
        chat.commit()
        ids[room] = [f["id"] for f in alice.take() if f["type"] == "message"]
    alice.disconnect()
    chat.advance(GRACE + 1)
    return ids


def test_idle_rooms_past_the_count_are_evicted_least_recently_used_first():
    chat = Chat(room_cache=2)
    fill_rooms(chat, ["r0", "r1", "r2", "r3", "r4"])
    assert sorted(chat.state.rooms) == ["r3", "r4"]
    stats = chat.state.room_cache
    assert (stats.idle, stats.evicted) == (2, 3)
    assert stats.bytes == sum(
        cached_bytes(m) for room in chat.state.rooms.values() for m in room.messages
    )


def test_a_room_joined_again_is_the_most_recently_used():
    chat = Chat(room_cache=2)
    fill_rooms(chat, ["r0", "r1"])
    bob = chat.connect()
    bob.join("r0", "bob")  # r0 is in memory: no read, and no longer idle
    bob.send(type_="leave", room="r0")
    chat.advance(GRACE + 1)  # r0 idle again, now the newest
    fill_rooms(chat, ["r2"])
    assert sorted(chat.state.rooms) == ["r0", "r2"]


def test_idle_rooms_past_the_bytes_are_evicted_but_never_a_room_in_use():
    probe = Message("big", "e1-1", "alice", "x" * 1000, 0)
    chat = Chat(room_cache=100, room_cache_bytes=3 * cached_bytes(probe))
    bob = chat.connect()
    bob.join("busy", "bob")
    fill_rooms(chat, ["busy", "a", "b", "c", "d"], says=1)
    alice = chat.connect()
    alice.join("big", "alice")
    for _ in range(5):
        alice.send(type_="say", room="big", msg="x" * 1000)
    chat.commit()
    # "big" (in use) alone is over the bound: every idle room went, "busy" stays.
    assert sorted(chat.state.rooms) == ["big", "busy"]
    assert chat.state.room_cache.idle == 0
    assert chat.state.room_cache.evicted == 4


def test_a_join_of_an_evicted_room_reads_its_history_and_merges_what_came_meanwhile():
    """`to_load` names the room; messages that arrive between `begin_load` and
    `end_load` are kept, merged with what the store read, in order, once each;
    messages the node has not seen yet are left for the backplane to bring."""
    chat = Chat(room_cache=1)
    ids = fill_rooms(chat, ["r0", "r1"], says=2)
    assert "r0" not in chat.state.rooms
    stored = [
        Message("r0", message_id, "alice", f"r0 {i}", 0) for i, message_id in enumerate(ids["r0"])
    ]
    bob = chat.connect()
    join = {"type": "join", "room": "r0", "name": "bob"}
    frame = decode_client_frame(json.dumps(join), max_msg_chars=2000)
    assert chat.state.to_load(bob.client, frame) == "r0"
    chat.state.begin_load("r0")
    # Meanwhile the server API posts to r0 (nobody here hears it, it is kept).
    late = Message("r0", f"e1-{chat.seq}", "api", "meanwhile", 0)
    chat.seq += 1
    chat.state.apply(late, chat.now)
    # The store was read before the late one was stored; it saw one that this
    # node has not seen yet, though (another node's, on its way here).
    unseen = Message("r0", f"e1-{chat.seq}", "api", "not yet here", 0)
    chat.state.end_load("r0", [*stored, unseen])
    assert chat.state.to_load(bob.client, frame) is None
    chat.state.handle(bob.client, frame, chat.now, chat.wall_ms)
    joined = bob.one()
    assert [m["msg"] for m in joined["history"]] == ["r0 0", "r0 1", "meanwhile"]
    assert chat.state.room_cache.loads == 1
    chat.state.apply(unseen, chat.now)  # it comes, and is kept and shown once
    assert bob.one()["msg"] == "not yet here"
    assert [m.msg for m in chat.state.rooms["r0"].messages][-1] == "not yet here"


def test_a_failed_read_forgets_the_room_and_nothing_is_marked_loaded():
    chat = Chat(room_cache=1)
    fill_rooms(chat, ["r0", "r1"])
    chat.state.begin_load("r0")
    chat.state.end_load("r0", None)
    assert "r0" not in chat.state.rooms
    assert not chat.state.history_in_memory("r0")


def test_with_every_room_in_memory_a_new_room_needs_no_read():
    """Until a room was evicted (and when the store's snapshot held every room),
    a room not in memory is known to be empty: its join is not parked."""
    chat = Chat(room_cache=10)
    fill_rooms(chat, ["r0"])
    assert chat.state.history_in_memory("new-room")
    assert chat.state.history_in_memory("r0")
    incomplete = Chat(history_complete=False)
    assert not incomplete.state.history_in_memory("new-room")


def test_messages_for_a_room_not_in_memory_are_not_kept_but_known():
    chat = Chat(room_cache=1)
    fill_rooms(chat, ["r0", "r1"])
    message = Message("r0", f"e1-{chat.seq}", "api", "to nobody here", 0)
    chat.seq += 1
    chat.state.apply(message, chat.now)
    assert "r0" not in chat.state.rooms
    chat.state.apply(message, chat.now)  # again (a gap fill overlapping): still nothing
    assert "r0" not in chat.state.rooms
