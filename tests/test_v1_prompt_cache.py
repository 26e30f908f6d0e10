"""Prompt caching for OpenAI-shaped ``/v1`` requests translated for Claude (docs/sessions.md#prompt-caching):
OpenAI caches on its own, Claude only what is marked, so a client that asks for the cache (``prompt_cache_key``,
as Codex sends it, or ``cache_control`` marks as LiteLLM and OpenRouter take them) gets the gateway's
breakpoints; ``[v1] prompt_cache`` says when. Driven with the official ``openai`` SDK against the running app,
read at the fake Anthropic upstream and in the usage records."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI, text_response

CLAUDE = "anthropic/claude-sonnet-4-6"
SYSTEM = "You are a careful coding agent. " * 20
TOOLS: list[Any] = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]
CACHED = {"input_tokens": 12, "cache_creation_input_tokens": 900, "cache_read_input_tokens": 300}


def sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


def marks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``cache_control`` of a Messages API request, in order: tools, system, messages."""
    found = [t["cache_control"] for t in body.get("tools") or () if "cache_control" in t]
    system = body.get("system")
    if isinstance(system, list):
        found += [b["cache_control"] for b in system if "cache_control" in b]
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, list):
            found += [b["cache_control"] for b in content if isinstance(b, dict) and "cache_control" in b]
    return found


async def chat(api: openai.AsyncOpenAI, **kwargs: Any) -> None:
    messages: list[Any] = kwargs.pop(
        "messages", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "ls"}]
    )
    await api.chat.completions.create(model=CLAUDE, messages=messages, tools=TOOLS, **kwargs)


async def test_a_request_that_asks_for_the_cache_gets_breakpoints_and_its_record_the_cache_tokens(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(*(fa.text_response("ok", usage=CACHED) for _ in range(5)))
    api = sdk(client, token)

    await chat(api)  # asks for nothing: sent as the client wrote it
    assert marks(fake_anthropic.requests[-1].body) == []

    # Codex's way: the Responses API with its conversation's prompt_cache_key.
    await api.responses.create(
        model=CLAUDE, instructions=SYSTEM, input="ls", tools=[{**TOOLS[0]["function"], "type": "function"}],
        prompt_cache_key="conversation-1", store=False,
    )  # fmt: skip
    body = fake_anthropic.requests[-1].body
    assert marks(body) and all(m == {"type": "ephemeral", "ttl": "5m"} for m in marks(body))
    assert "cache_control" in body["messages"][-1]["content"][-1] and "cache_control" in body["tools"][-1]

    # LiteLLM's and OpenRouter's way: cache_control on a content part, an hour long.
    part = {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    await chat(api, messages=[{"role": "system", "content": [part]}, {"role": "user", "content": "ls"}])
    assert marks(fake_anthropic.requests[-1].body) and all(
        m["ttl"] == "1h" for m in marks(fake_anthropic.requests[-1].body)
    )

    # Chat Completions' own hint; a 24-hour retention is Claude's longest, an hour.
    await chat(api, extra_body={"prompt_cache_retention": "24h"})
    assert {m["ttl"] for m in marks(fake_anthropic.requests[-1].body)} == {"1h"}

    # What the upstream reported about its cache is what the records say, one per call.
    records = [r for r in await client.app[state.REGISTRY].usage.records() if r["model"] == CLAUDE]
    assert len(records) == 4
    assert all((r["inputTokens"], r["cacheWriteTokens"], r["cacheReadTokens"]) == (12, 900, 300) for r in records)
    info = client.app[state.REGISTRY].model_info(CLAUDE)
    input_cost = (12 * info.input_per_mtok + 900 * info.cache_write_per_mtok + 300 * info.cache_read_per_mtok) / 1e6
    assert all(r["inputCost"] == pytest.approx(input_cost) and not r["estimatedFields"] for r in records)


async def test_v1_prompt_cache_off_and_always(
    make_client: Callable[..., Awaitable[TestClient]], token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(*(fa.text_response("ok") for _ in range(4)))
    off = await make_client(v1={"prompt_cache": "off"})
    await chat(sdk(off, token), extra_body={"prompt_cache_key": "k"})
    assert marks(fake_anthropic.requests[-1].body) == []
    await off.close()  # the next server takes the same data directory

    always = await make_client(v1={"prompt_cache": "always"}, chat={"prompt_cache_ttl": "1h"})
    await chat(sdk(always, token))
    assert marks(fake_anthropic.requests[-1].body) and {m["ttl"] for m in marks(fake_anthropic.requests[-1].body)} == {
        "1h"
    }


async def test_other_models_cache_on_their_own_and_get_no_marks(
    make_client: Callable[..., Awaitable[TestClient]], token: str, fake_openai: FakeOpenAI, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}}, v1={"prompt_cache": "always"})
    fake_openai.enqueue(text_response("ok"))
    part = {"type": "text", "text": "ls", "cache_control": {"type": "ephemeral"}}
    await sdk(client, token).chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": [part]}], prompt_cache_key="k"
    )
    sent = fake_openai.requests[-1].body
    assert "cache_control" not in repr(sent["messages"]) and sent.get("prompt_cache_key") == "k"
