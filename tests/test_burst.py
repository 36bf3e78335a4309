"""A burst is not a slow consumer, in virtual time (#12 defect 4, gap 3).

The same rules as tests/test_backlog.py, on an in-memory network under
``autojump_clock``: no real socket buffer or real time decides the outcome.
The clients' streams are lockstep (no buffer at all), so a write completes
only as fast as the client reads it (docs/protocol.md section 9).
"""

from __future__ import annotations

import trio

from triochat.hub import STORE_BATCH

from .chatclient import ChatClient
from .conftest import memory_server
from .test_backlog import GatedHistory

BYTES = 65536  # --outbox-bytes: four times that is 256 KiB
FRAMES = 16  # --outbox-frames: the reader waits while over 8
BODY = 1024  # a message of 1 KiB: a store batch of them is over 512 KiB
FLOOD = 300  # says sent as fast as possible, read back at a frame per ms
READ_PAUSE = 0.001


def _text(n: int) -> str:
    return f"{n:04d}".ljust(BODY, "x")


async def _read_texts(client: ChatClient, count: int, pause: float = 0) -> list[str]:
    """The heads of the next ``count`` messages; ``pause`` seconds after every frame."""
    seen: list[str] = []
    while len(seen) < count:
        frame = await client.recv()
        if frame["type"] == "message":
            seen.append(frame["msg"][:4])
        if pause:
            await trio.sleep(pause)
    return seen


async def test_burst_full_speed_reader_is_not_closed_and_a_reading_flooder_is_slowed(
    autojump_clock,
):
    """A store batch of 512 messages (over four times --outbox-bytes) reaches a member
    and the sender in one hub step: both read at full speed, so both get all of it and
    neither is closed. Then the sender floods 300 more says while reading one frame per
    millisecond: its reader is held back by its own backlog (the flood takes as long as
    its reading does), and it is not closed either."""
    history = GatedHistory(1000)
    async with (
        memory_server(
            history=history, rate=0, outbox_bytes=BYTES, outbox_frames=FRAMES, max_msg_chars=BODY
        ) as net,
        net.client(lockstep=True) as reader,
        net.client(lockstep=True) as flooder,
    ):
        server = net.server
        await reader.join("lobby", "reader")
        await flooder.join("lobby", "flooder")
        await reader.expect("presence", name="flooder", event="join")
        # One say takes the store's first append, which waits; the batch piles up.
        await flooder.say(_text(0))
        await history.entered.wait()
        burst = [_text(n)[:4] for n in range(STORE_BATCH + 1)]
        for n in range(1, STORE_BATCH + 1):
            await flooder.say(_text(n))
        await flooder.send({"type": "history", "room": "lobby", "limit": 1})
        await flooder.expect("history")  # the hub has taken every say
        async with trio.open_nursery() as nursery:
            got: dict[str, list[str]] = {}

            async def collect(name: str, client: ChatClient) -> None:
                got[name] = await _read_texts(client, len(burst))

            nursery.start_soon(collect, "reader", reader)
            nursery.start_soon(collect, "flooder", flooder)
            history.gate.set()
        assert history.batches == [1, STORE_BATCH]
        assert got == {"reader": burst, "flooder": burst}
        assert server.stats.slow_consumers == 0

        # The flood: the flooder sends as fast as the server takes its says, and
        # reads one frame (a message, an ack) per millisecond; the member reads
        # at full speed.
        flood = [_text(n)[:4] for n in range(STORE_BATCH + 1, STORE_BATCH + 1 + FLOOD)]
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def read(name: str, client: ChatClient, pause: float) -> None:
                got[name] = await _read_texts(client, FLOOD, pause)

            nursery.start_soon(read, "flooder", flooder, READ_PAUSE)
            nursery.start_soon(read, "reader", reader, 0)
            for n in range(STORE_BATCH + 1, STORE_BATCH + 1 + FLOOD):
                await flooder.say(_text(n))
            sent = trio.current_time() - started
        assert got == {"reader": flood, "flooder": flood}
        assert server.stats.slow_consumers == 0
        assert 1013 not in server.stats.closes_by_code
        # Held back by its own backlog: it read 2 x FLOOD frames at a millisecond
        # each; its bounds, the write in progress and the says on their way to
        # the store let about half of them wait (0.27 s, run after run), so the
        # flood took at least a quarter of its reading time. (Without the wait,
        # it is closed 1013.)
        assert sent >= FLOOD * READ_PAUSE / 2, sent
