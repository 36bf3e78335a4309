"""The Redis connection one node shares between its parts, and its failures.

`RedisLink` holds what every part of `RedisBackplane` reads: the node id, the
coredis client, whether Redis is available, and `RedisLink.failed`, which any
part calls when a command fails: unavailable until the session loop
(`redis_session`) has reconnected. Here too: the key names, the command
timeout, what counts as a connection failure, and the encoding of this
node's entries in its ``state:<node>`` set.
"""

from __future__ import annotations

import logging
import secrets
from typing import Final

import anyio
import coredis
import coredis.exceptions
import trio

from ..config import Config
from ..events import Entry

__all__ = [
    "BACKOFF",
    "CHANNEL",
    "COMMAND_TIMEOUT",
    "FAILURES",
    "LOGGER",
    "PREFIX",
    "Reconnect",
    "RedisLink",
    "entry_key",
    "entry_of",
]

#: One logger for every part of the Redis backplane.
LOGGER: Final = logging.getLogger("triochat.redis")

PREFIX: Final = "triochat:"
CHANNEL: Final = PREFIX + "events"
COMMAND_TIMEOUT: Final = 2.0
BACKOFF: Final = (0.1, 5.0)  # seconds: first and longest pause between reconnects

#: What a connection failure looks like from coredis and trio.
FAILURES: Final = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    anyio.ClosedResourceError,  # coredis, when its connection dies under it
    anyio.BrokenResourceError,
)


def entry_key(entry: Entry) -> str:
    """``entry`` as a member of ``state:<node>``."""
    return f"{entry[0]}\0{entry[1]}"


def entry_of(member: bytes) -> Entry:
    """A member of ``state:<node>`` as the entry it stands for."""
    room, _, name = member.decode().partition("\0")
    return room, name


class Reconnect(Exception):
    """Internal: the session must start again (failure, or a quiet end)."""


class RedisLink:
    """This node's connection to Redis, as every part of the backplane sees it."""

    __slots__ = (
        "available",
        "config",
        "down_logged",
        "node",
        "redis",
        "session_scope",
        "stopping",
        "url",
    )

    def __init__(self, config: Config, node: str | None = None) -> None:
        if config.redis is None:
            raise ValueError("RedisBackplane needs config.redis")
        self.node = node or secrets.token_hex(4)
        self.config = config
        self.url = config.redis
        #: Set by `RedisBackplane.run`; None before.
        self.redis: coredis.Redis[bytes] | None = None
        #: False until the first session is up, and during every outage.
        self.available = False
        #: Cancelled by `failed`: the session loop then reconnects.
        self.session_scope: trio.CancelScope | None = None
        #: An outage was logged: the session says so when Redis is back.
        self.down_logged = False
        #: Leaving: failures are coredis tearing down, not outages.
        self.stopping = False

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client (only once `RedisBackplane.run` has made it)."""
        redis = self.redis
        assert redis is not None
        return redis

    def failed(self, exc: BaseException) -> None:
        """A command failed: unavailable until the session loop has reconnected."""
        self.available = False
        if self.stopping:
            return  # coredis tearing its connections down under a cancelled scope
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]  # name the cause, not the nursery that carried it
        if not self.down_logged:
            LOGGER.warning("Redis unavailable (%s: %s): reconnecting", type(exc).__name__, exc)
            self.down_logged = True
        if self.session_scope is not None:
            self.session_scope.cancel()
