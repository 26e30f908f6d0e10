"""The clients in PostgreSQL: the client store's API on a real database, shared by replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentspace.storage.postgres import PostgresClientStore, PostgresDatabase

clients = pytest.importorskip("agentspace.clients")  # the clients feature defines the Client
store_module = pytest.importorskip("agentspace.storage.embedded.clients")


@pytest.fixture
async def two_replicas(pg_dsn: str) -> AsyncIterator[list[PostgresClientStore]]:
    dbs = [PostgresDatabase(pg_dsn), PostgresDatabase(pg_dsn)]
    await asyncio.gather(*(db.start() for db in dbs))
    yield [PostgresClientStore(db) for db in dbs]
    for db in dbs:
        await db.aclose()


def new_client(name: str) -> object:
    return clients.Client(name=name, key_hash="", created_at="2026-12-03T00:00:00.000Z", budget_usd=5.0, rpm=10)


async def test_clients_add_find_update_rotate_remove(two_replicas: list[PostgresClientStore]) -> None:
    a, b = two_replicas
    key = await a.add(new_client("team-a"))
    with pytest.raises(store_module.ClientExists):
        await b.add(new_client("team-a"))
    found = await b.get_by_key(key)
    assert found is not None and found.name == "team-a" and found.budget_usd == 5.0 and found.rpm == 10
    assert await b.get_by_key(key + "x") is None
    assert [c.name for c in await b.list()] == ["team-a"]

    def raise_budget(client: object) -> None:
        client.budget_usd = 9.0  # type: ignore[attr-defined]

    assert (await b.update("team-a", raise_budget)).budget_usd == 9.0
    assert (await a.get("team-a")).budget_usd == 9.0
    new_key = await a.rotate("team-a")
    assert await b.get_by_key(key) is None and (await b.get_by_key(new_key)).name == "team-a"
    assert a.should_touch("team-a", 100.0) and not a.should_touch("team-a", 101.0)
    await a.touch("team-a")
    assert (await b.get("team-a")).last_used_at
    await a.touch("gone")  # a client removed meanwhile: nothing to note
    await b.remove("team-a")
    with pytest.raises(store_module.ClientNotFound):
        await a.remove("team-a")
    with pytest.raises(store_module.ClientNotFound):
        await a.update("team-a", raise_budget)
    assert await a.list() == []


async def test_concurrent_updates_on_two_replicas_lose_nothing(two_replicas: list[PostgresClientStore]) -> None:
    a, b = two_replicas
    await a.add(new_client("shared"))

    def add_model(n: int):  # type: ignore[no-untyped-def]
        def change(client: object) -> None:
            client.models.append(f"m{n}/*")  # type: ignore[attr-defined]

        return change

    await asyncio.gather(*(two_replicas[n % 2].update("shared", add_model(n)) for n in range(20)))
    assert sorted((await b.get("shared")).models) == sorted(f"m{n}/*" for n in range(20))
