"""The chat protocol (docs/protocol.md §2-5, §11 close codes) over real sockets.

Written from docs/protocol.md alone. Absence is shown with a sentinel where the
protocol orders frames (a later frame arrives first), else with a short
`move_on_after` window.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from typing import Any

import pytest
import trio

from .chatclient import ChatClient
from .conftest import client_of, memory_server, running_server
from .test_http import open_handshake, read_ws_frame, ws_frame

SLOW_RATE = 0.001  # a bucket that does not refill during a test


async def assert_silent(client: ChatClient, seconds: float = 0.2) -> None:
    """Nothing arrives on ``client`` for ``seconds``."""
    with trio.move_on_after(seconds):
        frame = await client.recv()
        pytest.fail(f"unexpected frame {frame}")


async def say_and_see(client: ChatClient, msg: str, room: str = "lobby") -> dict[str, Any]:
    """Say ``msg`` and wait for its ack; the stored message."""
    ref = f"ref-{msg[:32]}"
    await client.say(msg, room=room, ref=ref)
    message = await client.expect("message", room=room, msg=msg)
    await client.expect("ack", ref=ref, id=message["id"])
    return message


async def expect_error(client: ChatClient, code: str, ref: str | None = None) -> dict[str, Any]:
    frame = await client.expect("error", code=code)
    assert isinstance(frame["message"], str), frame
    if ref is not None:
        assert frame.get("ref") == ref, frame
    return frame


# --- join, say, order ------------------------------------------------------------


async def test_protocol_join_answers_joined_fields(server):
    """`joined` carries room, trimmed name, token, sorted members, history, recovered, ref."""
    with trio.fail_after(10):
        async with client_of(server) as bob, client_of(server) as zed:
            joined = await bob.join("lobby", "  bob\t", ref="j1")
            assert joined["name"] == "bob"
            assert joined["members"] == ["bob"]
            assert joined["history"] == []
            assert joined["recovered"] is True
            assert joined["ref"] == "j1"
            assert isinstance(joined["token"], str)
            assert joined["token"]
            joined = await zed.join("lobby", "Zed")
            assert joined["members"] == ["Zed", "bob"]  # code point order
            await bob.expect("presence", room="lobby", event="join", name="Zed")


async def test_protocol_join_presence_goes_to_others_only(server):
    """A join is announced to the other members, not to the joiner."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", room="lobby", event="join", name="bob")
            await say_and_see(bob, "sentinel")  # no presence about itself first


async def test_protocol_rejoin_answers_joined_again(server):
    """Joining an already-joined room answers `joined` again, with no presence."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            joined = await bob.join("lobby", ref="again")
            assert joined["members"] == ["alice", "bob"]
            assert joined["ref"] == "again"
            message = await say_and_see(bob, "sentinel")
            await alice.expect("message", id=message["id"])  # no second presence


async def test_protocol_later_join_may_omit_name(server):
    """A later join without `name` joins under the bound name."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            joined = await alice.join("other")
            assert joined["name"] == "alice"
            joined = await alice.join("third", "alice")
            assert joined["name"] == "alice"


async def test_protocol_say_message_then_ack(server):
    """A say yields a `message` (room, id, name, msg, ts) to the sender, then the ack."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            before = time.time_ns() // 1_000_000
            await alice.say("hello", ref="c-17")
            message = await alice.expect("message", room="lobby", name="alice", msg="hello")
            after = time.time_ns() // 1_000_000
            await alice.expect("ack", ref="c-17", id=message["id"])
            assert isinstance(message["id"], str)
            assert isinstance(message["ts"], int)
            assert before - 1000 <= message["ts"] <= after + 1000
            assert await bob.recv() == message


async def test_protocol_say_without_ref_not_acked(server):
    """A say without `ref` gets its message and no ack."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.say("quiet")
            await alice.expect("message", msg="quiet")
            await say_and_see(alice, "sentinel")


async def test_protocol_message_not_sent_to_other_rooms(server):
    """A message goes to the room's members only."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await alice.join("other")
            await bob.join("other", "bob")
            await alice.expect("presence", room="other", event="join", name="bob")
            await say_and_see(alice, "in-lobby")
            message = await say_and_see(alice, "in-other", room="other")
            await bob.expect("message", id=message["id"])


async def test_protocol_same_order_for_all_members():
    """Interleaved says from three members reach all three in one identical order."""
    names = ["alice", "bob", "carol"]
    count = 15
    with trio.fail_after(10):
        async with (
            running_server(rate=0) as server,
            client_of(server) as a,
            client_of(server) as b,
            client_of(server) as c,
        ):
            clients = [a, b, c]
            for index, (client, name) in enumerate(zip(clients, names, strict=True)):
                await client.join("lobby", name)
                for earlier in clients[:index]:
                    await earlier.expect("presence", event="join", name=name)
            seen: dict[str, list[tuple[str, str, str]]] = {}

            async def talk(client: ChatClient, name: str) -> None:
                for i in range(count):
                    await client.say(f"{name}-{i}", ref=f"{name}-{i}")
                    await trio.lowlevel.checkpoint()

            async def listen(client: ChatClient, name: str) -> None:
                got: list[tuple[str, str, str]] = []
                acks: list[str] = []
                while len(got) < count * len(names) or len(acks) < count:
                    frame = await client.recv()
                    if frame["type"] == "ack":
                        acks.append(frame["ref"])
                        own = [m for m in got if m[1] == name]
                        assert own[-1][2] == frame["ref"]  # the ack comes after its message
                        assert own[-1][0] == frame["id"]
                    else:
                        assert frame["type"] == "message", frame
                        got.append((frame["id"], frame["name"], frame["msg"]))
                seen[name] = got
                assert acks == [f"{name}-{i}" for i in range(count)]

            async with trio.open_nursery() as nursery:
                for client, name in zip(clients, names, strict=True):
                    nursery.start_soon(listen, client, name)
                    nursery.start_soon(talk, client, name)
    assert seen["alice"] == seen["bob"] == seen["carol"]
    ids = [message_id for message_id, _, _ in seen["alice"]]
    assert len(set(ids)) == len(ids)
    for name in names:  # each sender's messages keep its own order
        mine = [msg for _, who, msg in seen["alice"] if who == name]
        assert mine == [f"{name}-{i}" for i in range(count)]


async def test_protocol_acked_message_in_later_history(server):
    """An acked message is in the history a later joiner gets."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            message = await say_and_see(alice, "kept")
            joined = await bob.join("lobby", "bob")
            assert joined["history"] == [message]


async def test_protocol_leave_answers_left_and_announces(server):
    """`leave` answers `left` (ref echoed), others see the leave at once; then not_joined."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            await bob.send({"type": "leave", "room": "lobby", "ref": "bye"})
            left = await bob.expect("left", room="lobby")
            assert left.get("ref") == "bye"
            await alice.expect("presence", room="lobby", event="leave", name="bob")
            await bob.say("ghost", ref="g")
            await expect_error(bob, "not_joined", "g")
            joined = await alice.join("lobby")
            assert joined["members"] == ["alice"]


# --- errors ----------------------------------------------------------------------


async def test_protocol_bad_json(server):
    """A text frame that is not JSON answers bad_json; the connection stays open."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.send('{"type": "join", ')
            await expect_error(alice, "bad_json")
            await alice.join("lobby", "alice")


@pytest.mark.parametrize(
    ("frame", "ref"),
    [
        ("[1, 2]", None),
        ('"join"', None),
        ("42", None),
        ("null", None),
        ({"type": "dance", "ref": "r1"}, "r1"),
        ({"room": "lobby", "ref": "r1"}, "r1"),
        ({"type": 7, "room": "lobby", "ref": "r1"}, "r1"),
        ({"type": "say", "room": "lobby", "msg": 5, "ref": "r1"}, "r1"),
        ({"type": "say", "room": "lobby", "ref": "r1"}, "r1"),
        ({"type": "say", "room": 3, "msg": "hi", "ref": "r1"}, "r1"),
        ({"type": "say", "room": "lobby", "msg": "", "ref": "r1"}, "r1"),
        ({"type": "say", "room": "lobby", "msg": "hi", "ref": ""}, None),
        ({"type": "say", "room": "lobby", "msg": "hi", "ref": "r" * 65}, None),
        ({"type": "say", "room": "lobby", "msg": "hi", "ref": 5}, None),
        ({"type": "join", "room": "lobby", "name": 5, "ref": "r1"}, "r1"),
        ({"type": "join", "room": "lobby", "since": 41, "ref": "r1"}, "r1"),
        ({"type": "whisper", "to": "alice", "ref": "r1"}, "r1"),
        ({"type": "whisper", "to": "alice", "msg": "", "ref": "r1"}, "r1"),
        ({"type": "history", "room": "lobby", "limit": 0, "ref": "r1"}, "r1"),
        ({"type": "history", "room": "lobby", "limit": 201, "ref": "r1"}, "r1"),
        ({"type": "history", "room": "lobby", "limit": "5", "ref": "r1"}, "r1"),
        ({"type": "history", "room": "lobby", "before": "no-such-id", "ref": "r1"}, "r1"),
    ],
)
async def test_protocol_bad_frame(server, frame, ref):
    """A JSON frame that is not a valid frame answers bad_frame (ref echoed); stays open."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send(frame)
            await expect_error(alice, "bad_frame", ref)
            await say_and_see(alice, "still-open")


async def test_protocol_too_long():
    """A msg over max_msg_chars answers too_long with the ref; at the limit it passes."""
    with trio.fail_after(10):
        async with running_server(max_msg_chars=2000) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.say("x" * 2001, ref="long")
            await expect_error(alice, "too_long", "long")
            await alice.send({"type": "whisper", "to": "alice", "msg": "y" * 2001, "ref": "w"})
            await expect_error(alice, "too_long", "w")
            await say_and_see(alice, "\U0001f600" * 2000)  # code points, not UTF-16 units


@pytest.mark.parametrize(
    "name",
    [None, "", "   ", "\t\n", "x" * 33, "a\x07b", "a\u200bb", "a\u2028b", "a\u2029b", "\u202e"],
)
async def test_protocol_bad_name(server, name):
    """A missing (first join) or invalid name answers bad_name with the ref."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            frame: dict[str, Any] = {"type": "join", "room": "lobby", "ref": "n1"}
            if name is not None:
                frame["name"] = name
            await alice.send(frame)
            await expect_error(alice, "bad_name", "n1")
            await alice.join("lobby", "alice")


async def test_protocol_name_limits_in_code_points(server):
    """A name is 1-32 code points after trimming, non-BMP characters included."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            joined = await alice.join("lobby", " " + "\U0001f600" * 32 + "\u3000")
            assert joined["name"] == "\U0001f600" * 32
            joined = await bob.join("lobby", "b" * 32)
            assert joined["name"] == "b" * 32


async def test_protocol_bad_name_on_different_later_name(server):
    """A later join with a different name answers bad_name."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send({"type": "join", "room": "other", "name": "mallory", "ref": "n2"})
            await expect_error(alice, "bad_name", "n2")
            joined = await alice.join("other", " alice ")  # the same name, trimmed
            assert joined["name"] == "alice"


@pytest.mark.parametrize(
    "room", ["", "Lobby", "-lobby", "_lobby", "lob by", "lobby!", "a" * 65, "caf\u00e9"]
)
async def test_protocol_bad_room(server, room):
    """An invalid room answers bad_room with the ref."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.send({"type": "join", "room": room, "name": "alice", "ref": "b1"})
            await expect_error(alice, "bad_room", "b1")
            await alice.join("a" * 64, "alice")
            await alice.say("hi", room=room, ref="b2")
            await expect_error(alice, "bad_room", "b2")


async def test_protocol_bad_room_over_max_rooms():
    """Joining one room more than max_rooms answers bad_room; leaving frees a slot."""
    with trio.fail_after(10):
        async with running_server(max_rooms=2) as server, client_of(server) as alice:
            await alice.join("one", "alice")
            await alice.join("two")
            await alice.send({"type": "join", "room": "three", "ref": "r3"})
            await expect_error(alice, "bad_room", "r3")
            await alice.join("two")  # re-joining a joined room is no extra room
            await alice.send({"type": "leave", "room": "one"})
            await alice.expect("left", room="one")
            await alice.join("three")


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "say", "room": "other", "msg": "hi", "ref": "x"},
        {"type": "typing", "room": "other", "ref": "x"},
        {"type": "leave", "room": "other", "ref": "x"},
        {"type": "history", "room": "other", "ref": "x"},
    ],
)
async def test_protocol_not_joined(server, frame):
    """Room frames for a room the connection has not joined answer not_joined."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send(frame)
            await expect_error(alice, "not_joined", "x")


async def test_protocol_not_joined_whisper_without_name(server):
    """A whisper before the connection has a name answers not_joined."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await bob.join("lobby", "bob")
            await alice.send({"type": "whisper", "to": "bob", "msg": "psst", "ref": "w"})
            await expect_error(alice, "not_joined", "w")


async def test_protocol_name_taken(server):
    """A name held by another live connection answers name_taken, also with a wrong token."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as mallory:
            await alice.join("lobby", "alice")
            await mallory.send({"type": "join", "room": "lobby", "name": "alice", "ref": "t"})
            await expect_error(mallory, "name_taken", "t")
            await mallory.send(
                {"type": "join", "room": "other", "name": " alice", "token": "forged", "ref": "u"}
            )
            await expect_error(mallory, "name_taken", "u")
            await mallory.join("other", "mallory")
            await say_and_see(alice, "still-mine")


async def test_protocol_look_alike_names_are_name_taken(server):
    """Over a real WebSocket: look-alikes of a present name (NFKC, case folding, TR39
    skeletons) answer name_taken, reserved and invisible names bad_name; a whisper `to`
    another form of the name reaches its holder, named as bound (#18)."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as mallory:
            joined = await alice.join("lobby", "Alice")
            assert joined["name"] == "Alice"
            spoofs = ["alice", "\u0430lice", "ALICE", "\uff21lice", "AIice", " alice\u00a0"]
            for i, name in enumerate(spoofs):
                await mallory.send({"type": "join", "room": "lobby", "name": name, "ref": f"t{i}"})
                await expect_error(mallory, "name_taken", f"t{i}")
            for i, name in enumerate(["server", "\u0405ystem", "Al\u200bice", "\u3164", "\ue000"]):
                await mallory.send({"type": "join", "room": "lobby", "name": name, "ref": f"b{i}"})
                await expect_error(mallory, "bad_name", f"b{i}")
            joined = await mallory.join("lobby", "M\u00e4llory")
            assert joined["name"] == "M\u00e4llory"
            assert joined["members"] == ["Alice", "M\u00e4llory"]
            await alice.expect("presence", event="join", name="M\u00e4llory")
            await mallory.send({"type": "whisper", "to": "ALICE", "msg": "psst", "ref": "w"})
            whisper = await alice.expect("whisper", msg="psst")
            assert (whisper["from"], whisper["to"]) == ("M\u00e4llory", "Alice")


async def test_protocol_no_such_user(server):
    """A whisper to a name nobody holds answers no_such_user with the ref."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send({"type": "whisper", "to": "nobody", "msg": "psst", "ref": "w"})
            await expect_error(alice, "no_such_user", "w")


async def test_protocol_rate_limited():
    """With rate=1, burst=1 a second say at once is dropped with rate_limited."""
    with trio.fail_after(10):
        async with running_server(rate=1, burst=1) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "first")
            await alice.say("second", ref="r2")
            await expect_error(alice, "rate_limited", "r2")


async def test_protocol_rate_bucket_starts_full_and_drops():
    """The bucket starts full (burst passes at once); a dropped say is never delivered."""
    with trio.fail_after(10):
        async with (
            running_server(rate=SLOW_RATE, burst=3) as server,
            client_of(server) as alice,
            client_of(server) as bob,
        ):
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            sent = [await say_and_see(alice, f"m{i}") for i in range(3)]
            await alice.say("dropped", ref="d")
            await expect_error(alice, "rate_limited", "d")
            await bob.send({"type": "history", "room": "lobby"})
            assert [await bob.expect("message") for _ in sent] == sent
            history = await bob.expect("history")
            assert history["messages"] == sent


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "typing", "room": "lobby", "ref": "x"},
        {"type": "whisper", "to": "alice", "msg": "psst", "ref": "x"},
    ],
)
async def test_protocol_rate_limit_shared_by_typing_and_whisper(frame):
    """say, typing and whisper draw from one bucket."""
    with trio.fail_after(10):
        async with running_server(rate=SLOW_RATE, burst=1) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "first")
            await alice.send(frame)
            await expect_error(alice, "rate_limited", "x")


async def test_protocol_rate_limit_spares_join_leave_history():
    """join, leave and history are not rate limited."""
    with trio.fail_after(10):
        async with running_server(rate=SLOW_RATE, burst=1) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "first")
            await alice.join("other")
            await alice.send({"type": "history", "room": "lobby", "ref": "h"})
            await alice.expect("history", room="lobby")
            await alice.send({"type": "leave", "room": "other"})
            await alice.expect("left", room="other")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # bad_frame before too_long
        ({"type": "say", "room": "lobby", "msg": "x" * 2001, "ref": ""}, "bad_frame"),
        # too_long before bad_room
        ({"type": "say", "room": "BAD", "msg": "x" * 2001, "ref": "x"}, "too_long"),
        # too_long before not_joined
        ({"type": "say", "room": "other", "msg": "x" * 2001, "ref": "x"}, "too_long"),
        # bad_name before bad_room
        ({"type": "join", "room": "BAD", "name": "", "ref": "x"}, "bad_name"),
        ({"type": "join", "room": "BAD", "name": "mallory", "ref": "x"}, "bad_name"),
        # bad_room before rate_limited
        ({"type": "say", "room": "BAD", "msg": "hi", "ref": "x"}, "bad_room"),
        # rate_limited before not_joined
        ({"type": "say", "room": "other", "msg": "hi", "ref": "x"}, "rate_limited"),
        ({"type": "typing", "room": "other", "ref": "x"}, "rate_limited"),
        # rate_limited before no_such_user
        ({"type": "whisper", "to": "nobody", "msg": "hi", "ref": "x"}, "rate_limited"),
        # bad_room on a later join (no name needed)
        ({"type": "join", "room": "lobby!", "ref": "x"}, "bad_room"),
    ],
)
async def test_protocol_check_order(frame, code):
    """The first failing check in §2's order answers (bucket empty, joined lobby as alice)."""
    with trio.fail_after(10):
        async with running_server(rate=SLOW_RATE, burst=1) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "drain-the-bucket")
            await alice.send(frame)
            await expect_error(alice, code, frame["ref"] or None)


async def test_protocol_check_order_name_before_state():
    """On a first join, bad_name beats name_taken and bad_room beats name_taken."""
    with trio.fail_after(10):
        async with (
            running_server() as server,
            client_of(server) as alice,
            client_of(server) as other,
        ):
            await other.join("lobby", "alice")
            await alice.send({"type": "join", "room": "BAD", "name": "", "ref": "x"})
            await expect_error(alice, "bad_name", "x")
            await alice.send({"type": "join", "room": "BAD", "name": "alice", "ref": "y"})
            await expect_error(alice, "bad_room", "y")
            await alice.send({"type": "join", "room": "lobby", "name": "alice", "ref": "z"})
            await expect_error(alice, "name_taken", "z")


# --- close codes -------------------------------------------------------------------


async def test_protocol_binary_frame_closes_1003(server):
    """A binary frame closes the connection with 1003."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.ws.send_message(b'{"type": "say", "room": "lobby", "msg": "hi"}')
            code, _ = await alice.closed()
    assert code == 1003


@pytest.mark.parametrize("text", ["x" * 2000, "\u20ac" * 400], ids=["ascii", "utf8-3-byte"])
async def test_protocol_frame_over_max_frame_bytes_closes_1009(text):
    """A frame over max_frame_bytes (counted in UTF-8 bytes) closes with 1009."""
    with trio.fail_after(10):
        async with running_server(max_frame_bytes=1000) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "x" * 900)  # a frame under the limit passes
            await alice.send(text)
            code, _ = await alice.closed()
    assert code == 1009


async def test_protocol_hundred_drops_close_1008():
    """99 rate-limited drops leave the connection open; the 100th closes it with 1008."""
    with trio.fail_after(10):
        async with running_server(rate=SLOW_RATE, burst=1) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            await say_and_see(alice, "first")
            for i in range(99):
                await alice.say("flood", ref=f"f{i}")
            for i in range(99):
                await expect_error(alice, "rate_limited", f"f{i}")
            await alice.join("lobby")  # still open
            await alice.say("flood", ref="f99")
            code, _ = await alice.closed()
    assert code == 1008


async def test_protocol_fragments_reassembled_and_limited():
    """Fragments are reassembled; their total over max_frame_bytes closes with 1009."""
    join = json.dumps({"type": "join", "room": "lobby", "name": "alice"}).encode()
    with trio.fail_after(10):
        async with (
            running_server(max_frame_bytes=1000) as server,
            open_handshake(server) as (response, conn),
        ):
            assert response.status == 101
            await conn.send(ws_frame(join[:10], fin=False) + ws_frame(join[10:], opcode=0))
            _, payload = await read_ws_frame(conn)
            assert json.loads(payload)["type"] == "joined"
            chunk = b"x" * 400
            await conn.send(
                ws_frame(chunk, fin=False)
                + ws_frame(chunk, opcode=0, fin=False)
                + ws_frame(chunk, opcode=0)
            )
            first, payload = await read_ws_frame(conn)
    assert first & 0x0F == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1009


async def test_protocol_no_pong_closes_and_leaves():
    """A peer that never answers pings is closed and its member leaves."""
    join = json.dumps({"type": "join", "room": "lobby", "name": "mute"}).encode()
    with trio.fail_after(10):
        async with (
            running_server(ping_interval=0.2, ping_timeout=0.2, presence_grace=0) as server,
            client_of(server) as bob,
        ):
            await bob.join("lobby", "bob")
            async with open_handshake(server) as (response, mute):
                assert response.status == 101
                await mute.send(ws_frame(join))
                await bob.expect("presence", event="join", name="mute")
                await mute.eof()  # pings go unanswered until the server gives up
            await bob.expect("presence", event="leave", name="mute")


async def test_protocol_pongs_keep_connection_open():
    """A client that answers pings stays connected across many ping intervals."""
    with trio.fail_after(10):
        async with (
            running_server(ping_interval=0.05, ping_timeout=0.2) as server,
            client_of(server) as alice,
        ):
            await alice.join("lobby", "alice")
            await assert_silent(alice, 0.6)
            await say_and_see(alice, "still-here")


async def test_protocol_client_mistakes_logged_below_warning(caplog):
    """Client mistakes are answered, and the server logs nothing above INFO for them."""
    with trio.fail_after(10):
        async with running_server(
            rate=SLOW_RATE, burst=1, max_frame_bytes=1000, max_msg_chars=10
        ) as server:
            async with client_of(server) as alice, client_of(server) as mallory:
                await alice.join("lobby", "alice")
                await say_and_see(alice, "first")
                mistakes = [
                    ("nope", "bad_json"),
                    ('{"type": "dance"}', "bad_frame"),
                    ({"type": "say", "room": "lobby", "msg": "x" * 11}, "too_long"),
                    ({"type": "join", "room": "lobby", "name": "mallory"}, "bad_name"),
                    ({"type": "join", "room": "BAD"}, "bad_room"),
                    ({"type": "say", "room": "lobby", "msg": "hi"}, "rate_limited"),
                    ({"type": "history", "room": "other"}, "not_joined"),
                    ({"type": "history", "room": "lobby", "before": "x"}, "bad_frame"),
                ]
                for frame, code in mistakes:
                    await alice.send(frame)
                    await expect_error(alice, code)
                await mallory.send({"type": "join", "room": "lobby", "name": "alice"})
                await expect_error(mallory, "name_taken")
                await mallory.send({"type": "join", "room": "other", "name": "mallory"})
                await mallory.expect("joined")
                await mallory.send({"type": "whisper", "to": "nobody", "msg": "hi"})
                await expect_error(mallory, "no_such_user")
            async with client_of(server) as binary:
                await binary.ws.send_message(b"\x00")
                assert (await binary.closed())[0] == 1003
            async with client_of(server) as big:
                await big.send("x" * 2000)
                assert (await big.closed())[0] == 1009
    loud = [
        r for r in caplog.records if r.name.startswith("triochat") and r.levelno > logging.INFO
    ]
    assert loud == []


# --- typing, whisper, history ---------------------------------------------------


async def test_protocol_typing_relayed_to_others(server):
    """`typing` reaches the other members as {room, name}, not the sender."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            await alice.send({"type": "typing", "room": "lobby"})
            frame = await bob.expect("typing", room="lobby", name="alice")
            assert set(frame) == {"type", "room", "name"}
            await say_and_see(alice, "sentinel")  # no typing echo came first


async def test_protocol_typing_not_stored(server):
    """`typing` never shows up in history."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send({"type": "typing", "room": "lobby"})
            await alice.send({"type": "history", "room": "lobby"})
            history = await alice.expect("history", room="lobby")
            assert history["messages"] == []


async def test_protocol_whisper_to_other_connection(server):
    """A whisper reaches the recipient and the sender's copy, then the ack; not stored."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            await bob.join("elsewhere", "bob")
            await alice.send({"type": "whisper", "to": "bob", "msg": "psst", "ref": "w1"})
            got = await bob.expect("whisper", to="bob", msg="psst")
            assert got["from"] == got["name"] == "alice"
            assert isinstance(got["id"], str)
            assert isinstance(got["ts"], int)
            copy = await alice.expect("whisper")
            assert copy == got
            await alice.expect("ack", ref="w1", id=got["id"])
            await alice.send({"type": "history", "room": "lobby"})
            assert (await alice.expect("history"))["messages"] == []


async def test_protocol_whisper_to_self_once(server):
    """A whisper to oneself arrives once, then the ack."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.send({"type": "whisper", "to": "alice", "msg": "note", "ref": "w"})
            got = await alice.expect("whisper", to="alice", msg="note")
            await alice.expect("ack", ref="w", id=got["id"])


async def test_protocol_history_paging(server):
    """history pages back with before/limit, oldest first, `more` set while older exist."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            sent = [await say_and_see(alice, f"m{i}") for i in range(5)]
            await alice.send({"type": "history", "room": "lobby", "limit": 2, "ref": "h1"})
            page = await alice.expect("history", room="lobby", more=True)
            assert page["messages"] == sent[3:]
            assert page.get("ref") == "h1"
            before = page["messages"][0]["id"]
            await alice.send({"type": "history", "room": "lobby", "before": before, "limit": 2})
            page = await alice.expect("history", room="lobby", more=True)
            assert page["messages"] == sent[1:3]
            before = page["messages"][0]["id"]
            await alice.send({"type": "history", "room": "lobby", "before": before, "limit": 2})
            page = await alice.expect("history", room="lobby", more=False)
            assert page["messages"] == sent[:1]
            await alice.send({"type": "history", "room": "lobby"})
            page = await alice.expect("history", room="lobby", more=False)
            assert page["messages"] == sent
            await alice.send({"type": "history", "room": "lobby", "before": sent[0]["id"]})
            page = await alice.expect("history", room="lobby", more=False)
            assert page["messages"] == []


async def test_protocol_history_default_limit_50():
    """history without `limit` returns the newest 50, with `more`."""
    with trio.fail_after(10):
        async with running_server(rate=0) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            sent = [await say_and_see(alice, f"m{i}") for i in range(55)]
            await alice.send({"type": "history", "room": "lobby"})
            page = await alice.expect("history", room="lobby", more=True)
            assert page["messages"] == sent[5:]


async def test_protocol_joined_history_newest_100():
    """`joined.history` without since holds the newest 100 messages, recovered true."""
    with trio.fail_after(10):
        async with running_server(rate=0) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            sent = [await say_and_see(alice, f"m{i}") for i in range(105)]
            async with client_of(server) as bob:
                joined = await bob.join("lobby", "bob")
    assert joined["history"] == sent[5:]
    assert joined["recovered"] is True


# --- recovery, takeover, presence grace --------------------------------------------


async def test_protocol_since_recovers_missed_messages(server):
    """Reconnecting with token and since replays exactly the missed messages in order."""
    with trio.fail_after(10):
        async with client_of(server) as bob:
            await bob.join("lobby", "bob")
            async with client_of(server) as alice:
                joined = await alice.join("lobby", "alice")
                await bob.expect("presence", event="join", name="alice")
                seen = await say_and_see(bob, "seen")
                await alice.expect("message", id=seen["id"])
            missed = [await say_and_see(bob, f"missed-{i}") for i in range(3)]
            async with client_of(server) as alice:
                again = await alice.join("lobby", "alice", token=joined["token"], since=seen["id"])
                assert again["recovered"] is True
                assert again["history"] == missed
                assert again["token"] == joined["token"]
                rejoined = await alice.join("lobby", since=missed[-1]["id"])
                assert rejoined["history"] == []
                assert rejoined["recovered"] is True


async def test_protocol_unknown_since_not_recovered(server):
    """A since the room cannot place answers recovered false, with the newest messages."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            await alice.join("lobby", "alice")
            sent = [await say_and_see(alice, f"m{i}") for i in range(3)]
            joined = await bob.join("lobby", "bob", since="no-such-id")
            assert joined["recovered"] is False
            assert joined["history"] == sent
            await alice.expect("presence", event="join", name="bob")
            await alice.join("other")
            joined = await bob.join("other", since=sent[0]["id"])  # another room's id
            assert joined["recovered"] is False
            assert joined["history"] == []


async def test_protocol_since_trimmed_not_recovered():
    """A since whose successors were trimmed from history answers recovered false."""
    with trio.fail_after(10):
        async with (
            running_server(history_size=3, rate=0) as server,
            client_of(server) as alice,
            client_of(server) as bob,
        ):
            await alice.join("lobby", "alice")
            sent = [await say_and_see(alice, f"m{i}") for i in range(6)]
            joined = await bob.join("lobby", "bob", since=sent[1]["id"])
            assert joined["recovered"] is False
            assert joined["history"] == sent[-3:]
            joined = await bob.join("lobby", since=sent[3]["id"])
            assert joined["recovered"] is True
            assert joined["history"] == sent[4:]


async def test_protocol_since_more_than_200_missed_not_recovered():
    """More than 200 missed messages: recovered false and the newest 100."""
    with trio.fail_after(10):
        async with running_server(rate=0) as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            first = await say_and_see(alice, "start")
            sent = [await say_and_see(alice, f"m{i}") for i in range(201)]
            async with client_of(server) as bob:
                joined = await bob.join("lobby", "bob", since=first["id"])
                assert joined["recovered"] is False
                assert joined["history"] == sent[-100:]
                joined = await bob.join("lobby", since=sent[0]["id"])  # exactly 200
                assert joined["recovered"] is True
                assert joined["history"] == sent[1:]


async def test_protocol_token_takeover_closes_old_4001(server):
    """A join with the resume token replaces the old connection (4001); no presence change."""
    with trio.fail_after(10):
        async with client_of(server) as bob, client_of(server) as old:
            joined = await old.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await old.expect("presence", event="join", name="bob")
            async with client_of(server) as new:
                again = await new.join("lobby", "alice", token=joined["token"])
                assert again["members"] == ["alice", "bob"]
                assert again["token"] == joined["token"]
                code, _ = await old.closed()
                assert code == 4001
                message = await say_and_see(new, "back")
                await bob.expect("message", id=message["id"])  # no leave/join before it


async def test_protocol_grace_delays_leave_after_drop():
    """A dropped member's leave is announced only when the grace period ends."""
    grace = 0.5
    with trio.fail_after(10):
        async with running_server(presence_grace=grace) as server, client_of(server) as bob:
            await bob.join("lobby", "bob")
            async with client_of(server) as alice:
                await alice.join("lobby", "alice")
                await bob.expect("presence", event="join", name="alice")
                start = trio.current_time()
            await assert_silent(bob, 0.2)
            await bob.expect("presence", room="lobby", event="leave", name="alice")
            assert trio.current_time() - start >= grace * 0.9


async def test_protocol_grace_quick_reconnect_no_flicker():
    """A reconnect with the token inside the grace period shows no leave or join."""
    grace = 0.5
    with trio.fail_after(10):
        async with running_server(presence_grace=grace) as server, client_of(server) as bob:
            await bob.join("lobby", "bob")
            async with client_of(server) as alice:
                joined = await alice.join("lobby", "alice")
                await bob.expect("presence", event="join", name="alice")
            async with client_of(server) as alice:
                again = await alice.join("lobby", "alice", token=joined["token"])
                assert again["members"] == ["alice", "bob"]
                await assert_silent(bob, grace + 0.3)  # past the grace period
                message = await say_and_see(alice, "back")
                await bob.expect("message", id=message["id"])


async def test_protocol_grace_holds_name():
    """During the grace period the name is held (name_taken); after it, free again."""
    grace = 0.5
    with trio.fail_after(10):
        async with running_server(presence_grace=grace) as server, client_of(server) as bob:
            await bob.join("lobby", "bob")
            async with client_of(server) as alice:
                await alice.join("lobby", "alice")
                await bob.expect("presence", event="join", name="alice")
            async with client_of(server) as mallory:
                await mallory.send({"type": "join", "room": "lobby", "name": "alice", "ref": "m"})
                await expect_error(mallory, "name_taken", "m")
                await bob.expect("presence", event="leave", name="alice")
                joined = await mallory.join("lobby", "alice")
                assert joined["members"] == ["alice", "bob"]


async def test_protocol_whisper_to_user_in_grace_no_such_user():
    """A whisper to a user held only by the grace period answers no_such_user."""
    with trio.fail_after(10):
        async with running_server(presence_grace=5) as server, client_of(server) as bob:
            await bob.join("lobby", "bob")
            async with client_of(server) as alice:
                await alice.join("lobby", "alice")
                await bob.expect("presence", event="join", name="alice")
            await bob.send({"type": "whisper", "to": "alice", "msg": "psst", "ref": "w"})
            await expect_error(bob, "no_such_user", "w")


# --- classic frames and the / endpoint ------------------------------------------


async def test_protocol_root_listener_hears_lobby(server):
    """A connection on / hears lobby messages before sending anything; it is no member."""
    with trio.fail_after(10):
        async with client_of(server, "/") as listener, client_of(server) as alice:
            joined = await alice.join("lobby", "alice")
            assert joined["members"] == ["alice"]
            message = await say_and_see(alice, "hello")
            assert await listener.recv() == message  # no presence before it
            await alice.send({"type": "typing", "room": "lobby"})
            message = await say_and_see(alice, "again")
            assert await listener.recv() == message  # no typing before it


async def test_protocol_ws_endpoint_starts_with_nothing(server):
    """A connection on /ws hears nothing before it joins."""
    with trio.fail_after(10):
        async with client_of(server) as silent, client_of(server) as alice:
            await alice.join("lobby", "alice")
            message = await say_and_see(alice, "hello")
            await silent.send({"type": "join", "room": "lobby", "name": "sid"})
            joined = await silent.expect("joined")  # the first frame it gets
            assert joined["history"] == [message]


async def test_protocol_typed_frame_stops_listening(server):
    """A / connection whose first frame is typed stops hearing lobby."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            await alice.join("other")
            async with client_of(server, "/") as lou:
                await lou.join("other", "lou")
                await alice.expect("presence", room="other", event="join", name="lou")
                await say_and_see(alice, "in-lobby")
                message = await say_and_see(alice, "in-other", room="other")
                assert await lou.recv() == message


@pytest.mark.parametrize("path", ["/", "/ws"])
async def test_protocol_classic_frame_joins_lobby_and_says(server, path):
    """A classic {name, msg} frame joins lobby and says; only name+msg frames come back."""
    with trio.fail_after(10):
        async with client_of(server) as bob, client_of(server, path) as carol:
            await bob.join("lobby", "bob")
            await carol.send({"name": "carol", "msg": "hi all"})
            await bob.expect("presence", room="lobby", event="join", name="carol")
            own = await bob.expect("message", name="carol", msg="hi all")
            assert await carol.recv() == own  # no joined, no history, no ack
            joined = await bob.join("lobby")
            assert joined["members"] == ["bob", "carol"]
            await carol.send({"name": "carol", "msg": "second", "ref": "c2"})
            second = await bob.expect("message", name="carol", msg="second")
            assert await carol.recv() == second  # no ack
            await bob.send({"type": "typing", "room": "lobby"})
            message = await say_and_see(bob, "from-bob")
            assert await carol.recv() == message  # no typing before it
            await bob.send({"type": "whisper", "to": "carol", "msg": "psst"})
            whisper = await carol.expect("whisper", name="bob", msg="psst")
            assert whisper["from"] == "bob"


async def test_protocol_classic_gets_errors_with_name_and_msg(server):
    """A classic connection's errors carry name "server" and msg; another name is bad_name."""
    with trio.fail_after(10):
        async with client_of(server, "/") as carol:
            await carol.send({"name": "carol", "msg": "hi"})
            await carol.expect("message", name="carol", msg="hi")
            await carol.send({"name": "dave", "msg": "spoof"})
            error = await carol.expect("error", code="bad_name", name="server")
            assert isinstance(error["msg"], str)
            assert error["msg"]
            await carol.send({"name": "carol", "msg": "x" * 2001})
            error = await carol.expect("error", code="too_long", name="server")
            assert error["msg"]
            await carol.send("not json")
            error = await carol.expect("error", code="bad_json", name="server")
            assert error["msg"]


async def test_protocol_classic_receives_only_name_msg_frames(server):
    """Every frame a classic connection gets has both `name` and `msg`."""
    with trio.fail_after(10):
        async with client_of(server, "/") as carol, client_of(server) as bob:
            await carol.send({"name": "carol", "msg": "hi"})
            await carol.expect("message", name="carol", msg="hi")
            await bob.join("lobby", "bob")
            await bob.send({"type": "typing", "room": "lobby"})
            await bob.send({"type": "leave", "room": "lobby"})
            await bob.expect("left")
            await bob.join("lobby")
            message = await say_and_see(bob, "done")
            assert await carol.recv() == message  # no presence, typing or history first


# --- drain --------------------------------------------------------------------------


async def test_protocol_drain_closes_1001_after_queued_frames():
    """drain() flushes what is queued for each client, then closes it with 1001."""
    with trio.fail_after(10):
        async with (
            running_server(rate=0) as server,
            client_of(server) as alice,
            client_of(server) as bob,
        ):
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.expect("presence", event="join", name="bob")
            # bob reads nothing while these are delivered to him.
            sent = [await say_and_see(alice, f"m{i}") for i in range(20)]
            server.drain()
            got = [await bob.expect("message") for _ in sent]
            assert got == sent
            code_bob, _ = await bob.closed()
            code_alice, _ = await alice.closed()
    assert code_bob == code_alice == 1001


async def test_protocol_drain_close_code_1001(server):
    """A connection open when draining starts is closed with code 1001."""
    with trio.fail_after(10):
        async with client_of(server) as alice:
            await alice.join("lobby", "alice")
            server.drain()
            code, _ = await alice.closed()
    assert code == 1001


async def test_e2e_overlong_ids_are_unknown_ids_not_bugs(caplog):
    """A `since` or `before` of the server's epoch and thousands of digits (over Python's
    4300-digit int() limit) is an unknown id: no `internal`, no 1011, nothing above INFO
    in the log, and nobody sees a join for a client that was refused (#18)."""
    caplog.set_level(logging.INFO, logger="triochat")
    with trio.fail_after(10):
        async with running_server() as server, client_of(server) as alice:
            await alice.join("lobby", "alice")
            first = await say_and_see(alice, "first")
            overlong = first["id"].rpartition("-")[0] + "-" + "9" * 5000
            async with client_of(server) as bob:
                joined = await bob.join("lobby", "bob", since=overlong)
                assert joined["recovered"] is False
                await alice.expect("presence", event="join", name="bob")
                await bob.send({"type": "history", "room": "lobby", "before": overlong})
                error = await bob.expect("error")
                assert error["code"] == "bad_frame"
                await bob.send({"type": "join", "room": "second", "since": overlong})
                again = await bob.expect("joined", room="second")
                assert again["recovered"] is False
                await say_and_see(bob, "still here")
    assert not [r for r in caplog.records if r.levelno > logging.INFO]


async def test_e2e_join_leave_churn_is_rate_limited_and_members_see_little(autojump_clock, caplog):
    """One connection looping leave/join in a room (#18): after the membership burst it
    gets `rate_limited`, so a member sees at most the burst plus 2 changes a second of
    presence frames, not thousands; an empty say bucket never stops a join. In virtual
    time: the loop takes no time, so the refill adds nothing however busy the machine."""
    with trio.fail_after(20):
        async with memory_server(rate=SLOW_RATE, burst=1) as net:
            async with net.client() as member, net.client() as churner:
                await member.join("lobby", "member")
                await churner.join("lobby", "churner")
                await churner.say("uses the only say token")
                await churner.send({"type": "say", "room": "lobby", "msg": "x", "ref": "s"})
                for i in range(100):
                    ref = f"c{i}"
                    kind = "leave" if i % 2 == 0 else "join"
                    await churner.send({"type": kind, "room": "lobby", "ref": ref})
                # The says' bucket is empty, and still the first joins went through.
                answers = []
                while len(answers) < 101:
                    frame = await churner.recv()
                    if frame["type"] in ("left", "joined", "error"):
                        answers.append(frame)
                refused = [f for f in answers[1:] if f["type"] == "error"]
                assert (answers[0]["type"], answers[0]["code"]) == ("error", "rate_limited")
                assert answers[0]["ref"] == "s"
                changes = [f for f in answers[1:] if f["type"] in ("left", "joined")]
                # The burst of 32 less the first join (no time passes: no refill).
                assert len(changes) == 31
                assert len(refused) == 100 - len(changes)
                # (a leave after a refused join is `not_joined`)
                assert {f["code"] for f in refused} == {"rate_limited", "not_joined"}
                seen = []
                with trio.move_on_after(0.5):
                    while True:
                        frame = await member.recv()
                        if frame["type"] == "presence":
                            seen.append(frame)
                assert len(seen) <= len(changes) + 1  # and the churner's first join
    assert not [r for r in caplog.records if r.levelno > logging.INFO]


async def test_e2e_flood_of_refused_frames_is_closed_1008():
    """A client that sends nothing but invalid JSON is answered `bad_json` 99 times, then
    the 100th refusal within 60 s closes it with 1008 (#18), even with --rate 0."""
    with trio.fail_after(20):
        async with running_server(rate=0) as server, client_of(server) as flooder:
            for _ in range(150):
                try:
                    await flooder.send("{not json")
                except Exception:
                    break
            errors = 0
            code = None
            try:
                while True:
                    frame = await flooder.recv()
                    assert frame["type"] == "error"
                    errors += 1
            except Exception:
                code = flooder.ws.closed.code if flooder.ws.closed else None
            assert errors == 100
            assert code == 1008
            async with client_of(server) as fresh:
                await fresh.join("lobby", "fresh")
                await say_and_see(fresh, "still served")


async def test_e2e_a_crowd_whispering_one_user_is_bounded(autojump_clock):
    """30 connections, each within its own rate limit, whisper one user at once (#18):
    the user receives 20 (the burst of its own bound), the rest get `rate_limited`, and
    the user is never closed as a slow consumer. In virtual time: the burst takes no
    time, so the 10/s refill adds nothing however busy the machine is."""
    with trio.fail_after(20):
        async with memory_server() as net, net.client() as bob:
            server = net.server
            await bob.join("lobby", "bob")
            async with contextlib.AsyncExitStack() as stack:
                crowd = [await stack.enter_async_context(net.client()) for _ in range(30)]
                for i, sender in enumerate(crowd):
                    await sender.join(f"room{i}", f"s{i}")
                for sender in crowd:
                    await sender.send({"type": "whisper", "to": "bob", "msg": "hi", "ref": "w"})
                answers = []
                for sender in crowd:
                    while (frame := await sender.recv())["type"] not in ("ack", "error"):
                        pass
                    answers.append(frame)
            assert sorted(a["type"] for a in answers) == ["ack"] * 20 + ["error"] * 10
            assert {a["code"] for a in answers if a["type"] == "error"} == {"rate_limited"}
            got = 0
            with trio.move_on_after(0.3):
                while True:
                    if (await bob.recv())["type"] == "whisper":
                        got += 1
            assert got == 20
            assert server.stats.slow_consumers == 0


async def test_protocol_joined_tells_the_servers_limits():
    """`joined.limits` (an extension, docs/protocol.md §4): clients take the limits
    from the server, not from constants (#15); the page's composer reads msg_chars,
    the clients' send pacing say_rate and say_burst (0: no rate limit)."""
    with trio.fail_after(10):
        async with (
            running_server(
                max_msg_chars=300, max_frame_bytes=4096, max_rooms=3, rate=2.5, burst=4
            ) as server,
            client_of(server) as alice,
        ):
            joined = await alice.join("lobby", "alice")
            assert joined["limits"] == {
                "msg_chars": 300,
                "frame_bytes": 4096,
                "rooms": 3,
                "say_rate": 2.5,
                "say_burst": 4,
            }
        async with running_server(rate=0) as server, client_of(server) as bob:
            joined = await bob.join("lobby", "bob")
            assert joined["limits"]["say_rate"] == 0
            assert joined["limits"]["say_burst"] == 20
        async with running_server() as server, client_of(server) as carol:
            joined = await carol.join("lobby", "carol")
            assert (joined["limits"]["say_rate"], joined["limits"]["say_burst"]) == (10, 20)


async def test_e2e_a_crowd_joining_one_room_gives_every_member_the_whole_room(server):
    """A join storm (#16): 60 clients join one room at once on real sockets. Each
    member's `joined.members` plus the presence joins it receives name the whole
    crowd exactly, with no duplicate, and presence comes before any message of
    the user it announces (frames that wait are never reordered, §6)."""
    names = [f"u{i:02d}" for i in range(60)]
    views: dict[str, set[str]] = {}
    all_joined = trio.Event()
    everyone_spoke = trio.Event()
    spoke: list[str] = []

    async def member(name: str) -> None:
        async with client_of(server) as client:
            joined = await client.join("crowd", name)
            seen = set(joined["members"])
            views[name] = seen
            if len(views) == len(names):
                all_joined.set()
            await all_joined.wait()
            await client.say(f"hi from {name}", room="crowd")
            spoke.append(name)
            if len(spoke) == len(names):
                everyone_spoke.set()
            heard: set[str] = set()
            while heard != set(names):
                frame = await client.recv()
                if frame["type"] == "presence":
                    assert frame["event"] == "join", frame
                    assert frame["name"] not in seen, f"{name}: a second join of {frame['name']}"
                    seen.add(frame["name"])
                elif frame["type"] == "message":
                    assert frame["name"] in seen, f"{name}: a message before its presence"
                    heard.add(frame["name"])
            assert seen == set(names)
            await everyone_spoke.wait()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(member, name)


async def test_e2e_presence_from_two_rooms_arrives_in_the_order_produced(server):
    """A room's frames that wait are held once per room and round (#16), yet a
    member of two rooms gets them in the order the server produced them (§6):
    users join room a, then room b, one after the other, and a member of both
    sees a, b, a, b, ... exactly, though the rounds hold many of them."""
    names = [f"w{i:02d}" for i in range(20)]
    async with client_of(server) as watcher:
        await watcher.join("a", "watcher")
        await watcher.join("b")
        with trio.fail_after(30):
            for name in names:  # each join is produced after the one before was answered
                async with client_of(server) as user:
                    await user.join("a", name)
                    await user.join("b")
            seen: list[tuple[str, str]] = []
            while len(seen) < 2 * len(names):
                frame = await watcher.recv()
                assert frame["type"] == "presence", frame
                if frame["event"] == "join":  # (leaves come once a grace period ends)
                    seen.append((frame["room"], frame["name"]))
    assert seen == [(room, name) for name in names for room in ("a", "b")]
