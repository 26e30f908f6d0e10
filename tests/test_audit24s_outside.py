"""Issue 24 (one metered call) tried from outside on two replicas of one PostgreSQL database and one Redis:
faults (Redis losing its state) under chat turns, as a WebSocket or useChat client sees them."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from scripts.harness import GatewayProcess
from tests.scale_servers import Redis
from tests.test_replicas import HEADERS, SHORT_LEASE


@pytest.mark.parametrize("lease_seconds", [SHORT_LEASE])
async def test_a_chat_turn_while_redis_rebuilds_is_refused_before_anything_is_stored(
    replicas: list[GatewayProcess], fake_anthropic: Any, redis_srv: Redis
) -> None:
    """docs/accounting.md: while the budget counters are rebuilt after Redis lost its state, no budget reservation
    is admitted (SERVICE_UNAVAILABLE with Retry-After), as while Redis cannot be reached: a turn is refused
    before its message is stored (a 503 for useChat, an error frame before the stream starts on the WebSocket),
    not taken, stored and then failed mid-stream."""
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
    body = {"id": "during-rebuild", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]}
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
