"""The Redis backplane (``--redis``): one chat over any number of nodes.

::

    RedisBackplane.run             backplane nursery (inside the hub's)
    ├── _session loop              connect, subscribe, reconcile, then read
    │                              the channel until the connection fails;
    │                              back off, and again
    ├── _heartbeat_loop            this node's key; finds dead nodes
    └── _publish_loop              this node's events and state, in order

Redis keys (prefix ``triochat:``)::

    epoch, seq                   the sequencer: ids are <epoch>-<seq>, seq global
    log                          stream of every message (gap filling), entry id <seq>-0
    room:<room>                  stream of one room's messages, trimmed to --history-size
    rooms                        set of room names
    users                        hash name key -> "<nodes> <token> <skeleton>\\0<name>":
                                 who holds a name (`name_key`, docs/protocol.md §2.1);
                                 several nodes only for an authenticated user (§15)
    skeletons                    hash confusable key -> "<node> <name key>": no two
                                 users share a TR39 skeleton either
    ref:<name>\\0<ref>            the id a say with that ref got (retries), 10 min
    node:<node>                  heartbeat, expires after 2/3 of --node-timeout
    nodes                        set of node ids
    state:<node>                 set of "<room>\\0<name>" entries of that node

Every message is stored and published by one Lua script (`SAY`), so the
order on the channel is the order of ``seq``, and a node that sees a gap
fills it from ``log`` before going on.

Outage: commands fail fast (no retries in coredis); says and first joins
get `unavailable`; `/readyz` is 503. The session loop reconnects with
backoff, resubscribes, fills the gap, rewrites this node's state and
reads every other node's (`Resync`). The end of a subscription (coredis can
end one quietly when Redis restarts) is treated the same way.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio
import coredis
import coredis.exceptions
import coredis.retry
import msgspec
import trio

from ..config import Config, redact_url
from ..errors import StorageError
from ..events import (
    Claim,
    Draft,
    Entry,
    Event,
    Handover,
    MemberState,
    NodeGone,
    NodeState,
    Received,
    Reload,
    Resync,
)
from ..protocol import Message, confusable_key, encode, name_key
from ..recent import Snapshot

__all__ = ["RedisBackplane"]

LOGGER = logging.getLogger("triochat.redis")

PREFIX: Final = "triochat:"
CHANNEL: Final = PREFIX + "events"
LOG_SIZE: Final = 100_000  # messages kept in `log` for filling gaps after an outage
REF_TTL: Final = 600  # seconds a say's ref is remembered for retries
COMMAND_TIMEOUT: Final = 2.0
BACKOFF: Final = (0.1, 5.0)  # seconds: first and longest pause between reconnects
MAX_RECEIVED: Final = 10_000  # received but not yet taken by the hub: the reader waits
ID_PLACEHOLDER: Final = b'"id":"\\u0000"'

#: Stores and publishes a batch of says, in order; returns their ids.
#: KEYS: epoch, seq, log, rooms. ARGV: prefix, a new epoch (used if there is
#: none), history size, log size, ref ttl, then 6 per draft: room, name, ref
#: ("" for none), msg, and the message JSON before and after its id.
SAY: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
end
local prefix = ARGV[1]
local ids = {}
local published = {}
local i = 6
while i + 5 <= #ARGV do
  local room, name, ref, msg = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local refkey = false
  local known = false
  if ref ~= '' then
    refkey = prefix .. 'ref:' .. name .. '\\0' .. ref
    local old = redis.call('GET', refkey)
    if old then
      local sep = string.find(old, '\\0', 1, true)
      if string.sub(old, sep + 1) == room .. '\\0' .. msg then
        known = string.sub(old, 1, sep - 1)
      end
    end
  end
  if known then
    ids[#ids + 1] = known
  else
    local seq = redis.call('INCR', KEYS[2])
    local id = epoch .. '-' .. seq
    local json = ARGV[i + 4] .. id .. ARGV[i + 5]
    local entry = seq .. '-0'
    redis.call('XADD', prefix .. 'room:' .. room, 'MAXLEN', ARGV[3], entry, 'm', json)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], entry, 'm', json)
    redis.call('SADD', KEYS[4], room)
    published[#published + 1] = json
    if refkey then
      redis.call('SET', refkey, id .. '\\0' .. room .. '\\0' .. msg, 'EX', ARGV[5])
    end
    ids[#ids + 1] = id
  end
  i = i + 6
end
if #published > 0 then
  -- One publish per batch: every node takes the whole batch in one step.
  redis.call('PUBLISH', prefix .. 'events', 'm' .. table.concat(published, '\\n'))
end
return ids
"""

#: KEYS: users, skeletons. ARGV: prefix, name key, token ("" for none), node,
#: new token, confusable key, name, "1" to rotate the token on a takeover, "1"
#: to share (an authenticated user's name: docs/protocol.md §15). A takeover
#: keeps the name as first bound (returned last) and its skeleton; a share
#: adds this node to the holders ("A,B ..."), dropping dead ones; a new name
#: must not share the skeleton of a user held by another live node. A skeleton
#: held by this node under another key is this node's business (it checks its
#: users itself): left as it is.
CLAIM: Final = """
local function alive(owner)
  return owner ~= ARGV[4] and redis.call('EXISTS', ARGV[1] .. 'node:' .. owner) == 1
end
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if cur then
  local sep = string.find(cur, ' ', 1, true)
  local owners, rest = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
  local token, skel, name = rest, ARGV[6], ARGV[7]
  sep = string.find(rest, ' ', 1, true)
  if sep then
    -- "<token> <skeleton>\\0<name>" (a value without them predates skeletons)
    token, rest = string.sub(rest, 1, sep - 1), string.sub(rest, sep + 1)
    sep = string.find(rest, '\\0', 1, true)
    skel, name = string.sub(rest, 1, sep - 1), string.sub(rest, sep + 1)
  end
  local live = {}
  for owner in string.gmatch(owners, '[^,]+') do
    if alive(owner) then live[#live + 1] = owner end
  end
  if ARGV[3] ~= '' and ARGV[3] == token then
    if ARGV[9] == '1' then
      live[#live + 1] = ARGV[4]
      local holders = table.concat(live, ',')
      redis.call('HSET', KEYS[1], ARGV[2], holders .. ' ' .. token .. ' ' .. skel .. '\\0' .. name)
      if redis.call('HGET', KEYS[2], skel) == false then
        redis.call('HSET', KEYS[2], skel, ARGV[4] .. ' ' .. ARGV[2])
      end
      return {'shared', token, '', name}
    end
    -- Asked to rotate (ARGV[8]), the takeover gets the new token: the one used stops working.
    if ARGV[8] == '1' then token = ARGV[5] end
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[4] .. ' ' .. token .. ' ' .. skel .. '\\0' .. name)
    redis.call('HSET', KEYS[2], skel, ARGV[4] .. ' ' .. ARGV[2])
    local previous = live[1] or ''
    return {'takeover', token, previous, name}
  end
  if #live > 0 then return {'taken', '', '', ''} end
end
local held = redis.call('HGET', KEYS[2], ARGV[6])
local free = true
if held then
  local sep = string.find(held, ' ', 1, true)
  local owner, key = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
  if key ~= ARGV[2] then
    if alive(owner) then return {'taken', '', '', ''} end
    free = owner ~= ARGV[4]
  end
end
local value = ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[6] .. '\\0' .. ARGV[7]
redis.call('HSET', KEYS[1], ARGV[2], value)
if free then redis.call('HSET', KEYS[2], ARGV[6], ARGV[4] .. ' ' .. ARGV[2]) end
return {'new', ARGV[5], '', ARGV[7]}
"""

#: Deletes one stored message (the server API, docs/protocol.md §16) from its
#: room's stream and from the log that fills gaps; 1 if the room had it.
#: KEYS: epoch, log. ARGV: prefix, room, id.
DELETE: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch or string.sub(ARGV[3], 1, #epoch + 1) ~= epoch .. '-' then return 0 end
local seq = string.sub(ARGV[3], #epoch + 2)
if not string.match(seq, '^%d+$') then return 0 end
local removed = redis.call('XDEL', ARGV[1] .. 'room:' .. ARGV[2], seq .. '-0')
if removed == 1 then redis.call('XDEL', KEYS[2], seq .. '-0') end
return removed
"""

#: This node's changes, in order. KEYS: users, state:<node>, channel, skeletons.
#: ARGV: node, then ops of 2: ("+", entry) ("-", entry) ("p", payload)
#: ("r", "<name key>\0<skeleton>") ("u", "<name key>\0<skeleton>\0<token>\0<name>").
OPS: Final = """
local i = 2
while i + 1 <= #ARGV do
  local op, arg = ARGV[i], ARGV[i + 1]
  if op == '+' then
    redis.call('SADD', KEYS[2], arg)
  elseif op == '-' then
    redis.call('SREM', KEYS[2], arg)
  elseif op == 'p' then
    redis.call('PUBLISH', KEYS[3], arg)
  elseif op == 'r' then
    -- This node lets a name go; a name other nodes share (§15) stays theirs.
    local sep = string.find(arg, '\\0', 1, true)
    local key, skel = string.sub(arg, 1, sep - 1), string.sub(arg, sep + 1)
    local cur = redis.call('HGET', KEYS[1], key)
    if cur then
      sep = string.find(cur, ' ', 1, true)
      local left, mine = {}, false
      for owner in string.gmatch(string.sub(cur, 1, sep - 1), '[^,]+') do
        if owner == ARGV[1] then mine = true else left[#left + 1] = owner end
      end
      if mine and #left == 0 then
        redis.call('HDEL', KEYS[1], key)
      elseif mine then
        redis.call('HSET', KEYS[1], key, table.concat(left, ',') .. string.sub(cur, sep))
        if redis.call('HGET', KEYS[4], skel) == ARGV[1] .. ' ' .. key then
          redis.call('HSET', KEYS[4], skel, left[1] .. ' ' .. key)
        end
      end
    end
    if redis.call('HGET', KEYS[4], skel) == ARGV[1] .. ' ' .. key then
      redis.call('HDEL', KEYS[4], skel)
    end
  elseif op == 'u' then
    local parts, start = {}, 1
    for _ = 1, 3 do
      local sep = string.find(arg, '\\0', start, true)
      parts[#parts + 1] = string.sub(arg, start, sep - 1)
      start = sep + 1
    end
    local key, skel, token, name = parts[1], parts[2], parts[3], string.sub(arg, start)
    local cur = redis.call('HGET', KEYS[1], key)
    if not cur or string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
      redis.call('HSET', KEYS[1], key, ARGV[1] .. ' ' .. token .. ' ' .. skel .. '\\0' .. name)
    else
      -- An authenticated user's name other nodes hold too (same token, §15):
      -- this node is one more holder.
      local sep = string.find(cur, ' ', 1, true)
      local owners, rest = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
      local mine = false
      for owner in string.gmatch(owners, '[^,]+') do
        if owner == ARGV[1] then mine = true end
      end
      local same = string.sub(rest, 1, #token + 1) == token .. ' '
      if not mine and same and string.sub(token, 1, 4) == 'sub-' then
        redis.call('HSET', KEYS[1], key, owners .. ',' .. ARGV[1] .. ' ' .. rest)
      end
    end
    cur = redis.call('HGET', KEYS[4], skel)
    if not cur or string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
      redis.call('HSET', KEYS[4], skel, ARGV[1] .. ' ' .. key)
    end
  end
  i = i + 2
end
return 1
"""

_EVENTS: Final = msgspec.json.Decoder(Event)
_MESSAGE: Final = msgspec.json.Decoder(Message)
_ENCODER: Final = msgspec.json.Encoder()

#: What a connection failure looks like from coredis and trio.
FAILURES: Final = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    anyio.ClosedResourceError,  # coredis, when its connection dies under it
    anyio.BrokenResourceError,
)


def _entry_key(entry: Entry) -> str:
    return f"{entry[0]}\0{entry[1]}"


def _entry_of(member: bytes) -> Entry:
    room, _, name = member.decode().partition("\0")
    return room, name


def _seq_of(message_id: str) -> int:
    return int(message_id.rpartition("-")[2])


class _Reconnect(Exception):
    """Internal: the session must start again (failure, or a quiet end)."""


class RedisBackplane:
    """One node of a chat whose shared state lives in Redis."""

    immediate = False  # every claim and catch-up is a round trip to Redis
    append_nowait = None  # every append is a script call to Redis

    def __init__(self, config: Config, node: str | None = None) -> None:
        if config.redis is None:
            raise ValueError("RedisBackplane needs config.redis")
        self.node = node or secrets.token_hex(4)
        self._config = config
        self._url = config.redis
        self._history_size = config.history_size
        self._redis: coredis.Redis[bytes] | None = None
        self._available = False
        self._received: list[Received] = []
        self._room_for_more = trio.Event()
        self._wake: Callable[[], None] | None = None
        self._own_entries: Callable[[], list[Entry]] = list
        self._own_users: Callable[[], list[tuple[str, str]]] = list
        self._epoch = ""
        self._last_seq = 0
        self._alive: set[str] = set()
        #: This node's changes waiting for `_publish_loop`: (op, argument).
        self._ops: list[tuple[str, str]] = []
        self._ops_waiting = trio.Event()
        self._ops_queued = 0  # ops ever queued / ever sent (or dropped): for `flush`
        self._ops_sent = 0
        self._ops_progress = trio.Event()
        self._barrier_ids = itertools.count(1)
        self._barriers: dict[int, trio.Event] = {}
        self._session_scope: trio.CancelScope | None = None
        self._say: Any = None
        self._claim: Any = None
        self._delete: Any = None
        self._apply_ops: Any = None
        self._down_logged = False
        self._stopping = False

    # --- Backplane -------------------------------------------------------------

    def available(self) -> bool:
        return self._available

    def on_events(
        self,
        wake: Callable[[], None],
        entries: Callable[[], list[Entry]],
        users: Callable[[], list[tuple[str, str]]],
    ) -> None:
        self._wake = wake
        self._own_entries = entries
        self._own_users = users

    def node_alive(self, node: str) -> bool:
        return node == self.node or node in self._alive

    def take_events(self) -> list[Received]:
        received, self._received = self._received, []
        self._room_for_more.set()
        return received

    async def append(self, drafts: Sequence[Draft]) -> list[str]:
        args: list[str | bytes | int] = [
            PREFIX,
            secrets.token_hex(4),
            self._history_size,
            LOG_SIZE,
            REF_TTL,
        ]
        for draft in drafts:
            head, tail = encode(Message(draft.room, "\0", draft.name, draft.msg, draft.ts)).split(
                ID_PLACEHOLDER, 1
            )
            args += [
                draft.room,
                draft.name,
                draft.ref or "",
                draft.msg,
                head + b'"id":"',
                b'"' + tail,
            ]
        keys = [PREFIX + "epoch", PREFIX + "seq", PREFIX + "log", PREFIX + "rooms"]
        ids = await self._call(self._say, keys, args)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def claim(
        self, name: str, token: str | None, *, rotate: bool = False, share: bool = False
    ) -> Claim:
        # Claimed by its keys, so look-alikes collide across nodes (docs/protocol.md §2.1).
        # A shared name keeps the token every node derives from the user's `sub`.
        new_token = token if share and token else secrets.token_urlsafe(24)
        args = [PREFIX, name_key(name), token or "", self.node, new_token]
        args += [confusable_key(name), name, "1" if rotate else "", "1" if share else ""]
        keys = [PREFIX + "users", PREFIX + "skeletons"]
        status, got, previous, held = await self._call(self._claim, keys, args)
        return Claim(status.decode(), got.decode(), previous.decode(), held.decode())

    async def _call(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        """Run one of our scripts for a client's frame; StorageError when Redis is not there."""
        if not self._available or script is None:
            raise StorageError("Redis is unavailable")
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                return await script(keys=keys, args=args)
        except FAILURES as exc:
            self._failed(exc)
            raise StorageError(f"Redis: {exc}") from exc

    async def delete(self, room: str, message_id: str) -> bool:
        keys = [PREFIX + "epoch", PREFIX + "log"]
        return bool(await self._call(self._delete, keys, [PREFIX, room, message_id]))

    def release(self, name: str) -> None:
        self._queue("r", f"{name_key(name)}\0{confusable_key(name)}")

    def publish(self, event: Event) -> None:
        if isinstance(event, MemberState) and event.node == self.node:
            for entry in event.remove:
                self._queue("-", _entry_key(entry))
            for entry in event.add:
                self._queue("+", _entry_key(entry))
        elif isinstance(event, Handover) and event.node == self.node:
            for room in ["", *event.rooms]:
                self._queue("-", _entry_key((room, event.name)))
        self._queue("p", "e" + _ENCODER.encode(event).decode())

    async def catch_up(self) -> None:
        """A barrier: publish a marker and wait until it comes back on the channel."""
        if not self._available:
            return
        number = next(self._barrier_ids)
        done = self._barriers[number] = trio.Event()
        try:
            self._queue("p", f"s{self.node} {number}")
            with trio.move_on_after(COMMAND_TIMEOUT):
                await done.wait()
        finally:
            del self._barriers[number]

    async def flush(self) -> None:
        target = self._ops_queued
        while self._available and self._ops_sent < target:
            await self._ops_progress.wait()

    async def leave(self) -> None:
        self._stopping = True
        with trio.move_on_after(COMMAND_TIMEOUT):
            await self.flush()
            await self._goodbye()

    # --- running -----------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Snapshot] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect (or fail with StorageError within the handshake timeout), then serve."""
        policy = coredis.retry.NoRetryPolicy()
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(
            self._url,
            retry_policy=policy,
            connect_timeout=COMMAND_TIMEOUT,
            stream_timeout=COMMAND_TIMEOUT,
        )
        self._redis = redis
        self._say = redis.register_script(SAY)
        self._claim = redis.register_script(CLAIM)
        self._delete = redis.register_script(DELETE)
        self._apply_ops = redis.register_script(OPS)
        try:
            async with redis:
                snapshot = await self._first_snapshot()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._publish_loop)
                    await nursery.start(self._session_loop)
                    task_status.started(snapshot)
        finally:
            self._available = False

    async def _goodbye(self) -> None:
        """Stopped (drained): leave after the presence grace period, not the node timeout.

        The users stay in everyone's member lists for the grace period, as after
        any disconnect: a client that reconnects to another node in time shows
        no leave/join; the others leave when the heartbeat runs out.
        """
        if not self._available:
            return
        self._available = False
        redis = self._redis
        assert redis is not None
        grace_ms = int(self._config.presence_grace * 1000)
        try:
            if grace_ms > 0:
                await redis.set(PREFIX + "node:" + self.node, b"0", px=grace_ms)
            else:
                await redis.delete([PREFIX + "node:" + self.node, PREFIX + "state:" + self.node])
                await redis.srem(PREFIX + "nodes", [self.node])
                gone = b"e" + _ENCODER.encode(NodeGone(self.node))
                await redis.publish(CHANNEL, gone)
        except FAILURES as exc:
            LOGGER.warning("could not say goodbye to the cluster: %s", exc)
        else:
            LOGGER.info("node %s left the chat", self.node)

    async def _first_snapshot(self) -> Snapshot:
        try:
            with trio.fail_after(self._config.backplane_timeout):
                epoch = await self._ensure_epoch()
                snapshot = await self._load_snapshot(epoch)
        except (*FAILURES, trio.TooSlowError) as exc:
            # Never the password: the URL as the start-up line shows it.
            raise StorageError(f"cannot reach Redis at {redact_url(self._url)}: {exc}") from exc
        self._epoch = snapshot.epoch
        self._last_seq = snapshot.next_seq - 1
        LOGGER.info("node %s joined the chat on %s", self.node, redact_url(self._url))
        return snapshot

    async def _ensure_epoch(self) -> str:
        assert self._redis is not None
        await self._redis.set(
            PREFIX + "epoch", secrets.token_hex(4), condition=coredis.PureToken.NX
        )
        epoch = await self._redis.get(PREFIX + "epoch")
        return (epoch or b"").decode()

    async def _load_snapshot(self, epoch: str) -> Snapshot:
        redis = self._redis
        assert redis is not None
        seq = int(await redis.get(PREFIX + "seq") or 0)
        rooms: dict[str, list[Message]] = {}
        # Messages stored after `seq` was read come through the gap fill, in order.
        for room_bytes in sorted(await redis.smembers(PREFIX + "rooms")):
            room = room_bytes.decode()
            entries = await redis.xrevrange(
                PREFIX + "room:" + room, "+", "-", count=self._history_size
            )
            kept = [_MESSAGE.decode(e.field_values[b"m"]) for e in reversed(entries)]
            kept = [m for m in kept if _seq_of(m.id) <= seq]
            if kept:
                rooms[room] = kept
        return Snapshot(epoch=epoch, next_seq=seq + 1, rooms=rooms)

    async def _session_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Subscribe and read; on any failure (or a quiet end) back off and again."""
        backoff = 0.0
        pending: list[trio.TaskStatus[None]] = [task_status]  # until the first session is up

        def ready() -> None:
            if pending:
                pending.pop().started()

        while True:
            with trio.CancelScope() as scope:
                self._session_scope = scope
                try:
                    await self._session(ready)
                except* FAILURES as group:
                    self._failed(group.exceptions[0])
                except* _Reconnect as group:
                    self._failed(group.exceptions[0])
            self._available = False
            backoff = min(max(backoff * 2, BACKOFF[0]), BACKOFF[1])
            await trio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 2000))
            if self._available:
                backoff = 0.0

    async def _session(self, ready: Callable[[], None]) -> None:
        redis = self._redis
        assert redis is not None
        policy = coredis.retry.NoRetryPolicy()
        async with redis.pubsub(channels=[CHANNEL], retry_policy=policy) as pubsub:
            # Subscribed first, then reconciled: nothing published in between is missed.
            with trio.fail_after(self._config.backplane_timeout):
                await self._reconcile()
            if self._down_logged:
                LOGGER.warning("Redis is back: node %s reconciled", self.node)
                self._down_logged = False
            self._available = True
            ready()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    if not pubsub.subscribed:
                        raise _Reconnect("the subscription ended")
                    continue
                if message["type"] != "message":
                    continue
                data = message["data"]
                if isinstance(data, bytes):
                    try:
                        await self._on_channel(data)
                    except (msgspec.DecodeError, ValueError):
                        LOGGER.exception("ignored a foreign publish on %s", CHANNEL)

    async def _reconcile(self) -> None:
        """After (re)subscribing: fill the gap, rewrite our state, read everyone else's."""
        redis = self._redis
        assert redis is not None
        for script in (SAY, CLAIM, DELETE, OPS):
            await redis.script_load(script)  # (a restarted Redis has forgotten them)
        epoch = await self._ensure_epoch()
        if epoch != self._epoch:
            # Redis lost the history (a new epoch): start again from what it has.
            snapshot = await self._load_snapshot(epoch)
            self._epoch, self._last_seq = epoch, snapshot.next_seq - 1
            self._deliver(Reload(snapshot))
        else:
            await self._fill_gap(None)
        await self._beat()
        entries = self._own_entries()
        ops: list[tuple[str, str]] = [
            ("u", f"{name_key(name)}\0{confusable_key(name)}\0{token}\0{name}")
            for name, token in self._own_users()
        ]
        ops += [("+", _entry_key(entry)) for entry in entries]
        # Tell the nodes already subscribed; those that reconcile later read the set.
        ops.append(("p", "e" + _ENCODER.encode(NodeState(self.node, entries)).decode()))
        await redis.delete([PREFIX + "state:" + self.node])
        await self._run_ops(ops)
        states: dict[str, list[Entry]] = {}
        for node in await self._live_nodes():
            if node != self.node:
                members = await redis.smembers(PREFIX + "state:" + node)
                states[node] = sorted(_entry_of(m) for m in members)
        self._deliver(Resync(states))

    async def _on_channel(self, data: bytes) -> None:
        if data[:1] == b"m":
            # A stored batch: messages in seq order, one JSON per line.
            for line in data[1:].split(b"\n"):
                await self._on_message(_MESSAGE.decode(line))
        elif data[:1] == b"s":
            node, _, number = data[1:].decode().partition(" ")
            barrier = self._barriers.get(int(number)) if node == self.node else None
            if barrier is not None:
                barrier.set()
        elif data[:1] == b"e":
            event = _EVENTS.decode(data[1:])
            own = MemberState | NodeState | Handover | NodeGone
            if event.node != self.node or not isinstance(event, own):
                await self._deliver_waiting(event)

    async def _on_message(self, message: Message) -> None:
        epoch, _, digits = message.id.rpartition("-")
        if epoch != self._epoch:
            raise _Reconnect("the history has a new epoch")
        seq = int(digits)
        if seq <= self._last_seq:
            return
        if seq > self._last_seq + 1:
            await self._fill_gap(seq)
        self._last_seq = seq
        await self._deliver_waiting(message)

    async def _fill_gap(self, before: int | None) -> None:
        """Deliver the stored messages after the last one seen (and before ``before``)."""
        redis = self._redis
        assert redis is not None
        start = self._last_seq + 1
        end = f"{before - 1}-0" if before is not None else "+"
        if before is not None and before - 1 < start:
            return
        entries = await redis.xrange(PREFIX + "log", f"{start}-0", end)
        messages = [_MESSAGE.decode(entry.field_values[b"m"]) for entry in entries]
        if messages and _seq_of(messages[0].id) > start:
            # The log was trimmed past what we saw: reload the rooms as stored.
            snapshot = await self._load_snapshot(self._epoch)
            self._last_seq = snapshot.next_seq - 1
            self._deliver(Reload(snapshot))
            return
        for message in messages:
            seq = _seq_of(message.id)
            if seq > self._last_seq:
                self._last_seq = seq
                self._deliver(message)

    async def _heartbeat_loop(self) -> None:
        period = self._config.node_timeout / 4
        while True:
            await trio.sleep(period)
            if not self._available:
                continue
            try:
                with trio.fail_after(COMMAND_TIMEOUT):
                    assert self._redis is not None
                    if not await self._redis.exists([PREFIX + "node:" + self.node]):
                        # Our heartbeat ran out (a stalled process?): the others
                        # dropped our users. Reconnect, which rewrites them.
                        raise _Reconnect("this node's heartbeat had expired")
                    await self._beat()
                    await self._live_nodes()
            except (*FAILURES, _Reconnect) as exc:
                self._failed(exc)

    async def _beat(self) -> None:
        redis = self._redis
        assert redis is not None
        ttl_ms = int(self._config.node_timeout * 2000 / 3)
        await redis.set(PREFIX + "node:" + self.node, b"1", px=ttl_ms)
        await redis.sadd(PREFIX + "nodes", [self.node])

    async def _live_nodes(self) -> set[str]:
        """The nodes whose heartbeat is current; the others are gone for good."""
        redis = self._redis
        assert redis is not None
        known = {n.decode() for n in await redis.smembers(PREFIX + "nodes")}
        alive = {self.node}
        for node in sorted(known - {self.node}):
            if await redis.exists([PREFIX + "node:" + node]):
                alive.add(node)
            else:
                await redis.srem(PREFIX + "nodes", [node])
                await redis.delete([PREFIX + "state:" + node])
                LOGGER.info("node %s is gone (its heartbeat expired): its users leave", node)
                self._deliver(NodeGone(node))
        for node in self._alive - alive:
            self._deliver(NodeGone(node))  # gone before we noticed (another node cleaned up)
        self._alive = alive - {self.node}
        return alive

    async def _publish_loop(self) -> None:
        while True:
            await self._ops_waiting.wait()
            self._ops_waiting = trio.Event()
            ops, self._ops = self._ops, []
            try:
                if self._available:  # else `_reconcile` rewrites it all after the outage
                    with trio.fail_after(COMMAND_TIMEOUT):
                        await self._run_ops(ops)
            except FAILURES as exc:
                self._failed(exc)
            finally:
                self._ops_sent += len(ops)
                self._ops_progress.set()
                self._ops_progress = trio.Event()

    async def _run_ops(self, ops: list[tuple[str, str]]) -> None:
        args = [self.node]
        for op, argument in ops:
            args += [op, argument]
        keys = [PREFIX + "users", PREFIX + "state:" + self.node, CHANNEL, PREFIX + "skeletons"]
        await self._apply_ops(keys=keys, args=args)

    # --- helpers -------------------------------------------------------------------

    def _queue(self, op: str, argument: str) -> None:
        if not self._available:
            return  # dropped: `_reconcile` rewrites this node's state after the outage
        self._ops.append((op, argument))
        self._ops_queued += 1
        self._ops_waiting.set()

    def _deliver(self, received: Received) -> None:
        self._received.append(received)
        if self._wake is not None:
            self._wake()

    async def _deliver_waiting(self, received: Received) -> None:
        """`_deliver`, but wait while the hub is far behind (bounded, never dropped).

        Not while the hub waits for a `catch_up` barrier: it takes nothing until
        the barrier's marker, further down the channel, has come back.
        """
        while len(self._received) >= MAX_RECEIVED and not self._barriers:
            self._room_for_more = trio.Event()
            await self._room_for_more.wait()
        self._deliver(received)

    def _failed(self, exc: BaseException) -> None:
        """A command failed: unavailable until the session loop has reconnected."""
        self._available = False
        if self._stopping:
            return  # coredis tearing its connections down under a cancelled scope
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]  # name the cause, not the nursery that carried it
        if not self._down_logged:
            LOGGER.warning("Redis unavailable (%s: %s): reconnecting", type(exc).__name__, exc)
            self._down_logged = True
        if self._session_scope is not None:
            self._session_scope.cancel()
