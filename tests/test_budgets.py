"""The budgets of docs/protocol.md §9 against a real server on real sockets (#18):
history replies charged by size, and one budget per client address."""

from __future__ import annotations

import contextlib

import trio
from trio_websocket import ConnectionClosed

from .conftest import client_of, running_server

BIG = "x" * 8000  # an 8 KB message: 200 of them make a 1.6 MB history page


async def test_budget_history_amplification_is_refused_not_queued():
    """The attack of #18: a client asks 60 times for a page of 200 messages of 8 KB
    without reading. The server encodes at most the reply budget (1 MiB burst, then
    256 KiB/s) and answers the rest rate_limited; a fresh client chats throughout."""
    with trio.fail_after(60):
        async with (
            running_server(rate=1000, burst=1000, max_msg_chars=8000) as server,
            client_of(server) as writer,
        ):
            await writer.join("lobby", "writer")
            for n in range(200):
                await writer.say(BIG, ref=f"w{n}")
            acks = 0
            while acks < 200:
                acks += (await writer.recv())["type"] == "ack"
            async with client_of(server, max_message_size=1 << 22) as attacker:
                await attacker.send({"type": "join", "room": "lobby", "name": "attacker"})
                for n in range(60):
                    await attacker.send(
                        {"type": "history", "room": "lobby", "limit": 200, "ref": f"h{n}"}
                    )
                # 1 MiB burst, 800 KB (100 messages) for the join: one 1.6 MB page
                # goes into debt, and the other 59 are refused, not encoded.
                for _ in range(2000):  # (bounded by the fail_after too)
                    if server.hub.chat.rate_limited >= 59:
                        break
                    await trio.sleep(0.01)
                async with client_of(server) as fresh:
                    await fresh.join("lobby", "fresh")
                    await fresh.say("still here", ref="f1")
                    while (await fresh.recv()).get("ref") != "f1":
                        pass
                # It never read: over the byte bound, it is closed as a slow consumer,
                # or (if the socket took it all) it reads one page and the refusals.
                kinds: list[str] = []
                try:
                    while len(kinds) < 61:
                        frame = await attacker.recv()
                        if frame["type"] in ("joined", "history", "error"):
                            kinds.append(frame.get("code", frame["type"]))
                except ConnectionClosed as closed:
                    assert closed.reason.code == 1013, closed.reason
                else:
                    assert kinds.count("history") == 1, kinds
            assert server.hub.chat.rate_limited == 59


async def test_budget_one_address_shares_five_connections_worth():
    """Six connections from 127.0.0.1, each within its own burst of 20 says: together
    over the address's 100, so some are rate_limited (#18 "a crowd from one address")."""
    with trio.fail_after(30):
        async with running_server(rate=0.001, burst=20) as server:
            async with contextlib.AsyncExitStack() as stack:
                crowd = [await stack.enter_async_context(client_of(server)) for _ in range(6)]
                for n, client in enumerate(crowd):
                    await client.join("lobby", f"c{n}")
                for n, client in enumerate(crowd):
                    for m in range(20):
                        await client.say(f"{n}-{m}", ref=f"{n}-{m}")
                refused = 0
                for client in crowd:
                    answered = 0
                    while answered < 20:
                        frame = await client.recv()
                        if frame["type"] == "ack":
                            answered += 1
                        elif frame["type"] == "error":
                            assert frame["code"] == "rate_limited", frame
                            answered += 1
                            refused += 1
            assert refused == 6 * 20 - 100
