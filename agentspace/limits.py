"""The checks before every provider call (README.md#teams-and-budgets), made at the moment of the call: the server is
not shutting down, the credential is still valid, the model allowlist, requests and tokens per minute, the
budget. One implementation (``Guard``), called by ``calls.ProviderCall.admit`` for every transport and
endpoint; the counters live behind one small interface (``Counters``) with an in-process implementation
here and a Redis one in ``redis_counters.py``.

Budget (docs/accounting.md): a call reserves the most it can cost as sent upstream (``calls.Ceiling``) and is
admitted only while posted spend + the reservations of the calls in flight + its own reservation fit the
budget; its record settles the reservation with the real cost. The reservations are held per client (its name
and creation), not per period: a period that changes (at midnight, or set by the admin) while calls are in
flight counts them still, as their records land in it (stamped at their end). The period's spend comes from the
usage store (the posted entries), read once per client and period and then kept current by every record of the
client -- with or without a budget, so a budget set later counts what was spent before it, and in every period
loaded, so a period changed and changed back counts what was spent meanwhile (but not in a period whose spend,
read while the record was being stored, counted it already).

Usage::

    reservation = await gw.guard.admit(caller, model, cost=lambda: usd)   # ApiError
    ... the provider call; its record settles: await gw.guard.settle(reservation, record)
    await gw.guard.release(reservation)  # in a finally: a call that made no record settles at 0
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from .clients import ADMIN, PERIODS, Client, Clock, hash_key, iso, period_bounds, utc_now
from .errors import OUTAGE_RETRY_SECONDS, ApiError, outage_error
from .logs import warn_limited
from .storage.protocols import spend_of

if TYPE_CHECKING:
    from .storage.protocols import ClientStoreAPI, UsageStoreAPI
    from .types import ModelInfo, UsageRecord

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
COUNTERS_UNAVAILABLE = (
    "The gateway could not reach Redis, where the clients' limits and budgets are counted; nothing was sent."
)
SHUTTING_DOWN_MESSAGE = "The gateway is shutting down; try again when it is back."
# What a call refused for its reservation alone may cost, and what to lower, in the Messages API's and Chat
# Completions' words (the /v1 endpoints speaking others say it in theirs: v1_common.refusal).
CALL_COST_HINT = "(its input, max_tokens and thinking budget at the model's prices): lower max_tokens or send less"


@dataclass
class Reservation:
    """The maximum cost of one call in flight, held against its client's budget until settled (whatever its
    period is by then); its real cost settles into the spend of ``period_key``, the period it was admitted in."""

    client: str
    period_key: str
    amount: float
    settled: bool = False
    # The client's creation (its identity, with its name): where the reservation is held, and the keys of its
    # other periods (``Guard.settle``).
    client_created_at: str = ""


@dataclass
class Window:
    """A client's sliding minute: requests and tokens in it, and when each next falls below a limit."""

    requests: int
    tokens: int
    # Seconds until the oldest request / token entry leaves the window.
    requests_free_in: float
    tokens_free_in: float


# Reads a period's spend from the usage store and returns it. Given ``install``, it hands the spend to it
# before settling may resume: a spend in Redis is set while no record of the client can settle meanwhile
# (a record settled between the read and the set would otherwise be lost: its adding finds no spend yet);
# ``install`` answers whether it set the spend (false: another load's was there already).
SpendLoader = Callable[[Callable[[float], Awaitable[object]] | None], Awaitable[float]]


class Counters(Protocol):
    """Where the rate windows, the budget spend and the reservations live (in-process here; Redis for a
    scaled-out gateway). Each method is atomic for its client."""

    def window(self, client: str, now: float) -> Awaitable[Window]: ...

    def add_request(self, client: str, now: float) -> Awaitable[None]: ...

    def take_request(self, client: str, now: float, limit: int) -> Awaitable[Window | None]:
        """Count one request when fewer than ``limit`` are in the window, and return None; else count
        nothing and return the window. Atomic: concurrent calls, on any replica, admit at most ``limit``."""
        ...

    def add_tokens(self, client: str, tokens: int, now: float) -> Awaitable[None]: ...

    def reserve(
        self, client: str, identity: str, period_key: str, budget: float, amount: float, load_spend: SpendLoader
    ) -> Awaitable[tuple[Reservation | None, float]]:
        """Admit and reserve ``amount`` when spend + reservations + amount <= budget: (reservation, spend);
        else (None, spend + reservations). The spend is the period's (``load_spend`` gives it when it is not known
        yet); the reservations are those of the client's calls in flight (``identity``: the client's creation),
        whatever period they were admitted in."""
        ...

    def spend(self, client: str, identity: str, period_key: str, load_spend: SpendLoader) -> Awaitable[float]:
        """Spend of the period plus the client's reservations in flight."""
        ...

    def spend_parts(
        self, client: str, identity: str, period_key: str, load_spend: SpendLoader
    ) -> Awaitable[tuple[float, float]]:
        """The spend of the period as posted, and the client's reservations in flight, read together."""
        ...

    def settle(self, reservation: Reservation, real_cost: float) -> Awaitable[None]:
        """The reservation out of the client's calls in flight, and ``real_cost`` into the spend of its period."""
        ...

    def add_spend(self, client: str, period_keys: Sequence[str], cost: float) -> Awaitable[None]:
        """A cost recorded, added to the spend of each of ``period_keys`` that is loaded (a call of a client that
        has no budget now, or the periods other than the one its reservation was held in)."""
        ...


@dataclass
class _Budget:
    spend: float = 0.0
    calls: int = 0  # calls in flight admitted in this period: kept until they settle into it


@dataclass
class _InFlight:
    reserved: float = 0.0
    calls: int = 0


@dataclass
class _ClientCounters:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    budgets: dict[str, _Budget] = field(default_factory=dict)  # period key -> its spend
    in_flight: dict[str, _InFlight] = field(default_factory=dict)  # identity -> its reservations, any period
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class InProcessCounters:
    """The counters of one server process (a single gateway)."""

    def __init__(self) -> None:
        self._clients: dict[str, _ClientCounters] = {}

    def _get(self, client: str) -> _ClientCounters:
        counters = self._clients.get(client)
        if counters is None:
            counters = self._clients[client] = _ClientCounters()
        return counters

    def _prune(self, c: _ClientCounters, now: float) -> None:
        while c.requests and c.requests[0] <= now - WINDOW_SECONDS:
            c.requests.popleft()
        while c.tokens and c.tokens[0][0] <= now - WINDOW_SECONDS:
            c.token_sum -= c.tokens.popleft()[1]

    async def window(self, client: str, now: float) -> Window:
        c = self._get(client)
        self._prune(c, now)
        return Window(
            len(c.requests),
            c.token_sum,
            c.requests[0] + WINDOW_SECONDS - now if c.requests else 0.0,
            c.tokens[0][0] + WINDOW_SECONDS - now if c.tokens else 0.0,
        )

    async def add_request(self, client: str, now: float) -> None:
        self._get(client).requests.append(now)

    async def take_request(self, client: str, now: float, limit: int) -> Window | None:
        # No await between the count and the append: atomic on the event loop.
        window = await self.window(client, now)
        if window.requests >= limit:
            return window
        self._get(client).requests.append(now)
        return None

    async def add_tokens(self, client: str, tokens: int, now: float) -> None:
        if tokens > 0:
            c = self._get(client)
            c.tokens.append((now, tokens))
            c.token_sum += tokens

    async def _budget(self, c: _ClientCounters, period_key: str, load_spend: SpendLoader) -> _Budget:
        budget = c.budgets.get(period_key)
        if budget is None:
            async with c.lock:  # one read of the usage store per client and period
                budget = c.budgets.get(period_key)
                if budget is None:
                    spend = await load_spend(None)  # set below, before anything else can run
                    budget = c.budgets[period_key] = _Budget(spend)
                    for key in [k for k in c.budgets if k != period_key and not c.budgets[k].calls]:
                        del c.budgets[key]  # periods gone by, nothing in flight
        return budget

    async def reserve(
        self, client: str, identity: str, period_key: str, budget: float, amount: float, load_spend: SpendLoader
    ) -> tuple[Reservation | None, float]:
        c = self._get(client)
        b = await self._budget(c, period_key, load_spend)
        held = c.in_flight.get(identity)
        reserved = held.reserved if held is not None else 0.0
        # No await from the check to the reservation: concurrent calls see each other's reservations.
        if b.spend + reserved + amount > budget * (1 + 1e-9):
            return None, b.spend + reserved
        if held is None:
            held = c.in_flight[identity] = _InFlight()
        held.reserved += amount
        held.calls += 1
        b.calls += 1
        return Reservation(client, period_key, amount, client_created_at=identity), b.spend

    async def spend(self, client: str, identity: str, period_key: str, load_spend: SpendLoader) -> float:
        spend, reserved = await self.spend_parts(client, identity, period_key, load_spend)
        return spend + reserved

    async def spend_parts(
        self, client: str, identity: str, period_key: str, load_spend: SpendLoader
    ) -> tuple[float, float]:
        c = self._get(client)
        b = await self._budget(c, period_key, load_spend)
        held = c.in_flight.get(identity)
        return b.spend, held.reserved if held is not None else 0.0

    async def settle(self, reservation: Reservation, real_cost: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        c = self._get(reservation.client)
        held = c.in_flight.get(reservation.client_created_at)
        if held is not None:
            held.calls -= 1
            held.reserved = max(0.0, held.reserved - reservation.amount)
            if held.calls <= 0:
                del c.in_flight[reservation.client_created_at]
        b = c.budgets.get(reservation.period_key)
        if b is not None:
            b.calls = max(0, b.calls - 1)
            b.spend += real_cost

    async def add_spend(self, client: str, period_keys: Sequence[str], cost: float) -> None:
        budgets = self._get(client).budgets
        for key in period_keys:
            b = budgets.get(key)
            if b is not None:  # not loaded yet: the load reads it from the store
                b.spend += cost


def _check_model(client: Client, model: str) -> None:
    if not client.model_allowed(model):
        raise ApiError(
            "MODEL_NOT_ALLOWED", f"Client {client.name!r} may not use {model}; it may use: {', '.join(client.models)}."
        )


def _window_of(name: str, created_at: str) -> str:
    # A client's minute, by its name and creation: one added again under a removed one's name starts afresh.
    return f"{name}|{created_at}"


def _period_key(period: str, start: datetime | None, created_at: str) -> str:
    # The client's creation is part of the key: a client added again under a removed one's name has its own
    # spend, in memory and in Redis.
    return f"{period}:{iso(start)}:{created_at}"


def _started_before(record: UsageRecord, created_at: str) -> str:
    """``record``'s call's start (its timestamp less its latency), and at the latest a millisecond before
    ``created_at``, as timestamps are written (``types.now_iso``)."""
    try:
        ended = datetime.fromisoformat(record.timestamp)
        limit = datetime.fromisoformat(created_at) - timedelta(milliseconds=1)
    except ValueError:
        return record.timestamp
    started = min(ended - timedelta(milliseconds=record.latency_ms), limit).astimezone(UTC)
    return started.strftime("%Y-%m-%dT%H:%M:%S.") + f"{started.microsecond // 1000:03d}Z"


def usd(value: float) -> str:
    """Dollars as the refusals show them: up to six decimals, no trailing zeros ($5, $0.00012)."""
    return "$" + (f"{round(value, 6) + 0.0:.6f}".rstrip("0").rstrip(".") or "0")  # + 0.0: never "$-0"


def _counters_failed(e: Exception) -> ApiError:
    """The refusal when the counters failed (admission fails closed), in words that name what failed, and the log
    line: an outage (Redis, the database or the data directory unreachable) in one line, a defect of ours with its
    traceback."""
    outage = outage_error(e)
    if outage is None:
        log.exception("the client counters could not be reached")
        return ApiError(
            "INTERNAL_ERROR",
            "The gateway could not check the client's limits and budget (an internal error; its log says more); "
            "nothing was sent.",
        )
    warn_limited(log, "counters-unreachable", "the client counters could not be reached: %r", e)
    if type(e).__module__.startswith("redis."):
        return ApiError("SERVICE_UNAVAILABLE", COUNTERS_UNAVAILABLE, retry_after=OUTAGE_RETRY_SECONDS)
    return ApiError(
        outage.code,
        f"{outage.message.rstrip('.')}; the client's limits and budget could not be checked, and nothing was sent.",
    )


class Guard:
    """The one place the checks are made, for every transport and endpoint."""

    def __init__(
        self,
        clients: ClientStoreAPI,
        usage: UsageStoreAPI,
        model_info: Callable[[str], ModelInfo],
        counters: Counters | None = None,
        clock: Clock = utc_now,
        shutting_down: asyncio.Event | None = None,
        gateway_token: Callable[[], str] | None = None,
    ) -> None:
        self.clients = clients
        self.usage = usage
        self.model_info = model_info
        self.counters: Counters = counters or InProcessCounters()
        self.clock = clock  # UTC wall clock of budget periods (tests inject one)
        self.monotonic: Callable[[], float] = time.monotonic  # the rate windows' clock
        # Set when shutdown begins (server.py): no new provider call is admitted after it, on any transport.
        self.shutting_down = shutting_down
        # The gateway token now (server.py: the token file, re-read when rotated): an admin's call made after
        # a rotation, on a socket or a request that authenticated before it, is refused as a client's is.
        self.gateway_token = gateway_token
        self._token_hash: tuple[str, str] = ("", "")  # the last token seen and its SHA-256
        # Records stored and not settled yet, per client (``posting``), and the ids of those a period's spend
        # read from the store counted already, per (client, period key): settling adds them there no more.
        self._posting: dict[str, dict[str, str]] = {}  # client -> id -> timestamp of records being stored
        self._counted: dict[tuple[str, str], set[str]] = {}
        # Per client: a spend read from the store and a record's settling never interleave. Else a record
        # settled while the read was under way is counted twice (read, then added to the period just loaded)
        # or not at all (not loaded yet when settled, and not in what was read).
        self._spend_locks: dict[str, asyncio.Lock] = {}

    def _spend_lock(self, client: str) -> asyncio.Lock:
        lock = self._spend_locks.get(client)
        if lock is None:
            lock = self._spend_locks[client] = asyncio.Lock()
        return lock

    async def client(self, caller: str, credential: str | None = None) -> Client | None:
        """The caller's client, read from the store of record now; None for the admin. A client removed since,
        or whose key (or the gateway token) was rotated since the caller authenticated with it (``credential``:
        its SHA-256), is refused."""
        if caller == ADMIN:
            if credential is not None and self.gateway_token is not None:
                token = self.gateway_token()
                if token != self._token_hash[0]:
                    self._token_hash = (token, hash_key(token))
                if not hmac.compare_digest(self._token_hash[1], credential):
                    raise ApiError("UNAUTHORIZED", "The gateway token was rotated; use the new one.")
            return None
        client = await self.clients.get(caller)
        if client is None:
            raise ApiError("UNAUTHORIZED", "This client key was removed; ask the gateway's admin for a new one.")
        if credential is not None and not client.key_matches_hash(credential):
            raise ApiError("UNAUTHORIZED", "This client key was rotated; use the new one.")
        return client

    async def check_model(self, caller: str, model: str) -> None:
        client = await self.client(caller)
        if client is not None:
            _check_model(client, model)

    def _period(self, client: Client) -> tuple[str, datetime | None, datetime | None]:
        start, end = period_bounds(client.period, self.clock())
        return _period_key(client.period, start, client.created_at), start, end

    def _every_period(self, created_at: str) -> list[str]:
        """The keys of the current day, week, month and total of a client: a record's cost goes to each that is
        loaded, not only to its period now, so that a period changed and changed back (month, day, month)
        finds a spend that counts the calls made meanwhile."""
        now = self.clock()
        return [_period_key(period, period_bounds(period, now)[0], created_at) for period in PERIODS]

    def _loader(self, client: Client, start: datetime | None, key: str) -> SpendLoader:
        async def load(install: Callable[[float], Awaitable[object]] | None) -> float:
            since = client.since if start is None else max(start, client.since or start)
            async with self._spend_lock(client.name):
                spend, counted = await spend_of(
                    self.usage,
                    since=since,
                    client=client.name,
                    posting=lambda: dict(self._posting.get(client.name, {})),
                )
                # Redis keeps a spend another load set first (SET NX): then this read is not what counts.
                if install is not None and not await install(spend):
                    return spend
                # A record stored and not settled yet is in this spend: its settling must not add it again.
                if counted:
                    self._counted.setdefault((client.name, key), set()).update(counted)
                return spend

        return load

    def posting(self, record: UsageRecord) -> None:
        """``record`` is about to be stored; its ``settle`` follows (``recording.Recorder``)."""
        if record.client is not None and record.client != ADMIN:
            self._posting.setdefault(record.client, {})[record.id] = record.timestamp

    def _posted(self, client: str, record_id: str) -> set[str]:
        """The period keys whose spend counted ``record_id`` when read; the record is no longer posting."""
        posting = self._posting.get(client)
        if posting is not None:
            posting.pop(record_id, None)
            if not posting:
                del self._posting[client]
        keys = set()
        for counted_key in [k for k in self._counted if k[0] == client]:
            ids = self._counted[counted_key]
            if record_id in ids:
                keys.add(counted_key[1])
                ids.discard(record_id)
                if not ids:
                    del self._counted[counted_key]
        return keys

    async def spend(self, client: Client) -> tuple[float, float]:
        """The spend of the client's current period as posted (what its records cost: what the CLI and the usage
        reports add up), and what its calls in flight hold (their reservations)."""
        key, start, _ = self._period(client)
        return await self.counters.spend_parts(client.name, client.created_at, key, self._loader(client, start, key))

    async def precheck(
        self, caller: str, model: str, least_cost: Callable[[], float] | None = None, credential: str | None = None
    ) -> None:
        """The checks a request must pass before it is taken (stored, streamed); reserves nothing.
        ``least_cost``: what its first call will reserve at least (its output ceiling), so that a turn that
        cannot be admitted is refused before anything is stored."""
        try:
            await self._precheck(caller, model, least_cost, credential)
        except ApiError:
            raise
        except Exception as e:
            raise _counters_failed(e) from None

    async def _precheck(
        self, caller: str, model: str, least_cost: Callable[[], float] | None, credential: str | None
    ) -> None:
        client = await self.client(caller, credential)
        if client is None:
            return
        _check_model(client, model)  # the client as read just now: one read for every check of the call
        if not client.limited:
            return
        await self._check_window(client)
        if client.budget_usd is not None:
            key, start, end = self._period(client)
            spent = await self.counters.spend(client.name, client.created_at, key, self._loader(client, start, key))
            if spent >= client.budget_usd:
                raise self._over_budget(client, spent, end)
            least = least_cost() if least_cost is not None else 0.0
            if least and spent + least > client.budget_usd * (1 + 1e-9):
                raise self._over_budget(client, spent, end, least, at_least=True)

    async def admit(
        self,
        caller: str,
        model: str,
        *,
        cost: Callable[[], float] | None,
        credential: str | None = None,
        continues: bool = False,
        admitted: Callable[[Client], None] | None = None,
    ) -> Reservation | None:
        """Check one provider call at the moment it is made and, for a client with a budget, reserve ``cost()``
        (the most it can cost, computed only then; None: a call billed nothing, e.g. count_tokens). Raises ApiError
        (SERVICE_UNAVAILABLE, UNAUTHORIZED, MODEL_NOT_ALLOWED, RATE_LIMITED, BUDGET_EXCEEDED); counters that
        cannot be reached (Redis) refuse: admission fails closed. ``continues``: the call is another attempt at a
        request admitted already (the next deployment of a group, a fallback, a retry): it is checked and
        reserved like any, but it is not another of the client's requests in its rpm. ``admitted`` is given the
        client the call was admitted as (its identity: ``settle``'s ``identity``)."""
        try:
            return await self._admit(
                caller, model, cost=cost, credential=credential, continues=continues, admitted=admitted
            )
        except ApiError:
            raise
        except Exception as e:
            raise _counters_failed(e) from None

    async def _admit(
        self,
        caller: str,
        model: str,
        *,
        cost: Callable[[], float] | None,
        credential: str | None = None,
        continues: bool = False,
        admitted: Callable[[Client], None] | None = None,
    ) -> Reservation | None:
        if self.shutting_down is not None and self.shutting_down.is_set():
            raise ApiError("SERVICE_UNAVAILABLE", SHUTTING_DOWN_MESSAGE)
        client = await self.client(caller, credential)
        if client is None:
            return None
        if admitted is not None:
            admitted(client)
        _check_model(client, model)  # the client as read just now: one read for every check of the call
        await self._check_window(client, rpm=not continues)
        reservation = None
        if client.budget_usd is not None and cost is not None:
            key, start, end = self._period(client)
            amount = cost()
            reservation, spent = await self.counters.reserve(
                client.name, client.created_at, key, client.budget_usd, amount, self._loader(client, start, key)
            )
            if reservation is None:
                raise self._over_budget(client, spent, end, amount)
        if continues:
            pass  # the request was counted when it was first admitted
        elif client.rpm is None:
            # Counted without a limit too (as the tokens are, in ``settle``): an rpm set later counts the
            # calls of the minute before it, as a budget set later counts the spend before it.
            await self.counters.add_request(_window_of(client.name, client.created_at), self.monotonic())
        else:
            # The check above is not atomic with the count: calls in flight together (on any replica) would
            # all pass it. This one is, so at most ``rpm`` calls are admitted in a minute.
            window = await self.counters.take_request(
                _window_of(client.name, client.created_at), self.monotonic(), client.rpm
            )
            if window is not None:
                await self.release(reservation)
                raise self._too_many_requests(client, window)
        return reservation

    async def _check_window(self, client: Client, rpm: bool = True) -> None:
        if (client.rpm is None or not rpm) and client.tpm is None:
            return
        window = await self.counters.window(_window_of(client.name, client.created_at), self.monotonic())
        if rpm and client.rpm is not None and window.requests >= client.rpm:
            raise self._too_many_requests(client, window)
        if client.tpm is not None and window.tokens >= client.tpm:
            raise ApiError(
                "RATE_LIMITED",
                f"Client {client.name!r} may use {client.tpm} tokens per minute; try again shortly.",
                retry_after=math.ceil(max(window.tokens_free_in, 0.001)),
                limited="tokens",
            )

    def _too_many_requests(self, client: Client, window: Window) -> ApiError:
        return ApiError(
            "RATE_LIMITED",
            f"Client {client.name!r} may make {client.rpm} requests per minute; try again shortly.",
            retry_after=math.ceil(max(window.requests_free_in, 0.001)),
            limited="requests",
        )

    def _over_budget(
        self, client: Client, spent: float, end: datetime | None, cost: float | None = None, *, at_least: bool = False
    ) -> ApiError:
        budget = client.budget_usd or 0.0
        if end is None:
            when, retry = "it does not reset (period 'total'); the admin can raise it", None
        else:
            when = f"it resets at {end.astimezone(UTC):%Y-%m-%d %H:%M} UTC"  # (periods end at midnight UTC)
            retry = max(1.0, math.ceil((end - self.clock()).total_seconds()))
        left = budget - spent
        if cost is not None and left > 0 and at_least:
            # A turn checked before anything is stored: its input is not counted yet, only its output is known.
            return ApiError(
                "BUDGET_EXCEEDED",
                f"Client {client.name!r} has {usd(left)} left of its {usd(budget)} {client.period} budget "
                f"(spent {usd(spent)}, calls in flight included), and this turn's first call needs at least "
                f"{usd(cost)} (the output it asks for, thinking budget included, at the model's prices); {when}.",
                retry_after=retry,
            )
        if cost is not None and left > 0:
            # Room is left, but not for this call at its most: say so, and what would fit.
            return ApiError(
                "BUDGET_EXCEEDED",
                f"Client {client.name!r} has {usd(left)} left of its {usd(budget)} {client.period} budget "
                f"(spent {usd(spent)}, calls in flight included), and this call may cost up to {usd(cost)} as sent "
                f"{CALL_COST_HINT}; {when}.",
                retry_after=retry,
            )
        return ApiError(
            "BUDGET_EXCEEDED",
            f"Client {client.name!r} has used its {usd(budget)} {client.period} budget "
            f"(spent {usd(spent)}, calls in flight included); {when}.",
            retry_after=retry,
        )

    async def owned(self, record: UsageRecord, identity: str) -> bool:
        """Whether the client that made ``record``'s call (created at ``identity``) is still its name's client.
        One removed and added again while the call ran is a new client that owns nothing from before it: the
        record is stamped when the call started, before the new client existed, so it stays the earlier
        client's in every report and spend (which own what is stamped since their creation)."""
        assert record.client is not None
        try:
            current = await self.clients.get(record.client)
        except Exception as e:  # an outage: the record is stored as it is, and counted as before
            warn_limited(log, "owner-check", "could not read client %s at its record: %r", record.client, e)
            return True
        if current is not None and current.created_at == identity:
            return True
        if current is not None and record.timestamp >= current.created_at:
            record.timestamp = _started_before(record, current.created_at)
        return False

    async def settle(
        self, reservation: Reservation | None, record: UsageRecord, *, identity: str | None = None, owned: bool = True
    ) -> None:
        """Account one usage record: its tokens in the client's minute, its cost against the period's spend --
        for every client, with a budget or not, so that a spend read once stays current. ``identity``: the
        creation of the client the call was admitted as; ``owned``: whether it is still the name's client."""
        if record.client is None or record.client == ADMIN:
            return
        async with self._spend_lock(record.client):
            await self._settle(reservation, record, identity, owned)

    async def _settle(
        self, reservation: Reservation | None, record: UsageRecord, identity: str | None, owned: bool
    ) -> None:
        assert record.client is not None
        counted = self._posted(record.client, record.id)
        try:
            cost = record.cost.total_cost
            if reservation is not None:
                created_at = reservation.client_created_at
                # Its period's spend read back from the store while the record was stored (Redis lost it, or its key
                # expired) counted it already: the reservation is given back, and the cost not added again.
                await self.counters.settle(reservation, 0.0 if reservation.period_key in counted else cost)
                periods = [k for k in self._every_period(created_at) if k != reservation.period_key]
            elif identity is not None:
                if not owned:  # removed, or replaced by a new client of the name: nothing of its is counted
                    return
                created_at, periods = identity, self._every_period(identity)
            else:
                client = await self.clients.get(record.client)
                # Removed since, or a record from before this client of the name was (an earlier one's, posted
                # after a restart): nothing of it is counted any more.
                if client is None or not client.owns_since(record.timestamp):
                    return
                created_at, periods = client.created_at, self._every_period(client.created_at)
            periods = [k for k in periods if k not in counted]
            window = _window_of(record.client, created_at)
            await self.counters.add_tokens(window, record.usage.total_tokens, self.monotonic())
            if cost:
                await self.counters.add_spend(record.client, periods, cost)
        except Exception:  # the record is stored; Redis's copy of the spend is reloaded from the records
            log.exception("settling usage record %s in the client counters failed", record.id)

    async def unsettle(self, client_name: str | None, cost: float) -> None:
        """A record taken back out of the store (a recovered estimate, replaced by the record as the upstream
        reported it, ``storage/ledger.py``): its cost out of the period's spend, which the new record adds."""
        if client_name is None or client_name == ADMIN or not cost:
            return
        try:
            client = await self.clients.get(client_name)
            if client is not None:
                await self.counters.add_spend(client.name, self._every_period(client.created_at), -cost)
        except Exception:  # Redis's copy of the spend is reloaded from the records
            log.exception("taking a replaced record's cost out of client %s's spend failed", client_name)

    async def release(self, reservation: Reservation | None) -> None:
        """Give back a reservation that was not settled (a call stopped before it made a record)."""
        if reservation is not None and not reservation.settled:
            await self.counters.settle(reservation, 0.0)
