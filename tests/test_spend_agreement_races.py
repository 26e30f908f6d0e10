"""A client's spend as the server keeps it (``/api/clients``, what the web app's clients page shows and budgets
are held to) against what its records add up to (the CLI, ``/api/usage``), while records land as the spend
is read: each client's first read and every change of its budget period read the spend from the store while
its calls are being recorded (docs/accounting.md#spend)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.scale_servers import flush_redis
from tests.test_clients import anthropic_sdk, bearer, cli, records

MODEL = "claude-sonnet-4-5"
CLIENTS = 40
CALLS = 10  # per client


@pytest.mark.parametrize("backend", ["tinydb", "postgres+redis"])
async def test_spend_read_while_records_land_is_what_the_records_add_up_to(
    make_client: Any, request: pytest.FixtureRequest, backend: str, fake_anthropic: FakeAnthropic, token: str
) -> None:
    storage: dict[str, Any] = {}
    if backend != "tinydb":
        redis_srv = request.getfixturevalue("redis_srv")
        await flush_redis(redis_srv)
        storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn"), "redis_url": redis_srv.url}
    client: TestClient = await make_client(storage=storage)
    admin = bearer(token)
    fake_anthropic.default = fa.text_response("Hi", usage={"input_tokens": 1000})
    rng = random.Random(7)

    async def one(n: int) -> None:
        made = await client.post("/api/clients", json={"name": f"c{n}"}, headers=admin)
        api = anthropic_sdk(client, (await made.json())["key"])

        async def read_and_change() -> None:
            for _ in range(CALLS):
                await asyncio.sleep(rng.random() * 0.05)
                assert (await client.get(f"/api/clients/c{n}", headers=admin)).status == 200
                period = rng.choice(["day", "week", "month", "total"])
                changed = await client.patch(
                    f"/api/clients/c{n}", json={"budgetUsd": 100, "period": period}, headers=admin
                )
                assert changed.status == 200

        messages: Any = [{"role": "user", "content": "Hi"}]
        calls = (api.messages.create(model=MODEL, max_tokens=64, messages=messages) for _ in range(CALLS))
        await asyncio.gather(read_and_change(), *calls)

    for wave in range(0, CLIENTS, 20):  # 20 clients at a time: 200 connections, within the server's cap
        await asyncio.gather(*(one(n) for n in range(wave, wave + 20)))

    found = await records(client)
    assert len(found) == CLIENTS * CALLS
    added_up = {f"c{n}": sum(r["totalCost"] for r in found if r["client"] == f"c{n}") for n in range(CLIENTS)}
    listed = (await (await client.get("/api/clients", headers=admin)).json())["clients"]
    assert {c["name"]: round(c["spend"]["usd"], 9) for c in listed} == {k: round(v, 9) for k, v in added_up.items()}
    report = await (await client.get("/api/usage", params={"by": "client"}, headers=admin)).json()
    assert {k: round(v["totalCost"], 9) for k, v in report["perClient"].items()} == {
        k: round(v, 9) for k, v in added_up.items()
    }
    if backend == "tinydb":  # the CLI reads the same data directory
        shown = {
            c["name"]: round(c["spend"]["usd"], 9) for c in json.loads(cli("clients", "list", "--json"))["clients"]
        }
        assert shown == {k: round(v, 9) for k, v in added_up.items()}
