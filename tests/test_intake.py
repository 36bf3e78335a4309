"""`Intake`: how a connection's frames reach the dispatcher (src/triochat/intake.py).

A frame that is not a message, for a dispatcher that waits, is handed over
without a task switch (#16: churn); a message always goes with the yield of
a `send`, so a flood of them reaches the dispatcher one per turn (what keeps
a full-speed reader within its bounds: tests/test_backlog.py).
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from triochat.budgets import AddressBudgets
from triochat.config import Config
from triochat.inbound import Inbound
from triochat.intake import Intake
from triochat.protocol import Join

JOIN = '{"type":"join","room":"lobby","name":"alice"}'
SAY = '{"type":"say","room":"lobby","msg":"hi"}'


def intake_of(send: trio.MemorySendChannel[Inbound]) -> Intake:
    config = Config()
    return Intake(config, send, AddressBudgets(config), authenticate=None, on_say=None)


async def test_intake_hands_a_join_to_a_waiting_dispatcher_without_a_checkpoint() -> None:
    send, receive = trio.open_memory_channel[Inbound](16)
    intake = intake_of(send)
    client: Any = object()
    got: list[Inbound] = []

    async def dispatcher() -> None:
        got.append(await receive.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_no_checkpoints():
            await intake.receive(client, JOIN)
    assert len(got) == 1
    sender, frame = got[0]  # type: ignore[misc]
    assert sender is client
    assert isinstance(frame, Join)


async def test_intake_sends_a_message_and_any_frame_to_a_busy_dispatcher_with_a_yield() -> None:
    send, receive = trio.open_memory_channel[Inbound](16)
    intake = intake_of(send)
    client: Any = object()

    async def dispatcher() -> None:
        await receive.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_checkpoints():
            await intake.receive(client, SAY)  # the dispatcher waits, but a say yields
    with trio.testing.assert_checkpoints():
        await intake.receive(client, JOIN)  # nobody waits: queued, with the yield
    _, frame = receive.receive_nowait()  # type: ignore[misc]
    assert isinstance(frame, Join)
