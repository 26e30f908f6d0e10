"""Issue 24 (one metered call) tried from outside on two replicas of one PostgreSQL database and one Redis:
faults (Redis losing its state) under chat turns, as a WebSocket or useChat client sees them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import TOKEN, Redis
from tests.test_replicas import HEADERS, stop_running


async def test_a_chat_turn_while_redis_rebuilds_is_refused_before_anything_is_stored(
    replicas: list[GatewayProcess], fake_anthropic: Any, redis_srv: Redis
) -> None:
    """docs/accounting.md: while the budget counters are rebuilt after Redis lost its state, no budget reservation
    is admitted (SERVICE_UNAVAILABLE with Retry-After), as while Redis cannot be reached: a turn is refused
    before its message is stored (a 503 for useChat, an error frame before the stream starts on the WebSocket),
    not taken, stored and then failed mid-stream. The default lease: an 11-second window for the checks."""
    a, b = replicas
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 1.0}) as resp:
            key = (await resp.json())["key"]
    client = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
    call = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession(headers=client) as http:
        for server in (a, b):  # both replicas hold budget counters in Redis
            async with http.post(f"{server.url}/v1/messages", json=call) as resp:
                assert resp.status == 200, await resp.text()
        redis = aioredis.from_url(redis_srv.url)
        await redis.flushall()  # Redis lost its state (restarted without persistence)
        await redis.aclose()
        async with http.post(f"{a.url}/v1/messages", json=call) as resp:  # noticed: the rebuild starts
            assert resp.status == 503, await resp.text()
    sent = len(fake_anthropic.requests)
    body = {
        "id": "during-rebuild",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}],
    }
    async with aiohttp.ClientSession(headers=client) as http:
        async with http.post(f"{a.url}/api/chat", json=body) as resp:
            answer = await resp.text()
            assert resp.status == 503, answer
            assert json.loads(answer)["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert int(resp.headers["Retry-After"]) >= 1
        async with http.ws_connect(b.ws_url) as ws:
            await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi"})
            first = json.loads((await ws.receive(timeout=30)).data)
            assert (first["type"], first.get("code")) == ("error", "SERVICE_UNAVAILABLE"), first
        async with http.get(f"{a.url}/api/sessions") as resp:
            assert (await resp.json())["sessions"] == []  # nothing stored: the refused turns left no session
    assert len(fake_anthropic.requests) == sent


async def test_redis_restarted_while_one_replica_streams_the_other_one_admits_no_budget_call_before_the_rebuild(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis killed and started again, empty, while replica B streams two calls of a client; replica A has made
    no call with a budget since it started (a replica just deployed, or one whose clients had none). A must take
    the empty Redis for the loss it is: were it to start the counters afresh, it would admit calls against the
    posted spend alone, without B's reservations, until B next renews them -- and the budget would be exceeded."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    redis_srv = Redis()
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}  # the default lease: renewals 5 s
    a, b = (GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b"))
    # Each call reports 1000 output tokens ($0.015) and takes about 6 s; max_tokens 1024 reserves ~$0.0154.
    fake_anthropic.default = fa.text_response(
        "tok " * 40, chunks=40, delta_usages=[{"output_tokens": 1000}]
    ).with_delay(0.15)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 0.05}) as resp:
                key = (await resp.json())["key"]
        headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession(headers=headers) as http:
            streams = [await http.post(f"{b.url}/v1/messages", json={**body, "stream": True}) for _ in range(2)]
            for resp in streams:
                assert resp.status == 200, await resp.text()
                await resp.content.readuntil(b"content_block_delta")
            redis_srv.kill()
            redis_srv.start()  # back, empty, while B's two calls stream

            async def on_a() -> int:
                async with http.post(f"{a.url}/v1/messages", json=body) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(on_a() for _ in range(3)))
            for resp in streams:
                assert b"message_stop" in await resp.read()
                resp.release()
            async with http.get(f"{b.url}/api/usage") as resp:
                spent = (await resp.json())["grandTotal"]["totalCost"]
        # $0.0308 reserved by B's calls in flight: one more call fits in $0.05, not three.
        assert statuses.count(200) <= 1, statuses
        assert spent <= 0.05, (spent, statuses)
    finally:
        await stop_running(a, b)
        redis_srv.close()
