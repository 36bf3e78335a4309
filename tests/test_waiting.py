"""A room's frames that wait, held once per room and round (`triochat.waiting`).

Presence and typing frames are added once to the room's `WaitingRun`, which
every typed subscriber shares, instead of being delivered to each member
(#16). These tests check what docs/protocol.md §6 promises still holds on
real sockets: every member gets every frame produced while it was
subscribed, none produced before it came or after it left, in the order
produced across rooms, with a frame that cannot wait taking them along, and
within a round of the schedule.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.lowlevel

from triochat.config import Config
from triochat.frames import OutFrame
from triochat.metrics import Stats
from triochat.outbound import Outbound
from triochat.outbox import SOON, FlushSchedule
from triochat.protocol import CloseCode, PresenceFrame, TypingFrame
from triochat.ratelimit import RateLimiter
from triochat.state.model import Client, Room
from triochat.state.output import OutputBuffer
from triochat.state.rooms import Rooms
from triochat.transports.websocket import ReplayStream, WebSocketTransport
from triochat.waiting import Share, WaitingRun, take_shared


class Member:
    """A typed client whose `Outbound` writes to a real socket pair."""

    def __init__(self, schedule: FlushSchedule, config: Config | None = None) -> None:
        self.ours, self.theirs = trio.socket.socketpair()
        transport = WebSocketTransport(None, ReplayStream(trio.SocketStream(self.ours), b""))
        self.out = Outbound(transport, schedule, config or Config(), Stats())
        self.client = Client(self.out, RateLimiter(10, 10, 0.0))
        self.client.mode = "typed"

    async def received(self) -> bytes:
        """What reached the other end of the socket so far."""
        data = b""
        while True:
            with trio.move_on_after(0.02):
                chunk = await self.theirs.recv(65536)
                data += chunk
                continue
            return data

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def presence(room: str, name: str) -> PresenceFrame:
    return PresenceFrame(room, "join", name)


def ws(*frames: PresenceFrame | TypingFrame) -> bytes:
    """The bytes those frames are written as."""
    return b"".join(OutFrame.of(frame).ws for frame in frames)


def setup(*rooms: str) -> tuple[FlushSchedule, Rooms, dict[str, Room]]:
    schedule = FlushSchedule()
    state = Rooms(OutputBuffer("n1"))
    return schedule, state, {name: state.room(name) for name in rooms}


def test_take_shared_merges_runs_in_the_order_produced() -> None:
    first, second = WaitingRun(), WaitingRun()
    a1, b1, a2, b2 = (OutFrame(f'"{n}"'.encode()) for n in ("a1", "b1", "a2", "b2"))
    shares = [Share(first), Share(second)]
    first.add(a1)
    second.add(b1)
    first.add(a2)
    frames, size = take_shared(shares)
    assert frames == [a1, b1, a2]
    assert size == len(a1.ws) + len(b1.ws) + len(a2.ws)
    second.add(b2)
    assert take_shared(shares) == ([b2], len(b2.ws))  # each share starts after what it took
    assert take_shared(shares) == ([], 0)
    late = Share(first)  # a share starts where the run is
    assert take_shared([late]) == ([], 0)
    first.add(a2)
    first.close()  # (a share kept past its run's close takes nothing)
    assert take_shared(shares) == ([], 0)


async def test_a_rooms_waiting_frames_reach_every_member_once_at_the_rounds_end() -> None:
    schedule, rooms, room = setup("a")
    members = [Member(schedule) for _ in range(3)]
    for member in members:
        rooms.subscribe(room["a"], member.client)
    frames = [presence("a", f"u{i}") for i in range(5)]
    for frame in frames:
        rooms.to_typed(room["a"], frame)
    run = room["a"].waiting
    assert run is not None
    assert len(run.frames) == 5  # held once, not once per member
    schedule.end_step(100.0)
    for member in members:
        assert await member.received() == b"", "they may wait"
    schedule.end_step(100.0 + SOON)  # the round ends: one write each
    for member in members:
        assert await member.received() == ws(*frames)
    assert not run.open
    assert run.frames == [], "a closed run keeps nothing"
    rooms.to_typed(room["a"], presence("a", "late"))  # a new round, a new run
    assert room["a"].waiting is not run
    schedule.end_step(200.0)
    schedule.end_step(200.0 + SOON)
    for member in members:
        assert await member.received() == ws(presence("a", "late"))
        member.close()


async def test_frames_from_several_rooms_keep_the_order_produced_and_go_before_a_message() -> None:
    schedule, rooms, room = setup("a", "b")
    both, only_a = Member(schedule), Member(schedule)
    for name in ("a", "b"):
        rooms.subscribe(room[name], both.client)
    rooms.subscribe(room["a"], only_a.client)
    a1, b1, a2 = presence("a", "x"), presence("b", "x"), presence("a", "y")
    rooms.to_typed(room["a"], a1)
    rooms.to_typed(room["b"], b1)
    rooms.to_typed(room["a"], a2)
    message = OutFrame(b'{"type":"message"}')
    both.out.deliver(message)  # cannot wait: takes what waits along, ahead of it
    schedule.end_step(100.0)
    assert await both.received() == ws(a1, b1, a2) + message.ws
    assert await only_a.received() == b""
    schedule.end_step(100.0 + SOON)
    assert await only_a.received() == ws(a1, a2)
    assert await both.received() == b"", "nothing twice"
    both.close()
    only_a.close()


async def test_a_member_gets_only_what_the_room_produced_while_it_was_subscribed() -> None:
    schedule, rooms, room = setup("a")
    stays, comes, goes = Member(schedule), Member(schedule), Member(schedule)
    rooms.subscribe(room["a"], stays.client)
    rooms.subscribe(room["a"], goes.client)
    before, during, after = presence("a", "1"), presence("a", "2"), presence("a", "3")
    rooms.to_typed(room["a"], before)
    rooms.subscribe(room["a"], comes.client)
    rooms.to_typed(room["a"], during)
    rooms.unsubscribe(room["a"], goes.client)
    rooms.to_typed(room["a"], after)
    schedule.end_step(100.0)
    schedule.end_step(100.0 + SOON)
    assert await stays.received() == ws(before, during, after)
    assert await comes.received() == ws(during, after)
    assert await goes.received() == ws(before, during)
    for member in (stays, comes, goes):
        member.close()


async def test_the_skipped_member_misses_that_frame_only() -> None:
    """A typing frame is not echoed to the typist, who still gets the room's
    other frames of the round, in order."""
    schedule, rooms, room = setup("a")
    typist, other = Member(schedule), Member(schedule)
    for member in (typist, other):
        rooms.subscribe(room["a"], member.client)
    first, typing, last = presence("a", "1"), TypingFrame("a", "typist"), presence("a", "2")
    rooms.to_typed(room["a"], first)
    rooms.to_typed(room["a"], typing, skip=typist.client)
    rooms.to_typed(room["a"], last)
    schedule.end_step(100.0)
    schedule.end_step(100.0 + SOON)
    assert await typist.received() == ws(first, last)
    assert await other.received() == ws(first, typing, last)
    typist.close()
    other.close()


def test_a_room_with_no_typed_subscriber_keeps_no_run() -> None:
    _, rooms, room = setup("a")
    rooms.to_typed(room["a"], presence("a", "x"))
    assert room["a"].waiting is None


async def test_a_closing_member_takes_what_was_produced_before_its_close_only() -> None:
    schedule, rooms, room = setup("a")
    member = Member(schedule)
    rooms.subscribe(room["a"], member.client)
    before = presence("a", "1")
    rooms.to_typed(room["a"], before)
    member.out.close_soon(CloseCode.GOING_AWAY, "bye")
    rooms.to_typed(room["a"], presence("a", "2"))
    queued = member.out.outbox.take_all()  # (its writer, not started here, sends them)
    assert b"".join(frame.ws for frame in queued) == ws(before)
    member.close()


async def test_shares_past_the_hard_bound_make_a_held_member_a_slow_consumer() -> None:
    """Frames that wait count against a member's backlog once taken: a member
    whose writes are held (its join not yet seen by the cluster) and whose
    shares grow past the hard bound is closed 1013, like one whose outbox did."""
    config = Config(outbox_bytes=1024)
    schedule, rooms, room = setup("a")
    held, fine = Member(schedule, config), Member(schedule, config)
    for member in (held, fine):
        rooms.subscribe(room["a"], member.client)
    held.out.hold()
    for i in range(200):
        rooms.to_typed(room["a"], presence("a", f"user-{i:04d}"))
    schedule.end_step(100.0)
    schedule.end_step(100.0 + SOON)
    assert held.out.close_request == (CloseCode.TRY_AGAIN_LATER, "slow consumer")
    assert fine.out.close_request is None
    held.close()
    fine.close()


# --- a model check: random operations against what each member must get ---------


class _Tasks:
    """A `TaskGroup` for an Outbound's writer: the test's nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.cancel_scope = self  # (ending a connection is not modelled)

    def cancel(self) -> None:
        """Nothing to end."""

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], /) -> None:
        self._nursery.start_soon(async_fn)


class _Transport:
    """Records what is written; only its writer task writes (like SSE)."""

    heartbeat = None

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.got: list[bytes] = []
        self._busy = False

    async def send(self, frames: list[OutFrame]) -> None:
        self._busy = True
        for _ in range(self.rng.randint(0, 2)):
            await trio.lowlevel.checkpoint()
        self.got += [frame.json for frame in frames]
        self._busy = False

    async def ping(self) -> None:
        """(No keepalive here.)"""

    async def close(self, code: int, reason: str) -> None:
        """(The close frame is not what is checked.)"""


class _DirectTransport(_Transport):
    """A `_Transport` with a direct write (a `DirectWrite`), which refuses at
    random (a full socket) and while a write is under way."""

    def send_nowait(self, frames: list[OutFrame]) -> bytes | None:
        if self._busy or self.rng.random() < 0.3:
            return None
        self.got += [frame.json for frame in frames]
        return b""

    async def send_rest(self, data: bytes) -> None:
        """(Every direct write here is whole.)"""

    @property
    def write_closed(self) -> bool:
        return False

    def ping_nowait(self) -> bytes | None:
        return None


class _Model:
    """A member and what it must receive: every frame produced for a room
    while it was subscribed and not closed, in the order produced."""

    def __init__(self, out: Outbound, transport: _Transport) -> None:
        self.out = out
        self.transport = transport
        self.client = Client(out, RateLimiter(10, 10, 0.0))
        self.client.mode = "typed"
        self.rooms: set[str] = set()
        self.expected: list[bytes] = []
        self.held = False

    @property
    def closed(self) -> bool:
        return self.out.close_request is not None


@pytest.mark.parametrize("outbox_bytes", [1 << 30, 600])  # (600: slow consumers too)
@pytest.mark.parametrize("seed", range(40))
async def test_random_operations_give_each_member_exactly_its_frames_in_order(
    seed: int, outbox_bytes: int
) -> None:
    rng = random.Random(seed)
    schedule, rooms, room = setup("a", "b", "c")
    config = Config(outbox_bytes=outbox_bytes, outbox_frames=1 << 30)
    produced = 0
    now = 100.0
    async with trio.open_nursery() as nursery:
        members: list[_Model] = []
        for index in range(6):
            transport = (_DirectTransport if index % 2 else _Transport)(rng)
            out = Outbound(transport, schedule, config, Stats())  # type: ignore[arg-type]
            out.start(_Tasks(nursery))
            members.append(_Model(out, transport))

        def produce(name: str, member: _Model, *, waits: bool, skip: bool) -> None:
            nonlocal produced
            produced += 1
            if waits:
                frame = TypingFrame(name, f"{produced}") if skip else presence(name, f"{produced}")
                out = OutFrame.of(frame)
            else:
                out = OutFrame(json.dumps({"type": "message", "n": produced}).encode())
            for model in members:
                if name in model.rooms and not model.closed and not (skip and model is member):
                    model.expected.append(out.json)
            if waits:
                rooms.to_typed(room[name], frame, skip=member.client if skip else None)
            else:
                rooms.broadcast(room[name], out)

        for _ in range(400):
            op = rng.random()
            member = rng.choice(members)
            name = rng.choice(list(room))
            if op < 0.15:
                if name not in member.rooms and not member.closed:
                    member.rooms.add(name)
                    member.client.rooms.add(name)
                    rooms.subscribe(room[name], member.client)
            elif op < 0.25:
                if name in member.rooms:
                    member.rooms.discard(name)
                    member.client.rooms.discard(name)
                    rooms.unsubscribe(room[name], member.client)
            elif op < 0.55:
                produce(name, member, waits=True, skip=rng.random() < 0.3)
            elif op < 0.68:
                produce(name, member, waits=False, skip=False)
            elif op < 0.72:
                if not member.held:
                    member.held = True
                    member.out.hold()
            elif op < 0.78:
                if member.held:
                    member.held = False
                    member.out.release()
            elif op < 0.79:
                member.out.close_soon(CloseCode.GOING_AWAY, "bye")
                if rng.random() < 0.5:  # replaced: out of its rooms too
                    rooms.drop(member.client)
                    member.rooms = set()
                    member.client.gone = False
            elif op < 0.92:
                now += rng.choice([0.0, 0.01, 0.03, SOON])
                schedule.end_step(now)
            else:
                for _ in range(rng.randint(1, 4)):
                    await trio.lowlevel.checkpoint()
        for member in members:
            if member.held:
                member.out.release()
        for _ in range(5):
            now += SOON
            schedule.end_step(now)
            for _ in range(20):
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    for index, member in enumerate(members):
        got = member.transport.got
        if member.out.close_request == (CloseCode.TRY_AGAIN_LATER, "slow consumer"):
            # Its queue was dropped: what it got is in order, and nothing twice.
            expected = iter(member.expected)
            assert all(frame in expected for frame in got), index
            assert len(set(got)) == len(got), index
        else:
            assert got == member.expected, index
