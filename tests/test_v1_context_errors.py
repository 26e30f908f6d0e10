"""An input past the model's context window, as each client knows it: OpenAI's error code
``context_length_exceeded`` on ``/v1/chat/completions``, ``/v1/responses`` (whole and streamed) and
``/v1/embeddings``, whatever the model's provider said (Codex and the SDKs' users compact or trim on that code),
and Anthropic's "prompt is too long" on ``/v1/messages`` for other models (Claude Code compacts on it).
Each is one usage record of an unanswered call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo

OPENAI_SAYS = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. "
    "Please reduce the length of the messages."
)


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


async def call(api: openai.AsyncOpenAI, endpoint: str, model: str) -> None:
    if endpoint == "chat":
        await api.chat.completions.create(model=model, messages=[{"role": "user", "content": "long"}])
    elif endpoint == "responses":
        await api.responses.create(model=model, input="long", store=False)
    elif endpoint == "embeddings":
        await api.embeddings.create(model=model, input="long")
    else:
        async with api.responses.stream(model=model, input="long", store=False) as stream:
            await stream.get_final_response()


@pytest.mark.parametrize(
    ("endpoint", "model"),
    [
        ("chat", "openai/gpt-4o-mini"),
        ("chat", "anthropic/claude-sonnet-4-6"),
        ("responses", "anthropic/claude-sonnet-4-6"),
        ("responses-stream", "openai/gpt-5"),
        ("embeddings", "openai/text-embedding-3-small"),
    ],
)
async def test_openai_clients_get_context_length_exceeded(
    client: TestClient,
    token: str,
    fake_openai: fo.FakeOpenAI,
    fake_anthropic: fa.FakeAnthropic,
    endpoint: str,
    model: str,
) -> None:
    fake_openai.enqueue(fo.error_status(400, OPENAI_SAYS, code="context_length_exceeded"))
    fake_anthropic.enqueue(fa.error_status(400, "prompt is too long: 210000 tokens > 200000 maximum"))
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        await call(api, endpoint, model)
    error: Any = raised.value.body
    assert (error["code"], error["type"]) == ("context_length_exceeded", "invalid_request_error")
    assert ("prompt is too long" if model.startswith("anthropic/") else "maximum context length") in error["message"]
    (record,) = await client.app[state.REGISTRY].usage.records()
    assert (record["answered"], record["error"], record["totalTokens"]) == (False, "LLM_ERROR", 0)


async def test_claude_code_on_an_openai_model_hears_prompt_is_too_long(
    client: TestClient, token: str, fake_openai: fo.FakeOpenAI
) -> None:
    fake_openai.enqueue(fo.error_status(400, OPENAI_SAYS, code="context_length_exceeded"))
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as raised:
        await api.messages.create(model="openai/gpt-5", max_tokens=100, messages=[{"role": "user", "content": "x"}])
    error: Any = raised.value.body
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("prompt is too long: ") and "128000" in error["error"]["message"]
