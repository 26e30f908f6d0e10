"""Rate windows and budget reservations in Redis (``RedisCounters``), two replicas' counters on one real
Redis: a client's limits and budget hold across both, reservations of a replica that died expire, and the
spend is reloaded from the database when its copy in Redis expires."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from agentspace import redis_counters
from agentspace.redis_counters import RedisCounters
from tests.conftest import wait_until
from tests.scale_servers import Redis

pytest.importorskip("agentspace.limits")  # the clients feature defines what is counted


@pytest.fixture
async def replicas(redis_srv: Redis) -> AsyncIterator[list[RedisCounters]]:
    import redis.asyncio as aioredis

    clients = [aioredis.from_url(redis_srv.url) for _ in range(2)]
    await clients[0].flushall()
    yield [RedisCounters(c) for c in clients]
    for c in clients:
        await c.aclose()


async def test_windows_count_across_replicas(replicas: list[RedisCounters]) -> None:
    a, b = replicas
    await asyncio.gather(*(r.add_request("team", 0.0) for r in (a, b, a, b, a)))
    await a.add_tokens("team", 120, 0.0)
    await b.add_tokens("team", 30, 0.0)
    await b.add_tokens("other", 5, 0.0)
    window = await b.window("team", 0.0)
    assert (window.requests, window.tokens) == (5, 150)
    assert 59 < window.requests_free_in <= 60 and 59 < window.tokens_free_in <= 60
    assert (await a.window("nobody", 0.0)).requests == 0


async def test_budget_holds_across_replicas(replicas: list[RedisCounters]) -> None:
    loads = 0

    async def load(install: Any = None) -> float:
        nonlocal loads
        loads += 1
        if install is not None:
            await install(0.25)
        return 0.25  # spent earlier in the period, per the database

    # 40 calls of at most $0.10 against a $1.00 budget, half on each replica, all at once.
    results = await asyncio.gather(
        *(replicas[n % 2].reserve("team", "c1", "month:2026-12", 1.0, 0.10, load) for n in range(40))
    )
    admitted = [(n, r) for n, (r, _) in enumerate(results) if r is not None]
    assert len(admitted) == 7  # 0.25 + 8 * 0.10 > 1.00: the 8th does not fit, on either replica
    assert await replicas[1].spend("team", "c1", "month:2026-12", load) == pytest.approx(0.95)
    for n, reservation in admitted:  # settled where reserved, at the real (lower) cost
        await replicas[n % 2].settle(reservation, 0.02)
    assert await replicas[0].spend("team", "c1", "month:2026-12", load) == pytest.approx(0.25 + 7 * 0.02)
    assert loads <= 2  # loaded once (a second replica may race the first; SET NX keeps one)
    reservation, _ = await replicas[1].reserve("team", "c1", "month:2026-12", 1.0, 0.10, load)
    assert reservation is not None


async def test_reservations_count_in_whatever_period_is_current(replicas: list[RedisCounters]) -> None:
    """A call admitted in one period is still in flight when the client's period changes: it counts there too
    (its record lands in it), on either replica, and settles its cost into the period it was admitted in. A
    client of the same name created anew holds none of them."""

    async def load(install: Any = None) -> float:
        if install is not None:
            await install(0.0)
        return 0.0

    a, b = replicas
    held, _ = await a.reserve("team", "c1", "month:2026-12", 1.0, 0.6, load)
    assert held is not None and held.client_created_at == "c1"
    assert await b.spend_parts("team", "c1", "day:2026-12-07", load) == (0.0, pytest.approx(0.6))
    refused, spent = await b.reserve("team", "c1", "day:2026-12-07", 1.0, 0.5, load)
    assert refused is None and spent == pytest.approx(0.6)
    other, _ = await b.reserve("team", "c2", "day:2026-12-07", 1.0, 0.5, load)
    assert other is not None
    await a.settle(held, 0.4)
    assert await b.spend_parts("team", "c1", "day:2026-12-07", load) == (0.0, 0.0)
    assert await b.spend_parts("team", "c1", "month:2026-12", load) == (pytest.approx(0.4), 0.0)


async def test_a_dead_replicas_reservation_expires(
    replicas: list[RedisCounters], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def load(install: Any = None) -> float:
        if install is not None:
            await install(0.0)
        return 0.0

    monkeypatch.setattr(redis_counters, "RESERVATION_TTL_SECONDS", 1)
    dead, alive = replicas
    held, _ = await dead.reserve("team", "c1", "p", 1.0, 1.0, load)  # never settled: its replica died
    assert held is not None
    refused, spent = await alive.reserve("team", "c1", "p", 1.0, 0.10, load)
    assert refused is None and spent == pytest.approx(1.0)
    await asyncio.sleep(2.1)
    admitted, _ = await alive.reserve("team", "c1", "p", 1.0, 0.10, load)
    assert admitted is not None


async def test_spend_is_reloaded_from_the_database_when_it_expires(
    replicas: list[RedisCounters], monkeypatch: pytest.MonkeyPatch, redis_srv: Redis
) -> None:
    truth = {"spend": 0.5}

    async def load(install: Any = None) -> float:
        if install is not None:
            await install(truth["spend"])
        return truth["spend"]

    a, _ = replicas
    assert await a.spend("team", "c1", "p", load) == pytest.approx(0.5)
    truth["spend"] = 0.7  # the database knows more (records written while Redis was away)
    await a.redis.expire("agentspace:budget:team:p", 0)
    assert await a.spend("team", "c1", "p", load) == pytest.approx(0.7)
    await a.add_spend("team", ["p"], 0.1)
    assert await a.spend("team", "c1", "p", load) == pytest.approx(0.8)


async def _is_about(spend: Awaitable[float], usd: float) -> bool:
    return await spend == pytest.approx(usd)


async def test_reservations_are_leases_renewed_while_the_call_runs(
    replicas: list[RedisCounters], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def load(install: Any = None) -> float:
        if install is not None:
            await install(0.0)
        return 0.0

    monkeypatch.setattr(redis_counters, "RESERVATION_TTL_SECONDS", 2)
    monkeypatch.setattr(redis_counters, "RENEW_SECONDS", 0.5)
    dead, alive = replicas
    held, _ = await alive.reserve("team", "c1", "p", 1.0, 0.5, load)  # a long call: its lease is renewed
    lost, _ = await dead.reserve("team", "c1", "p", 1.0, 0.5, load)
    assert held is not None and lost is not None
    assert dead._renewer is not None
    dead._renewer.cancel()  # its replica died: nobody renews its lease
    # The dead one's lease lapses (2 s; later under load), the live one's is renewed: the live one only.
    await wait_until(lambda: _is_about(alive.spend("team", "c1", "p", load), 0.5), timeout=30)
    await alive.settle(held, 0.4)
    assert await alive.spend("team", "c1", "p", load) == pytest.approx(0.4)


async def test_redis_losing_its_state_rebuilds_from_posted_and_pending(
    replicas: list[RedisCounters], monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentspace.errors

    posted = {"usd": 0.2}

    async def load(install: Any = None) -> float:
        if install is not None:
            await install(posted["usd"])
        return posted["usd"]

    monkeypatch.setattr(redis_counters, "RENEW_SECONDS", 0.3)
    monkeypatch.setattr(redis_counters, "REBUILD_SECONDS", 2)
    a, b = replicas
    in_flight = [await a.reserve("team", "c1", "p", 1.0, 0.3, load), await b.reserve("team", "c1", "p", 1.0, 0.3, load)]
    assert all(r is not None for r, _ in in_flight)
    await a.redis.flushall()  # Redis restarted without persistence, mid-stream

    # Admission fails closed while every replica puts back the reservations of its calls in flight.
    with pytest.raises(agentspace.errors.ApiError) as e:
        await a.reserve("team", "c1", "p", 1.0, 0.3, load)
    assert e.value.code == "SERVICE_UNAVAILABLE" and e.value.retry_after is not None
    await asyncio.sleep(2.5)
    # Rebuilt: 0.2 posted + 0.6 pending (each replica puts its own back when it renews: later under load);
    # another 0.3 does not fit, 0.2 does.
    await wait_until(lambda: _is_about(b.spend("team", "c1", "p", load), 0.8), timeout=30)
    refused, _ = await b.reserve("team", "c1", "p", 1.0, 0.3, load)
    admitted, _ = await b.reserve("team", "c1", "p", 1.0, 0.2, load)
    assert refused is None and admitted is not None
