"""The Lua scripts of the Redis backplane, and their calls.

Four scripts hold every change that must be atomic in Redis: `SAY` stores and
publishes a batch of says (so the order on the channel is the order of
``seq``), `CLAIM` takes a name, `DELETE` removes one stored message, and `OPS`
applies this node's changes in order (queued by `redis_publish`, rewritten
by `redis_sync`'s reconcile). `Scripts` registers them on the client, loads
them again after a reconnect (a restarted Redis has forgotten them), and
builds their keys and arguments.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Final

import coredis
import trio

from ..errors import StorageError
from ..events import Claim, Draft
from ..protocol import Message, confusable_key, encode, name_key
from .redis_link import CHANNEL, COMMAND_TIMEOUT, FAILURES, PREFIX, RedisLink

__all__ = ["CLAIM", "DELETE", "LOG_SIZE", "OPS", "REF_TTL", "SAY", "Scripts"]

LOG_SIZE: Final = 100_000  # messages kept in `log` for filling gaps after an outage
REF_TTL: Final = 600  # seconds a say's ref is remembered for retries
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


class Scripts:
    """The four scripts on this node's client, and how each is called."""

    __slots__ = ("_apply_ops", "_claim", "_delete", "_history_size", "_link", "_say")

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._history_size = link.config.history_size
        # None until `register`: a call before it is `unavailable`.
        self._say: Any = None
        self._claim: Any = None
        self._delete: Any = None
        self._apply_ops: Any = None

    def register(self, redis: coredis.Redis[bytes]) -> None:
        self._say = redis.register_script(SAY)
        self._claim = redis.register_script(CLAIM)
        self._delete = redis.register_script(DELETE)
        self._apply_ops = redis.register_script(OPS)

    async def load(self) -> None:
        """After (re)connecting: a restarted Redis has forgotten the scripts."""
        for script in (SAY, CLAIM, DELETE, OPS):
            await self._link.client.script_load(script)

    async def say(self, drafts: Sequence[Draft]) -> list[str]:
        """`Backplane.append`: store and publish ``drafts``; their ids, in order."""
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

    async def claim(self, name: str, token: str | None, *, rotate: bool, share: bool) -> Claim:
        """`Backplane.claim`: take ``name`` for this node."""
        # Claimed by its keys, so look-alikes collide across nodes (docs/protocol.md §2.1).
        # A shared name keeps the token every node derives from the user's `sub`.
        new_token = token if share and token else secrets.token_urlsafe(24)
        args = [PREFIX, name_key(name), token or "", self._link.node, new_token]
        args += [confusable_key(name), name, "1" if rotate else "", "1" if share else ""]
        keys = [PREFIX + "users", PREFIX + "skeletons"]
        status, got, previous, held = await self._call(self._claim, keys, args)
        return Claim(status.decode(), got.decode(), previous.decode(), held.decode())

    async def delete(self, room: str, message_id: str) -> bool:
        """`Backplane.delete`: remove one stored message; whether the room had it."""
        keys = [PREFIX + "epoch", PREFIX + "log"]
        return bool(await self._call(self._delete, keys, [PREFIX, room, message_id]))

    async def apply_ops(self, ops: list[tuple[str, str]]) -> None:
        """Apply this node's changes in order (the caller handles failures)."""
        node = self._link.node
        args = [node]
        for op, argument in ops:
            args += [op, argument]
        keys = [PREFIX + "users", PREFIX + "state:" + node, CHANNEL, PREFIX + "skeletons"]
        await self._apply_ops(keys=keys, args=args)

    async def _call(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        """Run one of our scripts for a client's frame; StorageError when Redis is not there."""
        link = self._link
        if not link.available or script is None:
            raise StorageError("Redis is unavailable")
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                return await script(keys=keys, args=args)
        except FAILURES as exc:
            link.failed(exc)
            raise StorageError(f"Redis: {exc}") from exc
