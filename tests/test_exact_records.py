"""Every call one exact record (docs/accounting.md): per endpoint and per provider, through the official SDKs
and the gateway's own WebSocket and ``POST /api/chat``, the fake upstream reports distinctive numbers and the
stored record must carry exactly those -- one record per upstream request, priced as the cost map says, with
the client, session, endpoint and model it came in with."""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from agentspace.storage.embedded.usage import UsageStore
from agentspace.tokens import count_tokens
from agentspace.transports import state
from agentspace.vault import KeyVault
from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ledgers import journal_entries, wait_for_notes
from tests.support.ui_stream import post_chat, read_all, user
from tests.support.ws import chat, of
from tests.test_clients import add_client, bearer
from tests.tool_plugins import WeatherTools

ANTHROPIC = "anthropic/claude-sonnet-4-5"
OPENAI = "openai/gpt-4o-mini"
SESSION = "exact-7"

# Anthropic: message_start reports the input; the final message_delta repeats it (cumulative, as the API now
# sends it) with the output and three web searches.
# Of the 89 tokens written to the cache, 50 for an hour (priced higher).
A_START = {
    "input_tokens": 1234,
    "cache_read_input_tokens": 567,
    "cache_creation_input_tokens": 89,
    "cache_creation": {"ephemeral_5m_input_tokens": 39, "ephemeral_1h_input_tokens": 50},
    "output_tokens": 1,
}
A_FINAL = {
    "input_tokens": 1234,
    "cache_read_input_tokens": 567,
    "cache_creation_input_tokens": 89,
    "output_tokens": 321,
    "server_tool_use": {"web_search_requests": 3},
}
A_EXPECTED = {
    "inputTokens": 1234,
    "cacheReadTokens": 567,
    "cacheWriteTokens": 89,
    "outputTokens": 321,
    "reasoningTokens": 0,
    "serverToolUse": {"web_search": 3},
}
A_COST = 1234 * 3e-6 + 567 * 0.3e-6 + 39 * 3.75e-6 + 50 * 6e-6 + 321 * 15e-6
A_FEE = 3 * 0.01

# OpenAI: 2000 prompt tokens of which 700 cached, 456 completion tokens of which 123 reasoning.
O_USAGE = fo.usage(2000, 456, cached=700, reasoning=123)
O_EXPECTED = {
    "inputTokens": 1300,
    "cacheReadTokens": 700,
    "cacheWriteTokens": 0,
    "outputTokens": 456,
    "reasoningTokens": 123,
    "serverToolUse": {},
}
O_COST = 1300 * 0.15e-6 + 700 * 0.075e-6 + 456 * 0.6e-6


def a_answer() -> fa.FakeResponse:
    return fa.text_response("Exactly so.", usage=A_START, delta_usages=[A_FINAL])


def o_answer() -> fo.FakeResponse:
    return fo.text_response("Exactly so.", usage=O_USAGE)


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    await asyncio.to_thread(importlib.import_module, "litellm")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def url(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


def assert_exact(record: dict[str, Any], expected: dict[str, Any], cost: float, fee: float = 0.0) -> None:
    got = {k: record[k] for k in expected}
    assert got == expected
    assert record["estimated"] is False and record["estimatedFields"] == []
    assert record["answered"] is True and record["error"] is None
    assert record["serverToolCost"] == pytest.approx(fee)
    assert record["totalCost"] == pytest.approx(cost + fee)
    assert record["inputCost"] + record["outputCost"] == pytest.approx(cost)


# --- each way in, each provider ------------------------------------------------------------------------


async def via_ws(client: TestClient, key: str, model: str, stream: bool) -> str:
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        frames = await chat(ws, "Hi", model=model)
    finally:
        await ws.close()
    return str(of(frames, "chat.stream.start")[0]["sessionId"])


async def via_http(client: TestClient, key: str, model: str, stream: bool) -> str:
    resp = await post_chat(client, bearer(key), SESSION, user("Hi"), model=model)
    await read_all(resp)
    return SESSION


async def via_messages(client: TestClient, key: str, model: str, stream: bool) -> str:
    api = anthropic.AsyncAnthropic(
        api_key=key, base_url=url(client), max_retries=0, default_headers={"X-Agentspace-Session": SESSION}
    )
    params: Any = {"model": model, "max_tokens": 500, "messages": [{"role": "user", "content": "Hi"}]}
    if stream:
        async with api.messages.stream(**params) as s:
            await s.get_final_message()
    else:
        await api.messages.create(**params)
    return SESSION


def o_sdk(client: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url=url(client) + "/v1", max_retries=0, default_headers={"X-Agentspace-Session": SESSION}
    )


async def via_completions(client: TestClient, key: str, model: str, stream: bool) -> str:
    api = o_sdk(client, key)
    messages: Any = [{"role": "user", "content": "Hi"}]
    if stream:
        async for _ in await api.chat.completions.create(model=model, messages=messages, stream=True, max_tokens=500):
            pass
    else:
        await api.chat.completions.create(model=model, messages=messages, max_tokens=500)
    return SESSION


async def via_responses(client: TestClient, key: str, model: str, stream: bool) -> str:
    api = o_sdk(client, key)
    if stream:
        async for _ in await api.responses.create(model=model, input="Hi", stream=True, store=False):
            pass
    else:
        await api.responses.create(model=model, input="Hi", store=False)
    return SESSION


WAYS = {
    "ws": (via_ws, "ws"),
    "api_chat": (via_http, "http"),
    "messages": (via_messages, "anthropic"),
    "completions": (via_completions, "openai"),
    "responses": (via_responses, "responses"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_the_record_is_what_the_upstream_reported(
    client: TestClient,
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    way: str,
    provider: str,
    stream: bool,
) -> None:
    if way in ("ws", "api_chat") and not stream:
        pytest.skip("a chat always streams")
    key = add_client("acme")
    call, endpoint = WAYS[way]
    if provider == "anthropic":
        fake_anthropic.enqueue(a_answer())
        model, expected, cost, fee, fake = ANTHROPIC, A_EXPECTED, A_COST, A_FEE, fake_anthropic
    else:
        fake_openai.enqueue(o_answer())
        model, expected, cost, fee, fake = OPENAI, O_EXPECTED, O_COST, 0.0, fake_openai
    session = await call(client, key, model, stream)
    assert len(fake.requests) == 1
    (record,) = await records(client)
    assert_exact(record, expected, cost, fee)
    assert (record["client"], record["sessionId"], record["endpoint"], record["model"]) == (
        "acme",
        session,
        endpoint,
        model,
    )


async def test_embeddings_record_what_was_reported(client: TestClient, fake_openai: fo.FakeOpenAI) -> None:
    key = add_client("acme")
    fake_openai.embedding_tokens = 777
    await o_sdk(client, key).embeddings.create(model="openai/text-embedding-3-small", input=["a b", "c"])
    assert len(fake_openai.requests) == 1
    (record,) = await records(client)
    assert (record["inputTokens"], record["outputTokens"], record["estimated"]) == (777, 0, False)
    assert record["totalCost"] == pytest.approx(777 * 2e-8)
    assert (record["client"], record["sessionId"], record["endpoint"], record["model"]) == (
        "acme",
        SESSION,
        "embeddings",
        "openai/text-embedding-3-small",
    )


async def test_count_tokens_makes_no_record(client: TestClient, fake_anthropic: fa.FakeAnthropic) -> None:
    key = add_client("acme")
    api = anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0)
    counted = await api.messages.count_tokens(model=ANTHROPIC, messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == 42 and len(fake_anthropic.count_requests) == 1
    assert await records(client) == []


# --- the unhappy calls -----------------------------------------------------------------------------------


async def ignoring_errors(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except (anthropic.APIError, openai.APIError):
        pass


@pytest.mark.parametrize("way", list(WAYS))
async def test_a_stream_cut_after_message_start_keeps_the_reported_input(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    key = add_client("acme")
    # message_start, ping, content_block_start, two deltas, then the connection drops.
    fake_anthropic.enqueue(fa.text_response("alpha beta gamma delta ", chunks=4, usage=A_START).cut_after(5))
    call, endpoint = WAYS[way]
    await ignoring_errors(call(client, key, ANTHROPIC, True))
    assert len(fake_anthropic.requests) == 1
    (record,) = await records(client)
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (1234, 567, 89)
    assert record["estimatedFields"] == ["outputTokens"] and record["outputTokens"] >= 1
    assert record["answered"] is True and record["error"] is not None
    assert (record["client"], record["endpoint"]) == ("acme", endpoint)


@pytest.mark.parametrize("way", list(WAYS))
async def test_a_stream_cut_after_its_final_usage_is_billed_as_reported(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    """The connection drops between the final ``message_delta`` (which reported the output) and
    ``message_stop``: nothing is left to estimate, so nothing is named in ``estimatedFields``."""
    key = add_client("acme")
    answer = fa.text_response("alpha beta gamma", chunks=3, usage=A_START, delta_usages=[A_FINAL])
    fake_anthropic.enqueue(answer.cut_after(len(answer.events) - 1))
    await ignoring_errors(WAYS[way][0](client, key, ANTHROPIC, True))
    (record,) = await records(client)
    assert {k: record[k] for k in A_EXPECTED} == A_EXPECTED
    assert (record["estimated"], record["estimatedFields"], record["answered"]) == (False, [], True)
    assert record["totalCost"] == pytest.approx(A_COST + A_FEE)


@pytest.mark.parametrize("way", list(WAYS))
async def test_a_stream_cut_before_any_output_keeps_every_reported_figure(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    """Cut after ``message_start`` and ``ping``: no output came after the report, so nothing is estimated and
    the reported output (``output_tokens: 1``) is not replaced by a count of nothing."""
    key = add_client("acme")
    fake_anthropic.enqueue(fa.text_response("never sent", usage=A_START).cut_after(2))
    await ignoring_errors(WAYS[way][0](client, key, ANTHROPIC, True))
    (record,) = await records(client)
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (1234, 567, 89)
    assert (record["outputTokens"], record["estimatedFields"], record["answered"]) == (1, [], True)


@pytest.mark.parametrize("status", [429, 500])
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_an_upstream_refusal_bills_nothing_and_makes_one_record(
    client: TestClient,
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    way: str,
    provider: str,
    status: int,
) -> None:
    key = add_client("acme")
    if provider == "anthropic":
        fake: Any = fake_anthropic
        fake.default = fa.error_status(status)
        model = ANTHROPIC
    else:
        fake = fake_openai
        fake.default = fo.error_status(status)
        model = OPENAI
    call, endpoint = WAYS[way]
    await ignoring_errors(call(client, key, model, True))
    assert fake.requests
    (record,) = await records(client)
    assert (record["totalTokens"], record["totalCost"], record["answered"]) == (0, 0, False)
    assert record["attempts"] == len(fake.requests)
    assert (record["client"], record["endpoint"], record["model"]) == ("acme", endpoint, model)


async def leave_mid_stream(client: TestClient, key: str, way: str, model: str) -> None:
    """Read the stream until some text arrived, then hang up."""
    if way == "messages":
        api = anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0)
        params: Any = {"model": model, "max_tokens": 500, "messages": [{"role": "user", "content": "Hi"}]}
        async with api.messages.stream(**params) as s:
            async for event in s:
                if event.type == "content_block_delta":
                    break
        return
    api = o_sdk(client, key)
    if way == "completions":
        stream: Any = await api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
    else:
        stream = await api.responses.create(model=model, input="Hi", stream=True, store=False)
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
    await stream.close()


@pytest.mark.parametrize("way", ["messages", "completions", "responses"])
async def test_a_client_leaving_mid_stream_keeps_the_reported_input(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    key = add_client("acme")
    fake_anthropic.enqueue(fa.text_response("alpha beta gamma delta ", chunks=4, usage=A_START).stall(30, after=5))
    await leave_mid_stream(client, key, way, ANTHROPIC)

    async def one_record() -> bool:
        return len(await records(client)) == 1

    await wait_until(one_record)
    (record,) = await records(client)
    assert len(fake_anthropic.requests) == 1
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (1234, 567, 89)
    assert record["estimatedFields"] == ["outputTokens"] and record["outputTokens"] >= 1
    assert (record["client"], record["endpoint"], record["answered"]) == ("acme", WAYS[way][1], True)


@pytest.mark.parametrize("way", ["messages", "completions", "responses"])
async def test_a_client_leaving_an_openai_model_mid_stream_makes_one_record(
    client: TestClient, fake_openai: fo.FakeOpenAI, way: str
) -> None:
    key = add_client("acme")
    fake_openai.enqueue(fo.text_response("alpha beta gamma delta ", chunks=4, usage=O_USAGE).stall(30, after=2))
    await leave_mid_stream(client, key, way, OPENAI)

    async def one_record() -> bool:
        return len(await records(client)) == 1

    await wait_until(one_record)
    await asyncio.sleep(0.3)  # no second record follows
    (record,) = await records(client)
    assert len(fake_openai.requests) == 1
    # Nothing reported before the usage chunk at the end: both counted here, and said so.
    assert record["estimatedFields"] == ["inputTokens", "outputTokens"] and record["outputTokens"] >= 1
    assert record["inputTokens"] > 0
    assert (record["client"], record["endpoint"], record["answered"]) == ("acme", WAYS[way][1], True)


# --- a killed server: the output relayed is what the recovery posts -------------------------------------------


@pytest.mark.parametrize("way", ["ws", "messages", "completions"])
async def test_a_killed_server_recovers_all_the_output_it_relayed(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    """The upstream reports its input, streams three pieces of text and goes quiet; the server is killed
    seconds later. The next start posts the reported input and all the output the client got (estimated):
    not the output as of the last time so many characters or deltas had gone by."""
    pieces = ["x" * 2048, "y" * 1024, "z" * 524]
    text = "".join(pieces)
    # The relay counts the deltas it relayed; the others, the characters (about four a token).
    relayed = count_tokens(text) if way == "messages" else len(text) // 4 + 1
    fake_anthropic.enqueue(fa.text_response(text, chunks=pieces, usage=A_START).stall(120, after=6))
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            headers = {**bearer(server.token), "anthropic-version": "2023-06-01"}
            body: dict[str, Any] = {"max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            if way == "ws":
                ws = await http.ws_connect(server.ws_url, headers=bearer(server.token))
                await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi"})
                got = ""
                while "z" * 524 not in got:
                    frame = json.loads((await ws.receive(timeout=30)).data)
                    got += frame.get("delta") or "" if frame["type"] == "chat.stream.delta" else ""
            else:
                path = "/v1/messages" if way == "messages" else "/v1/chat/completions"
                resp = await http.post(server.url + path, json={**body, "model": ANTHROPIC}, headers=headers)
                got_bytes = b""
                while b"z" * 524 not in got_bytes:
                    got_bytes += await asyncio.wait_for(resp.content.readany(), 30)
            # The output relayed is noted every half second, written within a second (later under load): wait
            # for the journal to hold all of it before the kill.
            await wait_for_notes(lambda: journal_entries(data_dir), 1, lambda e: e.get("relayedTokens") == relayed)
            await server.kill()
    finally:
        await server.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        await restarted.wait_for_log("recovered")
    finally:
        await restarted.aclose()
    (record,) = list(UsageStore(data_dir).records_sync())
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (1234, 567, 89)
    assert (record["outputTokens"], record["estimatedFields"], record["recovered"]) == (
        relayed,
        ["outputTokens"],
        True,
    )
    assert record["endpoint"] == WAYS[way][1]


# --- a tool loop: one record per step -----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("way", ["ws", "api_chat"])
async def test_a_three_step_tool_loop_makes_three_exact_records(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    way: str,
    provider: str,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm, providers={"openai": {"base_url": fake_openai.url}})
    key = add_client("acme")
    if provider == "anthropic":
        model, fake = ANTHROPIC, fake_anthropic
        steps = [(1000 + i, 10 + i, 200 + i, 30 + i, 40 + i) for i in range(3)]  # input, read, write, output, searches
        fake_anthropic.enqueue(
            *(
                fa.tool_use_response(
                    "get_weather",
                    {"city": f"City {i}"},
                    id=f"toolu_{i}",
                    usage={"input_tokens": s[0], "cache_read_input_tokens": s[1], "cache_creation_input_tokens": s[2]},
                    delta_usages=[{"output_tokens": s[3], "server_tool_use": {"web_search_requests": i + 1}}],
                )
                for i, s in enumerate(steps[:2])
            ),
            fa.text_response(
                "Sunny everywhere.",
                usage={"input_tokens": steps[2][0], "cache_read_input_tokens": steps[2][1]}
                | {"cache_creation_input_tokens": steps[2][2]},
                delta_usages=[{"output_tokens": steps[2][3], "server_tool_use": {"web_search_requests": 3}}],
            ),
        )
        expected = [
            {
                "inputTokens": s[0],
                "cacheReadTokens": s[1],
                "cacheWriteTokens": s[2],
                "outputTokens": s[3],
                "serverToolUse": {"web_search": i + 1},
            }
            for i, s in enumerate(steps)
        ]
    else:
        model, fake = OPENAI, fake_openai
        fake_openai.enqueue(
            fo.tool_calls_response(
                fo.tool_call("call_0", "get_weather", {"city": "A"}), usage=fo.usage(500, 50, cached=100, reasoning=5)
            ),
            fo.tool_calls_response(
                fo.tool_call("call_1", "get_weather", {"city": "B"}), usage=fo.usage(600, 60, cached=200, reasoning=6)
            ),
            fo.text_response("Sunny.", usage=fo.usage(700, 70, cached=300, reasoning=7)),
        )
        expected = [
            {"inputTokens": p - c, "cacheReadTokens": c, "cacheWriteTokens": 0, "outputTokens": o, "reasoningTokens": r}
            for p, o, c, r in ((500, 50, 100, 5), (600, 60, 200, 6), (700, 70, 300, 7))
        ]
    session = await WAYS[way][0](client, key, model, True)
    assert len(fake.requests) == 3
    found = sorted(await records(client), key=lambda r: r["timestamp"])
    assert [{k: r[k] for k in expected[0]} for r in found] == expected
    assert all(r["estimated"] is False and r["error"] is None for r in found)
    assert {(r["client"], r["sessionId"], r["endpoint"], r["model"]) for r in found} == {
        ("acme", session, WAYS[way][1], model)
    }
    # The turn's message carries the sum of its steps.
    message = (await client.app[state.REGISTRY].sessions.get(session))["messages"][-1]
    for field in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens"):
        assert message["usage"][field] == sum(r[field] for r in found), field
    assert message["usage"]["totalCost"] == pytest.approx(sum(r["totalCost"] for r in found))


# --- a record spooled while the database was away keeps its labels ------------------------------------------


async def test_a_spooled_record_is_posted_with_its_deployment(tmp_path: Path, fake_anthropic: fa.FakeAnthropic) -> None:
    """PostgreSQL stops while a call to a model group's deployment streams: its record is spooled; the replica
    is killed before the database returns; the next start posts the record as it was -- its deployment too,
    so the per-deployment report counts it where it belongs."""
    from tests.scale_servers import Postgres, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    pg = Postgres()
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    KeyVault(data_dir).set("team-1", "sk-ant-team1-0123456789abcdef")
    sections: dict[str, Any] = {
        "storage": {"backend": "postgres", "dsn": pg.dsn},
        'models.groups."claude"': {
            "deployments": [{"model": ANTHROPIC, "key": "team-1", "base_url": fake_anthropic.url}]
        },
    }
    fake_anthropic.default = fa.text_response("tok " * 10, chunks=10, usage=A_START).with_delay(0.3)
    try:
        server = GatewayProcess(data_dir, fake_anthropic.url, **sections)
        try:
            await server.start()
            headers = bearer(server.token)
            body = {
                "model": "claude",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 64,
                "stream": True,
            }
            async with aiohttp.ClientSession() as http:
                resp = await http.post(server.url + "/v1/chat/completions", json=body, headers=headers)
                assert resp.status == 200
                await resp.content.readany()
                pg.stop()  # the database goes away mid-stream
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            await server.kill()  # before the database returns
        finally:
            await server.aclose()
        pg.start()
        restarted = GatewayProcess(data_dir, fake_anthropic.url, **sections)
        try:
            await restarted.start()
            async with aiohttp.ClientSession() as http:
                url = restarted.url + "/api/usage?by=deployment"
                report = await (await http.get(url, headers=bearer(restarted.token))).json()
        finally:
            await restarted.aclose()
        assert report["grandTotal"]["requestCount"] == 1, report
        assert list(report["perDeployment"]) == ["claude/team-1"], report
        assert report["perDeployment"]["claude/team-1"]["inputTokens"] == 1234
    finally:
        pg.close()


# --- a session's compaction is a provider call like any other -------------------------------------------------


async def compact(client: TestClient, key: str, model: str) -> list[dict[str, Any]]:
    """Two turns in a session, then ``session.compact``: the compaction's records."""
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        frames = await chat(ws, "hello there", model=model)
        session = of(frames, "chat.stream.start")[0]["sessionId"]
        await chat(ws, "and more", sessionId=session)
        await ws.send_json({"type": "session.compact", "id": "c1", "sessionId": session})
        while (await ws.receive_json(timeout=10))["type"] not in ("session.compacted", "error"):
            pass
    finally:
        await ws.close()
    return [r for r in await records(client) if r["purpose"] == "compact"]


async def test_a_compaction_cut_after_message_start_keeps_the_reported_input(
    client: TestClient, fake_anthropic: fa.FakeAnthropic
) -> None:
    key = add_client("acme")
    fake_anthropic.enqueue(fa.text_response(), fa.text_response())
    fake_anthropic.enqueue(fa.text_response("alpha beta gamma delta ", chunks=4, usage=A_START).cut_after(5))
    (record,) = await compact(client, key, ANTHROPIC)
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (1234, 567, 89)
    assert record["estimatedFields"] == ["outputTokens"] and record["outputTokens"] > 1
    assert (record["answered"], record["client"], record["error"]) == (True, "acme", "LLM_ERROR")


async def test_a_compaction_cut_without_usage_bills_what_was_streamed(
    client: TestClient, fake_openai: fo.FakeOpenAI
) -> None:
    key = add_client("acme")
    fake_openai.enqueue(o_answer(), o_answer())
    fake_openai.enqueue(fo.text_response("alpha beta gamma delta ", chunks=4).cut_after(3))
    (record,) = await compact(client, key, OPENAI)
    assert len(fake_openai.requests) == 3
    # The upstream answered and streamed: the call is billed, counted here (nothing was reported).
    assert record["answered"] is True and record["estimatedFields"] == ["inputTokens", "outputTokens"]
    assert record["inputTokens"] > 0 and record["outputTokens"] > 0 and record["totalCost"] > 0
