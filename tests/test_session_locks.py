"""The session locks' one contract (``session_locks.SessionLocks``), run against both implementations: in this
process, and in Redis (``cluster.RedisSessionLocks``: two replicas, each with its own connection), with real
turns (``pipeline.Turn``, never started) of a gateway from the composition root."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentspace.cluster import Cluster, RedisSessionLocks
from agentspace.default_plugins.storage import open_storage
from agentspace.errors import ApiError
from agentspace.gateway import assemble
from agentspace.pipeline import Turn
from agentspace.registry import Registry
from agentspace.session_locks import InProcessLocks, SessionLocks
from agentspace.testing import make_config, plugin_manager
from agentspace.transports.ui_stream import UIMessageStreamEncoder
from tests.scale_servers import Redis, flush_redis

MODEL = "anthropic/claude-sonnet-4-5"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Registry]:
    config = make_config(tmp_path)
    with plugin_manager() as pm:
        storage = open_storage(config, pm)
        await storage.start()
        gateway = await assemble(config, pm, storage)
        yield gateway
        await gateway.aclose()


def turn(gw: Registry, session_id: str, client: str = "admin") -> Turn:
    return Turn(gw, session_id, MODEL, client, False, "u1", "ws")


@pytest.fixture(params=["in-process", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[SessionLocks, SessionLocks]]:
    """The locks of two gateways sharing sessions: one process (the same locks), or two replicas on Redis."""
    if request.param == "in-process":
        locks = InProcessLocks()
        yield locks, locks
        return
    redis_srv: Redis = request.getfixturevalue("redis_srv")
    await flush_redis(redis_srv)
    clusters = [Cluster(redis_srv.url, f"replica-{n}", encoder=UIMessageStreamEncoder) for n in (1, 2)]
    pair = (RedisSessionLocks(clusters[0]), RedisSessionLocks(clusters[1]))
    for cluster, locks in zip(clusters, pair, strict=True):
        await cluster.start(locks)
    yield pair
    for cluster in clusters:
        await cluster.aclose()


async def test_one_turn_per_session(gw: Registry, replicas: tuple[SessionLocks, SessionLocks]) -> None:
    here, there = replicas
    first = turn(gw, "s1")
    await here.claim(first)
    assert here.get("s1") is first and "s1" in here and len(here) == 1 and here.turns() == [first]
    for locks in (here, there):
        with pytest.raises(ApiError) as refused:
            await locks.claim(turn(gw, "s1"))
        assert refused.value.code == "STREAM_IN_PROGRESS"
    assert here.get("s1") is first  # a refused claim holds nothing and takes nothing away
    await there.claim(turn(gw, "s2"))  # another session is free
    assert "s2" in there


async def test_released_and_forgotten_the_session_is_free_again(
    gw: Registry, replicas: tuple[SessionLocks, SessionLocks]
) -> None:
    here, there = replicas
    first = turn(gw, "s1")
    await here.claim(first)
    here.forget(turn(gw, "s1"))  # not the holder: nothing changes
    assert here.get("s1") is first
    await here.release(first)  # the other replicas may take it (the turn publishes its end now)
    here.forget(first)
    assert here.get("s1") is None and "s1" not in here and len(here) == 0
    second = turn(gw, "s1")
    await there.claim(second)
    assert there.get("s1") is second
