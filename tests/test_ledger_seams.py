"""An outside audit of docs/accounting.md at the seams between ways in, upstream behaviours and admin changes:
the official SDKs against ``/v1``, the WebSocket and ``/api/chat``, the CLI through click's runner, fake
Anthropic and OpenAI upstreams. Each call one record with what the upstream reported; a budget, a key or a
client changed between two calls of one open socket (or two steps of one tool loop) is seen by the next call;
the spend every view shows is the records' and nothing stays in flight, however the calls ended."""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from agentspace import hookimpl
from agentspace.plugins import create_plugin_manager
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.scale_servers import flush_redis
from tests.support.tools import slow_tool
from tests.support.ws import chat, of
from tests.test_clients import add_client, bearer, cli, records
from tests.test_exact_records import WAYS, leave_mid_stream, o_sdk, url

ANTHROPIC = "anthropic/claude-sonnet-4-5"
OPENAI = "openai/gpt-4o-mini"
O_USAGE = fo.usage(2000, 456, cached=700, reasoning=123)


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    await asyncio.to_thread(importlib.import_module, "litellm")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}}, chat={"max_retries": 2})


async def clients_shown(client: TestClient, auth_headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``GET /api/clients``: each client's spend (with what its calls in flight hold), by name."""
    resp = await client.get("/api/clients", headers=auth_headers)
    assert resp.status == 200
    return {c["name"]: c["spend"] for c in (await resp.json())["clients"]}


# --- what the upstream reported --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_input_the_final_message_delta_reports_above_message_start_s_is_billed(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str, stream: bool
) -> None:
    """Web fetches bring content in as the answer runs: Anthropic's final ``message_delta`` then reports more
    input (and cache) than ``message_start`` did. The record has the final figures, on every way in."""
    if way in ("ws", "api_chat") and not stream:
        pytest.skip("a chat always streams")
    key = add_client("acme")
    start = {"input_tokens": 100, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 1}
    final = {
        "input_tokens": 5000,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 40,
        "output_tokens": 77,
        "server_tool_use": {"web_fetch_requests": 2},
    }
    fake_anthropic.enqueue(fa.text_response("Exactly so.", usage=start, delta_usages=[final]))
    await WAYS[way][0](client, key, ANTHROPIC, stream)
    (record,) = await records(client)
    fields = ("inputTokens", "cacheReadTokens", "cacheWriteTokens", "outputTokens", "serverToolUse", "estimatedFields")
    assert {k: record[k] for k in fields} == {
        "inputTokens": 5000,
        "cacheReadTokens": 300,
        "cacheWriteTokens": 40,
        "outputTokens": 77,
        "serverToolUse": {"web_fetch": 2},
        "estimatedFields": [],
    }


@pytest.mark.parametrize("way", list(WAYS))
async def test_an_openai_stream_cut_after_its_first_chunk_bills_the_input_it_was_charged(
    client: TestClient, fake_openai: fo.FakeOpenAI, way: str
) -> None:
    """The upstream answered (HTTP 200 and its first chunk, ``{"role": "assistant"}``) and then the connection
    dropped. The upstream took the call and bills its input: each upstream request has its record, answered,
    with the input counted here (``docs/accounting.md``: a call is voided only when the upstream never
    answered; ``ProviderCall.answered``: "its first byte"). A chat turn retries the step as a call of its own.
    Nothing was reported: the output (none relayed) is counted here too, and named, as a recovery names it
    (test_ledger_recovery_ways.py)."""
    key = add_client("acme")
    fake_openai.enqueue(fo.text_response("alpha beta gamma", chunks=3, usage=O_USAGE).cut_after(1))
    fake_openai.enqueue(fo.text_response("Exactly so.", usage=O_USAGE))  # the chat turn's retry
    try:
        await WAYS[way][0](client, key, OPENAI, True)
    except (anthropic.APIError, openai.APIError):
        pass  # /v1 relays the failure (502); the SDK's own retry is the client's next call
    mine = await records(client)
    assert len(mine) == len(fake_openai.requests)
    cut = mine[0]
    assert (cut["answered"], cut["estimatedFields"]) == (True, ["inputTokens", "outputTokens"])
    assert cut["inputTokens"] > 0 and cut["outputTokens"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="litellm holds an OpenAI-format stream's finish and usage chunks back until the stream ends, so "
    "the litellm provider never sees a usage chunk that arrived before the connection dropped: the record is "
    "an estimate of input and output instead (Anthropic's final message_delta is kept: "
    "test_exact_records.py::test_a_stream_cut_after_its_final_usage_is_billed_as_reported)",
)
@pytest.mark.parametrize("way", list(WAYS))
async def test_an_openai_stream_cut_after_its_usage_chunk_is_billed_as_reported(
    client: TestClient, fake_openai: fo.FakeOpenAI, way: str
) -> None:
    """The finish chunk and the usage chunk arrived; the connection dropped before ``[DONE]``. What the upstream
    reported is never replaced by an estimate (docs/accounting.md, "estimated")."""
    key = add_client("acme")
    head = {"id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}
    finish = {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    deltas: tuple[fo.Delta, ...] = (
        {"role": "assistant", "content": ""},
        {"content": "alpha "},
        {"content": "beta"},
        json.dumps(finish),
        json.dumps({**head, "choices": [], "usage": O_USAGE}),
    )
    fake_openai.enqueue(fo.FakeResponse(deltas, finish_reason=None, usage=None).cut_after(len(deltas)))
    try:
        await WAYS[way][0](client, key, OPENAI, True)
    except (anthropic.APIError, openai.APIError):
        pass
    (record,) = await records(client)
    got = {k: record[k] for k in ("inputTokens", "cacheReadTokens", "outputTokens", "estimatedFields")}
    assert got == {"inputTokens": 1300, "cacheReadTokens": 700, "outputTokens": 456, "estimatedFields": []}


# --- changes between two calls of one open socket ---------------------------------------------------------


async def test_an_open_socket_s_next_call_sees_its_budget_lowered_lifted_and_its_client_removed(
    client: TestClient, fake_anthropic: fa.FakeAnthropic
) -> None:
    key = add_client("alice")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        assert of(await chat(ws, "Hi"), "chat.stream.end")
        cli("clients", "set", "alice", "--budget", "0.000001")  # less than the one call made
        refused = (await chat(ws, "Again", request_id="r2"))[-1]
        assert (refused["type"], refused["code"]) == ("error", "BUDGET_EXCEEDED")
        cli("clients", "set", "alice", "--budget", "none")
        assert of(await chat(ws, "Third", request_id="r3"), "chat.stream.end")
        cli("clients", "remove", "alice")
        refused = (await chat(ws, "Fourth", request_id="r4"))[-1]
        assert (refused["type"], refused["code"]) == ("error", "UNAUTHORIZED")
    finally:
        await ws.close()
    assert len(fake_anthropic.requests) == 2 and len(await records(client)) == 2


async def test_an_open_socket_of_a_client_removed_and_added_again_is_refused_and_its_spend_not_inherited(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, auth_headers: dict[str, str]
) -> None:
    """The new client of the name has a key of its own: the old socket's key is not it, and the old client's
    spend is not the new one's."""
    key = add_client("alice")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        assert of(await chat(ws, "Hi"), "chat.stream.end")
        cli("clients", "remove", "alice")
        add_client("alice", "--budget", "1")
        refused = (await chat(ws, "Again", request_id="r2"))[-1]
        assert (refused["type"], refused["code"]) == ("error", "UNAUTHORIZED")
    finally:
        await ws.close()
    assert len(fake_anthropic.requests) == 1
    assert (await clients_shown(client, auth_headers))["alice"]["usd"] == 0
    assert "$0.000000 / $1.0000 month" in cli("clients", "list")


@pytest.mark.parametrize(
    ("change", "code"), [(("set", "alice", "--budget", "0.000001"), "BUDGET_EXCEEDED"), (("remove", "alice"), None)]
)
async def test_a_websocket_tool_loop_s_next_step_sees_a_change_made_while_its_tool_ran(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
    change: tuple[str, ...],
    code: str | None,
) -> None:
    """The step after the tool is admitted at the moment of its call: refused before anything is sent, no
    record for it, and nothing left held in flight."""
    entered, release = asyncio.Event(), asyncio.Event()
    client = await make_client(pm=slow_tool(entered, release))
    fake_anthropic.enqueue(fa.tool_use_response("wait", {}), fa.text_response("Never sent."))
    key = add_client("alice", "--budget", "100")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        turn = asyncio.ensure_future(chat(ws, "Hi"))
        await asyncio.wait_for(entered.wait(), 10)
        cli("clients", *change)
        release.set()
        end = (await turn)[-1]
    finally:
        await ws.close()
    assert end["type"] == "error" and end["code"] in (code or "UNAUTHORIZED", "LLM_ERROR"), end
    assert len(fake_anthropic.requests) == 1
    (record,) = await records(client)
    assert record["answered"] is True and record["error"] is None
    for spend in (await clients_shown(client, auth_headers)).values():
        assert spend["inFlightUsd"] == 0 and spend["usd"] == pytest.approx(record["totalCost"])


# --- spend after every kind of ending ---------------------------------------------------------------------


async def test_every_view_shows_the_records_spend_and_nothing_in_flight_after_every_kind_of_ending(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, auth_headers: dict[str, str]
) -> None:
    """A client with a budget and one without, on both providers and the three ``/v1`` APIs: calls answered
    whole, streams the upstream cut, streams the client left, upstream 500s, embeddings. Then each call has one
    record, ``/api/clients``, ``/api/usage``, ``agentspace clients list`` and ``agentspace usage`` show the sum of
    the client's records, and no reservation is left held."""
    keys = {"acme": add_client("acme", "--budget", "100"), "free": add_client("free")}
    a_usage = {"input_tokens": 1000, "output_tokens": 1}
    scripts: list[tuple[str, Any, Any, Any, Any, Any]] = [
        (
            ANTHROPIC,
            fake_anthropic,
            fa.text_response("Exactly so.", usage=a_usage, delta_usages=[{"output_tokens": 50}]),
            fa.text_response("alpha beta gamma delta ", chunks=4, usage=a_usage).cut_after(5),
            fa.text_response("alpha beta gamma delta ", chunks=4, usage=a_usage).stall(30, after=5),
            fa.error_status(500),
        ),
        (
            OPENAI,
            fake_openai,
            fo.text_response("Exactly so.", usage=O_USAGE),
            fo.text_response("alpha beta gamma", chunks=4, usage=O_USAGE).cut_after(3),
            fo.text_response("alpha beta gamma delta ", chunks=4, usage=O_USAGE).stall(30, after=2),
            fo.error_status(500),
        ),
    ]
    calls = 0
    for key in keys.values():
        for model, fake, whole, cut, stalled, failed in scripts:
            fake.default = failed  # the chat turn's retries of a 500 fail too
            for way in ("messages", "completions", "responses"):
                fake.enqueue(whole)
                await WAYS[way][0](client, key, model, False)
                fake.enqueue(cut)
                try:
                    await WAYS[way][0](client, key, model, True)
                except (anthropic.APIError, openai.APIError):
                    pass
                fake.enqueue(stalled)
                await leave_mid_stream(client, key, way, model)
                try:
                    await WAYS[way][0](client, key, model, False)
                except (anthropic.APIError, openai.APIError):
                    pass
                calls += 4
            fake.default = whole
        fake_openai.embedding_tokens = 777
        await o_sdk(client, key).embeddings.create(model="openai/text-embedding-3-small", input=["a b", "c"])
        calls += 1

    async def all_recorded() -> bool:
        return len(await records(client)) >= calls

    await wait_until(all_recorded, timeout=30)
    mine = await records(client)
    assert len(mine) == calls == len(fake_anthropic.requests) + len(fake_openai.requests)
    spent = {name: sum(r["totalCost"] for r in mine if r["client"] == name) for name in keys}
    assert all(cost > 0 for cost in spent.values())
    shown = await clients_shown(client, auth_headers)
    report = await (await client.get("/api/usage?by=client", headers=auth_headers)).json()
    listed, usage = cli("clients", "list"), cli("usage", "--by-client")
    for name, cost in spent.items():
        assert shown[name]["usd"] == pytest.approx(cost) and shown[name]["inFlightUsd"] == 0
        assert report["perClient"][name]["totalCost"] == pytest.approx(cost)
        assert f"${cost:.6f}" in listed and f"${cost:.6f}" in usage


@pytest.mark.parametrize("model", ["openai/text-embedding-3-small", "g"], ids=["model", "model_group"])
async def test_a_client_leaving_while_its_embeddings_are_awaited_leaves_one_record_and_nothing_held(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_openai: fo.FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    auth_headers: dict[str, str],
    model: str,
) -> None:
    """The request went upstream whole and the client hung up before the answer: the call has its one record
    (aborted), as a whole ``/v1/messages`` answer the client left has, and its reservation is given back."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    await asyncio.to_thread(importlib.import_module, "litellm")
    group = {"deployments": [{"model": "openai/text-embedding-3-small"}]}
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}}, models={"groups": {"g": group}})
    key = add_client("acme", "--budget", "1")
    fake_openai.enqueue(fo.text_response("").with_delay(30))  # the embeddings answer 30 s later
    api = openai.AsyncOpenAI(api_key=key, base_url=url(client) + "/v1", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        await api.embeddings.create(model=model, input=["a b", "c"])
    assert len(fake_openai.requests) == 1

    async def recorded() -> bool:
        return len(await records(client)) >= 1

    await wait_until(recorded)
    (record,) = await records(client)
    assert (record["client"], record["endpoint"], record["error"]) == ("acme", "embeddings", "ABORTED")
    assert (await clients_shown(client, auth_headers))["acme"]["inFlightUsd"] == 0


@pytest.mark.parametrize("way", ["messages", "embeddings"])
async def test_a_whole_answer_the_client_left_is_billed_its_input_as_after_a_crash(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, way: str
) -> None:
    """docs/accounting.md: "A call whose answer comes whole at its end (``/v1/messages`` with ``stream: false``,
    ``/v1/embeddings``) shows no sign before then: once its request went upstream, it is billed its input as a
    call that answered" -- and a call is billed nothing only when the upstream never answered (refused,
    unreachable, stopped before it was sent). The client hanging up is none of those. Its record names what a
    recovery's names (test_crashes_outside.py, a whole answer cut by a SIGKILL): the input counted here, and the
    output -- none relayed, but the upstream wrote an answer it did not report."""
    key = add_client("acme")
    fake_anthropic.enqueue(fa.text_response("late", usage={"input_tokens": 50}).silent_for(30))
    fake_openai.enqueue(fo.text_response("").with_delay(30))  # the embeddings answer 30 s later
    if way == "messages":
        api = anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0, timeout=1.0)
        with pytest.raises(anthropic.APITimeoutError):
            await api.messages.create(model=ANTHROPIC, max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    else:
        o_api = openai.AsyncOpenAI(api_key=key, base_url=url(client) + "/v1", max_retries=0, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            await o_api.embeddings.create(model="openai/text-embedding-3-small", input=["a b", "c"])

    async def recorded() -> bool:
        return len(await records(client)) >= 1

    await wait_until(recorded)
    (record,) = await records(client)
    assert (record["answered"], record["estimatedFields"]) == (True, ["inputTokens", "outputTokens"])
    assert record["inputTokens"] > 0 and record["outputTokens"] == 0 and record["totalCost"] > 0


# --- a budget period that changes while a call is in flight -----------------------------------------------


@pytest.mark.parametrize("counters", ["in-process", "redis"])
@pytest.mark.parametrize("period", ["day", "week", "total"])
async def test_a_call_in_flight_still_counts_after_its_client_s_budget_period_changed(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
    request: pytest.FixtureRequest,
    period: str,
    counters: str,
) -> None:
    """$0.025 a month; a call reserving $0.015 (1000 output tokens at $15/M) streams and holds. A second one
    does not fit. The admin makes it $0.025 a day (or week, or in total): the call in flight will post its
    record into the new period, so it still counts there -- shown in flight, and the second call still refused.
    The same with the counters in Redis (``[storage] redis_url``)."""
    storage: dict[str, Any] = {}
    if counters == "redis":
        redis_srv = request.getfixturevalue("redis_srv")
        await flush_redis(redis_srv)
        storage["redis_url"] = redis_srv.url
    client = await make_client(storage=storage)
    key = add_client("acme", "--budget", "0.025", "--period", "month")
    api = anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0)
    params: Any = {"model": ANTHROPIC, "max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]}
    answer = fa.text_response("alpha beta gamma", chunks=3, usage={"input_tokens": 10})
    fake_anthropic.enqueue(answer.stall(30, after=4))
    async with api.messages.stream(**params) as held:
        async for event in held:
            if event.type == "content_block_delta":
                break
        in_flight = (await clients_shown(client, auth_headers))["acme"]["inFlightUsd"]
        assert in_flight == pytest.approx(0.015, rel=0.01)
        with pytest.raises(anthropic.RateLimitError):
            await api.messages.create(**params)
        cli("clients", "set", "acme", "--period", period)
        assert (await clients_shown(client, auth_headers))["acme"]["inFlightUsd"] == in_flight
        with pytest.raises(anthropic.RateLimitError):
            await api.messages.create(**params)
    assert len(fake_anthropic.requests) == 1


# --- a spend read again while a record is stored ----------------------------------------------------------


def held_sink(stored: asyncio.Event, go_on: asyncio.Event) -> Any:
    """A plugin manager with an inline usage sink (awaited after the store of record, before the record settles)
    that holds a record until ``go_on``, after setting ``stored``."""

    class HeldSink:
        name = "held"
        delivery = "inline"

        async def record(self, record: Any) -> None:
            stored.set()
            await go_on.wait()

    class Plugin:
        @hookimpl
        def register_usage_sinks(self, register: Any, config: Any) -> None:
            register(HeldSink())

    pm = create_plugin_manager()
    pm.register(Plugin())
    return pm


async def test_a_spend_redis_lost_and_read_back_while_a_record_is_stored_counts_it_once(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
    redis_srv: Any,
) -> None:
    """The period's spend leaves Redis while a call runs (its key expires after 10 minutes, or is deleted) and is
    read back from the records after the call's record was stored, before it settled: that read counts the record,
    so its settling must not add it again (docs/accounting.md, "Spend")."""
    await flush_redis(redis_srv)
    stored, go_on = asyncio.Event(), asyncio.Event()
    client = await make_client(storage={"redis_url": redis_srv.url}, pm=held_sink(stored, go_on))
    key = add_client("acme", "--budget", "1")
    fake_anthropic.enqueue(fa.text_response("Exactly so.", usage={"input_tokens": 1000, "output_tokens": 50}))
    api = anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0)
    call = asyncio.ensure_future(
        api.messages.create(model=ANTHROPIC, max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    )
    await asyncio.wait_for(stored.wait(), 30)
    redis = aioredis.from_url(redis_srv.url)
    try:
        spend_keys = [k async for k in redis.scan_iter("agentspace:budget:acme:month:*")]
        assert len(spend_keys) == 1
        await redis.delete(*spend_keys)  # as when it expires
    finally:
        await redis.aclose()
    read_back = (await clients_shown(client, auth_headers))["acme"]  # the record is in the store: counted
    go_on.set()
    await call
    (record,) = await records(client)
    assert read_back["usd"] == pytest.approx(record["totalCost"])
    shown = (await clients_shown(client, auth_headers))["acme"]
    assert (shown["usd"], shown["inFlightUsd"]) == (pytest.approx(record["totalCost"]), 0)
