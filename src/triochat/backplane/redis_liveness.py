"""Heartbeats and node liveness in Redis.

Each node keeps a key ``node:<node>`` that expires after 2/3 of
``--node-timeout`` and renews it four times per timeout (`Liveness.run`); it
is listed in the set ``nodes``. A node whose key has expired is gone for
good: the first node to notice removes it and its ``state:<node>`` set and
delivers `NodeGone` (its users leave everywhere); every other node delivers
`NodeGone` when the node drops out of the set. A node that finds its own key
expired (a stalled process) reconnects, which rewrites its users. A node
that stops in order says goodbye (`Liveness.goodbye`).

After this node *re*connects, a node listed in ``nodes`` or last seen alive
whose heartbeat is missing is not gone yet: Redis may have been down or
restarted for it too, and it beats again when its own reconnect succeeds.
It is *waited for* (`wait_after_reconnect`: one node timeout, and at least
its longest pause between reconnects and a reconcile) from the reconnect
(its users stay), then gone as any other (docs/protocol.md §14). At
start-up nothing is waited for: a node that is not beating then died before.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec
import trio

from ..config import Config
from ..events import NodeGone
from .redis_inbox import Inbox
from .redis_link import (
    BACKOFF,
    CHANNEL,
    COMMAND_TIMEOUT,
    FAILURES,
    LOGGER,
    PREFIX,
    Reconnect,
    RedisLink,
)

__all__ = ["Liveness", "wait_after_reconnect"]

_ENCODER: Final = msgspec.json.Encoder()


def wait_after_reconnect(config: Config) -> float:
    """How long a reconnected node waits for another to beat again, seconds."""
    return max(config.node_timeout, BACKOFF[1] + config.backplane_timeout)


class Liveness:
    """This node's heartbeat, and which other nodes are alive."""

    __slots__ = ("_alive", "_inbox", "_link", "_reconciled", "_wait_until")

    def __init__(self, link: RedisLink, inbox: Inbox) -> None:
        self._link = link
        self._inbox = inbox
        #: The other nodes whose heartbeat was current when last looked at, and
        #: those waited for after a reconnect.
        self._alive: set[str] = set()
        #: Until when a node with no heartbeat is waited for (`subscribed`).
        self._wait_until = -math.inf
        self._reconciled = False

    def subscribed(self) -> None:
        """This node has subscribed and is about to reconcile. After the first time
        (a reconnect), the other nodes get `wait_after_reconnect` to beat again
        before they count as gone."""
        if self._reconciled:
            self._wait_until = trio.current_time() + wait_after_reconnect(self._link.config)
        self._reconciled = True

    def node_alive(self, node: str) -> bool:
        return node == self._link.node or node in self._alive

    async def run(self) -> None:
        """Beat, and look for dead nodes, four times per node timeout."""
        link = self._link
        period = link.config.node_timeout / 4
        while True:
            await trio.sleep(period)
            if not link.available:
                continue
            try:
                with trio.fail_after(COMMAND_TIMEOUT):
                    if not await link.client.exists([PREFIX + "node:" + link.node]):
                        # Our heartbeat ran out (a stalled process?): the others
                        # dropped our users. Reconnect, which rewrites them.
                        raise Reconnect("this node's heartbeat had expired")
                    await self.beat()
                    await self.live_nodes()
            except (*FAILURES, Reconnect) as exc:
                link.failed(exc)

    async def beat(self) -> None:
        link = self._link
        ttl_ms = int(link.config.node_timeout * 2000 / 3)
        await link.client.set(PREFIX + "node:" + link.node, b"1", px=ttl_ms)
        await link.client.sadd(PREFIX + "nodes", [link.node])

    async def live_nodes(self) -> tuple[set[str], set[str]]:
        """The nodes whose heartbeat is current, and those waited for (`subscribed`);
        the others are gone for good."""
        redis = self._link.client
        me = self._link.node
        known = {n.decode() for n in await redis.smembers(PREFIX + "nodes")}
        waiting = known | self._alive if trio.current_time() < self._wait_until else set()
        alive = {me}
        for node in sorted(known - {me}):
            if await redis.exists([PREFIX + "node:" + node]):
                alive.add(node)
            elif node not in waiting:
                await redis.srem(PREFIX + "nodes", [node])
                await redis.delete([PREFIX + "state:" + node])
                LOGGER.info("node %s is gone (its heartbeat expired): its users leave", node)
                self._inbox.deliver(NodeGone(node))
        waited = waiting - alive
        for node in self._alive - alive - waited:
            self._inbox.deliver(NodeGone(node))  # gone before we noticed (another node cleaned up)
        self._alive = (alive | waited) - {me}
        return alive, waited

    async def goodbye(self) -> None:
        """Stopped (drained): leave after the presence grace period, not the node timeout.

        The users stay in everyone's member lists for the grace period, as after
        any disconnect: a client that reconnects to another node in time shows
        no leave/join; the others leave when the heartbeat runs out.
        """
        link = self._link
        if not link.available:
            return
        link.available = False
        redis = link.client
        node = link.node
        grace_ms = int(link.config.presence_grace * 1000)
        try:
            if grace_ms > 0:
                await redis.set(PREFIX + "node:" + node, b"0", px=grace_ms)
            else:
                await redis.delete([PREFIX + "node:" + node, PREFIX + "state:" + node])
                await redis.srem(PREFIX + "nodes", [node])
                gone = b"e" + _ENCODER.encode(NodeGone(node))
                await redis.publish(CHANNEL, gone)
        except FAILURES as exc:
            LOGGER.warning("could not say goodbye to the cluster: %s", exc)
        else:
            LOGGER.info("node %s left the chat", node)
