"""One door (issue 31) tried from outside a fourth time: the same refusal, wherever it comes in, says the same."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ui_stream import post_chat, user
from tests.support.ws import chat
from tests.test_clients import add_client, bearer

# About 40,000 input tokens: $0.12 of Claude Sonnet 4.5's input. A turn's output ceiling ([chat] max_tokens and
# the thinking budget) is $0.18, so a $0.20 budget passes the turn's first check (its output) and is refused
# at its first call (its input and output: $0.33).
LONG = "word " * 40_000


async def test_a_first_call_refused_its_budget_is_refused_as_the_turns_check_refuses_it(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """A turn is checked once before it is taken (the output it asks for) and again at its first call (its
    input too). Refused at the first check, /api/chat answered 429 with ``Retry-After`` and the WebSocket's error
    frame said ``retryAfter``; refused at the call, the same BUDGET_EXCEEDED came as a 200 stream ending in an
    error chunk, and an error frame with no ``retryAfter``: a client that waits as told had nothing to wait for."""
    key = add_client("ana", "--budget", "0.2")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    refused = (await chat(ws, LONG))[-1]
    await ws.close()
    assert refused["code"] == "BUDGET_EXCEEDED", refused
    resp = await post_chat(client, bearer(key), "c1", user(LONG))
    assert resp.status == 429, (resp.status, await resp.text())
    assert (await resp.json())["error"]["code"] == "BUDGET_EXCEEDED"
    # The seconds to the budget's period end, on both (a second may turn between the two answers).
    assert abs(refused.get("retryAfter", 0) - int(resp.headers["Retry-After"])) <= 1, (refused, resp.headers)
    assert fake_anthropic.requests == []


async def test_an_upstream_refusal_that_says_when_to_retry_says_it_on_the_websocket_too(
    make_client: object, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic, token: str
) -> None:
    """Anthropic's 429 with ``retry-after: 7``: /v1/chat/completions answers ``Retry-After: 7``, while the
    WebSocket's RATE_LIMITED error frame (the code a client's own rpm gets, with ``retryAfter``) said nothing."""
    client: TestClient = await make_client(chat={"max_retries": 0})  # type: ignore[operator]
    fake_anthropic.enqueue(error_status(429, retry_after=7))
    body = {"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}
    async with client.post("/v1/chat/completions", json=body, headers=auth_headers) as resp:
        assert (resp.status, resp.headers.get("Retry-After")) == (429, "7")
    fake_anthropic.enqueue(error_status(429, retry_after=7))
    ws = await client.ws_connect("/gateway", headers=auth_headers)
    refused = (await chat(ws, "Hi"))[-1]
    await ws.close()
    assert (refused["code"], refused.get("retryAfter")) == ("RATE_LIMITED", 7), refused


@pytest.mark.parametrize("typo, group", [("claude-fats", "claude-fast"), ("smrat", "smart")])
async def test_a_mistyped_group_name_is_answered_with_the_group_on_every_way_in(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic, typo: str, group: str
) -> None:
    """A model group is a model id of its own (``/api/models``, ``/v1/models`` list it). Its name mistyped, the
    WebSocket and /api/chat said "Model ids look like provider/model" (a group's is not), /v1/chat/completions
    and /v1/responses "does not exist. Use provider/model ids", and a ``claude-*`` typo was offered a cost-map
    model (``anthropic/claude-fable-5``), never the group meant. Every way in now offers the group."""
    deployments = [{"name": "a", "model": "anthropic/claude-haiku-4-5"}]
    client: TestClient = await make_client(models={"groups": {group: {"deployments": deployments}}})
    ws = await client.ws_connect("/gateway", headers=auth_headers)
    refused = (await chat(ws, "Hi", model=typo))[-1]
    await ws.close()
    messages = {"ws": (refused["code"], refused["message"])}
    async with client.post(
        "/api/chat", json={"id": "c1", "messages": [user("Hi")], "model": typo}, headers=auth_headers
    ) as r:
        messages["/api/chat"] = (r.status, (await r.json())["error"]["message"])
    calls = (
        ("/v1/messages", {"model": typo, "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/messages/count_tokens", {"model": typo, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/chat/completions", {"model": typo, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/responses", {"model": typo, "input": "Hi"}),
    )
    for path, body in calls:
        async with client.post(path, json=body, headers=auth_headers) as r:
            messages[path] = (r.status, (await r.json())["error"]["message"])
    for where, (status, message) in messages.items():
        assert status in ("MODEL_NOT_FOUND", 400, 404), (where, status, message)
        assert f"Did you mean '{group}'?" in message, (where, message)
    assert fake_anthropic.requests == []
