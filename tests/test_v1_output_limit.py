"""A ``/v1/chat/completions`` or ``/v1/responses`` request that sets no output limit (as Codex sends every turn)
gets the model's own limit, as the provider's API would give it, within the context window left after the
input: not the gateway's ``[chat] max_tokens``, which would cut a long answer or a reasoning model's thinking
short behind the client's back. What is sent is what is reserved."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI, text_response, usage


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(
        providers={"openai": {"base_url": fake_openai.url}},
        pricing={"openai/gpt-4.1-mini": {"context_window": 30_000}},  # a small window, to fill with input
    )


def sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


def sent_limit(body: dict[str, Any]) -> int:
    return int(body.get("max_completion_tokens") or body["max_tokens"])


async def test_no_max_tokens_is_the_models_own_limit(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    api = sdk(client, token)
    fake_openai.enqueue(text_response("Hi", usage=usage(9, 2)), text_response("Hi", usage=usage(9, 2)))
    await api.responses.create(model="openai/gpt-5", input="Hi", store=False)  # as Codex asks
    await api.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert [sent_limit(r.body) for r in fake_openai.requests] == [128_000, 16_384]  # the cost map's limits
    fake_anthropic.enqueue(fa.text_response("Hi"))
    await api.responses.create(model="anthropic/claude-sonnet-4-5", input="Hi")
    assert fake_anthropic.requests[0].body["max_tokens"] == 64_000
    await api.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=7
    )
    assert sent_limit(fake_openai.requests[-1].body) == 7  # the client's own limit, as it is
    records = await client.app[state.REGISTRY].usage.records()
    assert [(r["endpoint"], r["outputTokens"]) for r in records][:2] == [("responses", 2), ("openai", 2)]


async def test_the_limit_leaves_room_for_the_input(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    """An input that fills most of the window: the limit is what is left of it (the upstream would refuse an
    input plus a limit past the window), never below the gateway's default."""
    fake_openai.enqueue(text_response("Hi", usage=usage(9, 2)))
    words = " ".join(["word"] * 20_000)  # 20,000 tokens
    await sdk(client, token).chat.completions.create(
        model="openai/gpt-4.1-mini", messages=[{"role": "user", "content": words}]
    )
    limit = sent_limit(fake_openai.requests[0].body)
    assert limit == 30_000 - 20_000  # what the input leaves
