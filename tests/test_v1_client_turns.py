"""The official SDKs at the ``/v1`` door past the happy path: strict function tools (the openai SDK's
``pydantic_function_tool``, Anthropic's strict tool use) on every model, tool calls streamed in parallel
through a translation, and upstream errors in each API's own shape; each checks the usage records against
what the fake upstream reported, prompt caching included."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from openai import pydantic_function_tool
from pydantic import BaseModel, Field

from agentspace.storage.embedded.usage import UsageStore
from agentspace.transports import state
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo


class Lookup(BaseModel):
    city: str


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def openai_sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


def anthropic_sdk(client: TestClient, token: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


def tokens(record: dict[str, Any]) -> tuple[Any, ...]:
    fields = ("endpoint", "model", "inputTokens", "cacheReadTokens", "cacheWriteTokens", "outputTokens")
    return tuple(record[f] for f in fields)


class Booking(BaseModel):
    guests: int = Field(ge=1, le=12)
    note: str = Field(max_length=200)


async def test_a_strict_tool_reaches_claude_in_the_form_it_takes(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Claude's strict tool use takes the narrower schema of its structured outputs: a pydantic tool with bounds
    (``Field(ge=1)``, what ``pydantic_function_tool`` sends) goes with them in its description, as the anthropic
    SDK sends it, not refused upstream; a tool that is not strict goes as the client wrote it."""
    fake_anthropic.enqueue(fa.tool_use_response("Booking", {"guests": 2, "note": "window"}, id="toolu_b"))
    plain = {"type": "function", "function": {"name": "free", "parameters": {"type": "object", "minProperties": 1}}}
    completion = await openai_sdk(client, token).chat.completions.create(
        model="anthropic/claude-sonnet-4-6",
        messages=[{"role": "user", "content": "Book a table"}],
        tools=[pydantic_function_tool(Booking), plain],  # type: ignore[list-item]
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert Booking.model_validate_json(call.function.arguments) == Booking(guests=2, note="window")  # type: ignore[union-attr]
    strict, free = fake_anthropic.requests[-1].body["tools"]
    assert strict["strict"] is True and "minimum" not in strict["input_schema"]["properties"]["guests"]
    assert "minimum: 1" in strict["input_schema"]["properties"]["guests"]["description"]
    assert free["input_schema"] == plain["function"]["parameters"]


async def test_strict_function_tools_reach_every_model(
    client: TestClient, token: str, fake_openai: fo.FakeOpenAI, fake_anthropic: fa.FakeAnthropic
) -> None:
    """``strict`` on a function tool (what ``pydantic_function_tool`` and ``responses.parse`` send) reaches
    the upstream: OpenAI's ``function.strict``, Anthropic's strict tool use. It was dropped without a word."""
    api = openai_sdk(client, token)
    fake_openai.enqueue(
        fo.tool_calls_response(fo.tool_call("call_1", "Lookup", {"city": "Paris"}), usage=fo.usage(30, 9, cached=10))
    )
    completion = await api.chat.completions.parse(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}], tools=[pydantic_function_tool(Lookup)]
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.parsed_arguments == Lookup(city="Paris")
    assert fake_openai.requests[-1].body["tools"][0]["function"]["strict"] is True

    claude_usage = {"input_tokens": 40, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}
    fake_anthropic.enqueue(fa.tool_use_response("Lookup", {"city": "Oslo"}, id="toolu_1", usage=claude_usage))
    completion = await api.chat.completions.parse(
        model="anthropic/claude-sonnet-4-6",
        messages=[{"role": "user", "content": "x"}],
        tools=[pydantic_function_tool(Lookup)],
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.parsed_arguments == Lookup(city="Oslo")
    (tool,) = fake_anthropic.requests[-1].body["tools"]
    assert tool["strict"] is True and tool["input_schema"]["additionalProperties"] is False
    assert completion.usage is not None and completion.usage.prompt_tokens == 190

    # The Responses API's function tool carries strict at its top level; false is passed on as sent.
    schema = Lookup.model_json_schema() | {"additionalProperties": False}
    for strict in (True, False):
        fake_openai.enqueue(fo.text_response("ok", usage=fo.usage(12, 2)))
        await api.responses.create(
            model="openai/gpt-4o-mini",
            input="x",
            tools=[{"type": "function", "name": "Lookup", "parameters": schema, "strict": strict}],
        )
        assert fake_openai.requests[-1].body["tools"][0]["function"]["strict"] is strict

    # Anthropic's strict tool use, translated for an OpenAI model; parallel calls streamed interleaved.
    fake_openai.enqueue(
        fo.stream_response(
            fo.tool_call_deltas(
                fo.tool_call("call_a", "a", {"x": 1}), fo.tool_call("call_b", "b", {"y": "two"}), interleave=True
            ),
            finish_reason="tool_calls",
            usage=fo.usage(300, 40, cached=200),
        )
    )
    tools: Any = [
        {"name": "a", "input_schema": {"type": "object"}, "strict": True},
        {"name": "b", "input_schema": {"type": "object"}},
    ]
    async with anthropic_sdk(client, token).messages.stream(
        model="openai/gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "x"}], tools=tools
    ) as stream:
        message = await stream.get_final_message()
    assert [(b.type, getattr(b, "id", None), getattr(b, "input", None)) for b in message.content] == [
        ("tool_use", "call_a", {"x": 1}),
        ("tool_use", "call_b", {"y": "two"}),
    ]
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (100, 200)
    sent = [t["function"] for t in fake_openai.requests[-1].body["tools"]]
    assert sent[0]["strict"] is True and "strict" not in sent[1]

    assert [tokens(r) for r in await records(client)] == [
        ("openai", "openai/gpt-4o-mini", 20, 10, 0, 9),
        ("openai", "anthropic/claude-sonnet-4-6", 40, 100, 50, 4),
        ("responses", "openai/gpt-4o-mini", 12, 0, 0, 2),
        ("responses", "openai/gpt-4o-mini", 12, 0, 0, 2),
        ("anthropic", "openai/gpt-4o-mini", 100, 200, 0, 40),
    ]


async def test_a_strict_flag_that_is_not_a_boolean_is_refused(client: TestClient, token: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_sdk(client, token).chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}],  # type: ignore[typeddict-item]
        )
    assert refused.value.param == "tools[0].function.strict"
    with pytest.raises(anthropic.BadRequestError):
        await anthropic_sdk(client, token).messages.create(
            model="openai/gpt-4o-mini",
            max_tokens=10,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"name": "f", "input_schema": {"type": "object"}, "strict": "yes"}],  # type: ignore[typeddict-item]
        )
    assert await records(client) == []


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_an_embeddings_error_says_what_the_upstream_said(
    client: TestClient, token: str, fake_openai: fo.FakeOpenAI, status: int
) -> None:
    fake_openai.enqueue(fo.error_status(status, "the upstream's words"))
    with pytest.raises(openai.APIStatusError) as failed:
        await openai_sdk(client, token).embeddings.create(model="openai/text-embedding-3-small", input="x")
    assert failed.value.status_code == status
    message = failed.value.body["message"]  # type: ignore[index]
    assert message.endswith(": the upstream's words") and "Error code" not in message, message
    (record,) = await records(client)
    assert (record["endpoint"], record["inputTokens"], record["answered"]) == ("embeddings", 0, False)


# --- a client that leaves before the model's first event -------------------------------------------
# Through a real ``agentspace serve``: aiohttp's TestServer cancels a handler whose client has gone, the
# server the gateway runs does not, so only a served gateway shows what a real client leaving does.


@pytest.fixture
async def served(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    monkeypatch.setenv("AGENTSPACE_TEST_OPENAI_KEY", "sk-openai-test-0123456789")
    started: list[GatewayProcess] = []

    async def serve(**sections: dict[str, Any]) -> GatewayProcess:
        openai_provider = {"base_url": fake_openai.url, "api_key_env": "AGENTSPACE_TEST_OPENAI_KEY"}
        process = GatewayProcess(
            tmp_path / "data", fake_anthropic.url, **{"providers.openai": openai_provider}, **sections
        )
        await process.start()
        started.append(process)
        return process

    yield serve
    for process in started:
        await process.aclose()


async def admin(server: GatewayProcess, method: str, path: str, **kwargs: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {server.token}"}
        async with session.request(method, server.url + path, headers=headers, **kwargs) as resp:
            return await resp.json()


async def leave_before_the_first_event(
    server: GatewayProcess,
    key: str,
    fake: fo.FakeOpenAI | fa.FakeAnthropic,
    path: str,
    body: dict[str, Any],
    upstream_requests: int = 1,
) -> None:
    """Send ``body`` and go away once the upstream has had ``upstream_requests`` requests, before the last
    answered anything."""

    async def send() -> None:
        async with aiohttp.ClientSession() as session:
            await session.post(server.url + path, headers={"Authorization": f"Bearer {key}"}, json=body)

    request = asyncio.create_task(send())
    async with asyncio.timeout(20):
        while len(fake.requests) < upstream_requests:
            await asyncio.sleep(0.02)
    request.cancel()  # the client's connection closes
    with contextlib.suppress(asyncio.CancelledError):
        await request


async def served_records(server: GatewayProcess, count: int) -> list[dict[str, Any]]:
    """The server's records once there are ``count`` of them; within 25 s (the upstream stalls for 60 s; a loaded
    machine takes seconds to notice a client gone)."""
    async with asyncio.timeout(25):
        while len(got := list(UsageStore(server.data_dir).records_sync())) < count:
            await asyncio.sleep(0.05)
    return got


async def reservation_released(server: GatewayProcess) -> None:
    """Client cli has nothing in flight: its reservation was given back (just after its record is stored),
    within 25 s, long before the upstream's first token would have come."""
    async with asyncio.timeout(25):
        while (await admin(server, "GET", "/api/clients/cli"))["client"]["spend"]["inFlightUsd"] != 0:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "model", "body"),
    [
        ("/v1/responses", "openai/gpt-4o-mini", {"input": "hi"}),
        ("/v1/chat/completions", "anthropic/claude-sonnet-4-6", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages", "openai/gpt-4o-mini", {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}),
        # Relayed as-is: the upstream's status and headers came, its message_start not (a recovery voids it too,
        # test_ledger_recovery_ways.py).
        (
            "/v1/messages",
            "anthropic/claude-sonnet-4-6",
            {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
        ),
    ],
)
async def test_a_client_gone_before_the_first_token_stops_the_call_at_once(
    served: Callable[..., Awaitable[GatewayProcess]],
    fake_openai: fo.FakeOpenAI,
    fake_anthropic: fa.FakeAnthropic,
    path: str,
    model: str,
    body: dict[str, Any],
) -> None:
    """Ctrl-C while the model has not answered yet (a reasoning model thinking, an upstream slow to start):
    the upstream request is closed then, one record says aborted, and the reservation is given back at once,
    not when the first token comes (here 60 s later; the upstream would have billed the whole answer)."""
    server = await served()
    key = (await admin(server, "POST", "/api/clients", json={"name": "cli", "budgetUsd": 5}))["key"]
    fake_openai.enqueue(fo.text_response("late", usage=fo.usage(50, 2)).stall(60, after=0))
    fake_anthropic.enqueue(fa.text_response("late", usage={"input_tokens": 50}).stall(60, after=0))
    fake = fake_anthropic if model.startswith("anthropic/") else fake_openai
    await leave_before_the_first_event(server, key, fake, path, {"model": model, "stream": True, **body})
    (record,) = await served_records(server, 1)
    assert (record["client"], record["finishReason"], record["error"], record["answered"]) == (
        "cli",
        "aborted",
        "ABORTED",
        False,
    )
    async with asyncio.timeout(25):
        while not fake.requests[-1].disconnected:
            await asyncio.sleep(0.05)
    await reservation_released(server)
    assert server.log_problems() == []


async def test_a_model_groups_fallback_attempt_gives_its_reservation_back_when_the_client_leaves(
    served: Callable[..., Awaitable[GatewayProcess]], fake_openai: fo.FakeOpenAI
) -> None:
    """The first deployment fails, the fallback (an attempt with its own reservation) has not answered when
    the client leaves: each attempt has one record, and nothing stays reserved."""
    group = {"deployments": [{"model": "openai/gpt-4o-mini"}], "fallbacks": ["openai/gpt-4o"]}
    server = await served(**{"models.groups.g": group})
    key = (await admin(server, "POST", "/api/clients", json={"name": "cli", "budgetUsd": 5}))["key"]
    fake_openai.enqueue(fo.error_status(500, "down"), fo.text_response("late").stall(60, after=0))
    body = {"model": "g", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    await leave_before_the_first_event(server, key, fake_openai, "/v1/chat/completions", body, 2)
    got = [(r["model"], r["finishReason"], r["error"]) for r in await served_records(server, 2)]
    assert got == [("openai/gpt-4o-mini", "error", "LLM_ERROR"), ("openai/gpt-4o", "aborted", "ABORTED")]
    await reservation_released(server)


async def test_a_models_fallback_attempt_gives_its_reservation_back_when_the_client_leaves(
    served: Callable[..., Awaitable[GatewayProcess]], fake_openai: fo.FakeOpenAI
) -> None:
    """The same along a model's own ``[models] fallbacks``: each attempt one record, nothing stays reserved."""
    server = await served(models={"fallbacks": {"openai/gpt-4o-mini": ["openai/gpt-4o"]}})
    key = (await admin(server, "POST", "/api/clients", json={"name": "cli", "budgetUsd": 5}))["key"]
    fake_openai.enqueue(fo.error_status(500, "down"), fo.text_response("late").stall(60, after=0))
    body = {"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    await leave_before_the_first_event(server, key, fake_openai, "/v1/chat/completions", body, 2)
    got = [(r["model"], r["finishReason"], r["error"]) for r in await served_records(server, 2)]
    assert got == [("openai/gpt-4o-mini", "error", "LLM_ERROR"), ("openai/gpt-4o", "aborted", "ABORTED")]
    await reservation_released(server)
