"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` through the official ``anthropic`` SDK, over real HTTP:
SDK -> gateway (aiohttp test server) -> fake Anthropic upstream. The usage records are read back from the
store and compared with what the fake reported."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.transports import state
from tests.conftest import TEST_KEY, wait_until
from tests.fakes.anthropic_upstream import (
    FakeAnthropic,
    error_event,
    error_status,
    text_response,
    thinking_response,
    tool_use_response,
)

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Hello"}]


def gateway_url(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


def sdk(client: TestClient, token: str, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=token, base_url=gateway_url(client), max_retries=0, **kwargs)


def direct(fake: FakeAnthropic) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=TEST_KEY, base_url=fake.url, max_retries=0)


async def records(client: TestClient, session_id: str | None = None) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records(session_id=session_id)


async def stream_events(api: anthropic.AsyncAnthropic, **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    async with api.messages.stream(
        model=params.pop("model", MODEL),
        max_tokens=params.pop("max_tokens", 1024),
        messages=params.pop("messages", MESSAGES),
        **params,
    ) as stream:
        events = [event.model_dump() async for event in stream]
        final = (await stream.get_final_message()).model_dump()
    return events, final


async def test_stream_through_the_gateway_equals_the_upstream_stream(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    answer = text_response(
        "Hello there, how are you?",
        chunks=4,
        usage={"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000},
        delta_usages=[{"output_tokens": 3}, {"output_tokens": 9}],
    )
    fake_anthropic.enqueue(answer, answer)
    expected, expected_final = await stream_events(direct(fake_anthropic))
    events, final = await stream_events(sdk(client, token))
    assert events == expected
    assert final == expected_final
    assert final["content"][0]["text"] == "Hello there, how are you?"
    # Byte for byte: the upstream got what the SDK sent, with the client's anthropic-version.
    assert fake_anthropic.requests[1].raw == fake_anthropic.requests[0].raw
    assert (
        fake_anthropic.requests[1].headers["anthropic-version"]
        == fake_anthropic.requests[0].headers["anthropic-version"]
    )
    assert fake_anthropic.requests[1].api_key == TEST_KEY  # our key upstream, never the gateway token
    (record,) = await records(client)
    assert record["endpoint"] == "anthropic"
    assert record["model"] == "anthropic/claude-sonnet-4-5"
    assert (record["inputTokens"], record["outputTokens"], record["cacheWriteTokens"], record["cacheReadTokens"]) == (
        12,
        9,
        100,
        2000,
    )
    assert record["estimated"] is False and record["estimatedFields"] == []
    assert record["finishReason"] == "stop" and record["error"] is None and record["answered"] is True
    assert record["totalCost"] == pytest.approx((12 * 3 + 9 * 15 + 100 * 3.75 + 2000 * 0.3) / 1e6)


@pytest.mark.parametrize(
    "answer",
    [
        thinking_response("Let me think.", "42", redacted=True),
        tool_use_response("get_weather", {"city": "Paris"}, text="Checking."),
        error_event("overloaded_error", "Overloaded", text="Part"),
    ],
    ids=["thinking", "tool_use", "error_event"],
)
async def test_every_kind_of_stream_is_seen_as_from_the_upstream(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, answer: Any
) -> None:
    async def seen(api: anthropic.AsyncAnthropic) -> list[Any]:
        out: list[Any] = []
        try:
            async with api.messages.stream(
                model=MODEL, max_tokens=4000, messages=MESSAGES, thinking={"type": "enabled", "budget_tokens": 2000}
            ) as stream:
                async for event in stream:
                    out.append(event.model_dump())
                out.append((await stream.get_final_message()).model_dump())
        except anthropic.APIStatusError as e:
            out.append((type(e).__name__, e.status_code, e.body))
        return out

    fake_anthropic.enqueue(answer, answer)
    assert await seen(sdk(client, token)) == await seen(direct(fake_anthropic))


async def test_create_not_streamed(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(
        text_response(
            "Whole answer",
            usage={"input_tokens": 20, "cache_read_input_tokens": 5},
            delta_usages=[{"output_tokens": 4}],
        )
    )
    message = await sdk(client, token).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert message.content[0].text == "Whole answer"  # type: ignore[union-attr]
    assert not fake_anthropic.requests[0].body.get("stream")
    (record,) = await records(client)
    assert (record["inputTokens"], record["outputTokens"], record["cacheReadTokens"]) == (20, 4, 5)
    assert record["endpoint"] == "anthropic" and record["finishReason"] == "stop"


async def test_prefixed_model_id_goes_upstream_without_the_prefix(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    message = await sdk(client, token).messages.create(
        model="anthropic/claude-sonnet-4-5", max_tokens=100, messages=MESSAGES
    )
    assert fake_anthropic.requests[0].body["model"] == "claude-sonnet-4-5"
    assert message.model == "claude-sonnet-4-5"


async def test_thinking(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(
        thinking_response("Six times seven.", "42", usage={"input_tokens": 30}, delta_usages=[{"output_tokens": 50}])
    )
    events, final = await stream_events(
        sdk(client, token), max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}
    )
    assert [b["type"] for b in final["content"]] == ["thinking", "text"]
    assert final["content"][0]["thinking"] == "Six times seven." and final["content"][0]["signature"]
    assert fake_anthropic.requests[0].body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert any(e["type"] == "thinking" for e in events)
    (record,) = await records(client)
    assert (record["inputTokens"], record["outputTokens"]) == (30, 50)


async def test_tool_use_and_a_tool_result_turn(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    fake_anthropic.enqueue(
        tool_use_response("get_weather", {"city": "Paris"}, id="toolu_1", text="Let me look."),
        text_response("18 °C in Paris."),
    )
    api = sdk(client, token)
    _, first = await stream_events(api, tools=tools, tool_choice={"type": "auto"})
    assert first["stop_reason"] == "tool_use"
    call = first["content"][1]
    assert (call["type"], call["id"], call["input"]) == ("tool_use", "toolu_1", {"city": "Paris"})
    history = [
        *MESSAGES,
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 °C"}]},
    ]
    _, second = await stream_events(api, tools=tools, messages=history)
    assert second["content"][0]["text"] == "18 °C in Paris."
    sent = fake_anthropic.requests[1].body
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 °C"}]
    assert sent["tools"] == tools and fake_anthropic.requests[0].body["tool_choice"] == {"type": "auto"}
    assert [r["finishReason"] for r in sorted(await records(client), key=lambda r: r["timestamp"])] == [
        "tool-calls",
        "stop",
    ]


async def test_cache_control_metadata_and_images_arrive_unchanged(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    system = [  # (one-hour marks first: the API refuses one after a 5-minute mark)
        {"type": "text", "text": "Big context " * 50, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
    ]
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A doc."}},
        {"type": "text", "text": "Describe", "cache_control": {"type": "ephemeral"}},
    ]
    await sdk(client, token).messages.create(
        model=MODEL,
        max_tokens=100,
        system=system,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        metadata={"user_id": "u-1"},
    )
    sent = fake_anthropic.requests[0].body
    assert sent["system"] == system
    assert sent["messages"][0]["content"] == content
    assert sent["metadata"] == {"user_id": "u-1"}


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (429, anthropic.RateLimitError),
        (529, anthropic.OverloadedError),
        (500, anthropic.InternalServerError),
        (400, anthropic.BadRequestError),
        (404, anthropic.NotFoundError),
    ],
)
async def test_upstream_errors_reach_the_sdk_as_they_were(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, status: int, error_class: type[Exception]
) -> None:
    fake_anthropic.enqueue(error_status(status, f"upstream says {status}", retry_after=7 if status == 429 else None))
    with pytest.raises(error_class) as raised:
        await stream_events(sdk(client, token))
    error = raised.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == status
    assert error.body["error"]["message"] == f"upstream says {status}"  # type: ignore[index]
    assert error.response.headers.get("request-id") == "req_01FakeRequest"
    if status == 429:
        assert error.response.headers["retry-after"] == "7"
    (record,) = await records(client)
    assert record["answered"] is False and record["totalTokens"] == 0
    assert record["error"] == {429: "RATE_LIMITED", 404: "MODEL_NOT_FOUND"}.get(status, "LLM_ERROR")


async def test_error_event_inside_the_stream_is_relayed(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(error_event("overloaded_error", "Overloaded right now", text="Partial answer"))
    with pytest.raises(anthropic.APIStatusError) as raised:
        await stream_events(sdk(client, token))
    assert "Overloaded right now" in str(raised.value)
    (record,) = await records(client)
    assert record["error"] == "LLM_ERROR" and record["answered"] is True
    assert record["inputTokens"] == 25  # reported in message_start
    assert record["outputTokens"] > 0 and record["estimatedFields"] == ["outputTokens"]


async def test_client_disconnect_stops_the_upstream_and_leaves_one_record(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(
        text_response("word " * 200, chunks=200, usage={"input_tokens": 77, "cache_read_input_tokens": 11}).with_delay(
            0.02
        )
    )
    body = {"model": MODEL, "max_tokens": 1000, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway_url(client)}/v1/messages",
            json=body,
            headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        ) as resp:
            assert resp.status == 200
            received = b""
            while received.count(b"content_block_delta") < 5:
                received += await resp.content.readany()
            resp.connection.transport.close()  # type: ignore[union-attr]  # hang up mid-answer
    await wait_until(lambda: _true(fake_anthropic.requests[0].disconnected), timeout=30)
    await wait_until(lambda: _nonempty(records(client)), timeout=30)
    await asyncio.sleep(0.2)
    (record,) = await records(client)
    assert record["finishReason"] == "aborted"
    assert (record["inputTokens"], record["cacheReadTokens"]) == (77, 11)  # as reported
    assert 3 <= record["outputTokens"] < 150  # counted from what was received (about 5 of 200 words)
    assert record["estimated"] is True and record["estimatedFields"] == ["outputTokens"]


async def _true(value: bool) -> bool:
    return value


async def _nonempty(pending: Awaitable[list[Any]]) -> bool:
    return bool(await pending)


async def test_gateway_token_as_bearer_and_wrong_tokens(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    bearer = anthropic.AsyncAnthropic(auth_token=token, base_url=gateway_url(client), max_retries=0)
    message = await bearer.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert message.content
    with pytest.raises(anthropic.AuthenticationError) as raised:
        await sdk(client, "wrong-token").messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert raised.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert len(fake_anthropic.requests) == 1


async def test_no_anthropic_key_is_a_clear_error(
    make_client: Callable[..., Awaitable[TestClient]],
    token: str,
    monkeypatch: pytest.MonkeyPatch,
    fake_anthropic: FakeAnthropic,
) -> None:
    client = await make_client()
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(anthropic.APIStatusError) as raised:
        await sdk(client, token).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert "agentspace keys add anthropic" in raised.value.message
    assert fake_anthropic.requests == []
    (record,) = await records(client)
    assert record["error"] == "NO_API_KEY" and record["answered"] is False


async def test_session_header_attributes_usage(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(text_response("a", usage={"input_tokens": 40}, delta_usages=[{"output_tokens": 6}]))
    await sdk(client, token, default_headers={"X-Agentspace-Session": "proj-7"}).messages.create(
        model=MODEL, max_tokens=10, messages=MESSAGES
    )
    (record,) = await records(client, "proj-7")
    assert record["sessionId"] == "proj-7"
    await client.close()  # the CLI reads the same store
    result = CliRunner().invoke(main, ["usage", "--session", "proj-7", "--json"], catch_exceptions=False)
    total = json.loads(result.output)["grandTotal"]
    assert (total["inputTokens"], total["outputTokens"]) == (40, 6)


async def test_count_tokens_from_upstream_and_local_fallback(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    api = sdk(client, token)
    tools = [{"name": "t", "description": "d", "input_schema": {"type": "object"}}]
    counted = await api.messages.count_tokens(model=MODEL, messages=MESSAGES, system="Be brief.", tools=tools)  # type: ignore[list-item]
    assert counted.input_tokens == 42
    assert fake_anthropic.count_requests[0].body["system"] == "Be brief."
    fake_anthropic.count_tokens = None  # an upstream without the endpoint: a local count, marked as such
    raw = await api.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
    assert raw.headers["x-agentspace-estimated"] == "true"
    small = (await raw.parse()).input_tokens
    bigger = (
        await api.messages.count_tokens(model=MODEL, messages=MESSAGES, system="Be brief. " * 100, tools=tools)
    ).input_tokens  # type: ignore[list-item]
    assert 0 < small < bigger
    assert await records(client) == []  # counting is not a model call


async def test_claude_code_shaped_session(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    """The headers and body Claude Code sends: beta headers, system blocks with cache_control, many tools,
    a session header, and bursts of count_tokens calls."""
    headers = {
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": "cc-session-1",
        "User-Agent": "claude-cli/2.0.0 (external, cli)",
    }
    api = anthropic.AsyncAnthropic(
        auth_token=token, base_url=gateway_url(client), max_retries=0, default_headers=headers
    )
    tools = [
        {
            "name": f"Tool{i}",
            "description": f"Tool number {i} " * 20,
            "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]},
        }
        for i in range(40)
    ]
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": "Instructions " * 300, "cache_control": {"type": "ephemeral"}},
    ]
    counts = await asyncio.gather(
        *(
            api.messages.count_tokens(model=MODEL, messages=MESSAGES, system=system, tools=tools)  # type: ignore[arg-type]
            for _ in range(40)
        )
    )
    assert [c.input_tokens for c in counts] == [42] * 40
    fake_anthropic.enqueue(
        text_response(
            "Done.", usage={"input_tokens": 3, "cache_creation_input_tokens": 9000}, delta_usages=[{"output_tokens": 2}]
        )
    )
    _, final = await stream_events(
        api,
        max_tokens=32000,
        system=system,
        tools=tools,
        metadata={"user_id": "user_abc_account__session_1"},
        thinking={"type": "enabled", "budget_tokens": 4000},
    )
    assert final["content"][0]["text"] == "Done."
    sent = fake_anthropic.requests[0]
    assert sent.headers["anthropic-beta"] == headers["anthropic-beta"]
    assert sent.body["system"] == system and len(sent.body["tools"]) == 40
    (record,) = await records(client, "cc-session-1")
    assert (record["inputTokens"], record["cacheWriteTokens"], record["outputTokens"]) == (3, 9000, 2)

    # Claude Code calls /v1/messages?beta=true, and a long session's request passes 1 MiB ([server] max_body_bytes).
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 20_000} for i in range(101)
    ]
    body = {"model": MODEL, "max_tokens": 100, "system": system, "tools": tools, "messages": history}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway_url(client)}/v1/messages?beta=true",
            json=body,
            headers={**headers, "Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    sent = fake_anthropic.requests[1]
    assert sent.query == "beta=true" and len(sent.raw) > 2_000_000 and sent.body == body


# --- other providers' models, translated ------------------------------------------------------------


@pytest.fixture
async def openai_client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


async def test_openai_model_through_messages_stream(openai_client: TestClient, token: str, fake_openai: Any) -> None:
    from tests.fakes import openai_upstream as fo

    fake_openai.enqueue(
        fo.stream_response(
            fo.reasoning_deltas("Think."),
            fo.text_deltas("Calling tools."),
            fo.tool_call_deltas(
                fo.tool_call("call_a", "get_weather", {"city": "Paris"}),
                fo.tool_call("call_b", "get_time", {"tz": "CET"}),
                interleave=True,
            ),
            finish_reason="tool_calls",
            usage=fo.usage(40, 25, cached=30, reasoning=4),
        )
    )
    tools = [{"name": n, "description": n, "input_schema": {"type": "object"}} for n in ("get_weather", "get_time")]
    events, final = await stream_events(
        sdk(openai_client, token),
        model="openai/gpt-4o-mini",
        tools=tools,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    )
    assert [b["type"] for b in final["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert final["content"][0]["thinking"] == "Think." and final["content"][1]["text"] == "Calling tools."
    assert [(b["id"], b["input"]) for b in final["content"][2:]] == [
        ("call_a", {"city": "Paris"}),
        ("call_b", {"tz": "CET"}),
    ]
    assert final["stop_reason"] == "tool_use" and final["model"] == "openai/gpt-4o-mini"
    assert (
        final["usage"]["input_tokens"],
        final["usage"]["cache_read_input_tokens"],
        final["usage"]["output_tokens"],
    ) == (10, 30, 25)
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [e["index"] for e in starts] == [0, 1, 2, 3]
    sent = fake_openai.requests[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    (record,) = await records(openai_client)
    assert (
        record["endpoint"],
        record["model"],
        record["inputTokens"],
        record["cacheReadTokens"],
        record["outputTokens"],
    ) == ("anthropic", "openai/gpt-4o-mini", 10, 30, 25)


async def test_openai_model_through_messages_create_and_tool_results(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    from tests.fakes import openai_upstream as fo

    fake_openai.enqueue(fo.text_response("It is 18 C.", usage=fo.usage(12, 5)))
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "18 C"}]},
    ]
    message = await sdk(openai_client, token).messages.create(
        model="openai/gpt-4o-mini", max_tokens=100, messages=history
    )  # type: ignore[arg-type]
    assert message.content[0].text == "It is 18 C." and message.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
    sent = fake_openai.requests[0].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_a", "content": "18 C"}


async def test_openai_model_through_messages_errors(openai_client: TestClient, token: str, fake_openai: Any) -> None:
    from tests.fakes import openai_upstream as fo

    fake_openai.enqueue(fo.error_status(429, "Slow down", retry_after=2))
    api = sdk(openai_client, token)
    with pytest.raises(anthropic.RateLimitError) as raised:
        await stream_events(api, model="openai/gpt-4o-mini")
    assert "Slow down" in raised.value.message and raised.value.response.headers["retry-after"] == "2"
    image = [
        {
            "role": "user",
            "content": [{"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}],
        }
    ]
    with pytest.raises(anthropic.BadRequestError):  # the Files API's ids: this gateway has no file storage
        await api.messages.create(model="openai/gpt-4o-mini", max_tokens=10, messages=image)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        await api.messages.create(model="nosuchprovider/x", max_tokens=10, messages=MESSAGES)
    (record,) = await records(openai_client)
    assert record["error"] == "RATE_LIMITED" and record["answered"] is False


async def test_count_tokens_of_other_models_is_local(
    openai_client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    raw = await sdk(openai_client, token).messages.with_raw_response.count_tokens(
        model="openai/gpt-4o-mini", messages=MESSAGES
    )
    assert raw.headers["x-agentspace-estimated"] == "true" and (await raw.parse()).input_tokens > 0
    assert fake_anthropic.count_requests == []


async def test_sampling_parameters_reach_other_providers(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    await sdk(openai_client, token).messages.create(
        model="openai/gpt-4o-mini",
        max_tokens=50,
        messages=MESSAGES,
        stop_sequences=["STOP"],
        extra_body={"temperature": 0.4, "top_p": 0.8},
    )
    sent = fake_openai.requests[0].body
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["max_tokens"]) == (0.4, 0.8, ["STOP"], 50)


async def test_unreachable_upstream(make_client: Callable[..., Awaitable[TestClient]], token: str) -> None:
    from tests.scale_servers import free_port

    port = free_port()  # a port nothing listens on
    client = await make_client(providers={"anthropic": {"base_url": f"http://127.0.0.1:{port}"}})
    with pytest.raises(anthropic.InternalServerError) as raised:
        await sdk(client, token).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert raised.value.status_code == 502 and "Could not connect to Anthropic" in raised.value.message
    (record,) = await records(client)
    assert record["error"] == "LLM_ERROR" and record["answered"] is False


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 2000}, "low"),
        ({"type": "adaptive"}, "medium"),
        ({"type": "enabled", "budget_tokens": 16000}, "high"),
    ],
)
async def test_thinking_on_an_openai_reasoning_model_is_its_reasoning_effort(
    openai_client: TestClient, token: str, fake_openai: Any, thinking: dict[str, Any], effort: str
) -> None:
    """Claude Code's thinking on an OpenAI reasoning model goes as reasoning_effort (OpenAI's API has no
    thinking parameter), not dropped on the way."""
    await sdk(openai_client, token).messages.create(
        model="openai/gpt-5",
        max_tokens=20000,
        thinking=thinking,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Hi"}],
    )
    sent = fake_openai.requests[0].body
    assert sent["reasoning_effort"] == effort and "thinking" not in sent


async def test_what_claude_code_sends_to_an_openai_model(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """Claude Code's request for a non-Claude model: its effort becomes the reasoning_effort, its metadata and
    context_management change nothing; what only Anthropic runs (mcp_servers) and a top_k the model has not
    are refused with the field named, nothing sent."""
    api = sdk(openai_client, token)
    claude_code: dict[str, Any] = dict(
        model="openai/gpt-5",
        max_tokens=20000,
        messages=[{"role": "user", "content": "Hi"}],
        thinking={"type": "adaptive", "display": "omitted"},
        extra_body={
            "output_config": {"effort": "low"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        },
        metadata={"user_id": "someone"},
    )
    await api.messages.create(**claude_code)
    assert fake_openai.requests[0].body["reasoning_effort"] == "low"
    for extra, name in (
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"top_k": 5}, "top_k"),
    ):
        with pytest.raises(anthropic.BadRequestError) as raised:
            await api.messages.create(**{**claude_code, "extra_body": extra})
        assert raised.value.body["error"]["message"].startswith(name)  # type: ignore[index]
    assert len(fake_openai.requests) == 1


async def test_claude_codes_output_limit_fits_the_model(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """Claude Code asks any model for ``max_tokens: 32000``; gpt-4o-mini writes at most 16,384 and OpenAI's API
    refuses more. The translated request asks for the model's own limit instead (an answer cannot be longer
    anyway), so `claude --model openai/gpt-4o-mini`, the README's example, answers."""
    from tests.fakes import openai_upstream as fo

    fake_openai.enqueue(fo.text_response("Hi.", usage=fo.usage(12, 2)))
    _, final = await stream_events(sdk(openai_client, token), model="openai/gpt-4o-mini", max_tokens=32000)
    assert final["content"] == [{"type": "text", "text": "Hi.", "citations": None}]
    assert fake_openai.requests[-1].body["max_tokens"] == 16384
    (record,) = await records(openai_client)
    assert (record["inputTokens"], record["outputTokens"], record["error"]) == (12, 2, None)


def _png(width: int, height: int) -> str:
    """A blank PNG of that size, base64."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


async def test_count_tokens_of_other_models_counts_images(
    openai_client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    """Claude Code counts a screenshot before it sends it: on a model Anthropic does not serve the local count
    takes the image at what it costs (Anthropic's formula: 1,333 tokens at 1000x1000),
    not at nothing; also inside a tool result."""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png(1000, 1000)}}
    api = sdk(openai_client, token)
    text_only = await api.messages.count_tokens(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "What is this?"}]
    )
    with_image = await api.messages.count_tokens(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
    )
    assert with_image.input_tokens - text_only.input_tokens == 1333
    in_result = await api.messages.count_tokens(
        model="openai/gpt-4o-mini",
        messages=[
            {"role": "user", "content": "Shoot"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
        ],
    )
    assert in_result.input_tokens > 1333


async def test_claude_schemas_with_optional_fields_reach_an_openai_model(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """Claude's structured outputs and strict tools let a property be optional; OpenAI's strict mode wants every
    property required and refuses the schema. Such a schema goes to OpenAI as a schema that is not strict (the
    model still follows it), one OpenAI takes strictly stays strict."""
    from tests.fakes import openai_upstream as fo

    optional = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "nickname": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    closed = {**optional, "required": ["name", "nickname"]}
    fake_openai.enqueue(fo.text_response('{"name": "Ada"}', usage=fo.usage(20, 5)))
    message = await sdk(openai_client, token).messages.create(
        model="openai/gpt-4o-mini",
        max_tokens=100,
        messages=MESSAGES,
        tools=[
            {"name": "save", "input_schema": optional, "strict": True},  # type: ignore[list-item]
            {"name": "keep", "input_schema": closed, "strict": True},  # type: ignore[list-item]
        ],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": optional}}},
    )
    assert json.loads(message.content[0].text) == {"name": "Ada"}  # type: ignore[union-attr]
    sent = fake_openai.requests[-1].body
    assert sent["response_format"]["json_schema"]["strict"] is False
    assert [t["function"].get("strict") for t in sent["tools"]] == [False, True]


async def test_the_beta_output_format_reaches_an_openai_model(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """Structured outputs as their beta had them (``output_format`` at the top, with the
    ``structured-outputs-2025-11-13`` beta: older anthropic SDKs and pydantic-ai send it) ask another model for
    the same JSON as ``output_config.format``; it was dropped without a word and the model answered prose."""
    from tests.fakes import openai_upstream as fo

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    fake_openai.enqueue(fo.text_response('{"name": "Ada"}', usage=fo.usage(20, 5)))
    await sdk(openai_client, token).messages.create(
        model="openai/gpt-4o-mini",
        max_tokens=100,
        messages=MESSAGES,
        extra_body={"output_format": {"type": "json_schema", "schema": schema}},
        extra_headers={"anthropic-beta": "structured-outputs-2025-11-13"},
    )
    sent = fake_openai.requests[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == schema


async def test_text_blocks_stay_apart_on_an_openai_model(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """A message's text blocks, a plain-text document (with its title) and a tool result's text blocks reach
    another model apart, not glued into one string ("x" + "hello doc" read as "xhello doc")."""
    from tests.fakes import openai_upstream as fo

    fake_openai.enqueue(fo.text_response("Done.", usage=fo.usage(30, 2)))
    history = [
        {"role": "user", "content": "Look it up."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_a", "name": "search", "input": {"q": "x"}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_a",
                    "content": [{"type": "text", "text": "first hit"}, {"type": "text", "text": "second hit"}],
                },
                {"type": "text", "text": "x"},
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "hello doc"},
                    "title": "notes.txt",
                },
            ],
        },
    ]
    await sdk(openai_client, token).messages.create(model="openai/gpt-4o-mini", max_tokens=100, messages=history)  # type: ignore[arg-type]
    sent = fake_openai.requests[0].body["messages"]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_a", "content": "first hit\nsecond hit"}
    assert sent[3] == {
        "role": "user",
        "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "notes.txt\n\nhello doc"}],
    }
