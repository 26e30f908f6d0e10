"""``GET /v1/models`` through both SDKs: only the models the gateway can serve, in each API's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace import ChatMessage, ProviderEvent, ProviderFinish, ProviderRequest, TextPart, hookimpl
from agentspace.testing import gateway_client, make_config


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
    sonnet = next(m for m in page.data if m.id == "claude-sonnet-4-5")
    assert sonnet.max_input_tokens and sonnet.max_tokens and sonnet.lifecycle  # the cost map's
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


class DescribedProvider:
    """A plugin provider that says what its models can take (``model_info``), as docs/plugins.md shows."""

    name = "described"

    def claims(self, model: str) -> bool:
        return model.startswith("described/")

    def models(self) -> list[str]:
        return ["described/small", "described/old"]

    def model_info(self, model: str) -> dict[str, Any]:
        info: dict[str, Any] = {"input_per_mtok": 0.5, "output_per_mtok": 1.5}
        if model == "described/small":
            info.update(context_window=32_000, max_output_tokens=4_096)
        else:
            info.update(deprecation_date="2099-01-01")
        return info

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        yield ProviderFinish("stop", None, ChatMessage("assistant", [TextPart("")]))


class DescribedPlugin:
    @hookimpl
    def register_providers(self, register: Callable[[Any], None]) -> None:
        register(DescribedProvider())


async def test_anthropic_shape_carries_the_window_and_output_limit_a_provider_gives(tmp_path: Path) -> None:
    """Anthropic's Models API gives each model's ``max_input_tokens``, ``max_tokens`` and ``lifecycle``;
    what a provider plugin says of its models reaches clients through them (``null`` when unknown)."""
    config = make_config(tmp_path)
    async with gateway_client(config, DescribedPlugin()) as client:
        token = (config.data_dir / "gateway-token").read_text().strip()
        api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
        listed = {m.id: m for m in (await api.models.list()).data}
        one = await api.models.retrieve("described/small")
    small, old = listed["described/small"], listed["described/old"]
    assert (small.max_input_tokens, small.max_tokens, small.lifecycle) == (32_000, 4_096, "active")
    assert (one.max_input_tokens, one.max_tokens, one.lifecycle) == (32_000, 4_096, "active")
    # A retirement date given: the model still answers until then, as Anthropic's "deprecated" one does.
    assert (old.max_input_tokens, old.max_tokens, old.lifecycle) == (None, None, "deprecated")
    assert old.retires_at is not None and old.retires_at.date().isoformat() == "2099-01-01"
