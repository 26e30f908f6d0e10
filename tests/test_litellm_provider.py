"""The litellm provider: the real litellm against the fake OpenAI upstream over real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from agentspace.config import parse_config
from agentspace.events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    ResponseStarted,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
)
from agentspace.providers import litellm as litellm_provider
from agentspace.providers.base import ProviderRequest
from agentspace.providers.litellm import LiteLLMProvider, to_openai_messages
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
from tests.fakes.openai_upstream import (
    FakeOpenAI,
    annotations_delta,
    annotations_response,
    error_status,
    malformed_response,
    stream_response,
    text_deltas,
    text_response,
    tool_call,
    tool_calls_response,
    usage,
)

MODEL = "openai/gpt-4o-mini"
KEY = "sk-test-0123456789abcdef"


async def _noop(args: dict[str, Any]) -> Any:
    return None


WEATHER = Tool(
    "get_weather",
    "Current weather of a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    _noop,
)
TIME = Tool(
    "get_time", "Current time in a time zone", {"type": "object", "properties": {"tz": {"type": "string"}}}, _noop
)


def make_request(fake: FakeOpenAI, messages: list[ChatMessage] | None = None, **kwargs: Any) -> ProviderRequest:
    info = ModelInfo(MODEL, "openai", 0.15, 0.6, 0.075, 0.0, context_window=128_000, supports_tools=True)
    return ProviderRequest(
        model=MODEL,
        system="You are terse.",
        messages=messages or [ChatMessage.user("Hi")],
        model_info=info,
        max_tokens=256,
        api_key=KEY,
        base_url=fake.url,
        **kwargs,
    )


async def collect(request: ProviderRequest, config: dict[str, Any] | None = None) -> list[ProviderEvent]:
    provider = LiteLLMProvider(parse_config(config or {}))
    return [event async for event in provider.stream(request)]


async def fail(
    request: ProviderRequest, config: dict[str, Any] | None = None
) -> tuple[ProviderError, list[ProviderEvent]]:
    provider = LiteLLMProvider(parse_config(config or {}))
    events: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in provider.stream(request):
            events.append(event)
    return info.value, events


def finish_of(events: list[ProviderEvent]) -> ProviderFinish:
    assert isinstance(events[-1], ProviderFinish)
    assert sum(isinstance(e, ProviderFinish) for e in events) == 1
    return events[-1]


# --- plugin ---------------------------------------------------------------------------------------


def test_registers_a_catch_all_provider() -> None:
    registered: list[Any] = []
    litellm_provider.register_providers(registered.append, parse_config({}))
    (provider,) = registered
    assert provider.name == "litellm"
    assert provider.claims("openai/gpt-4o-mini") and not provider.claims("gpt-4o-mini")
    # a local server only with its [providers.X] table (a client's model id must not reach a local port)
    assert not provider.claims("ollama/llama3.2")
    registered.clear()
    litellm_provider.register_providers(registered.append, parse_config({"providers": {"ollama": {}}}))
    assert registered[0].claims("ollama/llama3.2")


def test_importing_the_plugin_does_not_import_litellm() -> None:
    code = "import sys, agentspace.providers.litellm; print('litellm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- streams --------------------------------------------------------------------------------------


async def test_text_and_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello, world!", chunks=4, usage=usage(30, 7, cached=10, reasoning=3)))
    events = await collect(make_request(fake_openai))

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello, world!"
    assert sum(isinstance(e, TextDelta) for e in events) == 4
    finish = finish_of(events)
    assert finish.finish_reason == "stop"
    assert finish.usage == TokenUsage(input_tokens=20, output_tokens=7, cache_read_tokens=10, reasoning_tokens=3)
    assert finish.message == ChatMessage("assistant", [TextPart("Hello, world!")])

    (sent,) = fake_openai.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["max_tokens"] == 256
    assert sent.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ]
    assert "tools" not in sent.body
    assert sent.headers.get("x-stainless-retry-count", "0") == "0"


async def test_provider_options_are_passed_to_litellm(fake_openai: FakeOpenAI) -> None:
    config = {"providers": {"openai": {"options": {"temperature": 0.2, "extra_headers": {"X-Team": "blue"}}}}}
    await collect(make_request(fake_openai), config)
    (sent,) = fake_openai.requests
    assert sent.body["temperature"] == 0.2
    assert sent.headers["x-team"] == "blue"


async def test_reasoning_content(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("42", reasoning="Six times seven."))
    events = await collect(make_request(fake_openai))

    kinds = [type(e) for e in events]
    assert kinds.index(ReasoningDelta) < kinds.index(TextDelta)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Six times seven."
    assert finish_of(events).message.parts == [ReasoningPart("Six times seven."), TextPart("42")]

    # Reasoning is not sent back to a non-Anthropic model.
    history = [ChatMessage.user("Hi"), finish_of(events).message, ChatMessage.user("And?")]
    await collect(make_request(fake_openai, history))
    assert fake_openai.requests[1].body["messages"][2] == {"role": "assistant", "content": "42"}


async def test_parallel_tool_calls_streamed_in_pieces_then_a_second_turn(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(
        tool_calls_response(
            tool_call("call_1", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
            tool_call("call_2", "get_time", ['{"tz":', ' "UTC"}']),
            text="Checking.",
            interleave=True,
        )
    )
    first = make_request(fake_openai, tools=[WEATHER, TIME])
    events = await collect(first)

    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert calls == [
        ToolCallEvent("call_1", "get_weather", {"city": "Paris"}),
        ToolCallEvent("call_2", "get_time", {"tz": "UTC"}),
    ]
    finish = finish_of(events)
    assert finish.finish_reason == "tool-calls"
    assert finish.message.parts == [
        TextPart("Checking."),
        ToolCallPart("call_1", "get_weather", {"city": "Paris"}),
        ToolCallPart("call_2", "get_time", {"tz": "UTC"}),
    ]
    assert fake_openai.requests[0].body["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": WEATHER.description, "parameters": WEATHER.input_schema},
        },
        {
            "type": "function",
            "function": {"name": "get_time", "description": TIME.description, "parameters": TIME.input_schema},
        },
    ]

    results = ChatMessage(
        "user",
        [
            ToolResultPart("call_1", "get_weather", {"temp_c": 18}),
            ToolResultPart("call_2", "get_time", "no such zone", is_error=True),
        ],
    )
    fake_openai.enqueue(text_response("18 °C in Paris."))
    events = await collect(
        make_request(fake_openai, [ChatMessage.user("Weather?"), finish.message, results], tools=[WEATHER, TIME])
    )
    assert finish_of(events).message.text == "18 °C in Paris."

    messages = fake_openai.requests[1].body["messages"]
    assistant, tool_1, tool_2 = messages[2:]
    assert assistant["role"] == "assistant" and assistant["content"] == "Checking."
    assert [
        (c["id"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in assistant["tool_calls"]
    ] == [
        ("call_1", "function", "get_weather", {"city": "Paris"}),
        ("call_2", "function", "get_time", {"tz": "UTC"}),
    ]
    assert tool_1 == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}
    assert tool_2 == {"role": "tool", "tool_call_id": "call_2", "content": "Error: no such zone"}


async def test_invalid_tool_arguments_are_passed_raw(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(tool_calls_response(tool_call("call_1", "get_weather", ['{"city": ', '"Par'])))
    events = await collect(make_request(fake_openai, tools=[WEATHER]))
    assert [e for e in events if isinstance(e, ToolCallEvent)] == [
        ToolCallEvent("call_1", "get_weather", {"_raw": '{"city": "Par'})
    ]


async def test_annotations_become_sources_once_per_url(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(
        stream_response(
            text_deltas("Paris is sunny."),
            annotations_delta(("https://weather.example/paris", "Paris weather"), ("https://news.example/", None)),
            annotations_delta(("https://weather.example/paris", "Paris weather")),
        )
    )
    events = await collect(make_request(fake_openai))
    assert [e for e in events if isinstance(e, SourceEvent)] == [
        SourceEvent("https://weather.example/paris", "Paris weather"),
        SourceEvent("https://news.example/", None),
    ]
    assert finish_of(events).message.parts == [
        TextPart("Paris is sunny."),
        SourcePart("https://weather.example/paris", "Paris weather"),
        SourcePart("https://news.example/", None),
    ]


async def test_annotations_response_builder(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(annotations_response("See the docs.", ("https://docs.example/", "Docs")))
    events = await collect(make_request(fake_openai))
    assert [e for e in events if isinstance(e, SourceEvent)] == [SourceEvent("https://docs.example/", "Docs")]


async def test_signed_thinking_blocks_as_litellm_streams_them_for_anthropic_models(fake_openai: FakeOpenAI) -> None:
    # litellm's Anthropic-family adapters put thinking text in reasoning_content AND thinking_blocks, and the
    # signature in a thinking block of its own; the text must come out once, the signature be kept.
    fake_openai.enqueue(
        stream_response(
            {"reasoning_content": "Hmm, ", "thinking_blocks": [{"type": "thinking", "thinking": "Hmm, "}]},
            {"reasoning_content": "Paris.", "thinking_blocks": [{"type": "thinking", "thinking": "Paris."}]},
            {"reasoning_content": "", "thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "sig-1"}]},
            # On the OpenAI route litellm drops a delta that has nothing but thinking_blocks; its Anthropic
            # adapters keep such deltas alive through provider_specific_fields.
            {"reasoning_content": "", "thinking_blocks": [{"type": "redacted_thinking", "data": "opaque"}]},
            text_deltas("Paris."),
        )
    )
    events = await collect(make_request(fake_openai))
    assert [e.text for e in events if isinstance(e, ReasoningDelta)] == ["Hmm, ", "Paris."]
    message = finish_of(events).message
    assert message.parts == [
        ReasoningPart("Hmm, Paris.", signature="sig-1"),
        ReasoningPart("", redacted_data="opaque"),
        TextPart("Paris."),
    ]

    # Sent back unchanged to Anthropic-family models only.
    history = [ChatMessage.user("Capital?"), message, ChatMessage.user("Sure?")]
    claude = make_request(fake_openai, history)
    claude.model = "bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert to_openai_messages(claude)[2] == {
        "role": "assistant",
        "content": "Paris.",
        "thinking_blocks": [
            {"type": "thinking", "thinking": "Hmm, Paris.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "opaque"},
        ],
    }
    assert to_openai_messages(make_request(fake_openai, history))[2] == {"role": "assistant", "content": "Paris."}


async def test_no_usage_from_the_provider_gives_none(fake_openai: FakeOpenAI) -> None:
    # litellm counts tokens itself when the provider sends none; the pipeline must see that there were none.
    fake_openai.enqueue(text_response("No usage here.").without_usage())
    events = await collect(make_request(fake_openai))
    finish = finish_of(events)
    assert finish.usage is None
    assert finish.message.text == "No usage here."


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [("length", "length"), ("content_filter", "content-filter"), ("function_call", "tool-calls")],
)
async def test_finish_reasons(fake_openai: FakeOpenAI, upstream: str, ours: str) -> None:
    fake_openai.enqueue(text_response("Cut", finish_reason=upstream))
    assert finish_of(await collect(make_request(fake_openai))).finish_reason == ours


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "LLM_ERROR", False),
        (401, "NO_API_KEY", False),
        (404, "LLM_ERROR", False),
        (429, "RATE_LIMITED", True),
        (500, "LLM_ERROR", True),
        (503, "LLM_ERROR", True),
    ],
)
async def test_error_statuses(fake_openai: FakeOpenAI, status: int, code: str, retryable: bool) -> None:
    retry_after = 7 if status == 429 else None
    fake_openai.enqueue(error_status(status, f"upstream says no to {KEY}", retry_after=retry_after))
    error, events = await fail(make_request(fake_openai))

    assert events == []
    assert (error.code, error.retryable) == (code, retryable)
    assert KEY not in error.message and "sk-test" not in error.message
    assert error.retry_after == retry_after
    assert len(fake_openai.requests) == 1  # litellm and the OpenAI SDK do not retry on their own
    if status == 401:
        assert error.message == "OpenAI API key not configured or rejected. Run: agentspace keys add openai"
    else:
        assert "upstream says no to [redacted]" in error.message
        assert "litellm" not in error.message and "Exception" not in error.message


async def test_rejected_key_names_the_configured_vault_entry(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(error_status(401, "Incorrect API key provided: sk-test-0123****cdef."))
    error, _ = await fail(make_request(fake_openai), {"providers": {"openai": {"key_name": "openai-work"}}})
    assert error.message == "OpenAI API key not configured or rejected. Run: agentspace keys add openai-work"


async def test_cut_stream(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there, friend", chunks=3).cut_after(3))
    error, events = await fail(make_request(fake_openai))
    assert (error.code, error.retryable) == ("LLM_ERROR", True)
    # The role chunk says the upstream answered; what arrived before the cut was delivered.
    assert [type(e) for e in events] == [ResponseStarted, TextDelta, TextDelta]
    assert "TransferEncodingError" not in error.message


async def test_a_stream_cut_after_its_role_chunk_says_the_upstream_answered(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there, friend", chunks=3).cut_after(1))
    error, events = await fail(make_request(fake_openai))
    assert error.code == "LLM_ERROR"
    assert events == [ResponseStarted()]  # a call the upstream took: its input is billed (docs/accounting.md)


async def test_stream_ending_without_finish_reason(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there").cut_after(3, abort=False))
    error, _ = await fail(make_request(fake_openai))
    assert error.code == "LLM_ERROR"
    assert error.message == "the upstream stream ended before the answer was complete"


async def test_malformed_chunk(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(malformed_response())
    error, events = await fail(make_request(fake_openai))
    assert error.code == "LLM_ERROR"
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello"]


async def test_upstream_that_stalls_past_the_timeout(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Slow answer").stall(3, after=2))
    error, events = await fail(make_request(fake_openai), {"providers": {"openai": {"timeout_seconds": 0.5}}})
    assert (error.code, error.retryable) == ("LLM_ERROR", True)
    assert error.message == "OpenAI did not answer in time"
    assert [type(e) for e in events] == [ResponseStarted, TextDelta]


async def test_unreachable_upstream(fake_openai: FakeOpenAI) -> None:
    from tests.scale_servers import free_port

    port = free_port()  # a port nobody listens on
    request = make_request(fake_openai)
    request.base_url = f"http://127.0.0.1:{port}/v1"
    error, _ = await fail(request)
    assert (error.code, error.retryable) == ("LLM_ERROR", True)
    assert "could not connect" in error.message


async def test_closing_the_stream_early_closes_the_upstream_connection(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("one two three four five six", chunks=6).with_delay(0.05))
    stream = LiteLLMProvider(parse_config({})).stream(make_request(fake_openai))
    assert isinstance(await anext(stream), ResponseStarted)
    assert isinstance(await anext(stream), TextDelta)
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(50):
        if fake_openai.requests[0].disconnected:
            break
        await asyncio.sleep(0.02)
    assert fake_openai.requests[0].disconnected


def claude_with_budget_thinking(fake_anthropic: Any, *, max_output_tokens: int, max_tokens: int) -> ProviderRequest:
    """A Claude call through litellm with the budget form of thinking (8,000 tokens)."""
    from agentspace.providers.base import ThinkingSettings

    model = "anthropic/claude-sonnet-4-5"
    info = ModelInfo(
        model, "anthropic", 3.0, 15.0, 0.3, 3.75, max_output_tokens=max_output_tokens, supports_reasoning=True
    )
    return ProviderRequest(
        model=model,
        system="",
        messages=[ChatMessage.user("Hi")],
        model_info=info,
        max_tokens=max_tokens,
        api_key="sk-ant-test-0123456789abcdef",
        base_url=fake_anthropic.url,
        thinking=ThinkingSettings(8000),
    )


async def test_claude_with_budget_thinking_gets_the_answers_room_on_top_of_the_budget(
    fake_anthropic: Any, make_client: Any
) -> None:
    """Claude through litellm with the budget form of thinking was sent ``max_tokens`` 4096 beside an 8000
    budget: litellm cuts such a budget to 4095 (``cap_thinking_budget_to_max_tokens``), or Anthropic refuses it,
    so the turn thought with half its budget and shared the 4096 with its answer. It is sent what Anthropic's
    own provider sends, the answer's 4096 on top of the budget; the reservation prices that output."""
    from agentspace.calls import Ceiling, ceiling_cost, request_ceiling
    from agentspace.transports import state

    request = claude_with_budget_thinking(fake_anthropic, max_output_tokens=64_000, max_tokens=4096)
    assert isinstance((await collect(request))[-1], ProviderFinish)
    [sent] = fake_anthropic.requests
    assert sent.body["thinking"]["budget_tokens"] == 8000 and sent.body["max_tokens"] == 4096 + 8000

    # Claude behind another API that litellm serves (Azure AI's): reserved at the output it is sent.
    gw = (await make_client()).app[state.REGISTRY]
    behind = "azure_ai/claude-sonnet-4-5"
    ceiling = request_ceiling(request)
    assert ceiling_cost(gw, behind, ceiling) == ceiling_cost(gw, behind, Ceiling(ceiling.input_tokens, 12096))


async def test_claude_whose_output_limit_leaves_no_least_budget_is_sent_no_thinking(fake_anthropic: Any) -> None:
    """A Claude model described with 1,000 output tokens was sent budget_tokens 999 beside max_tokens 1000, which
    the API refuses (its least budget is 1,024): it answers without thinking, within its limit."""
    request = claude_with_budget_thinking(fake_anthropic, max_output_tokens=1_000, max_tokens=1_000)
    assert isinstance((await collect(request))[-1], ProviderFinish)
    [sent] = fake_anthropic.requests
    assert "thinking" not in sent.body and sent.body["max_tokens"] == 1_000
