"""``POST /v1/chat/completions`` through the official ``openai`` SDK, over real HTTP: SDK -> gateway ->
litellm -> fake OpenAI upstream (and the Anthropic SDK -> fake Anthropic for ``anthropic/*`` models)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.conftest import wait_until
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
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


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


async def chunks_of(stream: Any) -> list[dict[str, Any]]:
    return [chunk.model_dump(exclude_unset=True) async for chunk in stream]


def content(chunks: list[dict[str, Any]], key: str = "content") -> str:
    return "".join((c["choices"][0]["delta"].get(key) or "") for c in chunks if c["choices"])


async def test_streamed_without_include_usage(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello, world!", chunks=4, usage=usage(30, 7, cached=10)))
    chunks = await chunks_of(
        await sdk(client, token).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    )
    assert content(chunks) == "Hello, world!"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    # The gateway asked for usage anyway, and recorded it.
    assert fake_openai.requests[0].body["stream_options"] == {"include_usage": True}
    (record,) = await records(client)
    assert record["endpoint"] == "openai" and record["model"] == MODEL
    assert (record["inputTokens"], record["cacheReadTokens"], record["outputTokens"]) == (20, 10, 7)
    assert record["estimated"] is False


async def test_streamed_with_include_usage(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hi", usage=usage(50, 12, cached=40, reasoning=5)))
    chunks = await chunks_of(
        await sdk(client, token).chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 50 and last["usage"]["completion_tokens"] == 12
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 40
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    (record,) = await records(client)
    assert (record["inputTokens"], record["cacheReadTokens"], record["outputTokens"], record["reasoningTokens"]) == (
        10,
        40,
        12,
        5,
    )


async def test_not_streamed(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Whole", usage=usage(9, 2)))
    completion = await sdk(client, token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": "Be terse."}, *MESSAGES]
    )
    assert completion.choices[0].message.content == "Whole"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        9,
        2,
    )
    assert fake_openai.requests[0].body["messages"][0] == {"role": "system", "content": "Be terse."}
    (record,) = await records(client)
    assert record["model"] == MODEL  # a bare id the cost map knows


@pytest.mark.parametrize("stream", [True, False])
async def test_two_parallel_tool_calls_and_the_results_turn(
    client: TestClient, token: str, fake_openai: FakeOpenAI, stream: bool
) -> None:
    fake_openai.enqueue(
        tool_calls_response(
            tool_call("call_a", "get_weather", {"city": "Paris"}),
            tool_call("call_b", "get_time", {"tz": "CET"}),
            interleave=True,
        ),
        text_response("Done"),
    )
    tools: list[Any] = [
        {"type": "function", "function": {"name": n, "description": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    api = sdk(client, token)
    if stream:
        chunks = await chunks_of(
            await api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, stream=True)
        )
        pieces = [tc for c in chunks if c["choices"] for tc in (c["choices"][0]["delta"].get("tool_calls") or ())]
        firsts = {}
        for piece in pieces:
            firsts.setdefault(piece["index"], piece)
        assert [(f["index"], f["id"], f["function"]["name"]) for f in firsts.values()] == [
            (0, "call_a", "get_weather"),
            (1, "call_b", "get_time"),
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        calls = [{"id": f["id"], "type": "function", "function": f["function"]} for f in firsts.values()]
    else:
        completion = await api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools)
        assert completion.choices[0].finish_reason == "tool_calls"
        calls = [c.model_dump() for c in completion.choices[0].message.tool_calls or ()]
        assert [c["id"] for c in calls] == ["call_a", "call_b"]
    assert [c["function"]["arguments"] for c in calls] == ['{"city": "Paris"}', '{"tz": "CET"}']
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
    ]
    answer = await api.chat.completions.create(model=MODEL, messages=history, tools=tools)
    assert answer.choices[0].message.content == "Done"
    sent = fake_openai.requests[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [m.get("tool_call_id") for m in sent[2:]] == ["call_a", "call_b"]
    assert sent[1]["tool_calls"][1]["function"]["name"] == "get_time"


async def test_reasoning_content(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(
        text_response("42", reasoning="Six times seven.", usage=usage(10, 20, reasoning=15)),
        text_response("42", reasoning="Six times seven."),
    )
    api = sdk(client, token)
    chunks = await chunks_of(await api.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert content(chunks, "reasoning_content") == "Six times seven." and content(chunks) == "42"
    completion = await api.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.model_extra["reasoning_content"] == "Six times seven."  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "error_class", "code"),
    [
        (400, openai.BadRequestError, None),
        (401, openai.APIStatusError, "no_api_key"),  # the gateway's key refused: 424, not the caller's 401
        (403, openai.PermissionDeniedError, None),
        (404, openai.NotFoundError, "model_not_found"),
        (429, openai.RateLimitError, "rate_limit_exceeded"),
        (500, openai.InternalServerError, None),
        (503, openai.InternalServerError, None),
    ],
)
async def test_every_error_status(
    client: TestClient,
    token: str,
    fake_openai: FakeOpenAI,
    status: int,
    error_class: type[openai.APIStatusError],
    code: str | None,
) -> None:
    fake_openai.enqueue(error_status(status, f"upstream says {status}", retry_after=3 if status == 429 else None))
    with pytest.raises(error_class) as raised:
        await sdk(client, token).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    error = raised.value
    assert error.status_code == (424 if status == 401 else status)
    assert not isinstance(error, openai.AuthenticationError)
    assert error.code == code
    if status != 401:  # a rejected key is ours to fix: the message says how
        assert f"upstream says {status}" in error.message
    if status == 429:
        assert error.response.headers["retry-after"] == "3"
    (record,) = await records(client)
    assert record["answered"] is False and record["error"] and record["totalTokens"] == 0


@pytest.mark.parametrize(("model", "tier"), [(MODEL, "priority"), ("openai/gpt-5", "flex"), (MODEL, None)])
async def test_a_call_is_priced_at_the_service_tier_the_upstream_served_it_at(
    client: TestClient, token: str, fake_openai: FakeOpenAI, model: str, tier: str | None
) -> None:
    # OpenAI bills a call at the tier its chunks say served it (priority about 1.7x, flex half the standard
    # rates): the record is priced so, from the cost map's tier prices, not at the standard rates.
    from agentspace.pricing import cost_map

    extra = {"service_tier": tier} if tier else {}
    stream = await sdk(client, token).chat.completions.create(model=model, messages=MESSAGES, stream=True, **extra)
    async for _ in stream:
        pass
    assert fake_openai.requests[-1].body.get("service_tier") == tier
    (record,) = await records(client)
    rates = cost_map()[model.split("/", 1)[1]]
    suffix = f"_{tier}" if tier else ""
    expected = (
        record["inputTokens"] * rates[f"input_cost_per_token{suffix}"]
        + record["outputTokens"] * rates[f"output_cost_per_token{suffix}"]
    )
    assert record["inputTokens"] and record["cacheReadTokens"] == 0
    assert record["totalCost"] == pytest.approx(expected, rel=1e-9)


async def test_an_upstreams_retry_after_in_fractions_reaches_the_client_in_whole_seconds(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    # HTTP's Retry-After is whole seconds; an upstream's 1.5 (or retry-after-ms) is rounded up, never sent as 1.5.
    fake_openai.enqueue(error_status(429, "slow down", retry_after=1.5))
    with pytest.raises(openai.RateLimitError) as raised:
        await sdk(client, token).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert raised.value.response.headers["retry-after"] == "2"


async def test_unknown_model_and_unsupported_content(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    api = sdk(client, token)
    with pytest.raises(openai.NotFoundError) as raised:
        await api.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES)
    assert raised.value.code == "model_not_found"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError) as bad:
        await api.chat.completions.create(model=MODEL, messages=audio)  # type: ignore[arg-type]
    assert "input_audio" in bad.value.message
    with pytest.raises(openai.AuthenticationError):
        await sdk(client, "wrong").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake_openai.requests == [] and await records(client) == []


async def test_anthropic_model_through_chat_completions(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(
        fa.thinking_response(
            "Hmm.",
            "Bonjour",
            usage={"input_tokens": 11, "cache_read_input_tokens": 100},
            delta_usages=[{"output_tokens": 8}],
        ),
        fa.tool_use_response("get_weather", {"city": "Paris"}, id="toolu_9"),
        fa.error_status(529, "Overloaded"),
    )
    api = sdk(client, token)
    chunks = await chunks_of(
        await api.chat.completions.create(
            model="claude-sonnet-4-5",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            reasoning_effort="low",
        )
    )
    assert content(chunks, "reasoning_content") == "Hmm." and content(chunks) == "Bonjour"
    assert (
        chunks[-1]["usage"]["prompt_tokens"] == 111
        and chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 100
    )
    assert fake_anthropic.requests[0].body["thinking"]["type"] in ("enabled", "adaptive")
    tools: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    completion = await api.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=MESSAGES, tools=tools)
    (call,) = completion.choices[0].message.tool_calls or ()
    assert (call.id, call.function.name, call.function.arguments) == ("toolu_9", "get_weather", '{"city": "Paris"}')
    assert completion.choices[0].finish_reason == "tool_calls"
    assert fake_anthropic.requests[-1].body["tools"][0]["name"] == "get_weather"
    with pytest.raises(openai.InternalServerError) as raised:
        await api.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=MESSAGES)
    assert raised.value.status_code == 503
    first = next(r for r in await records(client) if r["finishReason"] == "stop")
    assert (first["inputTokens"], first["cacheReadTokens"], first["outputTokens"], first["endpoint"]) == (
        11,
        100,
        8,
        "openai",
    )


async def test_client_disconnect_stops_the_upstream(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("word " * 200, chunks=200).with_delay(0.02))
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{client.port}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200
            received = b""
            while received.count(b'"content"') < 6:
                received += await resp.content.readany()
            resp.connection.transport.close()  # type: ignore[union-attr]
    await wait_until(lambda: _is(fake_openai.requests[0], "disconnected"), timeout=30)
    await wait_until(lambda: _nonempty(records(client)), timeout=30)
    await asyncio.sleep(0.2)
    (record,) = await records(client)
    assert record["finishReason"] == "aborted" and record["endpoint"] == "openai"
    assert 0 < record["outputTokens"] < 150 and record["estimated"] is True


async def _is(obj: Any, attr: str) -> bool:
    return bool(getattr(obj, attr))


async def _nonempty(pending: Awaitable[list[Any]]) -> bool:
    return bool(await pending)


async def test_sampling_parameters_are_passed_on(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    api = sdk(client, token)
    await api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.2, top_p=0.9, stop="END")
    sent = fake_openai.requests[0].body
    assert (sent["temperature"], sent["top_p"], sent["stop"]) == (0.2, 0.9, ["END"])
    await api.chat.completions.create(model="claude-sonnet-4-5", messages=MESSAGES, temperature=0.3, stop=["A", "B"])
    sent = fake_anthropic.requests[0].body
    assert sent["stop_sequences"] == ["A", "B"] and "temperature" not in sent  # the Messages API takes no temperature
    with pytest.raises(openai.BadRequestError) as raised:
        await api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature="hot")  # type: ignore[arg-type]
    assert raised.value.body["param"] == "temperature"  # type: ignore[index]


async def test_every_message_role_and_text_part(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    """developer and system messages (strings or text parts), user text parts, an earlier refusal, a tool
    result in text parts: all reach the upstream, none refused, none dropped."""
    history: list[Any] = [
        {"role": "developer", "content": "Dev rules."},
        {"role": "system", "content": [{"type": "text", "text": "Sys rules."}]},
        {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "text", "text": " question"}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "18 C"}]},
    ]
    tools: list[Any] = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    await sdk(client, token).chat.completions.create(model=MODEL, messages=history, tools=tools)
    sent = fake_openai.requests[0].body["messages"]
    assert sent[0] == {"role": "system", "content": "Dev rules.\n\nSys rules."}
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "user", "assistant", "tool"]
    # the user's text parts as they were sent (not glued into one string), the refusal as the answer's text
    assert sent[1]["content"] == [{"type": "text", "text": "First"}, {"type": "text", "text": " question"}]
    assert "I can't help with that." in json.dumps(sent[2])
    assert sent[5]["tool_call_id"] == "c1" and "18 C" in json.dumps(sent[5])
