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
