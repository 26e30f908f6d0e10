"""Rate-limit windows and budget reservations in Redis (README.md): the ``limits.Counters`` of a
gateway with several replicas, so that a client's limits hold across all of them instead of once per
process.

Every operation is one Lua script, atomic in Redis, on Redis's own clock (``TIME``: the replicas'
monotonic clocks differ), and every key expires:

- windows: per client, sorted sets of requests and of token amounts over the last minute
  (``agentspace:rl:*``), pruned on each use, expiring a minute after the last entry.
- budgets: per client and period, ``agentspace:budget:<client>:<period>`` holds the period's spend. It is
  loaded from the usage store (the database: the truth) on first use and again once it expires
  (``SPEND_TTL_SECONDS``): that reload reconciles Redis with the database, and a spend lost with Redis is
  read back. Reservations of calls in flight sit apart, per client and not per period
  (``agentspace:budget:<client>:<created_at>:res`` amounts, ``...:resexp`` deadlines: a client added again
  under a removed one's name starts afresh), so a period that changes while calls are in flight counts them
  still (their records land in it). They are leases: each replica renews those of its calls in flight every
  ``RENEW_SECONDS``, so a replica that dies mid-call leaves reservations that lapse within
  ``RESERVATION_TTL_SECONDS`` instead of holding the budget. These times (and ``REBUILD_SECONDS``) are
  those of the default ``[storage] lease_seconds`` (``LEASE_SECONDS``); another lease scales them.
- Redis losing its state (a restart without persistence): ``agentspace:epoch``, set when a replica starts
  (and before its first budget call would take an empty Redis for a new one), is gone; a restart that loaded an older snapshot drops it too (``cluster.py``: the server's run
  id changed), and the spends it loaded are read again. The replica that notices starts a rebuild window (``REBUILD_SECONDS``, two renewals):
  every replica puts back the reservations of its calls in flight at its next renewal, and meanwhile no
  budget reservation is admitted (``SERVICE_UNAVAILABLE`` with Retry-After), so the spend is rebuilt from
  the posted records and the pending reservations, never from the posted records alone.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ApiError

if TYPE_CHECKING:
    from .limits import SpendLoader

log = logging.getLogger(__name__)

PREFIX = "agentspace"
WINDOW_MS = 60_000
SPEND_TTL_SECONDS = 600  # the spend is re-read from the database this often at most
LEASE_SECONDS = 20.0  # the default of [storage] lease_seconds, which the times below are for
RESERVATION_TTL_SECONDS = 30  # a lease: renewed while the call runs, lapses this long after its replica died
RENEW_SECONDS = 5.0
REBUILD_SECONDS = 2 * int(RENEW_SECONDS) + 1
EPOCH_KEY = f"{PREFIX}:epoch"

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# KEYS: requests zset, tokens zset. Returns {requests, tokens, ms until the oldest request leaves,
# ms until the oldest token entry leaves}.
_WINDOW = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
local requests = redis.call('ZCARD', KEYS[1])
local tokens = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  tokens = tokens + tonumber(string.match(member, ':(%d+)$'))
end
local function free_in(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then return tonumber(oldest[2]) + tonumber(ARGV[1]) - now end
  return 0
end
return {requests, tokens, free_in(KEYS[1]), free_in(KEYS[2])}
"""
)

# KEYS: zset; ARGV: member, window ms.
_ADD = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1
"""
)

# KEYS: requests zset; ARGV: member, window ms, limit. Adds the request when fewer than the limit are in the
# window: returns {1} then, else {0, requests, ms until the oldest request leaves}. One script: atomic.
_TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local requests = redis.call('ZCARD', KEYS[1])
if requests >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, requests, tonumber(oldest[2]) + tonumber(ARGV[2]) - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return {1}
"""
)

# The scripts below are put together from these parts (concatenated: one Lua chunk each).
# KEYS[2], KEYS[3]: reservations hash, reservation deadlines zset (of the client). Drops expired reservations;
# sets ``now`` and ``reserved`` (the sum of those left).
_RESERVED = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
local reserved = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(amount) end
"""
# KEYS[4]: epoch. {-2} when Redis lost its state (no epoch), {-3, seconds} while the reservations are being rebuilt.
_EPOCH_CHECK = """
local epoch = redis.call('GET', KEYS[4])
if not epoch then return {-2} end
if tonumber(epoch) > now then return {-3, tonumber(epoch) - now} end
"""
_RETURN_STATE = """
return {redis.call('GET', KEYS[1]), tostring(reserved)}
"""

# KEYS: spend (of the period), reservations hash, reservation deadlines zset (of the client).
# Returns {spend or false, reserved}.
_STATE = _RESERVED + _RETURN_STATE

# KEYS: spend (of the period), res, resexp (of the client), epoch; ARGV: budget, amount, reservation id,
# reservation ttl s. Admits when spend + reservations + amount fit the budget.
# Returns {admitted 1/0, spend, reserved}, {-1} when the spend is not loaded, {-2} when Redis lost its state
# (no epoch), {-3, seconds} while the reservations are being rebuilt.
_RESERVE = (
    _RESERVED
    + _EPOCH_CHECK
    + """
local spend = redis.call('GET', KEYS[1])
if not spend then return {-1} end
spend = tonumber(spend)
if spend + reserved + tonumber(ARGV[2]) > tonumber(ARGV[1]) * (1 + 1e-9) then return {0, tostring(spend), tostring(reserved)} end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return {1, tostring(spend), tostring(reserved)}
"""
)

# KEYS: res, resexp; ARGV: reservation id, amount, ttl s. A lease renewed (or put back after Redis lost it).
_RENEW = """
local now = tonumber(redis.call('TIME')[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS: spend (of the period), res, resexp (of the client), epoch. _STATE for a turn's check before anything is
# stored: {-2} when Redis lost its state, {-3, seconds} while the reservations are being rebuilt, as _RESERVE.
_STATE_CHECKED = _RESERVED + _EPOCH_CHECK + _RETURN_STATE

# KEYS: epoch; ARGV: rebuild seconds. Redis lost its state: the rebuild window starts (once, SET NX).
_LOST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1]))
return 1
"""

# KEYS: spend (of the reservation's period), res, resexp (of the client); ARGV: reservation id ('' for none),
# cost.
_SETTLE = """
if ARGV[1] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBYFLOAT', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: spend (of the reservation's period), res, resexp; ARGV: reservation id. A call settled late (Redis was out of
# reach when it ended): its reservation given back and the spend dropped, read again from the database, which has
# the call's record -- adding its cost here could count it twice, once more than a reload meanwhile did.
_SETTLE_LATE = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: spend keys; ARGV: cost. Added to each spend that is loaded (one not loaded reads it from the database).
_ADD_SPEND = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBYFLOAT', key, ARGV[1]) end
end
return 1
"""


def _rebuilding(seconds: int) -> ApiError:
    return ApiError(
        "SERVICE_UNAVAILABLE",
        "The gateway is rebuilding its budget counters after Redis lost them; try again shortly.",
        retry_after=max(1, seconds),
    )


def _limits() -> Any:
    # The dataclasses of the clients feature (agentspace.limits), looked up when used.
    return importlib.import_module("agentspace.limits")


class RedisCounters:
    """``limits.Counters`` shared by every replica through Redis."""

    def __init__(self, redis: Any, lease_seconds: float = LEASE_SECONDS) -> None:
        self.redis = redis
        self._scale = lease_seconds / LEASE_SECONDS  # of the times above (read when used)
        self._window = redis.register_script(_WINDOW)
        self._add = redis.register_script(_ADD)
        self._take = redis.register_script(_TAKE)
        self._state = redis.register_script(_STATE)
        self._state_checked = redis.register_script(_STATE_CHECKED)
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._settle_late = redis.register_script(_SETTLE_LATE)
        self._add_spend = redis.register_script(_ADD_SPEND)
        self._renew = redis.register_script(_RENEW)
        self._lost = redis.register_script(_LOST)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}"
        self._reservation_ids: dict[int, str] = {}  # id(Reservation) -> its id in Redis, until settled
        # The reservations of this replica's calls in flight: id -> (res and resexp keys, amount); their leases.
        self._live: dict[str, tuple[list[str], float]] = {}
        # Calls that ended while Redis was out of reach: id -> their spend, res and resexp keys. Their reservations
        # stay in _live, renewed (so they still count against the budget), until a renewal settles them late.
        self._unsettled: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._epoch_set = False

    async def start(self) -> None:
        """At the replica's start: a Redis that loses its state later is taken for the loss it is, by this replica
        too, even before its first budget call (which would otherwise mark an empty Redis as new, and admit calls
        without the other replicas' reservations until they renew them)."""
        await self._ensure_epoch()

    async def _ensure_epoch(self) -> None:
        """Mark Redis as holding the counters (once per replica); its absence later means the state was lost."""
        if not self._epoch_set:
            await self.redis.set(EPOCH_KEY, "0", nx=True)
            self._epoch_set = True

    def _seconds(self, default: float) -> int:
        """A time of the default lease, scaled to this one, in whole seconds (what Redis's EXPIRE takes)."""
        return max(1, round(default * self._scale))

    async def _renew_all(self) -> None:
        for reservation_id, keys in list(self._unsettled.items()):
            await self._settle_late(keys=keys, args=[reservation_id])
            del self._unsettled[reservation_id]
            self._live.pop(reservation_id, None)
        for reservation_id, (keys, amount) in list(self._live.items()):
            await self._renew(keys=keys, args=[reservation_id, repr(amount), self._seconds(RESERVATION_TTL_SECONDS)])

    async def _renew_forever(self) -> None:
        while self._live:
            await asyncio.sleep(RENEW_SECONDS * self._scale)
            try:
                await self._renew_all()
            except Exception as e:  # Redis away: the next renewal puts them back
                log.warning("renewing the budget reservations in Redis failed: %r", e)

    def _spend_key(self, client: str, period_key: str) -> str:
        return f"{PREFIX}:budget:{client}:{period_key}"

    def _keys(self, client: str, identity: str, period_key: str) -> list[str]:
        """The period's spend; the reservations of the client's calls in flight (whatever their period) and their
        deadlines, by the client's name and creation (``identity``)."""
        held = f"{PREFIX}:budget:{client}:{identity}"
        return [self._spend_key(client, period_key), held + ":res", held + ":resexp"]

    async def window(self, client: str, now: float) -> Any:
        requests, tokens, requests_ms, tokens_ms = await self._window(
            keys=[f"{PREFIX}:rl:req:{client}", f"{PREFIX}:rl:tok:{client}"], args=[WINDOW_MS]
        )
        return _limits().Window(int(requests), int(tokens), max(0, requests_ms) / 1000, max(0, tokens_ms) / 1000)

    async def add_request(self, client: str, now: float) -> None:
        await self._add(keys=[f"{PREFIX}:rl:req:{client}"], args=[f"{self._prefix}-{next(self._ids)}", WINDOW_MS])

    async def take_request(self, client: str, now: float, limit: int) -> Any:
        reply = await self._take(
            keys=[f"{PREFIX}:rl:req:{client}"], args=[f"{self._prefix}-{next(self._ids)}", WINDOW_MS, limit]
        )
        if int(reply[0]) == 1:
            return None
        return _limits().Window(int(reply[1]), 0, max(0, int(reply[2])) / 1000, 0.0)

    async def add_tokens(self, client: str, tokens: int, now: float) -> None:
        if tokens > 0:
            member = f"{self._prefix}-{next(self._ids)}:{int(tokens)}"
            await self._add(keys=[f"{PREFIX}:rl:tok:{client}"], args=[member, WINDOW_MS])

    async def _load(self, client: str, period_key: str, load_spend: SpendLoader) -> None:
        """The period's spend from the database, unless another replica loaded it meanwhile (SET NX)."""
        key = self._spend_key(client, period_key)
        await load_spend(lambda spend: self.redis.set(key, repr(float(spend)), nx=True, ex=SPEND_TTL_SECONDS))

    async def _drop_spends(self) -> None:
        """The spends a restarted Redis may have loaded from an older snapshot: read again from the database once
        the rebuild ends (the reservations stay: those of calls in flight are put back, the rest lapse)."""
        async for key in self.redis.scan_iter(match=f"{PREFIX}:budget:*", count=1000):
            if not key.endswith((b":res", b":resexp")):
                await self.redis.delete(key)

    async def reserve(
        self, client: str, identity: str, period_key: str, budget: float, amount: float, load_spend: SpendLoader
    ) -> tuple[Any, float]:
        await self._ensure_epoch()
        reservation_id = f"{self._prefix}-{next(self._ids)}"
        keys = self._keys(client, identity, period_key)
        for _ in range(3):
            reply = await self._reserve(
                keys=[*keys, EPOCH_KEY],
                args=[repr(budget), repr(amount), reservation_id, self._seconds(RESERVATION_TTL_SECONDS)],
            )
            if int(reply[0]) == -1:
                await self._load(client, period_key, load_spend)
                continue
            if int(reply[0]) == -2:  # Redis lost its state: rebuild, this replica's reservations first
                await self._rebuild()
                continue
            if int(reply[0]) == -3:
                raise _rebuilding(int(reply[1]))
            spend, reserved = float(reply[1]), float(reply[2])
            if int(reply[0]) == 0:
                return None, spend + reserved
            reservation = _limits().Reservation(client, period_key, amount, client_created_at=identity)
            self._reservation_ids[id(reservation)] = reservation_id
            self._live[reservation_id] = (keys[1:], amount)
            self._keep_renewing()
            return reservation, spend
        raise RuntimeError("the budget spend could not be loaded into Redis")

    def _keep_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="agentspace-reservation-leases"
            )

    async def _rebuild(self) -> None:
        rebuild = self._seconds(REBUILD_SECONDS)
        if await self._lost(keys=[EPOCH_KEY], args=[rebuild]):
            log.warning("Redis lost the budget counters; rebuilding them for %d s", rebuild)
            await self._drop_spends()
        await self._renew_all()

    async def spend(self, client: str, identity: str, period_key: str, load_spend: SpendLoader) -> float:
        """The spend and reservations a turn is checked against before anything of it is stored: refused while
        the counters are rebuilt, as its call's reservation would be, rather than stored and failed at the call."""
        await self._ensure_epoch()
        keys = [*self._keys(client, identity, period_key), EPOCH_KEY]
        for _ in range(3):
            reply = await self._state_checked(keys=keys)
            if reply[0] == -2:
                await self._rebuild()
            elif reply[0] == -3:
                raise _rebuilding(int(reply[1]))
            elif reply[0] is None:
                await self._load(client, period_key, load_spend)
            else:
                return float(reply[0]) + float(reply[1])
        raise RuntimeError("the budget spend could not be loaded into Redis")

    async def spend_parts(
        self, client: str, identity: str, period_key: str, load_spend: SpendLoader
    ) -> tuple[float, float]:
        keys = self._keys(client, identity, period_key)
        spend, reserved = await self._state(keys=keys)
        if spend is None:
            await self._load(client, period_key, load_spend)
            spend, reserved = await self._state(keys=keys)
        return float(spend or 0.0), float(reserved)

    async def settle(self, reservation: Any, real_cost: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        reservation_id = self._reservation_ids.pop(id(reservation), "")
        held = self._live.pop(reservation_id, None)
        keys = self._keys(reservation.client, reservation.client_created_at, reservation.period_key)
        try:
            await self._settle(keys=keys, args=[reservation_id, repr(real_cost)])
        except Exception:
            # Redis out of reach: the call's record is stored, but the spend here misses its cost. Its reservation
            # (at least that cost) is kept and renewed until a renewal can settle it late, so it counts meanwhile.
            if held is not None:
                self._live[reservation_id] = held
                self._unsettled[reservation_id] = keys
                self._keep_renewing()
            raise

    async def add_spend(self, client: str, period_keys: Sequence[str], cost: float) -> None:
        if period_keys:
            await self._add_spend(keys=[self._spend_key(client, k) for k in period_keys], args=[repr(cost)])
