"""The model groups' state in Redis (``routing.RouteState`` of a gateway with several replicas): one
replica's 429 cools the deployment for all of them, and the in-flight counts and per-deployment minute
windows are the deployment's, not a replica's share of it.

Every operation is one Lua script, atomic in Redis, on Redis's own clock (``TIME``), and every key expires.
Per deployment (``agentspace:route:<id>:*``): ``cool`` (the end of its cooldown, expiring with it), ``calls``
(the calls in flight, one member each, scored by when it lapses: a replica renews its own every third of
``INFLIGHT_TTL_SECONDS``, so the calls of a replica that died mid-call stop counting within that time), ``req``/``tok``/``fails`` (sorted sets over the last minute), ``lat`` (the TTFT
average, lapsing when not measured for ``routing.LATENCY_TTL_SECONDS``) and ``errors`` (the last few, newest first).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .routing import LATENCY_TTL_SECONDS, RECENT_ERRORS, WINDOW_SECONDS, Load

log = logging.getLogger(__name__)

PREFIX = "agentspace:route"
WINDOW_MS = int(WINDOW_SECONDS * 1000)
INFLIGHT_TTL_SECONDS = 30.0  # a dead replica's calls stop counting this long after its last renewal
_SUFFIXES = ("cool", "calls", "req", "tok", "fails", "lat", "errors")

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# KEYS: 7 per deployment (``_SUFFIXES``). Returns per deployment {cooled until ms or 0, in flight, requests,
# tokens, latency or false, errors...} flattened as one list of lists.
_LOADS = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS, 7 do
  local cool = tonumber(redis.call('GET', KEYS[i]) or '0')
  if cool <= now then cool = 0 end
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 2], '-inf', now - tonumber(ARGV[1]))
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 3], '-inf', now - tonumber(ARGV[1]))
  local tokens = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i + 3], 0, -1)) do
    tokens = tokens + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
  local row = {tostring(cool), tostring(redis.call('ZCARD', KEYS[i + 1])),
    tostring(redis.call('ZCARD', KEYS[i + 2])), tostring(tokens), redis.call('GET', KEYS[i + 5]) or ''}
  for _, e in ipairs(redis.call('LRANGE', KEYS[i + 6], 0, -1)) do table.insert(row, e) end
  table.insert(out, row)
end
return out
"""
)

# KEYS: req, tok. ARGV: window ms, rpm (0: none), tpm (0: none). Returns when (ms) the minute has room under
# both again, 0 when it has now: the request whose leaving brings it under rpm, the tokens under tpm.
_FREE_AT = (
    _NOW
    + """
local edge = now - tonumber(ARGV[1])
local at = 0
local rpm = tonumber(ARGV[2])
if rpm > 0 then
  local requests = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. edge, '+inf', 'WITHSCORES')
  local count = #requests / 2
  if count >= rpm then at = tonumber(requests[(count - rpm) * 2 + 2]) + tonumber(ARGV[1]) end
end
local tpm = tonumber(ARGV[3])
if tpm > 0 then
  local entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. edge, '+inf', 'WITHSCORES')
  local left = 0
  for i = 1, #entries, 2 do left = left + tonumber(string.match(entries[i], ':(%d+)$')) end
  if left >= tpm then
    for i = 1, #entries, 2 do
      left = left - tonumber(string.match(entries[i], ':(%d+)$'))
      if left < tpm then
        at = math.max(at, tonumber(entries[i + 1]) + tonumber(ARGV[1]))
        break
      end
    end
  end
end
return tostring(at)
"""
)

# KEYS: calls, req. ARGV: member, window ms, rpm (0: none), in-flight ttl ms. Returns 1 when taken.
_TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
if tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""
)

# KEYS: calls of each deployment. ARGV: in-flight ttl ms, then per key its members (space-separated): the
# calls this replica still runs lapse later (XX: a call ended meanwhile is not added back).
_RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  for member in string.gmatch(ARGV[i + 1], '%S+') do
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, member)
  end
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 1
"""
)

# KEYS: calls, tok, lat. ARGV: call member, tokens member (id:tokens, '' for none), window ms, ttft ms ('' for
# none), alpha, latency ttl ms (the average lapses when not measured for that long: ``routing.LATENCY_TTL_SECONDS``).
_DONE = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 1000)
end
if ARGV[4] ~= '' then
  local old = redis.call('GET', KEYS[3])
  local value = tonumber(ARGV[4])
  if old then value = (1 - tonumber(ARGV[5])) * tonumber(old) + tonumber(ARGV[5]) * value end
  redis.call('SET', KEYS[3], tostring(value), 'PX', tonumber(ARGV[6]))
end
return 1
"""
)

# KEYS: calls, fails, errors, cool. ARGV: call member, window ms, code, allowed fails, cooldown ms, errors kept.
# Returns the end of the cooldown (ms) when this failure began one, else 0.
_FAILED = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[3], tostring(now) .. ' ' .. ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
redis.call('EXPIRE', KEYS[3], 86400)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 1000)
local cooldown = tonumber(ARGV[5])
if redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4]) and cooldown > 0 then
  redis.call('DEL', KEYS[2])
  local until_ms = now + cooldown
  local current = tonumber(redis.call('GET', KEYS[4]) or '0')
  if current > until_ms then return current end
  redis.call('SET', KEYS[4], tostring(until_ms), 'PX', cooldown)
  return until_ms
end
return 0
"""
)


class RedisRouteState:
    """``routing.RouteState`` shared by every replica through Redis."""

    def __init__(
        self, redis: Any, inflight_ttl: float = INFLIGHT_TTL_SECONDS, latency_ttl: float = LATENCY_TTL_SECONDS
    ) -> None:
        import itertools
        import os

        self.redis = redis
        self._loads = redis.register_script(_LOADS)
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._done = redis.register_script(_DONE)
        self._failed = redis.register_script(_FAILED)
        self._free_at = redis.register_script(_FREE_AT)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}"
        self._ttl_ms = int(inflight_ttl * 1000)
        self._latency_ttl_ms = int(latency_ttl * 1000)
        # This replica's calls in flight per deployment (their members in ``calls``), renewed while they run.
        self._held: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    @staticmethod
    def _key(id: str, suffix: str) -> str:
        return f"{PREFIX}:{id}:{suffix}"

    def _member(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _release(self, id: str) -> str:
        """The member of one of this replica's calls on ``id`` (any: they count alike), no longer held."""
        held = self._held.get(id)
        if not held:
            return ""
        member = held.pop()
        if not held:
            del self._held[id]
        return member

    async def _keep_renewing(self) -> None:
        """While this replica has calls in flight, keep them from lapsing (they lapse when it dies)."""
        period = self._ttl_ms / 3000
        while self._held:
            await asyncio.sleep(period)
            held = {id: " ".join(members) for id, members in self._held.items() if members}
            if not held:
                continue
            try:
                await self._renew(keys=[self._key(id, "calls") for id in held], args=[self._ttl_ms, *held.values()])
            except Exception as e:  # Redis away for a moment: the next round renews them
                log.warning("could not renew the calls in flight in Redis: %r", e)
        self._renewer = None

    async def loads(self, ids: Sequence[str]) -> list[Load]:
        keys = [self._key(id, s) for id in ids for s in _SUFFIXES]
        rows = await self._loads(keys=keys, args=[WINDOW_MS])
        out = []
        for row in rows:
            values = [v.decode() if isinstance(v, bytes) else str(v) for v in row]
            errors = []
            for entry in values[5:]:
                at, _, code = entry.partition(" ")
                errors.append((int(at) / 1000, code))
            errors.reverse()  # oldest first, as the local state keeps them
            out.append(
                Load(
                    int(values[0]) / 1000,
                    int(values[1]),
                    int(values[2]),
                    int(values[3]),
                    float(values[4]) if values[4] else None,
                    errors,
                )
            )
        return out

    async def free_at(self, id: str, rpm: int | None, tpm: int | None) -> float:
        keys = [self._key(id, "req"), self._key(id, "tok")]
        at = await self._free_at(keys=keys, args=[WINDOW_MS, rpm or 0, tpm or 0])
        return float(at.decode() if isinstance(at, bytes) else at) / 1000

    async def take(self, id: str, rpm: int | None) -> bool:
        keys = [self._key(id, "calls"), self._key(id, "req")]
        member = self._member()
        taken = await self._take(keys=keys, args=[member, WINDOW_MS, rpm or 0, self._ttl_ms])
        if int(taken) != 1:
            return False
        self._held.setdefault(id, []).append(member)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._keep_renewing(), name="agentspace-route-renew")
        return True

    async def done(self, id: str, tokens: int, ttft_ms: float | None) -> None:
        from .routing import LATENCY_ALPHA

        counted = f"{self._member()}:{int(tokens)}" if tokens > 0 else ""
        keys = [self._key(id, "calls"), self._key(id, "tok"), self._key(id, "lat")]
        ttft = "" if ttft_ms is None else repr(float(ttft_ms))
        args = [self._release(id), counted, WINDOW_MS, ttft, LATENCY_ALPHA, self._latency_ttl_ms]
        await self._done(keys=keys, args=args)

    async def failed(self, id: str, code: str, allowed_fails: int, cooldown: float) -> float | None:
        keys = [self._key(id, s) for s in ("calls", "fails", "errors", "cool")]
        member = self._release(id) or self._member()  # also the failure's own member in ``fails``
        until = await self._failed(
            keys=keys, args=[member, WINDOW_MS, code, allowed_fails, int(cooldown * 1000), RECENT_ERRORS]
        )
        return int(until) / 1000 if int(until) else None
