from __future__ import annotations

import trio

from .conftest import client_of, memory_server


async def test_e2e_two_clients_chat(server):
    """Two clients on real sockets join, see each other and chat."""
    with trio.fail_after(10):
        async with client_of(server) as alice, client_of(server) as bob:
            joined = await alice.join("lobby", "alice")
            assert joined["members"] == ["alice"]
            joined = await bob.join("lobby", "bob")
            assert joined["members"] == ["alice", "bob"]
            await alice.expect("presence", event="join", name="bob")
            await alice.say("hello", ref="r1")
            message = await alice.expect("message", name="alice", msg="hello")
            await alice.expect("ack", ref="r1", id=message["id"])
            await bob.expect("message", id=message["id"])


async def test_memory_server_runs_in_virtual_time(autojump_clock):
    """The in-memory network carries a chat under the mock clock."""
    async with memory_server() as net, net.client() as alice:
        await alice.join("lobby", "alice")
        await trio.sleep(3600)  # virtual: pings pass, the connection stays
        await alice.say("still here")
        await alice.expect("message", msg="still here")
