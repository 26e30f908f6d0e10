"""Issue 24 (one metered call) tried again from outside: refusals, spend and records as a third-party client
sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from scripts.harness import GatewayProcess
from tests.scale_servers import Redis
from tests.test_clients import bearer

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_redis_unreachable_is_a_503_that_says_when_to_retry_on_every_way_in(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str
) -> None:
    """docs/accounting.md: while Redis cannot be reached, admission fails closed as during a rebuild
    (SERVICE_UNAVAILABLE with Retry-After); the SDKs retry a 503 when it says when (x-should-retry is not false)."""
    redis_srv = Redis()  # its own: this test stops it
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    try:
        await gateway.start()
        admin = bearer(gateway.token)
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway.url + "/api/clients", json={"name": "bob"}, headers=admin) as resp:
                bob = bearer((await resp.json())["key"])
            redis_srv.close()
            calls: list[tuple[str, dict[str, str], dict[str, Any]]] = [
                ("/v1/messages", bob, {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": MESSAGES}),
                ("/v1/messages/count_tokens", bob, {"model": "claude-sonnet-4-5", "messages": MESSAGES}),
                ("/v1/chat/completions", bob, {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}),
                ("/v1/responses", bob, {"model": "anthropic/claude-sonnet-4-5", "input": "hi"}),
                ("/v1/embeddings", bob, {"model": "openai/text-embedding-3-small", "input": "hi"}),
            ]
            for i, who in enumerate((bob, admin)):  # a chat's stream lock is in Redis: the gateway token's too
                chat = {
                    "id": f"s{i}",
                    "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
                }
                calls.append(("/api/chat", who, chat))
            for path, who, body in calls:
                async with http.post(gateway.url + path, json=body, headers=who) as resp:
                    text = await resp.text()
                    assert resp.status == 503 and "Redis" in text, (path, text)
                    assert resp.headers.get("Retry-After") == "1", (path, dict(resp.headers))
                    assert resp.headers.get("x-should-retry") != "false", (path, dict(resp.headers))
    finally:
        await gateway.aclose()
        redis_srv.close()
