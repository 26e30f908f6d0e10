"""``POST /v1/embeddings`` through the official openai SDK: SDK -> gateway -> litellm -> fake OpenAI upstream.
One usage record per call (input tokens as reported, priced, endpoint ``embeddings``), behind the client checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes.openai_upstream import FakeOpenAI, error_status

MODEL = "openai/text-embedding-3-small"


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


@pytest.mark.parametrize("model", [MODEL, "text-embedding-3-small"])
async def test_embeddings_counted_once(client: TestClient, token: str, fake_openai: FakeOpenAI, model: str) -> None:
    fake_openai.embedding_tokens = 1_000_000
    result = await sdk(client, token).embeddings.create(
        model=model, input=["one two", "three"], dimensions=4, extra_headers={"X-Agentspace-Session": "emb"}
    )
    assert [d.index for d in result.data] == [0, 1] and all(len(d.embedding) == 4 for d in result.data)
    assert result.usage.prompt_tokens == 1_000_000
    sent = fake_openai.requests[0].body
    assert sent["input"] == ["one two", "three"] and sent["dimensions"] == 4
    (record,) = await records(client)
    assert (record["endpoint"], record["model"], record["sessionId"]) == ("embeddings", MODEL, "emb")
    assert (record["inputTokens"], record["outputTokens"], record["estimated"]) == (1_000_000, 0, False)
    assert record["totalCost"] == pytest.approx(0.02)  # $0.02 per million input tokens


async def test_float_format_and_one_string(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    result = await sdk(client, token).embeddings.create(model=MODEL, input="hello there", encoding_format="float")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 8
    (record,) = await records(client)
    assert record["inputTokens"] == 2


async def test_refusals_and_errors(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    api = sdk(client, token)
    with pytest.raises(openai.BadRequestError) as bad:
        await api.embeddings.create(model=MODEL, input=[])
    assert bad.value.param == "input"
    with pytest.raises(openai.BadRequestError) as bad:
        await api.embeddings.create(model="anthropic/claude-sonnet-4-6", input="x")
    assert bad.value.param == "model"
    assert await records(client) == []
    fake_openai.enqueue(error_status(429, "slow down", retry_after=2))
    with pytest.raises(openai.RateLimitError):
        await api.embeddings.create(model=MODEL, input="x")
    assert len(fake_openai.requests) == 1, [
        r.headers for r in fake_openai.requests
    ]  # no retry behind the client's back
    (record,) = await records(client)
    assert record["endpoint"] == "embeddings" and record["answered"] is False and record["error"] == "RATE_LIMITED"


async def test_the_sdks_default_base64_on_a_provider_without_it(
    make_client: Callable[..., Awaitable[TestClient]], token: str
) -> None:
    """The openai SDK asks for ``encoding_format: base64`` unless told otherwise, and litellm refuses that
    parameter for providers whose API has none (Ollama, Gemini). The gateway asks them for floats and hands the
    client OpenAI's base64 (little-endian float32): the SDK's plain ``embeddings.create`` works on every model."""
    import base64
    import struct

    from aiohttp import web

    sent: list[Any] = []

    async def embed(request: web.Request) -> web.Response:  # Ollama's /api/embed
        body = await request.json()
        sent.append(body)
        return web.json_response(
            {"model": body["model"], "embeddings": [[0.5, -1.25, 2.0] for _ in body["input"]], "prompt_eval_count": 7}
        )

    app = web.Application()
    app.router.add_post("/api/embed", embed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = await make_client(providers={"ollama": {"base_url": f"http://127.0.0.1:{port}"}})
        api = sdk(client, token)
        result = await api.embeddings.create(model="ollama/nomic-embed-text", input=["a", "b"])
        assert [d.embedding for d in result.data] == [[0.5, -1.25, 2.0]] * 2  # decoded by the SDK
        asked = await api.embeddings.create(model="ollama/nomic-embed-text", input="a", encoding_format="base64")
        raw = base64.b64decode(str(asked.data[0].embedding))
        assert struct.unpack("<3f", raw) == (0.5, -1.25, 2.0)
        floats = await api.embeddings.create(model="ollama/nomic-embed-text", input="a", encoding_format="float")
        assert floats.data[0].embedding == [0.5, -1.25, 2.0]
        assert all("encoding_format" not in body for body in sent) and len(sent) == 3
        assert [(r["endpoint"], r["inputTokens"], r["error"]) for r in await records(client)] == [
            ("embeddings", 7, None)
        ] * 3
    finally:
        await runner.cleanup()
