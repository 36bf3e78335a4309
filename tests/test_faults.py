"""Fault injection: what the server guarantees when the world misbehaves.

Each test names one scenario and states its guarantee in its docstring.
They run in virtual time on an in-memory network (``autojump_clock``)
wherever possible; the few that need real sockets, threads or processes
use real time under a ``trio.fail_after`` guard. The toolkit is
tests/faults.py; docs/reliability.md maps scenarios to tests.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from triochat import Server
from triochat.connection import Connection

from .faults import (
    FaultyNet,
    handshake_request,
    live_instances,
    open_faulty_server,
    task_count,
)

GRACE = 5.0  # the default presence grace period, seconds


async def _quiesce(server: Server, seconds: float = GRACE + 1) -> None:
    """Let ``seconds`` of virtual time pass, then let the hub apply everything."""
    await trio.sleep(seconds)
    await server.hub.settle()
    await trio.testing.wait_all_tasks_blocked()


def _assert_only(server: Server, members: set[str], tasks: int) -> None:
    """Nothing but ``members``' connections is left: no task, member, subscription or object."""
    chat = server.hub.chat
    assert len(server.connections) == len(members)
    assert len(chat.clients) == len(members)
    assert set(chat.users) == members
    lobby = chat.rooms.get("lobby")
    if members:
        assert lobby is not None
        assert set(lobby.members) == members
        assert {client.name for client in lobby.typed} == members
        assert not lobby.listeners
    else:
        assert lobby is None or not (lobby.members or lobby.typed or lobby.listeners)
    assert task_count() == tasks, "a task was left behind"
    assert len(live_instances(Connection)) == len(members), "a Connection is still referenced"


@pytest.mark.parametrize("how", ["eof", "reset"])
@pytest.mark.parametrize("cut_at", [1, 4, 9], ids=["in-header", "in-mask", "in-payload"])
async def test_fault_client_vanishing_mid_frame_leaves_nothing_behind(autojump_clock, cut_at, how):
    """A client that dies halfway through a frame (FIN or reset) leaves no task, member, subscription or object behind."""
    async with open_faulty_server() as net:
        net: FaultyNet
        async with net.client() as (observer, _):
            await observer.join("lobby", "observer")
            await _quiesce(net.server, 0)
            tasks = task_count()
            async with net.client() as (victim, link):
                await victim.join("lobby", "victim")
                await observer.expect("presence", event="join", name="victim")
                if how == "reset":
                    link.server.reset()
                link.client.cut_after(cut_at)
                with pytest.raises(ConnectionClosed):
                    await victim.say("this frame never arrives whole")
            await observer.expect("presence", event="leave", name="victim")
            await _quiesce(net.server)
            _assert_only(net.server, {"observer"}, tasks)
            await observer.say("still here")
            await observer.expect("message", msg="still here")
