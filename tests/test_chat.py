"""ChatState (docs/protocol.md §2-6), sans-I/O: frames in through `handle`, out through peers
and `take_output`."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from triochat.chat import LEAVE_SETTLE, ChatState, Client, PendingSay
from triochat.errors import ClientProtocolError
from triochat.events import (
    Event,
    Kick,
    MemberState,
    NodeGone,
    NodeState,
    Reload,
    WhisperEvent,
    WhisperResult,
)
from triochat.history import Snapshot
from triochat.protocol import (
    JoinedFrame,
    JoinedReply,
    Limits,
    Message,
    decode_client_frame,
    encode,
    encode_history,
)
from triochat.ratelimit import RateLimiter
from triochat.recent import cached_bytes
from triochat.state.presence import DEADLINE_GRID
from triochat.waiting import Share, WaitingRun, take_shared

WALL_MS = 1_795_800_000_000
GRACE = 5.0


class FakePeer:
    """Records what the chat state delivers to one connection, and what it
    shares of the rooms' runs of frames that wait (`triochat.waiting`), in
    the order produced. Its runs never close (no schedule ends their round)."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.closed: list[tuple[int, str]] = []
        self.shares: list[Share] = []

    def deliver(self, frame) -> None:
        self._take_shared()
        self.frames.append(json.loads(frame.json))

    def share(self, run: WaitingRun) -> None:
        run.filed = True  # (a schedule would close it when the round ends)
        self.shares.append(Share(run))

    def unshare(self, run: WaitingRun) -> None:
        self._take_shared()
        self.shares = [share for share in self.shares if share.run is not run]

    def _take_shared(self) -> None:
        frames, _ = take_shared(self.shares)
        self.frames += [json.loads(frame.json) for frame in frames]

    def close_soon(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def take(self) -> list[dict]:
        """Every frame delivered since the last take."""
        self._take_shared()
        frames, self.frames = self.frames, []
        return frames

    def types(self) -> list[str]:
        """The types of the frames delivered since the last take (and takes them)."""
        return [frame["type"] for frame in self.take()]


class Conn:
    """One connection: its `Client` and the peer recording its frames."""

    def __init__(self, chat: Chat, client: Client, peer: FakePeer) -> None:
        self.chat = chat
        self.client = client
        self.peer = peer

    def send(self, **frame) -> None:
        """Send one client frame (the fields as keyword arguments, ``type_`` for type)."""
        if "type_" in frame:
            frame["type"] = frame.pop("type_")
        self.chat.send_raw(self, json.dumps(frame))

    def take(self) -> list[dict]:
        return self.peer.take()

    def types(self) -> list[str]:
        return self.peer.types()

    def one(self) -> dict:
        """The single frame delivered since the last take."""
        frames = self.take()
        assert len(frames) == 1, frames
        return frames[0]

    def join(self, room: str = "lobby", name: str | None = None, **extra) -> dict:
        """Join and return the `joined` frame (failing on anything else)."""
        fields = {"room": room, **extra}
        if name is not None:
            fields["name"] = name
        self.send(type_="join", **fields)
        joined = self.one()
        assert joined["type"] == "joined", joined
        return joined

    def error(self) -> dict:
        """The single `error` delivered since the last take."""
        frame = self.one()
        assert frame["type"] == "error", frame
        return frame

    def disconnect(self) -> None:
        self.chat.state.disconnect(self.client, self.chat.now)


class Chat:
    """A ChatState with a clock, connections and a hand-driven store.

    What the state gives back (`ChatState.take_output`) is gathered here, as the
    hub does, and read as `to_store`, `to_publish` and `to_release`: the says
    not yet stored, the events not yet carried to another node, the names released.
    """

    def __init__(
        self,
        *,
        epoch: str = "e1",
        next_seq: int = 1,
        history_size: int = 1000,
        max_rooms: int = 32,
        grace: float = GRACE,
        history: dict[str, list[Message]] | None = None,
        rate: float = 0,
        burst: int = 20,
        node: str = "",
        **state_options: Any,
    ) -> None:
        self.state = ChatState(
            node=node,
            epoch=epoch,
            next_seq=next_seq,
            history_size=history_size,
            max_rooms=max_rooms,
            presence_grace=grace,
            history=history,
            **state_options,
        )
        self.epoch = epoch
        stored = [int(m.id.rpartition("-")[2]) for kept in (history or {}).values() for m in kept]
        self.seq = max([next_seq, *(seq + 1 for seq in stored)])
        self.rate = rate
        self.burst = burst
        self.now = 1000.0
        self.wall_ms = WALL_MS
        self._to_store: list[PendingSay] = []
        self._to_publish: list[Event] = []
        self._to_release: list[str] = []

    def _gather(self) -> None:
        output = self.state.take_output()
        self._to_store.extend(output.says)
        self._to_publish.extend(output.events)
        self._to_release.extend(output.released)

    @property
    def to_store(self) -> list[PendingSay]:
        self._gather()
        return self._to_store

    @property
    def to_publish(self) -> list[Event]:
        self._gather()
        return self._to_publish

    @property
    def to_release(self) -> list[str]:
        self._gather()
        return self._to_release

    def connect(self, *, listener: bool = False, rate: float | None = None, burst=None) -> Conn:
        peer = FakePeer()
        limiter = RateLimiter(
            self.rate if rate is None else rate,
            self.burst if burst is None else burst,
            self.now,
        )
        client = Client(peer, limiter, lobby_listener=listener)
        self.state.connect(client)
        return Conn(self, client, peer)

    def send_raw(self, conn: Conn, text: str) -> None:
        """What the connection layer does with one text frame."""
        try:
            frame = decode_client_frame(text, max_msg_chars=2000)
        except ClientProtocolError as error:
            self.state.refuse(
                conn.client, error.code, error.message, error.ref, classic=error.classic
            )
            return
        self.state.handle(conn.client, frame, self.now, self.wall_ms)

    def pending(self) -> list[PendingSay]:
        """Take the says waiting for the store, as the hub does."""
        batch, self._to_store = self.to_store, []
        return batch

    def commit(self) -> list[PendingSay]:
        """Store every waiting say successfully, as a one-node backplane does:
        give each an id, then hand the messages back in order."""
        batch = self.pending()
        ids = []
        for _ in batch:
            ids.append(f"{self.epoch}-{self.seq}")
            self.seq += 1
        self.state.stored(batch, ids)
        for pending, message_id in zip(batch, ids, strict=True):
            draft = pending.draft
            message = Message(draft.room, message_id, draft.name, draft.msg, draft.ts)
            self.state.apply(message, self.now)
        return batch

    def fail(self, reason: str = "store down") -> None:
        self.state.store_failed(self.pending(), reason)

    def advance(self, seconds: float) -> None:
        """Move the clock and run `expire`, as the hub's dispatcher does."""
        self.now += seconds
        self.wall_ms += int(seconds * 1000)
        self.state.expire(self.now)


def say_all(chat: Chat, conn: Conn, count: int, room: str = "lobby") -> list[dict]:
    """Say ``count`` numbered messages and commit them; the messages, as delivered."""
    for i in range(count):
        conn.send(type_="say", room=room, msg=f"m{i}")
    chat.commit()
    return [frame for frame in conn.take() if frame["type"] == "message"]


@pytest.fixture
def chat() -> Chat:
    return Chat()


# --- join ---------------------------------------------------------------------------------


def test_join_answers_joined(chat):
    """A first join answers `joined` with name, token, members, history and recovered."""
    alice = chat.connect()
    alice.send(type_="join", room="lobby", name="alice", ref="j1")
    joined = alice.one()
    assert joined["type"] == "joined"
    assert joined["room"] == "lobby"
    assert joined["name"] == "alice"
    assert isinstance(joined["token"], str)
    assert len(joined["token"]) >= 16
    assert joined["members"] == ["alice"]
    assert joined["history"] == []
    assert joined["recovered"] is True
    assert joined["ref"] == "j1"


def test_join_without_ref_has_no_ref(chat):
    """A `joined` answering a join without ref carries no ref."""
    assert "ref" not in chat.connect().join(name="alice")


def test_join_binds_trimmed_name(chat):
    """The trimmed name is the one bound and echoed."""
    alice = chat.connect()
    assert alice.join(name="\u3000 alice \t")["name"] == "alice"
    bob = chat.connect()
    assert bob.join(name="bob")["members"] == ["alice", "bob"]


def test_join_members_sorted_by_code_point(chat):
    """`joined.members` lists every member, the joiner included, sorted by code point."""
    for name in ("李雷", "bob", "Zoë", "Alice", "ärger"):
        chat.connect().join(name=name)
    joined = chat.connect().join(name="carol")
    assert joined["members"] == ["Alice", "Zoë", "bob", "carol", "ärger", "李雷"]


def test_join_presence_goes_to_others_only(chat):
    """A join sends `presence` join to the other members, not to the joiner."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.send(type_="join", room="lobby", name="bob")
    assert bob.types() == ["joined"]
    assert alice.take() == [{"type": "presence", "room": "lobby", "event": "join", "name": "bob"}]


def test_join_presence_only_in_that_room(chat):
    """Members of other rooms hear nothing of a join."""
    alice = chat.connect()
    alice.join("dev", name="alice")
    chat.connect().join("lobby", name="bob")
    assert alice.take() == []


def test_join_again_answers_joined_without_presence(chat):
    """A join of an already joined room answers `joined` again and shows no presence."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    joined = bob.join()
    assert joined["members"] == ["alice", "bob"]
    assert alice.take() == []


def test_join_history_has_newest_hundred(chat):
    """Without `since`, `joined.history` holds the newest 100 messages, oldest first."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 130)
    joined = chat.connect().join(name="bob")
    assert joined["history"] == messages[-100:]
    assert joined["recovered"] is True


def _kept_cost(chat: Chat) -> tuple[int, int]:
    """The room cache's counted bytes, and what its rooms' messages and kept
    JSON cost (they must agree)."""
    rooms = chat.state.rooms.values()
    actual = sum(cached_bytes(m) for room in rooms for m in room.messages) + sum(
        room.recent.size for room in rooms if room.recent is not None
    )
    return chat.state.room_cache.bytes, actual


@pytest.mark.parametrize("history_size", [1000, 120, 30])
def test_join_history_stays_the_newest_through_every_change(history_size):
    """A join's history is joined from the JSON the room keeps for it (#16): it is
    the newest messages, oldest first, whatever happened since the last join:
    new messages, a delete inside the window or of the newest, a trim into it,
    a delete of all; and the room cache counts what that JSON costs."""
    chat = Chat(history_size=history_size)
    alice = chat.connect()
    alice.join(name="alice")
    kept: list[dict] = []
    joiners = iter(range(100))

    def joined_history() -> list[dict]:
        joiner = chat.connect()
        history = joiner.join(name=f"joiner{next(joiners)}")["history"]
        joiner.disconnect()
        assert _kept_cost(chat)[0] == _kept_cost(chat)[1]
        return history

    def say(count: int) -> None:
        kept.extend(say_all(chat, alice, count))
        del kept[:-history_size]  # what the room keeps

    def newest() -> list[dict]:
        return kept[-100:]

    assert joined_history() == []
    say(130)
    assert joined_history() == newest()
    say(1)  # one more: the kept JSON is extended
    assert joined_history() == newest()
    inside = kept[-10]
    assert chat.state.delete("lobby", inside["id"])
    kept.remove(inside)
    assert joined_history() == newest()
    newest_one = kept.pop()
    assert chat.state.delete("lobby", newest_one["id"])
    assert joined_history() == newest()
    say(250)  # past history_size: trimmed
    assert joined_history() == newest()
    for message in list(kept[-100:]):
        chat.state.delete("lobby", message["id"])
        kept.remove(message)
    assert joined_history() == newest()


def test_join_history_is_the_same_json_as_the_frames_struct():
    """`JoinedReply` (the history as kept JSON) encodes as `JoinedFrame`, the
    contract's struct, does for the same fields, byte for byte."""
    messages = [
        Message("lobby", f"e1-{i}", 'al"ice', f"m{i} \u2028 é", 1700 + i) for i in range(3)
    ]
    limits = Limits(2000, 65536, 32, 10.0, 20)
    for ref, with_limits in ((None, None), ("r1", limits)):
        fields = ("lobby", "bob", "tok", ["alice", "bob"])
        contract = JoinedFrame(*fields, messages, True, ref, with_limits)
        reply = JoinedReply(*fields, encode_history(messages), True, ref, with_limits)
        assert encode(reply) == encode(contract)
    empty = JoinedReply("lobby", "bob", "tok", [], encode_history([]), False)
    assert encode(empty) == encode(JoinedFrame("lobby", "bob", "tok", [], [], False))


def test_join_first_without_name_is_bad_name(chat):
    """A connection's first join without `name` is refused with `bad_name`."""
    alice = chat.connect()
    alice.send(type_="join", room="lobby", ref="r")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("bad_name", "r")


@pytest.mark.parametrize(
    "name", ["", "   ", "x" * 33, "\u200bbob", "a\u202eb", "a\u2028b", "\x07"]
)
def test_join_invalid_name_is_bad_name(chat, name):
    """An invalid name is refused with `bad_name`."""
    alice = chat.connect()
    alice.send(type_="join", room="lobby", name=name)
    assert alice.error()["code"] == "bad_name"


def test_join_later_with_other_name_is_bad_name(chat):
    """A later join with a different name is `bad_name`; the same or no name is fine."""
    alice = chat.connect()
    alice.join("lobby", name="alice")
    alice.send(type_="join", room="dev", name="bob")
    assert alice.error()["code"] == "bad_name"
    assert alice.join("dev", name=" alice ")["name"] == "alice"
    assert alice.join("ops", name=None)["name"] == "alice"


@pytest.mark.parametrize("room", ["Lobby", "", "-x", "a" * 65, "a b", "lobby!"])
def test_join_invalid_room_is_bad_room(chat, room):
    """A join of an invalid room name is refused with `bad_room`."""
    alice = chat.connect()
    alice.send(type_="join", room=room, name="alice")
    assert alice.error()["code"] == "bad_room"


def test_join_one_room_too_many_is_bad_room():
    """One room over max_rooms is `bad_room`; rejoining a joined room still works."""
    chat = Chat(max_rooms=2)
    alice = chat.connect()
    alice.join("a", name="alice")
    alice.join("b")
    alice.send(type_="join", room="c")
    assert alice.error()["code"] == "bad_room"
    assert alice.join("a")["room"] == "a"
    alice.send(type_="leave", room="b")
    alice.take()
    assert alice.join("c")["room"] == "c"


def test_join_bad_name_checked_before_bad_room(chat):
    """A join with a bad name and a bad room is `bad_name`."""
    alice = chat.connect()
    alice.send(type_="join", room="Bad Room", name="\x07")
    assert alice.error()["code"] == "bad_name"
    alice.send(type_="join", room="Bad Room")
    assert alice.error()["code"] == "bad_name"


def test_join_bad_frame_checked_before_bad_name(chat):
    """A join whose name is not a string is `bad_frame`."""
    alice = chat.connect()
    alice.send(type_="join", room="Bad Room", name=5)
    assert alice.error()["code"] == "bad_frame"


def test_join_name_held_by_other_connection_is_name_taken(chat):
    """A name held by another live connection is refused with `name_taken`."""
    chat.connect().join(name="alice")
    other = chat.connect()
    other.send(type_="join", room="dev", name=" alice", ref="r")
    error = other.error()
    assert (error["code"], error["ref"]) == ("name_taken", "r")
    other.send(type_="join", room="dev", name="alice", token="not-the-token")
    assert other.error()["code"] == "name_taken"
    assert other.join("dev", name="alice2")["name"] == "alice2"


def test_join_bad_room_checked_before_name_taken(chat):
    """A join with a taken name and an invalid room is `bad_room` (state checks come last)."""
    chat.connect().join(name="alice")
    other = chat.connect()
    other.send(type_="join", room="NOPE", name="alice")
    assert other.error()["code"] == "bad_room"


def test_join_refused_leaves_connection_unnamed(chat):
    """After `name_taken` the connection can still pick another name."""
    chat.connect().join(name="alice")
    other = chat.connect()
    other.send(type_="join", room="lobby", name="alice")
    other.error()
    other.send(type_="join", room="lobby")
    assert other.error()["code"] == "bad_name"
    assert other.join(name="bob")["members"] == ["alice", "bob"]


# --- look-alike names (#18) -----------------------------------------------------------

LOOK_ALIKE_JOINS = [
    ("alice", "\u0430lice"),  # Cyrillic a
    ("alice", "ALICE"),
    ("alice", "\uff41\uff4c\uff49\uff43\uff45"),  # fullwidth
    ("alice", "alice\u00a0"),  # NBSP is trimmed: the same name
    ("\u0430lice", "alice"),
    ("mary", "rnary"),  # TR39: m looks like rn
    ("rn", "m"),
    ("KATE", "\u039a\u0391\u03a4\u0395"),  # Greek capitals (TR39 skeleton)
    ("Alice", "AIice"),  # capital i for l (TR39 skeleton)
    ("stra\u00dfe", "STRASSE"),
]


@pytest.mark.parametrize(("held", "other"), LOOK_ALIKE_JOINS, ids=repr)
def test_join_look_alike_of_present_name_is_name_taken(chat, held, other):
    """A name equal to a present one after NFKC and case folding, or with the same TR39
    skeleton, is `name_taken`, and the holder hears nothing of it (#18)."""
    holder = chat.connect()
    assert holder.join(name=held)["name"] == held
    spoofer = chat.connect()
    spoofer.send(type_="join", room="lobby", name=other, ref="j")
    error = spoofer.error()
    assert (error["code"], error["ref"]) == ("name_taken", "j")
    assert holder.take() == []
    assert spoofer.join(name="carol")["members"] == sorted([held, "carol"])


@pytest.mark.parametrize(("held", "other"), LOOK_ALIKE_JOINS[:3], ids=repr)
def test_classic_look_alike_is_name_taken(chat, held, other):
    """A classic frame's look-alike name is `name_taken` too (#18)."""
    chat.connect().join(name=held)
    classic = chat.connect(listener=True)
    classic.send(name=other, msg="hi")
    assert classic.error()["code"] == "name_taken"


def test_join_look_alike_during_grace_is_name_taken_then_free(chat):
    """A look-alike is refused while the name is held (grace too), and free once released (#18)."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.disconnect()
    spoofer = chat.connect()
    spoofer.send(type_="join", room="lobby", name="\u0430lice")
    assert spoofer.error()["code"] == "name_taken"
    chat.advance(GRACE + 1)
    assert spoofer.join(name="\u0430lice")["name"] == "\u0430lice"
    assert set(chat.state.users) == {"alice"}  # the key of "\u0430lice"
    assert chat.to_release == ["alice"]


@pytest.mark.parametrize("name", ["ALICE", "\u0430lice", " Zo\u00eb ", "\u039a\u0391\u03a4\u0395"])
def test_join_echoes_the_name_as_typed(chat, name):
    """The trimmed name as typed is bound and echoed in joined, members, presence and
    messages; only the uniqueness check uses the keys (#18)."""
    watcher = chat.connect()
    watcher.join(name="watcher")
    user = chat.connect()
    joined = user.join(name=name)
    shown = name.strip()
    assert joined["name"] == shown
    assert joined["members"] == sorted(["watcher", shown])
    assert watcher.one() == {"type": "presence", "room": "lobby", "event": "join", "name": shown}
    user.send(type_="say", room="lobby", msg="hi")
    chat.commit()
    assert watcher.one()["name"] == shown


@pytest.mark.parametrize(
    "name",
    ["server", "System", "\u0455ystem", "s\u0435rv\u0435r", "al\u200bice", "\u3164", "\ue000"],
)
def test_join_reserved_or_invisible_name_is_bad_name(chat, name):
    """Reserved names (and look-alikes), invisible and private-use characters are `bad_name` (#18)."""
    alice = chat.connect()
    alice.send(type_="join", room="lobby", name=name, ref="n")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("bad_name", "n")
    classic = chat.connect(listener=True)
    classic.send(name=name, msg="hi")
    assert classic.error()["code"] == "bad_name"


def test_takeover_with_the_token_works_under_another_form_of_the_name(chat):
    """A token takes the name back whatever form of it is typed; the name as first bound
    stays (joined echoes it), and later joins may use any form of it (#18)."""
    alice = chat.connect()
    token = alice.join(name="Alice")["token"]
    again = chat.connect()
    joined = again.join(name="ALICE", token=token)
    assert (joined["name"], joined["token"]) == ("Alice", token)
    assert alice.peer.closed[0][0] == 4001
    assert again.join("dev", name="alice")["name"] == "Alice"
    again.send(type_="join", room="ops", name="\u0430lice\u00e9", ref="x")
    assert again.error()["code"] == "bad_name"
    assert set(chat.state.users) == {"alice"}


def test_whisper_to_matches_by_name_key(chat):
    """`to` matches a user by name key: a whisper to "ALICE" reaches "alice", and the
    frame names the recipient as bound (#18)."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    for to in ("ALICE", "\u0430lice", "\uff41lice"):
        bob.send(type_="whisper", to=to, msg="psst", ref="w")
        frame = alice.one()
        assert (frame["type"], frame["to"], frame["from"]) == ("whisper", "alice", "bob")
        assert [f["type"] for f in bob.take()] == ["whisper", "ack"]


def test_needs_claim_skips_names_refused_here(chat):
    """A look-alike of a local user needs no cluster claim: it is refused here (#18)."""
    alice = chat.connect()
    alice.join(name="Alice")
    other = chat.connect()
    for name in ("alice", "AIice", "\u0430lice"):
        frame = decode_client_frame(
            json.dumps({"type": "join", "room": "x", "name": name}), max_msg_chars=10
        )
        assert chat.state.needs_claim(other.client, frame) is None
    frame = decode_client_frame(
        json.dumps({"type": "join", "room": "x", "name": "bob"}), max_msg_chars=10
    )
    assert chat.state.needs_claim(other.client, frame) == "bob"


# --- say --------------------------------------------------------------------------------


def test_say_waits_for_commit(chat):
    """A `say` delivers nothing until its batch is committed."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    alice.send(type_="say", room="lobby", msg="hello", ref="c-17")
    assert alice.take() == []
    assert bob.take() == []
    [pending] = chat.to_store
    assert (pending.draft.msg, pending.ref) == ("hello", "c-17")


def test_say_commit_broadcasts_then_acks(chat):
    """After commit every member gets the `message`; the sender gets it, then the `ack`."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    alice.send(type_="say", room="lobby", msg="hello", ref="c-17")
    chat.commit()
    message = {
        "type": "message",
        "room": "lobby",
        "id": "e1-1",
        "name": "alice",
        "msg": "hello",
        "ts": WALL_MS,
    }
    assert alice.take() == [message, {"type": "ack", "ref": "c-17", "id": "e1-1"}]
    assert bob.take() == [message]


def test_say_without_ref_has_no_ack(chat):
    """A `say` without `ref` gets its message and no ack."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert alice.types() == ["message"]


def test_say_same_order_for_everyone(chat):
    """Every member sees the messages of a room in one and the same order."""
    conns = [chat.connect() for _ in range(3)]
    for i, conn in enumerate(conns):
        conn.join(name=f"user{i}")
    for conn in conns:
        conn.take()
    for round_ in range(3):
        for i, conn in enumerate(conns):
            conn.send(type_="say", room="lobby", msg=f"{i}/{round_}")
        if round_ == 1:
            chat.commit()
    chat.commit()
    seen = [[f["id"] for f in conn.take() if f["type"] == "message"] for conn in conns]
    assert len(seen[0]) == 9
    assert seen[0] == seen[1] == seen[2]
    assert seen[0] == [f"e1-{n}" for n in range(1, 10)]


def test_say_only_to_that_room(chat):
    """A message goes to the members of its room only."""
    alice = chat.connect()
    alice.join("lobby", name="alice")
    bob = chat.connect()
    bob.join("dev", name="bob")
    alice.send(type_="say", room="lobby", msg="hi")
    chat.commit()
    assert bob.take() == []


def test_say_not_joined(chat):
    """A `say` in a room the connection has not joined is `not_joined`."""
    alice = chat.connect()
    alice.send(type_="say", room="lobby", msg="hi", ref="r")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("not_joined", "r")
    alice.join("dev", name="alice")
    alice.send(type_="say", room="lobby", msg="hi")
    assert alice.error()["code"] == "not_joined"
    assert chat.to_store == []


def test_say_invalid_room_is_bad_room(chat):
    """A `say` to an invalid room name is `bad_room`."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="NOPE", msg="hi")
    assert alice.error()["code"] == "bad_room"


def test_say_store_failed_is_unavailable(chat):
    """A failed store answers `unavailable` (ref echoed), broadcasts and acks nothing."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    alice.send(type_="say", room="lobby", msg="lost", ref="c-1")
    chat.fail("backplane down")
    error = alice.one()
    assert error["type"] == "error"
    assert (error["code"], error["ref"]) == ("unavailable", "c-1")
    assert bob.take() == []
    alice.send(type_="history", room="lobby")
    assert alice.one()["messages"] == []


def test_say_after_failed_store_is_stored_for_real(chat):
    """A retry after `unavailable` is stored and acked with its message's id."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="x", ref="a")
    chat.fail()
    alice.take()
    alice.send(type_="say", room="lobby", msg="x", ref="a")
    chat.commit()
    message, ack = alice.take()
    assert (message["msg"], ack) == ("x", {"type": "ack", "ref": "a", "id": message["id"]})


def test_say_commit_after_sender_left_still_broadcasts(chat):
    """A stored say of a sender that disconnected meanwhile reaches the others, unacked."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.send(type_="say", room="lobby", msg="bye", ref="r")
    alice.disconnect()
    alice.take()
    chat.commit()
    assert alice.take() == []
    assert [f["msg"] for f in bob.take() if f["type"] == "message"] == ["bye"]


# --- typing -----------------------------------------------------------------------------


def test_typing_goes_to_other_members_only(chat):
    """`typing` reaches the other members of the room, not the sender; nothing is stored."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    carol = chat.connect()
    carol.join("dev", name="carol")
    alice.take()
    bob.send(type_="typing", room="lobby")
    assert alice.take() == [{"type": "typing", "room": "lobby", "name": "bob"}]
    assert bob.take() == []
    assert carol.take() == []
    assert chat.to_store == []


def test_typing_not_joined(chat):
    """`typing` in a room not joined is `not_joined`."""
    alice = chat.connect()
    alice.join("dev", name="alice")
    alice.send(type_="typing", room="lobby", ref="t")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("not_joined", "t")


# --- leave ------------------------------------------------------------------------------


def test_leave_answers_left_and_presence_once_it_settles(chat):
    """`leave` answers `left` (ref echoed) at once; the others get `presence` leave
    once it has settled (`LEAVE_SETTLE`, docs/protocol.md §6)."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    bob.send(type_="leave", room="lobby", ref="l1")
    assert bob.take() == [{"type": "left", "room": "lobby", "ref": "l1"}]
    assert alice.take() == []
    chat.advance(LEAVE_SETTLE - 0.1)
    assert alice.take() == []
    chat.advance(0.1)
    assert alice.take() == [{"type": "presence", "room": "lobby", "event": "leave", "name": "bob"}]
    carol = chat.connect()
    assert carol.join(name="carol")["members"] == ["alice", "carol"]


def test_leave_and_join_again_within_the_settle_time_shows_nothing(chat):
    """Leave/join churn (#18): a join of the same room before the leave settled shows
    the others nothing, however often; the member list never lost the user."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    for _ in range(20):
        bob.send(type_="leave", room="lobby")
        chat.advance(0.05)
        bob.send(type_="join", room="lobby")
        chat.advance(0.05)
    chat.advance(LEAVE_SETTLE * 2)
    assert alice.take() == []
    assert [f["type"] for f in bob.take()] == ["left", "joined"] * 20
    carol = chat.connect()
    assert carol.join(name="carol")["members"] == ["alice", "bob", "carol"]


def test_leave_never_cuts_a_running_grace_short(chat):
    """A leave's short wait does not shorten the grace of rooms held by a takeover."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    token = bob.join("lobby", name="bob")["token"]
    bob.join("dev")
    alice.take()
    alice.join("dev")
    alice.take()
    again = chat.connect()
    again.join("lobby", name="bob", token=token)  # takes over: dev is held for the grace
    again.send(type_="leave", room="lobby")
    chat.advance(LEAVE_SETTLE)
    assert alice.take() == []  # neither room is left yet: the grace runs
    chat.advance(GRACE)
    assert sorted(f["room"] for f in alice.take() if f["type"] == "presence") == ["dev", "lobby"]


def test_leave_then_close_wakes_the_hub_once_not_at_the_superseded_settle(chat):
    """A leave, then the close (a churn's lifecycle): the close's grace supersedes
    the leave's settle, and the next deadline is the grace's, so the dispatcher
    does not wake at the settle time for nothing (#16)."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    bob.send(type_="leave", room="lobby")
    assert chat.state.next_deadline() == chat.now + LEAVE_SETTLE
    bob.disconnect()
    assert chat.state.next_deadline() == chat.now + GRACE
    chat.advance(LEAVE_SETTLE)
    assert alice.take() == []
    chat.advance(GRACE - LEAVE_SETTLE)
    assert alice.take() == [{"type": "presence", "room": "lobby", "event": "leave", "name": "bob"}]
    assert chat.state.next_deadline() == float("inf")


def test_grace_periods_that_end_within_one_tick_end_together(chat):
    """Three connections closed 10 ms apart: their grace periods all end on the same
    50 ms tick (`DEADLINE_GRID`), never before the grace is over, so the dispatcher
    wakes once for the three leaves, not once each (#16: churn; docs/protocol.md §6)."""
    alice = chat.connect()
    alice.join(name="alice")
    others = [chat.connect() for _ in range(3)]
    for name, other in zip(("bob", "carol", "dave"), others, strict=True):
        other.join(name=name)
    chat.advance(0.001)  # off the tick
    alice.take()
    closed_at = []
    for other in others:
        other.disconnect()
        closed_at.append(chat.now)
        chat.advance(0.01)
    end = chat.state.next_deadline()
    assert closed_at[-1] + GRACE <= end < closed_at[0] + GRACE + DEADLINE_GRID
    chat.advance(end - chat.now - 0.001)
    assert alice.take() == []
    chat.advance(0.001)
    left = [f["name"] for f in alice.take() if f["type"] == "presence"]
    assert left == ["bob", "carol", "dave"]
    assert chat.state.next_deadline() == float("inf")


def test_leave_stops_delivery(chat):
    """After `leave` the connection gets no more of the room, and cannot say there."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    bob.send(type_="leave", room="lobby")
    bob.take()
    alice.send(type_="say", room="lobby", msg="hi")
    alice.send(type_="typing", room="lobby")
    chat.commit()
    assert bob.take() == []
    bob.send(type_="say", room="lobby", msg="hi")
    assert bob.error()["code"] == "not_joined"
    chat.advance(LEAVE_SETTLE)
    assert chat.connect().join(name="carol")["members"] == ["alice", "carol"]


def test_leave_not_joined(chat):
    """`leave` of a room not joined is `not_joined`."""
    alice = chat.connect()
    alice.send(type_="leave", room="lobby", ref="x")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("not_joined", "x")


def test_leave_without_ref_has_no_ref(chat):
    """A `left` answering a leave without ref carries no ref."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="leave", room="lobby")
    assert alice.take() == [{"type": "left", "room": "lobby"}]


# --- rate limit -------------------------------------------------------------------------


def test_rate_limit_third_say_at_once_is_rate_limited():
    """rate 1, burst 2: a third say at the same instant is `rate_limited` and dropped."""
    chat = Chat(rate=1, burst=2)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="1")
    alice.send(type_="say", room="lobby", msg="2")
    alice.send(type_="say", room="lobby", msg="3", ref="r3")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("rate_limited", "r3")
    assert [p.draft.msg for p in chat.pending()] == ["1", "2"]
    chat.now += 1.0
    alice.send(type_="say", room="lobby", msg="4")
    assert [p.draft.msg for p in chat.pending()] == ["4"]


def test_rate_limit_counts_say_typing_and_whisper_together():
    """`say`, `typing` and `whisper` share one bucket; `join` and `leave` do not use it."""
    chat = Chat(rate=1, burst=3)
    alice = chat.connect()
    alice.join(name="alice")
    alice.join("dev")
    alice.send(type_="say", room="lobby", msg="1")
    alice.send(type_="typing", room="lobby")
    alice.send(type_="whisper", to="alice", msg="psst")
    alice.take()
    alice.send(type_="typing", room="lobby")
    assert alice.error()["code"] == "rate_limited"
    alice.send(type_="whisper", to="alice", msg="psst")
    assert alice.error()["code"] == "rate_limited"
    alice.send(type_="leave", room="dev")
    assert alice.types() == ["left"]


def test_rate_limit_checked_before_not_joined():
    """With an empty bucket, a say in a room not joined is `rate_limited`."""
    chat = Chat(rate=1, burst=1)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="1")
    alice.send(type_="say", room="elsewhere", msg="2")
    assert alice.error()["code"] == "rate_limited"


def test_rate_limit_checked_after_bad_room():
    """With an empty bucket, a say to an invalid room is still `bad_room`."""
    chat = Chat(rate=1, burst=1)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="1")
    alice.send(type_="say", room="NOT VALID", msg="2")
    assert alice.error()["code"] == "bad_room"


def test_rate_limit_hundredth_drop_closes_1008():
    """The 100th dropped frame within 60 s closes the connection with 1008."""
    chat = Chat(rate=1, burst=2)
    alice = chat.connect()
    alice.join(name="alice")
    for _ in range(2 + 99):
        alice.send(type_="say", room="lobby", msg="spam")
    assert alice.peer.closed == []
    alice.send(type_="say", room="lobby", msg="spam")
    assert [code for code, _ in alice.peer.closed] == [1008]


def test_rate_limit_drops_older_than_a_minute_do_not_count():
    """Drops older than 60 s do not count towards the 100 that close the connection."""
    chat = Chat(rate=0.001, burst=1)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="ok")
    for _ in range(99):
        alice.send(type_="say", room="lobby", msg="spam")
    chat.now += 61.0
    alice.send(type_="say", room="lobby", msg="spam")
    assert alice.take()[-1]["code"] == "rate_limited"
    assert alice.peer.closed == []


def test_rate_limit_checked_before_whisper_state():
    """With an empty bucket, a whisper from an unnamed connection is `rate_limited`."""
    chat = Chat(rate=1, burst=1)
    anon = chat.connect()
    anon.send(type_="whisper", to="nobody", msg="1")
    assert anon.error()["code"] == "not_joined"
    anon.send(type_="whisper", to="nobody", msg="2")
    assert anon.error()["code"] == "rate_limited"


def test_rate_limit_off_with_rate_zero():
    """rate 0 turns the limit off."""
    chat = Chat(rate=0, burst=1)
    alice = chat.connect()
    alice.join(name="alice")
    for _ in range(500):
        alice.send(type_="say", room="lobby", msg="x")
    assert len(chat.pending()) == 500
    assert alice.take() == []


# --- resume token and takeover -------------------------------------------------------------


def test_token_takeover_closes_old_with_4001(chat):
    """A join with the resume token takes the name over; the old connection closes 4001."""
    alice1 = chat.connect()
    token = alice1.join(name="alice")["token"]
    bob = chat.connect()
    bob.join(name="bob")
    bob.take()
    alice1.take()
    alice2 = chat.connect()
    joined = alice2.join(name="alice", token=token)
    assert [code for code, _ in alice1.peer.closed] == [4001]
    assert joined["token"] == token  # docs/protocol.md §6: the takeover keeps it valid
    assert joined["members"] == ["alice", "bob"]
    assert bob.take() == []
    chat.advance(GRACE + 1)
    assert bob.take() == []


def test_token_takeover_moves_delivery(chat):
    """After a takeover messages reach the new connection, not the replaced one."""
    alice1 = chat.connect()
    token = alice1.join(name="alice")["token"]
    alice2 = chat.connect()
    alice2.join(name="alice", token=token)
    alice1.take()
    bob = chat.connect()
    bob.join(name="bob")
    bob.send(type_="say", room="lobby", msg="hi")
    chat.commit()
    assert alice1.take() == []
    assert [f["type"] for f in alice2.take()] == ["presence", "message"]
    alice1.send(type_="say", room="lobby", msg="late")
    assert chat.to_store == []
    assert alice1.take() == []


def test_token_stays_valid_after_takeover(chat):
    """The token keeps working for a second takeover (docs/protocol.md §6)."""
    alice1 = chat.connect()
    token = alice1.join(name="alice")["token"]
    alice2 = chat.connect()
    alice2.join(name="alice", token=token)
    alice3 = chat.connect()
    assert alice3.join(name="alice", token=token)["token"] == token
    assert [code for code, _ in alice2.peer.closed] == [4001]


def test_token_rotates_on_a_takeover_that_asks(chat):
    """`rotate: true` (#18): the takeover gets a new token and the one it used no
    longer works, so a leaked copy takes the name over no more."""
    alice1 = chat.connect()
    token = alice1.join(name="alice")["token"]
    alice2 = chat.connect()
    second = alice2.join(name="alice", token=token, rotate=True)["token"]
    assert second != token
    thief = chat.connect()
    thief.send(type_="join", room="lobby", name="alice", token=token, ref="t")
    assert (thief.error()["code"], alice2.peer.closed) == ("name_taken", [])
    alice3 = chat.connect()
    third = alice3.join(name="alice", token=second, rotate=True)["token"]
    assert third not in (token, second)
    assert [code for code, _ in alice2.peer.closed] == [4001]
    # Later joins of the same connection keep its token.
    assert alice3.join("dev")["token"] == third


# --- presence grace -----------------------------------------------------------------------


def grace_setup(chat: Chat) -> tuple[Conn, Conn, str]:
    alice = chat.connect()
    token = alice.join(name="alice")["token"]
    bob = chat.connect()
    bob.join(name="bob")
    alice.take()
    bob.take()
    return alice, bob, token


def test_grace_disconnect_leave_only_after_grace(chat):
    """A lost connection's leave is announced only once the grace period ends."""
    alice, bob, _ = grace_setup(chat)
    alice.disconnect()
    assert bob.take() == []
    assert chat.state.next_deadline() == chat.now + GRACE
    chat.advance(GRACE - 0.1)
    assert bob.take() == []
    chat.advance(0.1)
    assert bob.take() == [{"type": "presence", "room": "lobby", "event": "leave", "name": "alice"}]


def test_grace_reconnect_with_token_shows_no_flicker(chat):
    """A reconnect with the token within grace shows no leave and no join."""
    alice, bob, token = grace_setup(chat)
    alice.disconnect()
    chat.advance(2.0)
    alice2 = chat.connect()
    joined = alice2.join(name="alice", token=token)
    assert joined["members"] == ["alice", "bob"]
    assert joined["token"] == token
    chat.advance(GRACE * 2)
    assert bob.take() == []
    bob.send(type_="say", room="lobby", msg="still there?")
    chat.commit()
    assert [f["msg"] for f in alice2.take()] == ["still there?"]


def test_grace_members_include_held_user(chat):
    """During grace the held user still shows in `joined.members`."""
    alice, _, _ = grace_setup(chat)
    alice.disconnect()
    assert chat.connect().join(name="carol")["members"] == ["alice", "bob", "carol"]


def test_grace_reconnect_without_token_is_name_taken(chat):
    """During grace the name stays held: a join without token gets `name_taken`."""
    alice, _, _ = grace_setup(chat)
    alice.disconnect()
    chat.advance(GRACE - 1)
    other = chat.connect()
    other.send(type_="join", room="lobby", name="alice")
    assert other.error()["code"] == "name_taken"


def test_grace_after_expiry_name_is_free(chat):
    """After grace the leave is broadcast and the name is free again (with a join)."""
    alice, bob, _ = grace_setup(chat)
    alice.disconnect()
    chat.advance(GRACE)
    assert bob.types() == ["presence"]
    new = chat.connect()
    joined = new.join(name="alice")
    assert joined["members"] == ["alice", "bob"]
    assert bob.take() == [{"type": "presence", "room": "lobby", "event": "join", "name": "alice"}]


def test_grace_zero_leaves_on_expire():
    """With presence_grace 0 the leave comes at the next `expire`."""
    chat = Chat(grace=0.0)
    alice, bob, _ = grace_setup(chat)
    alice.disconnect()
    chat.state.expire(chat.now)
    assert bob.types() == ["presence"]


def test_grace_explicit_leave_then_disconnect_no_second_leave(chat):
    """An explicit leave is announced once; the later disconnect announces nothing more."""
    alice, bob, _ = grace_setup(chat)
    alice.send(type_="leave", room="lobby")
    chat.advance(LEAVE_SETTLE)
    assert bob.types() == ["presence"]
    alice.disconnect()
    chat.advance(GRACE)
    assert bob.take() == []


# --- whisper ------------------------------------------------------------------------------


def test_whisper_to_recipient_and_sender_then_ack(chat):
    """A whisper reaches the recipient and the sender, then the sender's ack."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join("dev", name="bob")
    alice.send(type_="whisper", to="bob", msg="psst", ref="w1")
    received = bob.take()
    whisper_id = received[0]["id"]
    assert whisper_id.startswith("e1-w")
    whisper = {
        "type": "whisper",
        "id": whisper_id,
        "from": "alice",
        "to": "bob",
        "name": "alice",
        "msg": "psst",
        "ts": WALL_MS,
    }
    assert received == [whisper]
    assert alice.take() == [whisper, {"type": "ack", "ref": "w1", "id": whisper_id}]
    assert chat.to_store == []


def test_whisper_to_self_once(chat):
    """A whisper to oneself arrives once, then the ack."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="whisper", to="alice", msg="note", ref="n")
    assert alice.types() == ["whisper", "ack"]


def test_whisper_not_in_history(chat):
    """Whispers are not stored in room history."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="whisper", to="alice", msg="note")
    alice.send(type_="history", room="lobby")
    assert alice.take()[-1]["messages"] == []


@pytest.mark.parametrize("to", ["nobody", "", "   ", "\x07", "x" * 40])
def test_whisper_unknown_or_invalid_to_is_no_such_user(chat, to):
    """A whisper to a name nobody holds, or to an invalid name, is `no_such_user`."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="whisper", to=to, msg="psst", ref="w")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("no_such_user", "w")


def test_whisper_to_trimmed_name(chat):
    """`to` is matched after trimming like a name."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.send(type_="whisper", to=" bob ", msg="psst")
    assert bob.take()[-1]["to"] == "bob"


def test_whisper_without_name_is_not_joined(chat):
    """A whisper from a connection without a name is `not_joined`."""
    chat.connect().join(name="bob")
    anon = chat.connect()
    anon.send(type_="whisper", to="bob", msg="psst", ref="w")
    error = anon.error()
    assert (error["code"], error["ref"]) == ("not_joined", "w")


def test_whisper_to_user_in_grace_is_no_such_user(chat):
    """A whisper to a user only held in the grace period is `no_such_user`."""
    alice, bob, _ = grace_setup(chat)
    alice.disconnect()
    bob.send(type_="whisper", to="alice", msg="psst")
    assert bob.error()["code"] == "no_such_user"


def test_whisper_ids_are_distinct(chat):
    """Each whisper gets its own id, also across a restart that keeps the epoch."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="whisper", to="alice", msg="1")
    alice.send(type_="whisper", to="alice", msg="2")
    first, second = (f["id"] for f in alice.take())
    assert first != second
    assert first.startswith("e1-w")
    restarted = ChatState(
        epoch="e1", next_seq=1, history_size=10, max_rooms=4, presence_grace=GRACE
    )
    assert restarted._whispers.prefix != chat.state._whispers.prefix


# --- history ------------------------------------------------------------------------------


def test_history_pages_back_oldest_first(chat):
    """`history` pages back with `before` and `limit`, oldest first, `more` when older exist."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 10)
    alice.send(type_="history", room="lobby", limit=3, ref="h1")
    page = alice.one()
    assert page == {
        "type": "history",
        "room": "lobby",
        "messages": messages[7:],
        "more": True,
        "ref": "h1",
    }
    alice.send(type_="history", room="lobby", before=messages[7]["id"], limit=3)
    page = alice.one()
    assert (page["messages"], page["more"]) == (messages[4:7], True)
    alice.send(type_="history", room="lobby", before=messages[3]["id"], limit=3)
    page = alice.one()
    assert (page["messages"], page["more"]) == (messages[0:3], False)
    alice.send(type_="history", room="lobby", before=messages[1]["id"], limit=3)
    page = alice.one()
    assert (page["messages"], page["more"]) == (messages[0:1], False)
    alice.send(type_="history", room="lobby", before=messages[0]["id"])
    page = alice.one()
    assert (page["messages"], page["more"]) == ([], False)


def test_history_default_limit_fifty(chat):
    """Without `limit`, `history` returns the newest 50."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 60)
    alice.send(type_="history", room="lobby")
    page = alice.one()
    assert (page["messages"], page["more"]) == (messages[10:], True)
    assert "ref" not in page


def test_history_all_fits_more_false(chat):
    """When every message fits, `more` is false."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 3)
    alice.send(type_="history", room="lobby", limit=3)
    page = alice.one()
    assert (page["messages"], page["more"]) == (messages, False)


@pytest.mark.parametrize("before", ["e1-999", "e0-1", "garbage", "e1-w1"])
def test_history_unknown_before_is_bad_frame(chat, before):
    """An unknown `before` is `bad_frame` (ref echoed)."""
    alice = chat.connect()
    alice.join(name="alice")
    say_all(chat, alice, 2)
    alice.send(type_="history", room="lobby", before=before, ref="h")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("bad_frame", "h")


def test_history_before_from_other_room_is_bad_frame(chat):
    """A `before` id of another room is unknown in this one: `bad_frame`."""
    alice = chat.connect()
    alice.join("lobby", name="alice")
    alice.join("dev")
    dev = say_all(chat, alice, 1, room="dev")
    say_all(chat, alice, 2, room="lobby")
    alice.send(type_="history", room="lobby", before=dev[0]["id"])
    assert alice.error()["code"] == "bad_frame"


def test_history_not_joined(chat):
    """`history` of a room not joined is `not_joined`."""
    alice = chat.connect()
    alice.join("dev", name="alice")
    alice.send(type_="history", room="lobby", ref="h")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("not_joined", "h")


# --- since recovery -----------------------------------------------------------------------


def test_since_exact_gap_recovered(chat):
    """A join with `since` replays exactly the messages after it, recovered true."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 8)
    joined = chat.connect().join(name="bob", since=messages[4]["id"])
    assert joined["history"] == messages[5:]
    assert joined["recovered"] is True


def test_since_newest_recovered_empty(chat):
    """A `since` equal to the newest id replays nothing, recovered true."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 3)
    joined = chat.connect().join(name="bob", since=messages[-1]["id"])
    assert (joined["history"], joined["recovered"]) == ([], True)


def test_since_two_hundred_missed_recovered(chat):
    """Exactly 200 missed messages are replayed in full."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 201)
    joined = chat.connect().join(name="bob", since=messages[0]["id"])
    assert (joined["history"], joined["recovered"]) == (messages[1:], True)


def test_since_over_two_hundred_missed_not_recovered(chat):
    """More than 200 missed: recovered false with the newest 100."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 202)
    joined = chat.connect().join(name="bob", since=messages[0]["id"])
    assert (joined["history"], joined["recovered"]) == (messages[-100:], False)


@pytest.mark.parametrize("since", ["e1-9999", "e0-5", "e2-5", "nonsense", ""])
def test_since_unknown_not_recovered(chat, since):
    """An unknown or foreign-epoch `since`: recovered false with the newest 100."""
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 120)
    joined = chat.connect().join(name="bob", since=since)
    assert (joined["history"], joined["recovered"]) == (messages[-100:], False)


def test_since_from_other_room_not_recovered(chat):
    """A `since` id of another room cannot be placed: recovered false."""
    alice = chat.connect()
    alice.join("dev", name="alice")
    dev = say_all(chat, alice, 1, room="dev")
    alice.join("lobby")
    lobby = say_all(chat, alice, 3)
    joined = chat.connect().join(name="bob", since=dev[0]["id"])
    assert (joined["history"], joined["recovered"]) == (lobby, False)


def test_since_trimmed_not_recovered():
    """A `since` whose successors were trimmed: recovered false with what is kept."""
    chat = Chat(history_size=5)
    alice = chat.connect()
    alice.join(name="alice")
    messages = say_all(chat, alice, 10)
    joined = chat.connect().join(name="bob", since=messages[2]["id"])
    assert (joined["history"], joined["recovered"]) == (messages[-5:], False)


def test_since_on_rejoin_with_token(chat):
    """A reconnect with token and `since` replays what it missed, with no flicker."""
    alice, bob, token = grace_setup(chat)
    seen = say_all(chat, bob, 2)
    alice.take()
    alice.disconnect()
    missed = say_all(chat, bob, 3)
    alice2 = chat.connect()
    joined = alice2.join(name="alice", token=token, since=seen[-1]["id"])
    assert (joined["history"], joined["recovered"]) == (missed, True)
    assert bob.take() == []


# --- ids across restarts ---------------------------------------------------------------------


def test_ids_never_reused_after_rebuild_with_new_epoch():
    """A state rebuilt with a new epoch (history lost) never hands out an old id."""
    first = Chat(epoch="e1")
    alice = first.connect()
    alice.join(name="alice")
    old = say_all(first, alice, 5)
    second = Chat(epoch="e2", next_seq=1)
    alice2 = second.connect()
    alice2.join(name="alice")
    new = say_all(second, alice2, 5)
    assert {m["id"] for m in old}.isdisjoint(m["id"] for m in new)
    joined = second.connect().join(name="bob", since=old[2]["id"])
    assert (joined["history"], joined["recovered"]) == (new, False)


def test_ids_continue_after_rebuild_with_history():
    """A state rebuilt from stored history continues after the stored ids and recovers."""
    first = Chat(epoch="e1")
    alice = first.connect()
    alice.join(name="alice")
    old = say_all(first, alice, 5)
    stored = [Message(m["room"], m["id"], m["name"], m["msg"], m["ts"]) for m in old]
    second = Chat(epoch="e1", next_seq=1, history={"lobby": stored})
    alice2 = second.connect()
    joined = alice2.join(name="alice", since=old[1]["id"])
    assert (joined["history"], joined["recovered"]) == (old[2:], True)
    new = say_all(second, alice2, 2)
    assert [m["id"] for m in new] == ["e1-6", "e1-7"]


# --- classic frames ------------------------------------------------------------------------


def test_classic_frame_joins_lobby_and_says(chat):
    """`{name, msg}` joins lobby as name (a member), then says msg there."""
    alice = chat.connect()
    alice.join(name="alice")
    carl = chat.connect()
    carl.send(name="carl", msg="hi all", ref="c")
    assert carl.take() == []
    assert alice.take() == [{"type": "presence", "room": "lobby", "event": "join", "name": "carl"}]
    chat.commit()
    message = {
        "type": "message",
        "room": "lobby",
        "id": "e1-1",
        "name": "carl",
        "msg": "hi all",
        "ts": WALL_MS,
    }
    assert carl.take() == [message]
    assert alice.take() == [message]
    assert chat.connect().join(name="bob")["members"] == ["alice", "bob", "carl"]


def test_classic_receives_only_message_whisper_error(chat):
    """A classic connection gets message, whisper and error frames only."""
    carl = chat.connect()
    carl.send(name="carl", msg="first")
    chat.commit()
    carl.take()
    alice = chat.connect()
    alice.join(name="alice", since="e1-1")
    alice.send(type_="typing", room="lobby")
    alice.send(type_="say", room="lobby", msg="hey", ref="a")
    chat.commit()
    alice.send(type_="whisper", to="carl", msg="psst")
    alice.send(type_="leave", room="lobby")
    frames = carl.take()
    assert [f["type"] for f in frames] == ["message", "whisper"]
    assert all("name" in f and "msg" in f for f in frames)


def test_classic_errors_carry_name_server_and_msg(chat):
    """A classic connection's errors carry name "server" and msg (the error text)."""
    carl = chat.connect()
    carl.send(name="carl", msg="hi")
    chat.commit()
    carl.take()
    carl.send(name="carla", msg="hi again")
    error = carl.error()
    assert error["code"] == "bad_name"
    assert error["name"] == "server"
    assert error["msg"] == error["message"]
    assert error["msg"]
    carl.send(name="carl", msg="")
    error = carl.error()
    assert (error["code"], error["name"]) == ("bad_frame", "server")


def test_classic_same_name_again_just_says(chat):
    """Later classic frames with the same name only say (no second join)."""
    alice = chat.connect()
    alice.join(name="alice")
    carl = chat.connect()
    carl.send(name="carl", msg="1")
    carl.send(name=" carl ", msg="2")
    chat.commit()
    assert [f["type"] for f in alice.take()] == ["presence", "message", "message"]
    assert [f["msg"] for f in carl.take()] == ["1", "2"]


def test_classic_other_name_is_bad_name(chat):
    """A later classic frame with another name is `bad_name`, and nothing is said."""
    carl = chat.connect()
    carl.send(name="carl", msg="hi")
    chat.pending()
    carl.send(name="mallory", msg="hi")
    assert carl.error()["code"] == "bad_name"
    assert chat.to_store == []


def test_classic_invalid_name_is_bad_name(chat):
    """A classic frame with an invalid name is `bad_name`."""
    carl = chat.connect()
    carl.send(name="\u200b", msg="hi")
    error = carl.error()
    assert (error["code"], error["name"]) == ("bad_name", "server")


def test_classic_name_taken(chat):
    """A classic frame with a name held by another connection is `name_taken`."""
    chat.connect().join(name="alice")
    carl = chat.connect()
    carl.send(name="alice", msg="hi")
    assert carl.error()["code"] == "name_taken"
    assert chat.to_store == []


def test_classic_no_ack(chat):
    """A classic say with a ref gets its message but no ack."""
    carl = chat.connect()
    carl.send(name="carl", msg="hi", ref="r")
    chat.commit()
    assert carl.types() == ["message"]


def test_classic_store_failed_error(chat):
    """A failed store tells a classic sender with a classic error."""
    carl = chat.connect()
    carl.send(name="carl", msg="hi")
    chat.fail("down")
    error = carl.error()
    assert (error["code"], error["name"], error["msg"]) == ("unavailable", "server", "down")


def test_classic_rate_limited():
    """Classic frames are rate limited like `say`."""
    chat = Chat(rate=1, burst=1)
    carl = chat.connect()
    carl.send(name="carl", msg="1")
    carl.send(name="carl", msg="2")
    assert carl.error()["code"] == "rate_limited"


# --- `/` listeners --------------------------------------------------------------------------


def test_listener_hears_lobby_before_sending(chat):
    """A `/` listener receives lobby's messages before sending anything."""
    listener = chat.connect(listener=True)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="typing", room="lobby")
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert [(f["type"], f["msg"]) for f in listener.take()] == [("message", "hello")]


def test_listener_not_a_member(chat):
    """A listener shows in no members list and causes no presence."""
    chat.connect(listener=True)
    alice = chat.connect()
    assert alice.join(name="alice")["members"] == ["alice"]
    assert alice.take() == []


def test_listener_only_lobby(chat):
    """A listener hears lobby only."""
    listener = chat.connect(listener=True)
    alice = chat.connect()
    alice.join("dev", name="alice")
    alice.send(type_="say", room="dev", msg="hello")
    chat.commit()
    assert listener.take() == []


def test_listener_typed_first_frame_stops_listening(chat):
    """A typed first frame makes a typed connection; lobby stops reaching it."""
    listener = chat.connect(listener=True)
    listener.join("dev", name="lis")
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert listener.take() == []


def test_listener_typed_join_lobby_is_member(chat):
    """A listener whose first frame joins lobby becomes a typed member of it."""
    listener = chat.connect(listener=True)
    joined = listener.join("lobby", name="lis")
    assert joined["members"] == ["lis"]
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert [f["type"] for f in listener.take()] == ["presence", "message"]


def test_listener_classic_first_frame_becomes_classic_member(chat):
    """A listener whose first frame is classic becomes a classic member of lobby."""
    alice = chat.connect()
    alice.join(name="alice")
    listener = chat.connect(listener=True)
    listener.send(name="carl", msg="hi")
    chat.commit()
    assert [f["msg"] for f in listener.take()] == ["hi"]
    assert [f["type"] for f in alice.take()] == ["presence", "message"]
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert [f["msg"] for f in listener.take()] == ["hello"]


def test_listener_disconnect_stops_delivery(chat):
    """A disconnected listener hears nothing more."""
    listener = chat.connect(listener=True)
    chat.state.disconnect(listener.client, chat.now)
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello")
    chat.commit()
    assert listener.take() == []


# --- retries: a say is stored once per user and ref (issue #3) ------------------


def _takeover(chat, old, name="alice"):
    """Drop ``old`` and take its name back on a new connection with the token."""
    token = chat.state.users[name].token
    old.disconnect()
    new = chat.connect()
    new.join(name=name, token=token)
    return new


def test_say_retry_after_commit_is_acked_again_not_stored(chat):
    """A say retried with the same ref after a reconnect gets the first id's ack; nothing new is stored."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    chat.commit()
    first_id = alice.take()[-1]["id"]
    alice = _takeover(chat, alice)
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    assert chat.pending() == []
    assert alice.take() == [{"type": "ack", "ref": "c-1", "id": first_id}]


def test_say_retry_while_storing_gets_the_same_ack(chat):
    """A retry that arrives while the first copy is being stored is acked with it, once stored."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    old = alice
    alice = _takeover(chat, old)
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    batch = chat.commit()
    assert len(batch) == 1
    frames = alice.take()
    assert [f["type"] for f in frames] == ["message", "ack"]
    assert frames[1]["id"] == frames[0]["id"]


def test_say_retry_after_store_failure_is_stored(chat):
    """After `unavailable`, the same ref is a new attempt and is stored."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    chat.fail()
    assert alice.error()["code"] == "unavailable"
    alice.send(type_="say", room="lobby", msg="hello", ref="c-1")
    assert len(chat.commit()) == 1
    assert [f["type"] for f in alice.take()] == ["message", "ack"]


def test_say_same_ref_with_other_text_is_a_new_message(chat):
    """A reused ref with different text (a client that restarted its counter) is not swallowed."""
    alice = chat.connect()
    alice.join(name="alice")
    alice.send(type_="say", room="lobby", msg="one", ref="1")
    chat.commit()
    alice.send(type_="say", room="lobby", msg="two", ref="1")
    assert len(chat.commit()) == 1
    assert [f.get("msg") for f in alice.take() if f["type"] == "message"] == ["one", "two"]


def test_say_retry_by_another_user_is_not_deduplicated(chat):
    """Refs are per user: another user's say with the same ref and text is its own message."""
    alice = chat.connect()
    alice.join(name="alice")
    bob = chat.connect()
    bob.join(name="bob")
    alice.send(type_="say", room="lobby", msg="hi", ref="1")
    bob.send(type_="say", room="lobby", msg="hi", ref="1")
    assert len(chat.commit()) == 2


# --- two nodes, events carried by hand (the backplane's part) -------------------------------


def carry(source: Chat, target: Chat) -> None:
    """Deliver what ``source`` published to ``target``, as a backplane does."""
    events, source._to_publish = source.to_publish, []
    for event in events:
        target.state.apply(event, target.now)


def test_cluster_members_on_another_node_are_listed_and_announced():
    """A member joining on another node shows in `joined.members` and as presence."""
    one, two = Chat(node="n1"), Chat(node="n2")
    bob = two.connect()
    bob.join(name="bob")
    carry(two, one)
    alice = one.connect()
    assert alice.join(name="alice")["members"] == ["alice", "bob"]
    carry(one, two)
    assert bob.one() == {"type": "presence", "room": "lobby", "event": "join", "name": "alice"}


def test_cluster_join_then_leave_in_one_step_is_not_a_member_elsewhere():
    """Changes published in one step keep their order: join+leave nets to absent."""
    one, two = Chat(node="n1"), Chat(node="n2")
    watcher = two.connect()
    watcher.join(name="watcher")
    carry(two, one)
    alice = one.connect()
    alice.join(name="alice")
    alice.send(type_="leave", room="lobby")
    one.advance(LEAVE_SETTLE)
    carry(one, two)
    assert watcher.types() == ["presence", "presence"]  # join, then leave
    assert two.connect().join(name="zed")["members"] == ["watcher", "zed"]


def test_cluster_leave_then_rejoin_in_one_step_stays_a_member_elsewhere():
    one, two = Chat(node="n1"), Chat(node="n2")
    alice = one.connect()
    alice.join(name="alice")
    carry(one, two)
    alice.send(type_="leave", room="lobby")
    alice.send(type_="join", room="lobby")
    assert alice.types() == ["left", "joined"]
    carry(one, two)
    assert two.connect().join(name="zed")["members"] == ["alice", "zed"]


def test_cluster_node_gone_removes_its_members_once():
    """NodeGone drops every entry of that node, with one leave per member."""
    one, two = Chat(node="n1"), Chat(node="n2")
    for name in ("alice", "carol"):
        one.connect().join(name=name)
    carry(one, two)
    bob = two.connect()
    bob.join(name="bob")
    two.state.apply(NodeGone("n1"), two.now)
    assert [f["name"] for f in bob.take()] == ["alice", "carol"]
    two.state.apply(NodeGone("n1"), two.now)
    assert bob.take() == []


def _names_in_step(chat: Chat) -> None:
    """Every room's kept sorted names (`Room.member_names`) are its members, here
    and on other nodes, as computed afresh."""
    for room in chat.state._rooms.rooms.values():
        assert room.member_names() == sorted(room.members.keys() | room.remote.keys())


@pytest.mark.parametrize("seed", range(8))
def test_member_names_stay_in_step_through_every_kind_of_change(seed: int):
    """Joins, leaves, drops and grace periods, members of other nodes arriving,
    leaving and vanishing (NodeGone), a name moving between nodes: the sorted
    names a `joined` frame lists are kept in step with each (#16), checked after
    every step on both nodes."""
    rng = random.Random(seed)
    one, two = Chat(node="n1"), Chat(node="n2")
    names = ["alice", "bob", "carol", "dave", "erin"]
    rooms = ["lobby", "side", "back"]
    conns: list[tuple[Chat, Conn]] = []
    for _ in range(400):
        chat = rng.choice((one, two))
        roll = rng.random()
        if roll < 0.35 or not conns:
            conn = chat.connect()
            conn.send(type_="join", room=rng.choice(rooms), name=rng.choice(names))
            conns.append((chat, conn))
        elif roll < 0.5:
            chat, conn = rng.choice(conns)
            conn.send(type_="join", room=rng.choice(rooms))
        elif roll < 0.62:
            chat, conn = rng.choice(conns)
            conn.send(type_="leave", room=rng.choice(rooms))
        elif roll < 0.74:
            chat, conn = conns.pop(rng.randrange(len(conns)))
            conn.disconnect()
        elif roll < 0.86:
            chat.advance(rng.choice((0.5, 2.0, GRACE + 1)))
        elif roll < 0.93:
            carry(one, two)
            carry(two, one)
        elif roll < 0.98:
            # Another node took this name over: this node hands the user's rooms
            # over (`kicked`), and the other takes them (`handed_over`) once carried.
            other = "n1" if chat is two else "n2"
            chat.state.apply(Kick(chat.state.node, rng.choice(names), other), chat.now)
        else:
            other = "n1" if chat is two else "n2"
            chat.state.apply(NodeGone(other), chat.now)
        for _chat, conn in conns:
            conn.take()
        _names_in_step(one)
        _names_in_step(two)


def test_reload_delivers_what_the_gap_held_in_order():
    """A `Reload` (the backplane could not fill a gap) delivers the stored messages this
    node had not seen, in seq order across rooms, and keeps them as history."""
    chat = Chat(epoch="e1")
    alice = chat.connect()
    alice.join(name="alice")
    alice.join(room="side")
    seen = say_all(chat, alice, 1)
    stored = {
        "lobby": [
            Message("lobby", seen[0]["id"], "alice", "m0", 1),
            Message("lobby", "e1-3", "bob", "x", 2),
        ],
        "side": [Message("side", "e1-2", "bob", "y", 2)],
    }
    chat.state.apply(Reload(Snapshot(epoch="e1", next_seq=4, rooms=stored)), chat.now)
    assert [(f["room"], f["msg"]) for f in alice.take()] == [("side", "y"), ("lobby", "x")]
    alice.send(type_="history", room="lobby")
    assert [m["msg"] for m in alice.one()["messages"]] == ["m0", "x"]


def test_reload_with_a_new_epoch_refuses_says_stored_under_the_old_one():
    """The store lost everything (new epoch): says stored but not yet back are answered
    `unavailable` (never acked), the old history is gone, an old `since` is not recovered."""
    chat = Chat(epoch="e1")
    alice = chat.connect()
    alice.join(name="alice")
    old = say_all(chat, alice, 2)
    alice.send(type_="say", room="lobby", msg="in flight", ref="f")
    pending = chat.pending()
    chat.state.stored(pending, ["e1-3"])
    chat.state.apply(Reload(Snapshot(epoch="e2", next_seq=1, rooms={})), chat.now)
    error = alice.one()
    assert (error["type"], error["code"], error["ref"]) == ("error", "unavailable", "f")
    joined = chat.connect().join(name="bob", since=old[1]["id"])
    assert (joined["history"], joined["recovered"]) == ([], False)


def test_cluster_node_state_replaces_what_is_known_of_that_node():
    """`NodeState` (a node wrote its entries again after an outage) replaces that node's
    entries: a leave for each one gone, a join for each one new, nothing for the rest."""
    one, two = Chat(node="n1"), Chat(node="n2")
    for name in ("alice", "carol"):
        one.connect().join(name=name)
    carry(one, two)
    bob = two.connect()
    bob.join(name="bob")
    entries = [("", "carol"), ("lobby", "carol"), ("", "dave"), ("lobby", "dave")]
    two.state.apply(NodeState("n1", entries), two.now)
    frames = [(f["event"], f["name"]) for f in bob.take()]
    assert frames == [("leave", "alice"), ("join", "dave")]


# --- whispers across nodes (#12) -------------------------------------------------------


def _remote_bob(chat: Chat) -> None:
    """Node B says: bob is connected there (and what this node published so far is sent)."""
    chat.state.apply(MemberState("B", add=[("", "bob"), ("lobby", "bob")], remove=[]), chat.now)
    chat.to_publish.clear()


def _alice_whispers_remote_bob(chat: Chat) -> tuple[Conn, WhisperEvent]:
    """alice (on this node) whispers bob, who is connected on node B; the event sent."""
    alice = chat.connect()
    alice.join(name="alice")
    _remote_bob(chat)
    alice.take()
    alice.send(type_="whisper", to="bob", msg="psst", ref="w1")
    events = [e for e in chat.to_publish if isinstance(e, WhisperEvent)]
    assert len(events) == 1
    return alice, events[0]


def test_whisper_to_another_node_is_acked_only_when_that_node_delivered_it():
    """The sender's copy and ack wait for the home node's answer; a `delivered` answer
    brings both, in that order, with the whisper's id."""
    chat = Chat(node="A")
    alice, event = _alice_whispers_remote_bob(chat)
    assert alice.take() == []
    assert isinstance(event, WhisperEvent)
    assert (event.node, event.to, event.sender) == ("B", "bob", "A")
    chat.state.apply(WhisperResult("A", event.request, delivered=True), chat.now)
    copy, ack = alice.take()
    assert (copy["type"], copy["msg"], ack["type"], ack["ref"]) == ("whisper", "psst", "ack", "w1")
    assert ack["id"] == copy["id"]


def test_whisper_to_another_node_not_delivered_there_is_no_such_user():
    """The home node found no live connection (the user is in its grace period): the
    sender gets no_such_user, and no copy or ack."""
    chat = Chat(node="A")
    alice, event = _alice_whispers_remote_bob(chat)
    chat.state.apply(WhisperResult("A", event.request, delivered=False), chat.now)
    error = alice.error()
    assert (error["code"], error["ref"]) == ("no_such_user", "w1")


def test_whisper_to_another_node_with_no_answer_is_unavailable_after_the_timeout():
    """No answer within the backplane timeout: `unavailable` (it may not have been
    delivered), never an ack; a late answer changes nothing."""
    chat = Chat(node="A")
    alice, event = _alice_whispers_remote_bob(chat)
    assert chat.state.next_deadline() == chat.now + 5.0
    chat.advance(4.9)
    assert alice.take() == []
    chat.advance(0.2)
    error = alice.error()
    assert (error["code"], error["ref"]) == ("unavailable", "w1")
    chat.state.apply(WhisperResult("A", event.request, delivered=True), chat.now)
    assert alice.take() == []


def test_whisper_event_is_answered_by_the_home_node():
    """Node B delivers a whisper for its connected user and answers delivered; for a
    user in its grace period it delivers nothing and answers not delivered."""
    chat = Chat(node="B")
    bob = chat.connect()
    bob.join(name="bob")
    bob.take()
    frame = '{"type":"whisper","id":"x-w1.1","from":"alice","to":"bob","name":"alice","msg":"hi","ts":1}'
    chat.state.apply(WhisperEvent("B", "bob", frame, "A", 7), chat.now)
    assert bob.one()["msg"] == "hi"
    assert chat.to_publish[-1] == WhisperResult("A", 7, delivered=True)
    bob.disconnect()
    chat.state.apply(WhisperEvent("B", "bob", frame, "A", 8), chat.now)
    assert chat.to_publish[-1] == WhisperResult("A", 8, delivered=False, refused="no_such_user")


def test_whisper_to_another_node_matches_by_name_key():
    """A whisper `to` "BOB" for bob, connected on node B, goes to B as to "bob"; B finds
    its user by key whatever form the event names (#18)."""
    chat = Chat(node="A")
    alice = chat.connect()
    alice.join(name="alice")
    _remote_bob(chat)
    alice.take()
    # Cyrillic capitals: folded to "\u0432\u043e\u0432", no look-alike of "bob".
    alice.send(type_="whisper", to="\u0412\u041e\u0412", msg="psst", ref="w1")
    assert alice.error()["code"] == "no_such_user"
    alice.send(type_="whisper", to="BOB", msg="psst", ref="w2")
    (event,) = [e for e in chat.to_publish if isinstance(e, WhisperEvent)]
    assert (event.node, event.to) == ("B", "bob")
    assert json.loads(event.frame)["to"] == "bob"
    home = Chat(node="B")
    bob = home.connect()
    bob.join(name="bob")
    bob.take()
    home.state.apply(WhisperEvent("B", "BOB", event.frame, "A", 1), home.now)
    assert bob.one()["msg"] == "psst"


def test_kick_by_another_node_finds_the_user_by_key_and_hands_over_its_entries():
    """A Kick naming another form of the name still closes the user here, and the
    Handover names the entries as this node published them (#18)."""
    chat = Chat(node="A")
    alice = chat.connect()
    alice.join(name="Alice")
    chat.to_publish.clear()
    chat.state.apply(Kick("A", "alice", "B"), chat.now)
    assert alice.peer.closed[0][0] == 4001
    assert chat.state.users == {}
    (handover,) = chat.to_publish
    assert (handover.name, handover.to, handover.rooms) == ("Alice", "B", ["lobby"])
    assert chat.to_release == ["Alice"]


# --- every check before any state changes (#18) -----------------------------------------


def _observable(chat: Chat) -> tuple:
    """Everything of the chat state another client or node could observe."""
    state = chat.state
    rooms = {
        name: (
            sorted(room.members),
            sorted(room.remote),
            len(room.typed),
            len(room.classic),
            [m.id for m in room.messages],
        )
        for name, room in state.rooms.items()
        if room.members or room.remote or room.typed or room.classic or room.messages
    }
    users = {name: (sorted(u.rooms), bool(u.clients), u.token) for name, u in state.users.items()}
    # (A connection's first frame decides its own mode even when refused, §7.)
    clients = sorted((c.name or "", tuple(sorted(c.rooms))) for c in state.clients)
    return (
        rooms,
        users,
        sorted((key, u.name) for key, u in state._presence._skeletons.items()),
        clients,
        list(chat.to_publish),
        len(chat.to_store),
        list(chat.to_release),
    )


REFUSED_FRAMES = [
    ("join", "carol", {"type_": "join", "room": "lobby", "name": ""}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby"}, "bad_name"),
    ("join", "alice", {"type_": "join", "room": "Not A Room"}, "bad_room"),
    ("join", "alice", {"type_": "join", "room": "third"}, "bad_room"),  # over max_rooms=2
    ("join", "alice", {"type_": "join", "room": "lobby", "name": "bob"}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "alice"}, "name_taken"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "\u0430lice"}, "name_taken"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "ALICE"}, "name_taken"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "aIice"}, "name_taken"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "ali\u200bce"}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "\U000e0041"}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "\ufdd0"}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "Server"}, "bad_name"),
    ("join", "carol", {"type_": "join", "room": "lobby", "name": "\u0301"}, "bad_name"),
    (
        "join",
        "carol",
        {"type_": "join", "room": "lobby", "name": "bob", "token": "x"},
        "name_taken",
    ),
    ("say", "alice", {"type_": "say", "room": "nowhere", "msg": "hi"}, "not_joined"),
    ("say", "carol", {"type_": "say", "room": "lobby", "msg": "hi"}, "not_joined"),
    ("say", "alice", {"type_": "say", "room": "lobby", "msg": "x" * 2001}, "too_long"),
    ("leave", "alice", {"type_": "leave", "room": "nowhere"}, "not_joined"),
    ("leave", "alice", {"type_": "leave", "room": "Bad"}, "bad_room"),
    ("typing", "alice", {"type_": "typing", "room": "nowhere"}, "not_joined"),
    ("whisper", "alice", {"type_": "whisper", "to": "nobody", "msg": "x"}, "no_such_user"),
    ("whisper", "carol", {"type_": "whisper", "to": "bob", "msg": "x"}, "not_joined"),
    ("history", "alice", {"type_": "history", "room": "nowhere"}, "not_joined"),
    ("history", "alice", {"type_": "history", "room": "lobby", "before": "e1-999"}, "bad_frame"),
    ("classic", "dave", {"name": "alice", "msg": "hi"}, "name_taken"),
    ("classic", "dave", {"name": "\u0430lice", "msg": "hi"}, "name_taken"),
    ("classic", "dave", {"name": "system", "msg": "hi"}, "bad_name"),
    ("unknown", "alice", {"type_": "shout", "room": "lobby"}, "bad_frame"),
]


@pytest.mark.parametrize(
    ("kind", "sender", "frame", "code"),
    REFUSED_FRAMES,
    ids=[f"{kind}-{code}-{i}" for i, (kind, _, _, code) in enumerate(REFUSED_FRAMES)],
)
def test_refused_frame_leaves_the_state_untouched(kind, sender, frame, code):
    """A frame that fails a check is answered with its error and changes nothing anyone
    could observe: rooms, members, users, connections, what is published or stored."""
    chat = Chat(max_rooms=2)
    conns = {name: chat.connect() for name in ("alice", "bob", "carol")}
    conns["dave"] = chat.connect(listener=True)
    conns["alice"].join(name="alice")
    conns["alice"].join("second")
    conns["bob"].join(name="bob")
    say_all(chat, conns["alice"], 2)
    chat.to_publish.clear()
    for conn in conns.values():
        conn.take()
    before = _observable(chat)
    conns[sender].send(**frame)
    error = conns[sender].error()
    assert error["code"] == code
    assert _observable(chat) == before
    for name, conn in conns.items():
        if name != sender:
            assert conn.take() == [], name


def test_refused_membership_change_leaves_the_state_untouched():
    """A join or leave refused by the membership bucket changes nothing."""
    chat = Chat(rate=1, burst=5)
    alice, bob = chat.connect(), chat.connect()
    alice.join(name="alice")
    bob.join(name="bob")
    for i in range(31):  # the membership burst of 32, less alice's first join
        alice.send(type_="join" if i % 2 else "leave", room="lobby")
    alice.send(type_="leave", room="lobby")  # the 32nd change: bucket empty
    for conn in (alice, bob):
        conn.take()
    chat.to_publish.clear()
    before = _observable(chat)
    alice.send(type_="join", room="lobby")
    assert alice.error()["code"] == "rate_limited"
    assert _observable(chat) == before
    assert bob.take() == []


def test_whispers_one_user_receives_are_bounded_whoever_sends_them():
    """A crowd of senders, each within its own rate limit, cannot bury one user: past
    the recipient's bound (burst 20, then 10/s) senders get `rate_limited` (#18)."""
    chat = Chat(rate=10, burst=20)
    bob = chat.connect()
    bob.join(name="bob")
    senders = [chat.connect() for _ in range(30)]
    for i, sender in enumerate(senders):
        sender.join(name=f"s{i}")
    bob.take()
    for sender in senders:
        sender.take()
        sender.send(type_="whisper", to="bob", msg="hi", ref="w")
    answers = [sender.take()[-1] for sender in senders]
    assert [a["type"] for a in answers] == ["ack"] * 20 + ["error"] * 10
    assert {a["code"] for a in answers[20:]} == {"rate_limited"}
    assert sum(f["type"] == "whisper" for f in bob.take()) == 20
    chat.advance(1.0)
    senders[0].send(type_="whisper", to="bob", msg="later", ref="w2")
    assert senders[0].take()[-1]["type"] == "ack"


def test_whisper_event_for_a_buried_user_is_refused_rate_limited():
    """Across nodes the home node applies the same bound and answers `rate_limited`."""
    chat = Chat(node="B")
    bob = chat.connect()
    bob.join(name="bob")
    frame = '{"type":"whisper","id":"x-w1.1","from":"a","to":"bob","name":"a","msg":"hi","ts":1}'
    for request in range(1, 22):
        chat.state.apply(WhisperEvent("B", "bob", frame, "A", request), chat.now)
    assert chat.to_publish[-1] == WhisperResult("A", 21, delivered=False, refused="rate_limited")
    alice_side = Chat(node="A")
    alice, event = _alice_whispers_remote_bob(alice_side)
    alice_side.state.apply(
        WhisperResult("A", event.request, delivered=False, refused="rate_limited"),
        alice_side.now,
    )
    assert (alice.error()["code"]) == "rate_limited"


# --- reply budget (#18: history and re-joins are charged by the size of their replies) ---


def _big_room(count: int = 200, chars: int = 2000) -> dict[str, list[Message]]:
    return {
        "lobby": [
            Message("lobby", f"e1-{seq}", "writer", "x" * chars, WALL_MS)
            for seq in range(1, count + 1)
        ]
    }


def test_history_is_charged_by_reply_size_and_refused_in_debt(chat):
    """Pages of ~410 KB after a join's ~205 KB replay: the 1 MiB burst lets three
    through (the last one into debt); then rate_limited until 256 KiB a second has
    paid the debt off."""
    big = Chat(rate=10, history=_big_room())
    alice = big.connect()
    alice.join(name="alice")  # (its replay of 100 messages is charged too)
    kinds = []
    for n in range(4):
        alice.send(type_="history", room="lobby", limit=200, ref=f"h{n}")
        frame = alice.one()
        kinds.append(frame["type"] if frame["type"] != "error" else frame["code"])
    # 1 MiB - 205 KB (the join) - 3 x 410 KB: the third goes into debt.
    assert kinds == ["history", "history", "history", "rate_limited"]
    assert big.state.rate_limited == 1
    big.advance(1.0)  # 256 KiB back: still in debt
    alice.send(type_="history", room="lobby", limit=200, ref="soon")
    assert alice.error()["code"] == "rate_limited"
    big.advance(1.0)  # out of debt
    alice.send(type_="history", room="lobby", limit=200, ref="later")
    assert alice.one()["type"] == "history"


def test_join_replay_is_charged_and_a_rejoin_in_debt_is_refused():
    big = Chat(rate=10, history=_big_room())
    alice = big.connect()
    alice.join(name="alice")
    alice.send(type_="history", room="lobby", limit=200)
    alice.send(type_="history", room="lobby", limit=200)
    alice.take()
    alice.send(type_="join", room="lobby", ref="again")  # a replay of 100 messages
    assert alice.one()["type"] == "joined"  # (not in debt yet: charged after)
    alice.send(type_="join", room="dev", ref="j2")
    error = alice.error()
    assert (error["code"], error["ref"]) == ("rate_limited", "j2")
    assert "dev" not in big.state.rooms or not big.state.rooms["dev"].members


def test_reply_budget_is_off_with_rate_zero():
    big = Chat(rate=0, history=_big_room())
    alice = big.connect()
    alice.join(name="alice")
    for _ in range(10):
        alice.send(type_="history", room="lobby", limit=200)
        assert alice.one()["type"] == "history"


def test_address_budget_is_shared_by_its_connections():
    """Five connections' worth per address: six connections, each within its own burst,
    together find the shared bucket empty (#18: a crowd from one address is one budget)."""
    from triochat.ratelimit import ADDRESS_SCALE

    now = 0.0
    shared = RateLimiter(10, 20, now, scale=ADDRESS_SCALE)
    crowd = [RateLimiter(10, 20, now, shared=shared) for _ in range(6)]
    allowed = sum(limiter.allow(now) for limiter in crowd for _ in range(20))
    assert allowed == 100
    alone = RateLimiter(10, 20, now)
    assert sum(alone.allow(now) for _ in range(20)) == 20
    # Membership changes too: 32 x 5 per address.
    joins = sum(limiter.allow_membership(now) for limiter in crowd for _ in range(32))
    assert joins == 160
