"""AnthropicProvider through the real ``anthropic`` SDK against the fake Messages API over HTTP."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from agentspace.config import parse_config
from agentspace.events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
    UsageReport,
)
from agentspace.providers.anthropic import INCOMPLETE_MESSAGE, AnthropicProvider, register_providers
from agentspace.providers.base import ProviderRequest, ThinkingSettings
from agentspace.types import (
    ChatMessage,
    ModelInfo,
    ReasoningPart,
    SourcePart,
    TextPart,
    TokenUsage,
    Tool,
    ToolCallPart,
    ToolResultPart,
)
from tests.fakes.anthropic_upstream import (
    FakeAnthropic,
    citations_response,
    error_event,
    error_status,
    malformed_response,
    message_response,
    model_object,
    started_fake_anthropic,
    text_block,
    text_response,
    thinking_response,
    tool_use_block,
    tool_use_response,
)

KEY = "sk-ant-test-provider-0123456789"
MODEL = "anthropic/claude-sonnet-4-5"


def model_info(max_output_tokens: int | None = 64_000) -> ModelInfo:
    return ModelInfo(
        MODEL,
        "anthropic",
        3.0,
        15.0,
        0.3,
        3.75,
        200_000,
        max_output_tokens,
        supports_reasoning=True,
        supports_tools=True,
    )


@pytest.fixture
async def provider() -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(parse_config({}))
    yield p
    await p.aclose()


def make_request(fake: FakeAnthropic, messages: list[ChatMessage] | None = None, **kwargs: Any) -> ProviderRequest:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("model_info", model_info())
    kwargs.setdefault("model", MODEL)
    return ProviderRequest(
        system="Be brief.", messages=messages or [ChatMessage.user("Hi")], base_url=fake.url, **kwargs
    )


async def collect(provider: AnthropicProvider, request: ProviderRequest) -> list[ProviderEvent]:
    # Usage reports along the way are the pipeline's business (tests/test_accounting.py); the final usage is here.
    return [event async for event in provider.stream(request) if not isinstance(event, UsageReport)]


async def collect_until_error(
    provider: AnthropicProvider, request: ProviderRequest
) -> tuple[list[ProviderEvent], ProviderError]:
    events: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in provider.stream(request):
            if not isinstance(event, UsageReport):
                events.append(event)
    return events, info.value


def finish_of(events: list[ProviderEvent]) -> ProviderFinish:
    assert isinstance(events[-1], ProviderFinish)
    assert not any(isinstance(e, ProviderFinish) for e in events[:-1])
    return events[-1]


# --- streaming ----------------------------------------------------------------------------------


async def test_text_stream_and_request_shape(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(text_response("Hello world", chunks=["Hello", " world"]))

    events = await collect(provider, make_request(fake_anthropic))

    assert events[:-1] == [TextDelta("Hello"), TextDelta(" world")]
    finish = finish_of(events)
    assert finish.finish_reason == "stop"
    assert finish.message == ChatMessage("assistant", [TextPart("Hello world")])
    sent = fake_anthropic.requests[0]
    assert sent.api_key == KEY
    assert sent.body["model"] == "claude-sonnet-4-5"
    assert sent.body["system"] == "Be brief."
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert sent.body["max_tokens"] == 4096
    assert sent.body["stream"] is True
    assert "thinking" not in sent.body and "temperature" not in sent.body and "tools" not in sent.body


async def test_thinking_signature_round_trip(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(thinking_response("Hmm, let me see.", "It is 42.", signature="sig-abc", redacted=True))

    events = await collect(provider, make_request(fake_anthropic))

    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Hmm, let me see."
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "It is 42."
    reply = finish_of(events).message
    redacted = reply.parts[1]
    assert isinstance(redacted, ReasoningPart) and redacted.redacted_data
    assert reply.parts == [ReasoningPart("Hmm, let me see.", signature="sig-abc"), redacted, TextPart("It is 42.")]

    # The tool loop and later turns send the assistant message back: thinking blocks unchanged.
    await collect(provider, make_request(fake_anthropic, [ChatMessage.user("Hi"), reply, ChatMessage.user("Why?")]))

    assert fake_anthropic.requests[1].body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Hmm, let me see.", "signature": "sig-abc"},
            {"type": "redacted_thinking", "data": redacted.redacted_data},
            {"type": "text", "text": "It is 42."},
        ],
    }


async def test_tool_use_input_is_assembled_from_pieces(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    async def handler(args: dict[str, Any]) -> Any:
        return "sunny"

    weather = Tool(
        "get_weather", "Weather for a city.", {"type": "object", "properties": {"city": {"type": "string"}}}, handler
    )
    fake_anthropic.enqueue(
        tool_use_response(
            "get_weather", {"city": "Paris"}, id="toolu_1", text="Checking.", pieces=['{"ci', 'ty": "Pa', 'ris"}']
        )
    )

    events = await collect(provider, make_request(fake_anthropic, tools=[weather]))

    assert [e for e in events if isinstance(e, ToolCallEvent)] == [
        ToolCallEvent("toolu_1", "get_weather", {"city": "Paris"})
    ]
    finish = finish_of(events)
    assert finish.finish_reason == "tool-calls"
    assert finish.message.parts == [TextPart("Checking."), ToolCallPart("toolu_1", "get_weather", {"city": "Paris"})]
    assert fake_anthropic.requests[0].body["tools"] == [weather.definition()]

    result = ChatMessage("user", [ToolResultPart("toolu_1", "get_weather", {"sky": "sunny"})])
    await collect(provider, make_request(fake_anthropic, [ChatMessage.user("Weather?"), finish.message, result]))

    assert fake_anthropic.requests[1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"sky": "sunny"}', "is_error": False}
            ],
        },
    ]


async def test_tool_use_without_arguments_has_empty_input(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(tool_use_response("now", "", id="toolu_2"))

    events = await collect(provider, make_request(fake_anthropic))

    assert events[0] == ToolCallEvent("toolu_2", "now", {})


async def test_tool_results_stored_in_the_assistant_message_go_in_a_user_turn(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    # AI SDK UI messages keep a tool's call and result in the assistant message, followed by more text.
    assistant = ChatMessage(
        "assistant",
        [
            ToolCallPart("toolu_1", "now", {}),
            ToolResultPart("toolu_1", "now", "12:00", is_error=False),
            TextPart("Noon."),
        ],
    )

    await collect(
        provider, make_request(fake_anthropic, [ChatMessage.user("Time?"), assistant, ChatMessage.user("Thanks")])
    )

    assert [(m["role"], [b["type"] for b in m["content"]]) for m in fake_anthropic.requests[0].body["messages"]] == [
        ("user", ["text"]),
        ("assistant", ["tool_use"]),
        ("user", ["tool_result"]),
        ("assistant", ["text"]),
        ("user", ["text"]),
    ]


async def test_sources_from_citations_and_search_results_are_deduplicated(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(citations_response())

    events = await collect(provider, make_request(fake_anthropic))

    assert [e for e in events if isinstance(e, SourceEvent)] == [
        SourceEvent("https://example.com/a", "Page A"),
        SourceEvent("https://example.com/b", "Page B"),
        SourceEvent("https://example.com/c", "Page C"),
    ]
    message = finish_of(events).message
    assert [p.url for p in message.parts if isinstance(p, SourcePart)] == [
        "https://example.com/a",
        "https://example.com/b",
        "https://example.com/c",
    ]
    assert message.text == "Let me search.According to the sources, it is so."


async def test_usage_is_cumulative_and_includes_cache_tokens(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(
        text_response(
            "Hi",
            usage={
                "input_tokens": 100,
                "cache_read_input_tokens": 50,
                "cache_creation_input_tokens": 20,
                "output_tokens": 1,
            },
            delta_usages=[{"output_tokens": 5}, {"output_tokens": 12, "output_tokens_details": {"thinking_tokens": 4}}],
        )
    )

    events = await collect(provider, make_request(fake_anthropic))

    assert finish_of(events).usage == TokenUsage(
        input_tokens=100, output_tokens=12, cache_read_tokens=50, cache_write_tokens=20, reasoning_tokens=4
    )


async def test_message_delta_overwrites_the_input_counts_it_carries(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(
        text_response(
            "Hi",
            usage={"input_tokens": 10, "cache_read_input_tokens": 0},
            delta_usages=[{"output_tokens": 7, "input_tokens": 30, "cache_read_input_tokens": 9}],
        )
    )

    events = await collect(provider, make_request(fake_anthropic))

    assert finish_of(events).usage == TokenUsage(input_tokens=30, output_tokens=7, cache_read_tokens=9)


@pytest.mark.parametrize(
    "stop_reason, finish_reason",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("tool_use", "tool-calls"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("refusal", "content-filter"),
        ("something_new", "other"),
        (None, "other"),
    ],
)
async def test_stop_reasons(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic, stop_reason: str | None, finish_reason: str
) -> None:
    fake_anthropic.enqueue(message_response(text_block("Hi"), stop_reason=stop_reason))

    events = await collect(provider, make_request(fake_anthropic))

    assert finish_of(events).finish_reason == finish_reason


# --- thinking request shape ---------------------------------------------------------------------


async def test_thinking_budget_raises_max_tokens_and_sends_no_temperature(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    await collect(
        provider, make_request(fake_anthropic, thinking=ThinkingSettings(budget_tokens=8000), max_tokens=4096)
    )

    body = fake_anthropic.requests[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 8000}
    assert body["max_tokens"] == 8000 + 4096
    assert "temperature" not in body


async def test_thinking_budget_below_max_tokens_keeps_max_tokens(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    await collect(
        provider, make_request(fake_anthropic, thinking=ThinkingSettings(budget_tokens=2000), max_tokens=4096)
    )

    body = fake_anthropic.requests[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert body["max_tokens"] == 4096


async def test_thinking_stays_within_the_models_output_limit(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    request = make_request(
        fake_anthropic, thinking=ThinkingSettings(budget_tokens=8000), max_tokens=4096, model_info=model_info(10_000)
    )

    await collect(provider, request)

    body = fake_anthropic.requests[0].body
    assert body["max_tokens"] == 10_000
    assert body["thinking"]["budget_tokens"] == 8000


async def test_a_model_whose_output_limit_leaves_no_least_budget_answers_without_thinking(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    # The API's least budget is 1,024 tokens, below max_tokens: a model described with 1,000 output tokens
    # was sent budget_tokens 999, and every call was refused.
    request = make_request(
        fake_anthropic, thinking=ThinkingSettings(budget_tokens=8000), max_tokens=1_000, model_info=model_info(1_000)
    )

    events = await collect(provider, request)

    body = fake_anthropic.requests[0].body
    assert "thinking" not in body and body["max_tokens"] == 1_000
    assert events[-1].finish_reason == "stop"


async def test_adaptive_thinking_for_models_the_models_api_says_take_only_adaptive(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    request = make_request(fake_anthropic, thinking=ThinkingSettings(), max_tokens=4096)
    fake_anthropic.models[request.model_name] = model_object(request.model_name, adaptive_only=True)
    await collect(provider, request)
    await collect(provider, make_request(fake_anthropic, thinking=ThinkingSettings(), max_tokens=4096))

    body = fake_anthropic.requests[0].body
    assert body["thinking"] == {"type": "adaptive"}
    assert body["max_tokens"] == 4096
    assert "temperature" not in body
    assert fake_anthropic.model_requests == [request.model_name]  # asked once, then cached


async def test_no_thinking_for_models_without_it(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    request = make_request(fake_anthropic, thinking=ThinkingSettings())
    fake_anthropic.models[request.model_name] = model_object(request.model_name, thinking=False)
    await collect(provider, request)
    assert "thinking" not in fake_anthropic.requests[0].body


async def test_without_the_models_api_the_cost_map_decides(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.any_model = False  # the Models API answers 404 for every model
    adaptive = make_request(fake_anthropic, thinking=ThinkingSettings(adaptive=True))
    await collect(provider, adaptive)
    assert fake_anthropic.requests[-1].body["thinking"] == {"type": "adaptive"}

    plain = make_request(
        fake_anthropic,
        model="anthropic/claude-no-reasoning",
        thinking=ThinkingSettings(),
        model_info=replace(model_info(), supports_reasoning=False),
    )
    await collect(provider, plain)
    assert "thinking" not in fake_anthropic.requests[-1].body


# --- errors -------------------------------------------------------------------------------------


async def test_missing_key_fails_before_any_request(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    events, error = await collect_until_error(provider, make_request(fake_anthropic, api_key=None))

    assert events == []
    assert (error.code, error.message) == (
        "NO_API_KEY",
        "Anthropic API key not configured. Run: agentspace keys add anthropic",
    )
    assert fake_anthropic.requests == []


@pytest.mark.parametrize(
    "response, code, retryable, status, retry_after, says",
    [
        (error_status(401, "invalid x-api-key"), "NO_API_KEY", False, 401, None, "Run: agentspace keys add anthropic"),
        (error_status(403, "permission denied"), "NO_API_KEY", False, 403, None, "Run: agentspace keys add anthropic"),
        (
            error_status(429, "Number of request tokens has exceeded your rate limit", retry_after=7),
            "RATE_LIMITED",
            True,
            429,
            7.0,
            "rate limit",
        ),
        (error_status(500, "Internal server error"), "LLM_ERROR", True, 500, None, "temporary problem"),
        (error_status(529, "Overloaded"), "LLM_ERROR", True, 529, None, "overloaded"),
        (
            error_status(400, "messages: text content blocks must be non-empty"),
            "LLM_ERROR",
            False,
            400,
            None,
            "must be non-empty",
        ),
        (error_status(404, "model: claude-nope"), "MODEL_NOT_FOUND", False, 404, None, "claude-nope"),
    ],
)
async def test_http_errors(
    provider: AnthropicProvider,
    fake_anthropic: FakeAnthropic,
    response: Any,
    code: str,
    retryable: bool,
    status: int,
    retry_after: float | None,
    says: str,
) -> None:
    fake_anthropic.enqueue(response)

    events, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert events == []
    assert (error.code, error.retryable, error.status, error.retry_after) == (code, retryable, status, retry_after)
    assert says in error.message


async def test_error_messages_never_carry_the_key(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(error_status(400, f"bad header value {KEY}"))

    _, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert KEY not in error.message and "bad header value ***" in error.message


async def test_error_event_after_200_keeps_what_was_streamed(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(error_event("overloaded_error", "Overloaded", text="Partial answer"))

    events, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Partial answer"
    assert (error.code, error.retryable, error.status) == ("LLM_ERROR", True, 529)
    assert "Overloaded" in error.message


async def test_non_transient_error_event_is_not_retryable(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(error_event("invalid_request_error", "prompt is too long"))

    _, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert (error.code, error.retryable) == ("LLM_ERROR", False)
    assert "prompt is too long" in error.message


@pytest.mark.parametrize("abort", [True, False], ids=["connection-dropped", "body-ended"])
async def test_cut_stream_is_an_error_after_the_streamed_text(
    provider: AnthropicProvider, fake_anthropic: FakeAnthropic, abort: bool
) -> None:
    # message_start, ping, content_block_start, then the first of two text deltas.
    fake_anthropic.enqueue(text_response("Hello world", chunks=["Hello", " world"]).cut_after(4, abort=abort))

    events, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert events == [TextDelta("Hello")]
    assert (error.code, error.message, error.retryable) == ("LLM_ERROR", INCOMPLETE_MESSAGE, False)


async def test_malformed_data_is_an_error(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(malformed_response())

    events, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert events == [TextDelta("Hello")]
    assert error.code == "LLM_ERROR" and "could not be read" in error.message


async def test_broken_tool_json_is_an_error(provider: AnthropicProvider, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(message_response(tool_use_block("f", '{"a": '), stop_reason="tool_use"))

    _, error = await collect_until_error(provider, make_request(fake_anthropic))

    assert error.code == "LLM_ERROR"


async def test_stalled_stream_times_out(fake_anthropic: FakeAnthropic) -> None:
    provider = AnthropicProvider(parse_config({"providers": {"anthropic": {"timeout_seconds": 0.3}}}))
    fake_anthropic.enqueue(text_response("Hello world", chunks=2).stall(30, after=3))
    try:
        events, error = await collect_until_error(provider, make_request(fake_anthropic))
    finally:
        await provider.aclose()

    assert events == []
    assert (error.code, error.retryable) == ("LLM_ERROR", True)


async def test_unreachable_upstream_is_retryable(provider: AnthropicProvider) -> None:
    async with started_fake_anthropic() as fake:
        request = make_request(fake)
    # The fake is closed: nothing listens on its port any more.

    _, error = await collect_until_error(provider, request)

    assert (error.code, error.retryable) == ("LLM_ERROR", True)


# --- the plugin ---------------------------------------------------------------------------------


def test_registers_one_provider_for_anthropic_ids() -> None:
    registered: list[Any] = []

    register_providers(registered.append, parse_config({}))

    [provider] = registered
    assert provider.name == "anthropic"
    assert provider.claims("anthropic/claude-sonnet-4-5")
    assert not provider.claims("openai/gpt-4o-mini")


def test_importing_the_plugin_does_not_import_the_sdk() -> None:
    code = "import sys, agentspace.providers.anthropic; sys.exit('anthropic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
