"""One door (issue 31) tried again from outside: the same situation answered alike on every way in."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ws import chat, connect

MESSAGES = [{"role": "user", "content": "Hi"}]


async def two_turn_session(client: TestClient, token: str) -> str:
    ws = await connect(client, token)
    session_id = str((await chat(ws, "first"))[0]["sessionId"])
    await chat(ws, "second", "r2", sessionId=session_id)
    await ws.close()
    return session_id


async def test_an_upstream_429_says_when_to_retry_on_compaction_as_on_the_v1_endpoints(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    client = await make_client(chat={"max_retries": 0})
    session_id = await two_turn_session(client, token)
    fake_anthropic.enqueue(error_status(429, retry_after=7))
    body = {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}
    async with client.post("/v1/chat/completions", json=body, headers=auth_headers) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "7", await resp.text()
    fake_anthropic.enqueue(error_status(429, retry_after=7))
    async with client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers) as resp:
        answer = await resp.json()
        # RATE_LIMITED carries Retry-After (docs/protocol.md), the upstream's own here
        assert resp.status == 429 and answer["error"]["code"] == "RATE_LIMITED", answer
        assert resp.headers.get("Retry-After") == "7", dict(resp.headers)


async def test_count_tokens_of_a_model_nothing_serves_is_404_as_the_messages_call_is(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    body = {"model": "nosuch/model-x", "messages": MESSAGES}
    async with client.post("/v1/messages", json={**body, "max_tokens": 16}, headers=auth_headers) as resp:
        call = await resp.json()
        assert resp.status == 404 and call["error"]["type"] == "not_found_error", call
    async with client.post("/v1/messages/count_tokens", json=body, headers=auth_headers) as resp:
        count = await resp.json()
        # docs/protocol.md: on /v1, a model nothing serves is a 404, as the providers answer it; no count
        assert resp.status == 404, count
        assert count == call, count  # the same answer, the closest known id included
    assert fake_anthropic.requests == []
