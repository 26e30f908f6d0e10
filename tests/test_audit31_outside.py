"""One door (issue 31) tried again from outside: the same situation answered alike on every way in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import security
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ui_stream import post_chat
from tests.support.ws import chat, connect
from tests.test_clients import add_client, bearer, cli

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


async def assert_count_refused_as_the_call(client: TestClient, headers: dict[str, str], model: str) -> None:
    """``POST /v1/messages`` and ``/v1/messages/count_tokens`` for ``model`` are both answered 404, alike."""
    body = {"model": model, "messages": MESSAGES}
    async with client.post("/v1/messages", json={**body, "max_tokens": 16}, headers=headers) as resp:
        call = await resp.json()
        assert resp.status == 404 and call["error"]["type"] == "not_found_error", call
    async with client.post("/v1/messages/count_tokens", json=body, headers=headers) as resp:
        count = await resp.json()
        # docs/protocol.md: on /v1, a model nothing serves is a 404, as the providers answer it; no count
        assert resp.status == 404, count
        assert count == call, count  # the same answer, the closest known id (or the hint) included


async def test_count_tokens_of_a_model_nothing_serves_is_404_as_the_messages_call_is(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    await assert_count_refused_as_the_call(client, auth_headers, "nosuch/model-x")
    assert fake_anthropic.requests == []


async def test_the_refusals_of_chat_and_compaction_are_in_the_served_openapi_document(
    make_client: Any, auth_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction is a provider call admitted like a turn's: the statuses both answer for a spent budget, a
    model not allowed and a provider without a key are the ones GET /api/openapi.json lists for them."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = await make_client()
    seen: dict[str, set[int]] = {"/api/chat": set(), "/api/sessions/{id}/compact": set()}
    for name, options in (("spent", ("--budget", "0")), ("narrow", ("--models", "openai/gpt-5.4-mini"))):
        key = add_client(name)
        session_id = await two_turn_session(client, key)
        cli("clients", "set", name, *options)
        async with client.post(f"/api/sessions/{session_id}/compact", headers=bearer(key)) as resp:
            seen["/api/sessions/{id}/compact"].add(resp.status)
        resp = await post_chat(client, bearer(key), f"c-{name}")
        seen["/api/chat"].add(resp.status)
    resp = await post_chat(client, auth_headers, "c-no-key", model="openai/gpt-4o-mini")
    seen["/api/chat"].add(resp.status)
    assert seen == {"/api/chat": {403, 424, 429}, "/api/sessions/{id}/compact": {403, 429}}
    async with client.get("/api/openapi.json", headers=auth_headers) as resp:
        document = await resp.json()
    for path, statuses in seen.items():
        documented = {int(status) for status in document["paths"][path]["post"]["responses"]}
        assert statuses - documented == set(), (path, statuses, documented)


async def test_the_readme_names_every_endpoint_a_record_is_filed_under(
    make_client: Any, token: str, auth_headers: dict[str, str]
) -> None:
    client = await make_client()
    session_id = await two_turn_session(client, token)  # ws
    await (await post_chat(client, auth_headers, "c-http")).read()  # http
    message = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}
    for path, body in (
        ("/v1/messages", message),
        ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}),
        ("/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"}),
        (f"/api/sessions/{session_id}/compact", None),
    ):
        async with client.post(path, json=body, headers=auth_headers) as resp:
            assert resp.status == 200, await resp.text()
    async with client.get("/api/usage?by=endpoint", headers=auth_headers) as resp:
        endpoints = set((await resp.json())["perEndpoint"])
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"Usage records carry `client` and `endpoint` \(([^)]*)\)", readme)
    assert listed is not None
    named = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert endpoints - named == set(), (endpoints, named)


async def test_failed_authentications_rate_limited_say_when_to_retry_on_every_http_way_in(client: TestClient) -> None:
    """RATE_LIMITED carries Retry-After (docs/protocol.md), the refusal of too many failed authentications too:
    on the HTTP API and on /v1, in each one's shape."""
    for i in range(security.MAX_FAILURES):
        assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer wrong-{i}"})).status == 401
    wrong = {"Authorization": "Bearer wrong-again"}
    message = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}
    for method, path, body in (("GET", "/api/sessions", None), ("POST", "/v1/messages", message)):
        async with client.request(method, path, json=body, headers=wrong) as resp:
            answer = await resp.json()
            assert resp.status == 429, answer
            seconds = int(resp.headers.get("Retry-After", "0"))
            # one failure drains in FAILURE_WINDOW_SECONDS / MAX_FAILURES: the next guess is let in by then
            assert 1 <= seconds <= security.FAILURE_WINDOW_SECONDS, (path, dict(resp.headers))
