from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pluggy
import pytest

import agentspace_echo
from agentspace import hookspecs
from agentspace.config import Config, ConfigError, parse_config
from agentspace.events import ProviderFinish, ReasoningDelta, TextDelta
from agentspace.plugins import create_plugin_manager, describe_plugins
from agentspace.providers.base import Provider, ProviderRequest
from agentspace.tokens import count_tokens
from agentspace.types import ChatMessage, ModelInfo, ReasoningPart, TextPart, ToolCallPart, ToolResultPart


def make_config(**echo: Any) -> Config:
    return parse_config({"plugins": {"echo": echo}} if echo else {}, "test.toml", base_dir=Path("."))


def echo_provider(config: Config) -> Provider:
    """The provider the plugin registers, obtained through the hook like the gateway does."""
    pm = pluggy.PluginManager("agentspace")
    pm.add_hookspecs(hookspecs)
    pm.register(agentspace_echo)
    providers: list[Provider] = []
    pm.hook.register_providers(register=providers.append, config=config)
    [provider] = providers
    assert isinstance(provider, Provider)
    return provider


def request(model: str, messages: list[ChatMessage], system: str = "Be brief.") -> ProviderRequest:
    info = ModelInfo(model, "echo", 0.0, 0.0, 0.0, 0.0)
    return ProviderRequest(model=model, system=system, messages=messages, model_info=info)


async def collect(provider: Provider, req: ProviderRequest) -> list[Any]:
    return [event async for event in provider.stream(req)]


def test_claims_echo_ids_only() -> None:
    provider = echo_provider(make_config())
    assert provider.name == "echo"
    assert provider.claims("echo/echo") and provider.claims("echo/reasoning") and provider.claims("echo/anything")
    assert not provider.claims("anthropic/claude-sonnet-4-5") and not provider.claims("echo")


async def test_streams_the_last_user_message_word_by_word() -> None:
    history = [ChatMessage.user("first"), ChatMessage("assistant", [TextPart("reply")]), ChatMessage.user("Hello,  echo\nworld ")]
    events = await collect(echo_provider(make_config()), request("echo/echo", history, system="Sys"))
    *deltas, finish = events
    assert deltas == [TextDelta("Hello,  "), TextDelta("echo\n"), TextDelta("world ")]
    assert isinstance(finish, ProviderFinish)
    assert finish.finish_reason == "stop"
    assert finish.message == ChatMessage("assistant", [TextPart("Hello,  echo\nworld ")])
    assert finish.usage is not None
    assert finish.usage.input_tokens == count_tokens("Sys\nfirst\nreply\nHello,  echo\nworld ")
    assert finish.usage.output_tokens == count_tokens("Hello,  echo\nworld ") > 0
    assert finish.usage.reasoning_tokens == 0 and not finish.usage.estimated


async def test_reasoning_model_thinks_first() -> None:
    events = await collect(echo_provider(make_config()), request("echo/reasoning", [ChatMessage.user("why sky blue")]))
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    text = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(reasoning) == "Thinking about: why sky blue"
    assert "".join(text) == "why sky blue"
    assert isinstance(events[0], ReasoningDelta) and isinstance(events[-2], TextDelta)
    finish = events[-1]
    assert finish.message.parts == [ReasoningPart("Thinking about: why sky blue"), TextPart("why sky blue")]
    assert finish.usage.reasoning_tokens == count_tokens("Thinking about: why sky blue")
    assert finish.usage.output_tokens == finish.usage.reasoning_tokens + count_tokens("why sky blue")


async def test_echoes_tool_output_in_the_tool_loop() -> None:
    history = [
        ChatMessage.user("what time is it?"),
        ChatMessage("assistant", [ToolCallPart("call_1", "clock", {"tz": "UTC"})]),
        ChatMessage("user", [ToolResultPart("call_1", "clock", "12:00"), ToolResultPart("call_2", "n", {"n": 1})]),
    ]
    events = await collect(echo_provider(make_config()), request("echo/echo", history, system=""))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == '12:00\n{"n": 1}'
    assert events[-1].usage.input_tokens == count_tokens('what time is it?\n{"tz": "UTC"}\n12:00\n{"n": 1}')


async def test_empty_message_finishes_without_text() -> None:
    events = await collect(echo_provider(make_config()), request("echo/echo", [ChatMessage.user("")]))
    assert events == [ProviderFinish("stop", events[-1].usage, ChatMessage("assistant", []))]


async def test_delay_ms_paces_every_chunk() -> None:
    provider = echo_provider(make_config(delay_ms=20))
    started = time.monotonic()
    events = await collect(provider, request("echo/echo", [ChatMessage.user("one two three")]))
    assert len(events) == 4
    assert time.monotonic() - started >= 0.055


async def test_a_stopped_stream_stops_at_the_pending_chunk() -> None:
    provider = echo_provider(make_config(delay_ms=10_000))
    task = asyncio.create_task(collect(provider, request("echo/echo", [ChatMessage.user("slow words")])))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("settings", "key"), [({"delay_ms": -1}, "plugins.echo.delay_ms"), ({"delay_ms": "5"}, "plugins.echo.delay_ms"), ({"delay": 5}, "plugins.echo.delay")])
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        echo_provider(make_config(**settings))
    assert e.value.key == key


def test_pricing_table_from_the_readme_prices_echo_at_zero() -> None:
    from agentspace.pricing import model_info

    config = parse_config({"pricing": {"echo/echo": {"input_per_mtok": 0, "output_per_mtok": 0}}})
    info = model_info(config, "echo/echo")
    assert info.price_known
    assert (info.input_per_mtok, info.output_per_mtok, info.cache_read_per_mtok) == (0.0, 0.0, 0.0)
    assert not model_info(make_config(), "echo/echo").price_known


def test_discovered_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTSPACE_LOAD_PLUGINS", raising=False)
    pm = create_plugin_manager()
    assert pm.get_plugin("echo") is agentspace_echo
    [info] = [p for p in describe_plugins(pm) if p["name"] == "echo"]
    assert info["package"] == "agentspace-echo"
    assert info["hooks"] == ["register_providers"]
    providers: list[Provider] = []
    pm.hook.register_providers(register=providers.append, config=make_config())
    # Registered before the built-in catch-alls are asked, so echo ids reach the echo provider.
    assert next(p for p in providers if p.claims("echo/echo")).name == "echo"


def test_models_are_listed_by_the_catalog() -> None:
    from agentspace.catalog import usable_models
    from agentspace.config import parse_config

    providers: list = []
    agentspace_echo.register_providers(register=providers.append, config=parse_config({}))
    ids = {m["id"] for m in usable_models(parse_config({}), providers)}
    assert {"echo/echo", "echo/reasoning"} <= ids
