"""Heartbeats and node liveness in Redis.

Each node keeps a key ``node:<node>`` that expires after 2/3 of
``--node-timeout`` and renews it four times per timeout (`Liveness.run`); it
is listed in the set ``nodes``. A node whose key has expired is gone for
good: the first node to notice removes it and its ``state:<node>`` set and
delivers `NodeGone` (its users leave everywhere); every other node delivers
`NodeGone` when the node drops out of the set. A node that finds its own key
expired (a stalled process) reconnects, which rewrites its users. A node
that stops in order says goodbye (`Liveness.goodbye`).
"""

from __future__ import annotations

from typing import Final

import msgspec
import trio

from ..events import NodeGone
from .redis_inbox import Inbox
from .redis_link import CHANNEL, COMMAND_TIMEOUT, FAILURES, LOGGER, PREFIX, Reconnect, RedisLink

__all__ = ["Liveness"]

_ENCODER: Final = msgspec.json.Encoder()


class Liveness:
    """This node's heartbeat, and which other nodes are alive."""

    __slots__ = ("_alive", "_inbox", "_link")

    def __init__(self, link: RedisLink, inbox: Inbox) -> None:
        self._link = link
        self._inbox = inbox
        #: The other nodes whose heartbeat was current when last looked at.
        self._alive: set[str] = set()

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

    async def live_nodes(self) -> set[str]:
        """The nodes whose heartbeat is current; the others are gone for good."""
        redis = self._link.client
        me = self._link.node
        known = {n.decode() for n in await redis.smembers(PREFIX + "nodes")}
        alive = {me}
        for node in sorted(known - {me}):
            if await redis.exists([PREFIX + "node:" + node]):
                alive.add(node)
            else:
                await redis.srem(PREFIX + "nodes", [node])
                await redis.delete([PREFIX + "state:" + node])
                LOGGER.info("node %s is gone (its heartbeat expired): its users leave", node)
                self._inbox.deliver(NodeGone(node))
        for node in self._alive - alive:
            self._inbox.deliver(NodeGone(node))  # gone before we noticed (another node cleaned up)
        self._alive = alive - {me}
        return alive

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
