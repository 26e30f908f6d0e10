"""Bad input on every way in (issue 27's hardening round), tried from outside a fourth time: a field of the
wrong type at every nesting level of the /v1 bodies, in front of each provider kind."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import tests.fakes.anthropic_upstream as fa
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_hardening_outside import openai_client

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
MODELS = ["claude-sonnet-4-5", "openai/gpt-4o-mini"]  # translated for Claude, and through litellm


async def post(client: TestClient, path: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with client.post(path, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        # A named tool_choice whose function is no object (AttributeError: 'str' object has no attribute 'get')
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": 5}}, "tool_choice"),
        # An assistant message's tool_calls that is no array (TypeError: 'int' object is not iterable)
        (
            {"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": 5}, *USER]},
            "messages[1].tool_calls",
        ),
        ({"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": True}, *USER]}, "tool_calls"),
    ],
)
async def test_a_mistyped_nested_field_on_chat_completions_is_a_400_not_a_500(
    make_client: Any,
    fake_openai: FakeOpenAI,
    fake_anthropic: fa.FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    token: str,
    model: str,
    extra: dict[str, Any],
    field: str,
) -> None:
    # OpenAI answers these 400 invalid_request_error naming the field; the gateway answered 500 server_error
    # with a traceback in its log, for either provider, and nothing went upstream
    client = await openai_client(make_client, fake_openai, monkeypatch)
    status, body = await post(client, "/v1/chat/completions", token, {"model": model, "messages": USER, **extra})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and field in body["error"]["param"], body
    assert not fake_openai.requests and not fake_anthropic.requests


SCHEMA_CASES = [
    (
        "/v1/chat/completions",
        {
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "objekt"}}},
        },
    ),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": 5}}}}),
    (
        "/v1/chat/completions",
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "x"}}}],
        },
    ),
]


@pytest.mark.parametrize(("path", "body"), SCHEMA_CASES)
async def test_a_json_schema_of_an_unknown_type_goes_to_claude_for_its_answer_not_a_500(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic, path: str, body: dict[str, Any]
) -> None:
    # The anthropic SDK's transform_schema asserts on a type it does not know; that AssertionError escaped:
    # 500 server_error. A schema the SDK cannot read goes as it is, for the API to say what is wrong with it
    # (docs: claude_schema), here the API's 400 in OpenAI's shape
    fake_anthropic.enqueue(fa.error_status(400, "output_config.format.schema: invalid JSON schema"))
    status, answer = await post(client, path, token, {"model": "claude-sonnet-4-5", **body})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and "schema" in answer["error"]["message"], answer
    assert len(fake_anthropic.requests) == 1
