"""``POST /v1/responses`` through the official ``openai`` SDK over real HTTP: SDK -> gateway -> litellm -> fake
OpenAI upstream (Chat Completions), and the Anthropic SDK -> fake Anthropic for ``anthropic/*`` models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import (
    FakeOpenAI,
    error_status,
    text_response,
    tool_call,
    tool_calls_response,
    usage,
)

MODEL = "openai/gpt-4o-mini"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    }
]


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def sdk(client: TestClient, token: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0, **kwargs)


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


async def test_create_whole(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there", usage=usage(30, 7, cached=10)))
    response = await sdk(client, token).responses.create(
        model=MODEL,
        instructions="Be terse.",
        input="Hi",
        store=False,
        prompt_cache_key="codex-1",
        prompt_cache_retention="24h",  # a hint of the Responses API, as on Chat Completions
        extra_headers={"session-id": "codex-1"},
    )
    assert response.output_text == "Hello there"
    assert response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (30, 7, 37)
    assert response.usage.input_tokens_details.cached_tokens == 10
    sent = fake_openai.requests[0].body
    assert sent["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert sent["prompt_cache_key"] == "codex-1" and "store" not in sent
    assert sent["prompt_cache_retention"] == "24h"
    (record,) = await records(client)
    assert record["endpoint"] == "responses" and record["sessionId"] == "codex-1"
    assert (record["inputTokens"], record["cacheReadTokens"], record["outputTokens"]) == (20, 10, 7)
    assert record["estimated"] is False and record["ttftMs"] is None


async def test_stream_accumulated_by_the_sdk(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(
        text_response("The answer is 42.", reasoning="Six times seven.", usage=usage(12, 9, reasoning=4))
    )
    api = sdk(client, token)
    reasoning: Any = {"effort": "low", "summary": "auto"}
    async with api.responses.stream(model="openai/gpt-5", input="Why?", reasoning=reasoning) as s:
        kinds = [event.type async for event in s]
        final = await s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in kinds and "response.output_text.delta" in kinds
    assert final.output_text == "The answer is 42."
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Six times seven."  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 4
    assert fake_openai.requests[0].body["reasoning_effort"] == "low"
    (record,) = await records(client)
    assert (record["inputTokens"], record["outputTokens"], record["reasoningTokens"]) == (12, 9, 4)
    assert record["endpoint"] == "responses" and record["ttftMs"] is not None


@pytest.mark.parametrize("stream", [True, False])
async def test_function_call_round_trip(client: TestClient, token: str, fake_openai: FakeOpenAI, stream: bool) -> None:
    fake_openai.enqueue(
        tool_calls_response(
            tool_call("call_a", "get_weather", {"city": "Paris"}),
            tool_call("call_b", "get_weather", {"city": "Rome"}),
            usage=usage(40, 15),
        ),
        text_response("Paris 18 C, Rome 22 C", usage=usage(60, 8)),
    )
    api = sdk(client, token)
    first: list[dict[str, Any]] = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
    ]
    kwargs: dict[str, Any] = dict(
        model=MODEL, input=first, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True, store=False
    )
    if stream:
        async with api.responses.stream(**kwargs) as s:
            events = [e async for e in s]
            response = await s.get_final_response()
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert deltas == ['{"city": "Paris"}', '{"city": "Rome"}']
    else:
        response = await api.responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_weather", '{"city": "Rome"}'),
    ]
    sent = fake_openai.requests[0].body
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][0] == {"role": "system", "content": "Use tools."}
    second = [
        *first,
        *(c.model_dump(exclude_none=True) for c in calls),
        {"type": "function_call_output", "call_id": "call_a", "output": "18 C"},
        {"type": "function_call_output", "call_id": "call_b", "output": "22 C"},
    ]
    answer = await api.responses.create(model=MODEL, input=second, tools=TOOLS, store=False)
    assert answer.output_text == "Paris 18 C, Rome 22 C"
    sent = fake_openai.requests[1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "tool"]
    assert [tc["id"] for tc in sent[2]["tool_calls"]] == ["call_a", "call_b"]
    assert [(m["tool_call_id"], m["content"]) for m in sent[3:]] == [("call_a", "18 C"), ("call_b", "22 C")]
    assert [(r["endpoint"], r["inputTokens"], r["outputTokens"]) for r in await records(client)] == [
        ("responses", 40, 15),
        ("responses", 60, 8),
    ]


class Person(BaseModel):
    name: str
    age: int


async def test_structured_output_parse(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response('{"name": "Ada", "age": 36}'))
    parsed = await sdk(client, token).responses.parse(model=MODEL, input="Ada, 36", text_format=Person)
    assert parsed.output_parsed == Person(name="Ada", age=36)
    fmt = fake_openai.requests[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Person"
    assert fmt["json_schema"]["strict"] is True and fmt["json_schema"]["schema"]["required"] == ["name", "age"]


async def test_length_is_incomplete(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Cut", finish_reason="length"))
    response = await sdk(client, token).responses.create(model=MODEL, input="Long?", max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert fake_openai.requests[0].body["max_tokens"] == 16


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        # A choice that needs a tool when there is none: OpenAI's 400 (it was dropped)
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
    ],
)
async def test_refused_with_the_field_named(
    client: TestClient, token: str, fake_openai: FakeOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(client, token).responses.create(model=MODEL, input="Hi", extra_body=extra)
    assert raised.value.param == param
    assert raised.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert fake_openai.requests == [] and await records(client) == []


async def test_tool_choice_auto_or_none_without_tools_is_no_refusal(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    for choice in ("auto", "none"):  # Codex sends "auto" whatever its tools
        await sdk(client, token).responses.create(model=MODEL, input="Hi", tool_choice=choice)  # type: ignore[arg-type]
    assert ["tool_choice" in request.body for request in fake_openai.requests] == [False, False]


async def test_upstream_error(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(error_status(429, "slow down", retry_after=3))
    with pytest.raises(openai.RateLimitError) as raised:
        await sdk(client, token).responses.create(model=MODEL, input="Hi")
    assert raised.value.code == "rate_limit_exceeded"
    (record,) = await records(client)
    assert record["endpoint"] == "responses" and record["error"] == "RATE_LIMITED"


async def test_claude_model(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    reported = {"input_tokens": 25, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 40}
    fake_anthropic.enqueue(
        fa.text_response("Bonjour", usage=reported, delta_usages=[{"output_tokens": 4}]),
        fa.text_response("Salut", usage=reported, delta_usages=[{"output_tokens": 4}]),
    )
    async with sdk(client, token).responses.stream(
        model="anthropic/claude-sonnet-4-6", input="Hello", tools=TOOLS, tool_choice="required"
    ) as s:
        final = await s.get_final_response()
    assert final.output_text == "Bonjour"
    sent = fake_anthropic.requests[0].body
    assert sent["tool_choice"] == {"type": "any"}
    assert final.usage is not None and (final.usage.input_tokens, final.usage.total_tokens) == (165, 169)
    details = final.usage.input_tokens_details
    assert (details.cached_tokens, details.cache_write_tokens) == (100, 40)  # what Anthropic reported
    chat = await sdk(client, token).chat.completions.create(
        model="anthropic/claude-sonnet-4-6", messages=[{"role": "user", "content": "Hello"}]
    )
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert (chat.usage.prompt_tokens_details.cached_tokens, chat.usage.prompt_tokens_details.cache_write_tokens) == (
        100,
        40,
    )
    record = (await records(client))[0]
    assert (record["endpoint"], record["inputTokens"], record["outputTokens"]) == ("responses", 25, 4)
    assert (record["cacheReadTokens"], record["cacheWriteTokens"]) == (100, 40)


async def test_signed_reasoning_goes_back_with_the_tool_result(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    """As Codex runs a Claude model with reasoning: the stream's reasoning item carries the signature as
    encrypted_content (asked with include), and the next turn sends it back, before the tool call."""
    fake_anthropic.enqueue(
        fa.message_response(
            fa.thinking_block("Weather needs a tool."),
            fa.tool_use_block("get_weather", {"city": "Paris"}, id="toolu_w"),
            stop_reason="tool_use",
        ),
        fa.text_response("18 C in Paris"),
    )
    api = sdk(client, token)
    first: list[Any] = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}]
    kwargs: dict[str, Any] = dict(
        model="anthropic/claude-sonnet-4-6",
        tools=TOOLS,
        store=False,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "low", "summary": "auto"},
    )
    async with api.responses.stream(input=first, **kwargs) as s:
        done = [e.item for e in [e async for e in s] if e.type == "response.output_item.done"]
    # In the order Codex keeps them: the call, then the reasoning (done once its signature is known).
    assert [item.type for item in done] == ["function_call", "reasoning"]
    assert done[1].encrypted_content == fa.DEFAULT_SIGNATURE  # type: ignore[union-attr]
    assert done[1].summary[0].text == "Weather needs a tool."  # type: ignore[union-attr]
    history = [
        *first,
        *(item.model_dump(exclude_none=True) for item in done),
        {"type": "function_call_output", "call_id": "toolu_w", "output": "18 C"},
    ]
    answer = await api.responses.create(input=history, **kwargs)
    assert answer.output_text == "18 C in Paris"
    assistant = fake_anthropic.requests[1].body["messages"][1]
    assert [b["type"] for b in assistant["content"]] == ["thinking", "tool_use"]
    assert assistant["content"][0]["signature"] == fa.DEFAULT_SIGNATURE


@pytest.mark.parametrize("upstream", ["openai", "anthropic"])
async def test_upstream_dies_mid_stream(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, upstream: str
) -> None:
    """After some text, the upstream breaks off: the stream ends with response.failed (its error's code and
    message), the SDK's accumulator keeps what came, and the call is counted once as failed."""
    fake_openai.enqueue(text_response("Partial answer", chunks=["Partial", " answer", " never"]).cut_after(2))
    fake_anthropic.enqueue(fa.error_event("overloaded_error", "Overloaded", text="Partial answer"))
    model = MODEL if upstream == "openai" else "anthropic/claude-sonnet-4-6"
    async with sdk(client, token).responses.stream(model=model, input="Hi") as s:
        events = [e async for e in s]
        with pytest.raises(RuntimeError):  # no response.completed: the SDK has no final response
            await s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.failed"
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.message
    assert failed.id == events[0].response.id  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (record,) = await records(client)
    assert record["endpoint"] == "responses" and record["error"]
    assert record["ttftMs"] is not None


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("invalid_request_error", "invalid_prompt"),
        ("request_too_large", "invalid_prompt"),
        # The gateway's provider key refused mid-stream: the same on a retry (invalid_api_key, server_error:
        # Codex retried them).
        ("authentication_error", "invalid_prompt"),
        ("permission_error", "invalid_prompt"),
        ("not_found_error", "invalid_prompt"),
        ("rate_limit_error", "rate_limit_exceeded"),
        ("overloaded_error", "server_error"),
        ("api_error", "server_error"),
    ],
)
async def test_a_mid_stream_error_fails_the_response_with_the_code_openai_gives_it(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, error_type: str, code: str
) -> None:
    """Anthropic's ``invalid_request_error`` after the stream began ended it as ``server_error``, which Codex
    retries (every ``response.failed`` code but a few): the same request, refused again. A request the
    upstream refuses fails as OpenAI's ``invalid_prompt`` (Codex shows it and stops); what may pass on a retry
    (overloaded, a server error, a rate limit) keeps its code."""
    fake_anthropic.enqueue(fa.error_event(error_type, "the request was refused", text="Partial answer"))
    async with sdk(client, token).responses.stream(model="anthropic/claude-sonnet-4-6", input="Hi") as s:
        events = [e async for e in s]
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.error is not None
    assert failed.response.error.code == code
    assert "the request was refused" in failed.response.error.message


async def test_reasoning_effort_reaches_an_openai_reasoning_model(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    """reasoning.effort goes to OpenAI as reasoning_effort (not dropped on the way through Chat Completions);
    a model without reasoning refuses it with a 400 naming reasoning.effort, as OpenAI does."""
    api = sdk(client, token)
    await api.responses.create(model="openai/gpt-5", input="Hi", reasoning={"effort": "high", "summary": "auto"})
    assert fake_openai.requests[0].body["reasoning_effort"] == "high"
    with pytest.raises(openai.BadRequestError) as raised:
        await api.responses.create(model=MODEL, input="Hi", reasoning={"effort": "low"})
    # Named as the Responses API names it (as OpenAI's own error does), not as Chat Completions upstream does.
    assert raised.value.param == "reasoning.effort"
    assert raised.value.body["message"].startswith("reasoning.effort: not supported by openai/gpt-4o-mini")  # type: ignore[index]
    assert len(fake_openai.requests) == 1


async def test_text_verbosity_is_passed_on_or_refused(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """text.verbosity (llm and Codex send it for GPT-5 models) reaches a model that takes it; others refuse it
    with a 400 naming it, never drop it."""
    api = sdk(client, token)
    await api.responses.create(model="openai/gpt-5", input="Hi", text={"verbosity": "low"})
    assert fake_openai.requests[0].body["verbosity"] == "low"
    for model in (MODEL, "anthropic/claude-sonnet-4-6"):
        with pytest.raises(openai.BadRequestError) as raised:
            await api.responses.create(model=model, input="Hi", text={"verbosity": "low"})
        assert raised.value.param == "text.verbosity"
        assert raised.value.body["message"].startswith("text.verbosity: not supported by")  # type: ignore[index]
    assert len(fake_openai.requests) == 1 and fake_anthropic.requests == []


@pytest.mark.parametrize("upstream", ["openai", "anthropic"])
async def test_an_image_a_function_returned_reaches_the_model(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, upstream: str
) -> None:
    """Codex's view_image answers its call with the image it read (``output`` as content items): the text is the
    call's result, the image follows the turn's results (it was a 400 for every later turn of the session)."""
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    model = MODEL if upstream == "openai" else "anthropic/claude-sonnet-4-6"
    history: list[Any] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is in dot.png?"}]},
        {"type": "function_call", "call_id": "call_img", "name": "view_image", "arguments": '{"path": "dot.png"}'},
        {"type": "function_call", "call_id": "call_ls", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {
            "type": "function_call_output",
            "call_id": "call_img",
            "output": [{"type": "input_image", "image_url": image}],
        },
        {"type": "function_call_output", "call_id": "call_ls", "output": [{"type": "input_text", "text": "18 C"}]},
    ]
    answer = await sdk(client, token).responses.create(model=model, input=history, tools=TOOLS, store=False)
    assert answer.status == "completed"
    if upstream == "openai":
        sent = fake_openai.requests[0].body["messages"]
        assert [(m["role"], m.get("tool_call_id")) for m in sent[1:]] == [
            ("assistant", None),
            ("tool", "call_img"),
            ("tool", "call_ls"),
            ("user", None),
        ]
        assert (sent[2]["content"], sent[3]["content"]) == ("", "18 C")
        assert sent[4]["content"] == [{"type": "image_url", "image_url": {"url": image}}]
    else:
        blocks = fake_anthropic.requests[0].body["messages"][2]["content"]
        assert [(b["type"], b.get("tool_use_id"), b.get("content")) for b in blocks] == [
            ("tool_result", "call_img", ""),
            ("tool_result", "call_ls", "18 C"),
            ("image", None, None),
        ]
        assert blocks[2]["source"] == {"type": "base64", "media_type": "image/png", "data": image.split(",")[1]}
    (record,) = await records(client)
    assert record["endpoint"] == "responses" and record["error"] is None


@pytest.mark.parametrize(
    ("model", "form"), [("anthropic/claude-opus-4-7", "adaptive"), ("anthropic/claude-sonnet-4-5", "enabled")]
)
async def test_a_reasoning_summary_asks_claude_for_its_summarized_thinking(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, model: str, form: str
) -> None:
    """Codex asks for ``reasoning.summary: "auto"``; Claude Opus 4.7 and later send their thinking's summary only
    when asked (``thinking.display: "summarized"``; by default "omitted", no text): asked for it, the summary
    streams as the reasoning item's summary text. Not asked, the model's own default stands."""
    fake_anthropic.enqueue(
        fa.message_response(fa.thinking_block("Paris is in France.", signature="sig"), fa.text_block("Paris")),
        fa.text_response("Paris"),
    )
    api = sdk(client, token)
    async with api.responses.stream(
        model=model, input="Capital of France?", reasoning={"effort": "high", "summary": "auto"}
    ) as s:
        deltas = [e.delta async for e in s if e.type == "response.reasoning_summary_text.delta"]
    assert "".join(deltas) == "Paris is in France."
    await api.responses.create(model=model, input="Capital of France?", reasoning={"effort": "high"})
    asked, not_asked = (request.body["thinking"] for request in fake_anthropic.requests)
    assert (asked["type"], asked["display"]) == (form, "summarized")
    assert not_asked["type"] == form and "display" not in not_asked


@pytest.mark.parametrize("thought", ["", "Weather needs a tool."])
@pytest.mark.parametrize("stream", [True, False])
async def test_thinking_without_text_and_redacted_thinking_go_back(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, stream: bool, thought: str
) -> None:
    """Claude Opus 4.7 and later send thinking with no text by default (only its signature), and any Claude may send
    redacted thinking: each comes to the client as a reasoning item's encrypted_content and goes back unchanged,
    in its place, before the turn's tool call (the stream dropped both: the turn's reasoning was lost); thinking blocks
    one after another stream into one item, and go back as the blocks they were, each with its own signature."""
    fake_anthropic.enqueue(
        fa.message_response(
            fa.thinking_block(thought, signature="sig-of-thinking"),
            fa.thinking_block("Then Rome.", signature="sig-of-more-thinking"),  # streams into the same item
            fa.redacted_thinking_block("opaque-redacted-data"),
            fa.tool_use_block("get_weather", {"city": "Paris"}, id="toolu_r"),
            stop_reason="tool_use",
        ),
        fa.text_response("18 C"),
    )
    api = sdk(client, token)
    first: list[Any] = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}]
    kwargs: dict[str, Any] = dict(
        model="anthropic/claude-opus-4-7",
        tools=TOOLS,
        store=False,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "low", "summary": "auto"},
    )
    if stream:  # Codex keeps the items of output_item.done, in the order they came
        async with api.responses.stream(input=first, **kwargs) as s:
            items = [e.item for e in [e async for e in s] if e.type == "response.output_item.done"]
            final = await s.get_final_response()
        assert sorted(i.id for i in items) == sorted(i.id for i in final.output)
    else:
        items = list((await api.responses.create(input=first, **kwargs)).output)
    assert sorted(item.type for item in items) == ["function_call", "reasoning", "reasoning", "reasoning"]
    history = [
        *first,
        *(item.model_dump(exclude_none=True) for item in items),
        {"type": "function_call_output", "call_id": "toolu_r", "output": "18 C"},
    ]
    assert (await api.responses.create(input=history, **kwargs)).output_text == "18 C"
    assistant = fake_anthropic.requests[1].body["messages"][1]["content"]
    assert assistant == [
        {"type": "thinking", "thinking": thought, "signature": "sig-of-thinking"},
        {"type": "thinking", "thinking": "Then Rome.", "signature": "sig-of-more-thinking"},
        {"type": "redacted_thinking", "data": "opaque-redacted-data"},
        {"type": "tool_use", "id": "toolu_r", "name": "get_weather", "input": {"city": "Paris"}},
    ]
