from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import agentspace_echo
import pytest

from agentspace import (
    ChatMessage,
    ConfigError,
    ModelInfo,
    Provider,
    ProviderFinish,
    ProviderRequest,
    ReasoningDelta,
    ReasoningPart,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    count_tokens,
)
from agentspace.testing import gateway_client, installed_plugin, make_config, registered


def echo_provider(tmp_path: Path, **settings: Any) -> Provider:
    """The provider the plugin registers, with ``[plugins.echo]`` settings, obtained through the hook."""
    [provider] = registered("register_providers", make_config(tmp_path, plugins={"echo": settings}), agentspace_echo)
    assert isinstance(provider, Provider)
    return provider


def request(model: str, messages: list[ChatMessage], system: str = "Be brief.") -> ProviderRequest:
    info = ModelInfo(model, "echo", 0.0, 0.0, 0.0, 0.0)
    return ProviderRequest(model=model, system=system, messages=messages, model_info=info)


async def collect(provider: Provider, req: ProviderRequest) -> list[Any]:
    return [event async for event in provider.stream(req)]


def test_claims_echo_ids_only(tmp_path: Path) -> None:
    provider = echo_provider(tmp_path)
    assert provider.name == "echo"
    assert provider.claims("echo/echo") and provider.claims("echo/reasoning") and provider.claims("echo/anything")
    assert not provider.claims("anthropic/claude-sonnet-4-5") and not provider.claims("echo")


async def test_streams_the_last_user_message_word_by_word(tmp_path: Path) -> None:
    history = [
        ChatMessage.user("first"),
        ChatMessage("assistant", [TextPart("reply")]),
        ChatMessage.user("Hello,  echo\nworld "),
    ]
    events = await collect(echo_provider(tmp_path), request("echo/echo", history, system="Sys"))
    *deltas, finish = events
    assert deltas == [TextDelta("Hello,  "), TextDelta("echo\n"), TextDelta("world ")]
    assert isinstance(finish, ProviderFinish)
    assert finish.finish_reason == "stop"
    assert finish.message == ChatMessage("assistant", [TextPart("Hello,  echo\nworld ")])
    assert finish.usage is not None
    assert finish.usage.input_tokens == count_tokens("Sys\nfirst\nreply\nHello,  echo\nworld ")
    assert finish.usage.output_tokens == count_tokens("Hello,  echo\nworld ") > 0
    assert finish.usage.reasoning_tokens == 0 and not finish.usage.estimated


async def test_reasoning_model_thinks_first(tmp_path: Path) -> None:
    events = await collect(echo_provider(tmp_path), request("echo/reasoning", [ChatMessage.user("why sky blue")]))
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    text = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(reasoning) == "Thinking about: why sky blue"
    assert "".join(text) == "why sky blue"
    assert isinstance(events[0], ReasoningDelta) and isinstance(events[-2], TextDelta)
    finish = events[-1]
    assert finish.message.parts == [ReasoningPart("Thinking about: why sky blue"), TextPart("why sky blue")]
    assert finish.usage.reasoning_tokens == count_tokens("Thinking about: why sky blue")
    assert finish.usage.output_tokens == finish.usage.reasoning_tokens + count_tokens("why sky blue")


async def test_echoes_tool_output_in_the_tool_loop(tmp_path: Path) -> None:
    history = [
        ChatMessage.user("what time is it?"),
        ChatMessage("assistant", [ToolCallPart("call_1", "clock", {"tz": "UTC"})]),
        ChatMessage("user", [ToolResultPart("call_1", "clock", "12:00"), ToolResultPart("call_2", "n", {"n": 1})]),
    ]
    events = await collect(echo_provider(tmp_path), request("echo/echo", history, system=""))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == '12:00\n{"n": 1}'
    assert events[-1].usage.input_tokens == count_tokens('what time is it?\n{"tz": "UTC"}\n12:00\n{"n": 1}')


async def test_empty_message_finishes_without_text(tmp_path: Path) -> None:
    events = await collect(echo_provider(tmp_path), request("echo/echo", [ChatMessage.user("")]))
    assert events == [ProviderFinish("stop", events[-1].usage, ChatMessage("assistant", []))]


async def test_delay_ms_paces_every_chunk(tmp_path: Path) -> None:
    provider = echo_provider(tmp_path, delay_ms=20)
    started = time.monotonic()
    events = await collect(provider, request("echo/echo", [ChatMessage.user("one two three")]))
    assert len(events) == 4
    assert time.monotonic() - started >= 0.055


async def test_a_stopped_stream_stops_at_the_pending_chunk(tmp_path: Path) -> None:
    provider = echo_provider(tmp_path, delay_ms=10_000)
    task = asyncio.create_task(collect(provider, request("echo/echo", [ChatMessage.user("slow words")])))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"delay_ms": -1}, "plugins.echo.delay_ms"),
        ({"delay_ms": "5"}, "plugins.echo.delay_ms"),
        ({"delay": 5}, "plugins.echo.delay"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        echo_provider(tmp_path, **settings)
    assert e.value.key == key


def test_pricing_table_from_the_readme_prices_echo_at_zero(tmp_path: Path) -> None:
    from agentspace.pricing import model_info

    config = make_config(tmp_path, '[pricing."echo/echo"]\ninput_per_mtok = 0\noutput_per_mtok = 0\n')
    info = model_info(config, "echo/echo")
    assert info.price_known
    assert (info.input_per_mtok, info.output_per_mtok, info.cache_read_per_mtok) == (0.0, 0.0, 0.0)
    assert not model_info(make_config(tmp_path), "echo/echo").price_known


def test_discovered_through_the_entry_point(tmp_path: Path) -> None:
    installed = installed_plugin("echo")
    assert installed.plugin is agentspace_echo
    assert installed.info["package"] == "agentspace-echo"
    assert installed.info["hooks"] == ["register_providers"]
    providers: list[Provider] = []
    installed.pm.hook.register_providers(register=providers.append, config=make_config(tmp_path))
    # Registered before the built-in catch-alls are asked, so echo ids reach the echo provider.
    assert next(p for p in providers if p.claims("echo/echo")).name == "echo"


def test_models_are_listed_by_the_catalog(tmp_path: Path) -> None:
    from agentspace.catalog import usable_models

    config = make_config(tmp_path)
    ids = {m["id"] for m in usable_models(config, registered("register_providers", config, agentspace_echo))}
    assert {"echo/echo", "echo/reasoning"} <= ids


async def test_chat_through_the_gateway_is_stored_and_priced(tmp_path: Path) -> None:
    """The plugin in the real gateway: a WebSocket chat with echo/echo, stored, with its usage record."""
    config = make_config(tmp_path, '[pricing."echo/echo"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n')
    async with gateway_client(config, agentspace_echo) as client:
        ws = await client.ws_connect("/gateway")
        await ws.send_json({"type": "chat.send", "id": "1", "content": "Hello there", "model": "echo/echo"})
        frames = []
        while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
            frames.append(await ws.receive_json(timeout=10))
        await ws.close()
        end = frames[-1]
        assert end["type"] == "chat.stream.end" and end["finishReason"] == "stop", frames
        assert "".join(f["delta"] for f in frames if f["type"] == "chat.stream.delta") == "Hello there"
        usage = end["usage"]
        assert usage["outputTokens"] == count_tokens("Hello there") and usage["inputTokens"] > 0
        assert usage["totalCost"] == (usage["inputTokens"] * 1.0 + usage["outputTokens"] * 2.0) / 1e6
        [session_id] = {f["sessionId"] for f in frames if "sessionId" in f}
        stored = await (await client.get(f"/api/sessions/{session_id}")).json()
        assert [m["content"] for m in stored["session"]["messages"]] == ["Hello there", "Hello there"]
        report = await (await client.get("/api/usage?by=model")).json()
        assert report["grandTotal"]["requestCount"] == 1
