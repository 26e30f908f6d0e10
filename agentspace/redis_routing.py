"""The model groups' state in Redis (``routing.RouteState`` of a gateway with several replicas): one
replica's 429 cools the deployment for all of them, and the in-flight counts and per-deployment minute
windows are the deployment's, not a replica's share of it.

Every operation is one Lua script, atomic in Redis, on Redis's own clock (``TIME``), and every key expires.
Per deployment (``agentspace:route:<id>:*``): ``cool`` (the end of its cooldown, expiring with it),
``inflight`` (a counter whose expiry each call renews: the calls of a replica that died mid-call stay counted
until the deployment has been idle for ``INFLIGHT_TTL_SECONDS``), ``req``/``tok``/``fails`` (sorted sets over the last minute), ``lat`` (the TTFT
average) and ``errors`` (the last few, newest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .routing import RECENT_ERRORS, WINDOW_SECONDS, Load

PREFIX = "agentspace:route"
WINDOW_MS = int(WINDOW_SECONDS * 1000)
INFLIGHT_TTL_SECONDS = 900  # longer than any call: the count of a dead replica's calls goes then
_SUFFIXES = ("cool", "inflight", "req", "tok", "fails", "lat", "errors")

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
  local row = {tostring(cool), tostring(math.max(0, tonumber(redis.call('GET', KEYS[i + 1]) or '0'))),
    tostring(redis.call('ZCARD', KEYS[i + 2])), tostring(tokens), redis.call('GET', KEYS[i + 5]) or ''}
  for _, e in ipairs(redis.call('LRANGE', KEYS[i + 6], 0, -1)) do table.insert(row, e) end
  table.insert(out, row)
end
return out
"""
)

# KEYS: inflight, req. ARGV: member, window ms, rpm (0: none), inflight ttl s. Returns 1 when taken.
_TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
if tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 1000)
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""
)

# KEYS: inflight, tok, lat. ARGV: member (id:tokens, '' for none), window ms, ttft ms ('' for none), alpha.
_DONE = (
    _NOW
    + """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 1000)
end
if ARGV[3] ~= '' then
  local old = redis.call('GET', KEYS[3])
  local value = tonumber(ARGV[3])
  if old then value = (1 - tonumber(ARGV[4])) * tonumber(old) + tonumber(ARGV[4]) * value end
  redis.call('SET', KEYS[3], tostring(value), 'EX', 86400)
end
return 1
"""
)

# KEYS: inflight, fails, errors, cool. ARGV: member, window ms, code, allowed fails, cooldown ms, errors kept.
# Returns the end of the cooldown (ms) when this failure began one, else 0.
_FAILED = (
    _NOW
    + """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
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

    def __init__(self, redis: Any) -> None:
        import itertools
        import os

        self.redis = redis
        self._loads = redis.register_script(_LOADS)
        self._take = redis.register_script(_TAKE)
        self._done = redis.register_script(_DONE)
        self._failed = redis.register_script(_FAILED)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}"

    @staticmethod
    def _key(id: str, suffix: str) -> str:
        return f"{PREFIX}:{id}:{suffix}"

    def _member(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

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

    async def take(self, id: str, rpm: int | None) -> bool:
        keys = [self._key(id, "inflight"), self._key(id, "req")]
        taken = await self._take(keys=keys, args=[self._member(), WINDOW_MS, rpm or 0, INFLIGHT_TTL_SECONDS])
        return int(taken) == 1

    async def done(self, id: str, tokens: int, ttft_ms: float | None) -> None:
        from .routing import LATENCY_ALPHA

        member = f"{self._member()}:{int(tokens)}" if tokens > 0 else ""
        keys = [self._key(id, "inflight"), self._key(id, "tok"), self._key(id, "lat")]
        ttft = "" if ttft_ms is None else repr(float(ttft_ms))
        await self._done(keys=keys, args=[member, WINDOW_MS, ttft, LATENCY_ALPHA])

    async def failed(self, id: str, code: str, allowed_fails: int, cooldown: float) -> float | None:
        keys = [self._key(id, s) for s in ("inflight", "fails", "errors", "cool")]
        until = await self._failed(
            keys=keys, args=[self._member(), WINDOW_MS, code, allowed_fails, int(cooldown * 1000), RECENT_ERRORS]
        )
        return int(until) / 1000 if int(until) else None
