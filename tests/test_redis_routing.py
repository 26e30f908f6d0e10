"""The model groups' state in Redis (``RedisRouteState``), two replicas' states on one real Redis: calls in
flight, the per-deployment minute windows, cooldowns, latency and errors are the deployment's, seen alike
from both; and the in-process state (``LocalRouteState``) answers the same sequence the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentspace.redis_routing import RedisRouteState
from agentspace.routing import LocalRouteState
from tests.scale_servers import Redis

DEP = "claude/team-1"


@pytest.fixture
async def replicas(redis_srv: Redis) -> AsyncIterator[list[RedisRouteState]]:
    import redis.asyncio as aioredis

    clients = [aioredis.from_url(redis_srv.url) for _ in range(2)]
    await clients[0].flushall()
    yield [RedisRouteState(c) for c in clients]
    for c in clients:
        await c.aclose()


async def test_in_flight_and_rpm_are_the_deployments(replicas: list[RedisRouteState]) -> None:
    a, b = replicas
    # 10 calls at once, half on each replica, against an rpm of 6: six are taken, whichever replica.
    taken = await asyncio.gather(*(replicas[n % 2].take(DEP, 6) for n in range(10)))
    assert sum(taken) == 6
    (load,) = await b.loads([DEP])
    assert load.in_flight == 6 and load.requests == 6
    await a.done(DEP, 120, 50.0)
    await b.done(DEP, 80, 100.0)
    (load,) = await a.loads([DEP])
    assert load.in_flight == 4 and load.tokens == 200
    assert load.latency_ms == pytest.approx(0.8 * 50 + 0.2 * 100)  # the moving average, across replicas


async def test_a_cooldown_begun_on_one_replica_holds_on_the_other(replicas: list[RedisRouteState]) -> None:
    a, b = replicas
    assert await a.take(DEP, None) and await b.take(DEP, None)
    assert await a.failed(DEP, "RATE_LIMITED", 1, 30.0) is None  # one failure allowed in the minute
    until = await b.failed(DEP, "OVERLOADED", 1, 30.0)
    assert until is not None and 29 <= until - time.time() <= 31
    for state in (a, b):
        (load,) = await state.loads([DEP])
        assert load.cooled_until == pytest.approx(until, abs=0.01) and load.in_flight == 0
        assert [code for _, code in load.errors] == ["RATE_LIMITED", "OVERLOADED"]  # oldest first


async def test_a_short_cooldown_ends(replicas: list[RedisRouteState]) -> None:
    a, b = replicas
    # Two seconds: long enough for the other replica to see it on a loaded machine.
    assert await a.failed(DEP, "LLM_ERROR", 0, 2.0) is not None
    assert (await b.loads([DEP]))[0].cooled_until
    deadline = time.monotonic() + 30
    while (await b.loads([DEP]))[0].cooled_until != 0.0:
        assert time.monotonic() < deadline, "the cooldown never ended"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_both_states_agree(kind: str, replicas: list[RedisRouteState]) -> None:
    state: Any = LocalRouteState() if kind == "local" else replicas[0]
    assert await state.take(DEP, 2) and await state.take(DEP, 2)
    assert not await state.take(DEP, 2)  # the minute is full
    assert 0 < await state.free_at(DEP, 2, None) - time.time() <= 60  # until its first request leaves it
    assert await state.free_at(DEP, 3, None) == 0.0
    await state.done(DEP, 10, None)
    assert 0 < await state.free_at(DEP, None, 10) - time.time() <= 60  # until those tokens leave it
    assert await state.free_at(DEP, None, 11) == 0.0
    assert await state.failed(DEP, "RATE_LIMITED", 0, 5.0) is not None
    (load,) = await state.loads([DEP])
    assert (load.in_flight, load.requests, load.tokens, load.latency_ms) == (0, 2, 10, None)
    assert load.cooled_until > time.time() and [c for _, c in load.errors] == ["RATE_LIMITED"]


async def test_a_dead_replicas_calls_stop_counting(redis_srv: Redis) -> None:
    """A replica killed mid-call (SIGKILL: no ``done``) leaves its calls counted only until their lapse
    (``inflight_ttl``), while a live replica's calls, renewed, stay counted however long they run."""
    import signal
    import subprocess
    import sys

    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_srv.url)
    await client.flushall()
    # A lapse of 2 s (renewed every 0.67 s): a replica starved of CPU for a second on a loaded machine still renews.
    live = RedisRouteState(client, inflight_ttl=2.0)
    script = (
        "import asyncio, sys, redis.asyncio as r\n"
        "from agentspace.redis_routing import RedisRouteState\n"
        "async def main():\n"
        f"    s = RedisRouteState(r.from_url({redis_srv.url!r}), inflight_ttl=2.0)\n"
        f"    assert await s.take({DEP!r}, None) and await s.take({DEP!r}, None)\n"
        "    print('taken', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().strip() == "taken"
        assert await live.take(DEP, None)
        await asyncio.sleep(4.5)  # more than twice the lapse: both replicas renewed theirs
        assert (await live.loads([DEP]))[0].in_flight == 3
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        deadline = time.monotonic() + 30
        while (in_flight := (await live.loads([DEP]))[0].in_flight) > 1:
            assert time.monotonic() < deadline, "the dead replica's calls never lapsed"
            await asyncio.sleep(0.1)
        assert in_flight == 1  # the dead one's two lapsed; the live one's stays
        await live.done(DEP, 0, None)
        assert (await live.loads([DEP]))[0].in_flight == 0
    finally:
        if doomed.poll() is None:
            doomed.kill()
        await client.aclose()
