"""``GET /v1/models`` through both SDKs: only the models the gateway can serve, in each API's shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient


async def test_openai_shape_lists_usable_models_only(
    make_client: Callable[..., Awaitable[TestClient]], token: str
) -> None:
    client = await make_client()  # an Anthropic key only (conftest), no OpenAI key
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    ids = [m.id async for m in api.models.list()]
    assert "anthropic/claude-sonnet-4-5" in ids
    assert not any(i.startswith("openai/") for i in ids)
    page = await api.models.list()
    assert page.data[0].object == "model" and page.data[0].owned_by == "anthropic"


async def test_openai_models_appear_with_a_key(
    make_client: Callable[..., Awaitable[TestClient]], token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client()
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    # A model with no deprecation date in the cost map: models past theirs are not listed.
    assert "openai/gpt-5.4-mini" in [m.id async for m in api.models.list()]


async def test_anthropic_shape_with_anthropic_version(client: TestClient, token: str) -> None:
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    page = await api.models.list()
    ids = [m.id for m in page.data]
    assert "claude-sonnet-4-5" in ids  # the bare id Anthropic clients use
    assert page.data[0].type == "model" and page.has_more is False
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(
            api_key="wrong", base_url=f"http://127.0.0.1:{client.port}", max_retries=0
        ).models.list()


async def test_one_model_is_retrieved_in_each_apis_shape(client: TestClient, token: str) -> None:
    # The SDKs' models.retrieve: GET /v1/models/{id}, the id percent-encoded (its "/" as %2F).
    openai_api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    model = await openai_api.models.retrieve("anthropic/claude-sonnet-4-5")
    assert (model.id, model.object, model.owned_by) == ("anthropic/claude-sonnet-4-5", "model", "anthropic")
    # The bare id the /v1 endpoints take for it is the same model, named as asked (as OpenAI answers).
    bare = await openai_api.models.retrieve("claude-sonnet-4-5")
    assert (bare.id, bare.owned_by) == ("claude-sonnet-4-5", "anthropic")
    with pytest.raises(openai.NotFoundError) as refused:
        await openai_api.models.retrieve("anthropic/claude-sonet-4-5")
    assert refused.value.code == "model_not_found"

    anthropic_api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    info = await anthropic_api.models.retrieve("claude-sonnet-4-5")  # the bare id Anthropic clients use
    assert (info.id, info.type) == ("claude-sonnet-4-5", "model")
    assert (await anthropic_api.models.retrieve("anthropic/claude-sonnet-4-5")).id == "anthropic/claude-sonnet-4-5"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await anthropic_api.models.retrieve("claude-sonet-4-5")
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
