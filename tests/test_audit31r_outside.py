"""One door (issue 31) tried from outside once more: the same request answered alike wherever it comes in."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ws import chat, connect
from tests.test_metrics import delta, scrape

MESSAGES = [{"role": "user", "content": "Hi"}]


async def test_count_tokens_of_an_unknown_bare_model_name_is_refused_as_the_messages_call_refuses_it(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """A name that is no claude-* id and no provider/model: both answer the same 404, the hint included."""
    body = {"model": "nosuch-model", "messages": MESSAGES}
    async with client.post("/v1/messages", json={**body, "max_tokens": 16}, headers=auth_headers) as resp:
        call = await resp.json()
        assert resp.status == 404 and call["error"]["type"] == "not_found_error", call
    async with client.post("/v1/messages/count_tokens", json=body, headers=auth_headers) as resp:
        count = await resp.json()
        assert resp.status == 404, count
        assert count == call, count
    assert fake_anthropic.requests == []


@pytest.mark.parametrize("status", [400, 413])
async def test_an_upstream_refusal_of_the_request_is_counted_under_one_code_on_every_way_in(
    make_client: Any,
    auth_headers: dict[str, str],
    fake_anthropic: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    """Anthropic refusing the request (400, 413) is the same record and the same ``agentspace_errors`` code
    whichever door the request came in by: LLM_ERROR, the provider refused the call (docs/protocol.md)."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    client = await make_client(chat={"max_retries": 0}, pm=create_plugin_manager())
    before = await scrape(client, auth_headers)
    answers = []
    ws = await connect(client, auth_headers["Authorization"].split()[1])
    fake_anthropic.enqueue(error_status(status))
    answers.append([f["code"] for f in await chat(ws, "Hi") if f["type"] == "error"])
    await ws.close()
    for path, body in (
        ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}),
        ("/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"}),
    ):
        fake_anthropic.enqueue(error_status(status))
        async with client.post(path, json=body, headers=auth_headers) as resp:
            answers.append(resp.status)  # each API passes the provider's status on
    assert answers == [["LLM_ERROR"], status, status, status], answers
    errors = delta(await scrape(client, auth_headers), before, "agentspace_errors_total")
    codes = {dict(labels)["endpoint"]: dict(labels)["code"] for labels in errors}
    assert codes == dict.fromkeys(("ws", "anthropic", "openai", "responses"), "LLM_ERROR"), codes


@pytest.mark.parametrize(
    ("field", "value"), [("model", 5), ("user", 7), ("dimensions", "8"), ("encoding_format", ["float"])]
)
async def test_a_field_of_the_wrong_type_is_refused_alike_on_every_openai_shaped_endpoint(
    client: TestClient, auth_headers: dict[str, str], field: str, value: Any
) -> None:
    """OpenAI answers a field of the wrong type with code ``invalid_type`` naming the field; so do
    /v1/chat/completions and /v1/responses, and /v1/embeddings as well (not "you must provide a model")."""
    base = {"model": "openai/text-embedding-3-small", "input": "Hi"}
    async with client.post("/v1/embeddings", json={**base, field: value}, headers=auth_headers) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 400 and (error["code"], error["param"]) == ("invalid_type", field), error
    if field in ("model", "user"):  # the fields the three APIs share: the same words too
        chat = {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES, field: value}
        async with client.post("/v1/chat/completions", json=chat, headers=auth_headers) as resp:
            assert (await resp.json())["error"] == error
