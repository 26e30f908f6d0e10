"""GET /metrics (issue 21): the built-in metrics plugin counts every provider call as the usage
store does, over every transport and endpoint (WebSocket, /api/chat, /v1/messages pass-through and
translated, /v1/chat/completions), errors, aborts, retries, fallbacks and a tool loop included; the
histograms hold the observations; the route needs the token unless ``[metrics] public``; the plugin can be
left out with AGENTSPACE_LOAD_PLUGINS.

The metrics are the process's (one registry per replica), so each test compares what changed during it.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agentspace import pipeline
from agentspace.default_plugins import metrics
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state as STATE
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ui_stream import post_chat, read_all, user
from tests.support.ws import chat, connect, of, receive
from tests.tool_plugins import WeatherTools

ANTHROPIC = "anthropic/claude-sonnet-4-5"
FALLBACK = "anthropic/claude-haiku-4-5"
OPENAI = "openai/gpt-4o-mini"
OPENAI_KEY = "sk-openai-test-fedcba9876543210"
USAGE = {"input_tokens": 30, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 4, "output_tokens": 1}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: TestClient, headers: dict[str, str]) -> Samples:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=")  # the Prometheus text format
    out: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name.startswith("agentspace_"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(after: Samples, before: Samples, name: str, **match: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The change of each series of ``name`` (labels matching ``match``), zero changes left out."""
    out = {}
    for (n, labels), value in after.items():
        if n == name and all(dict(labels).get(k) == v for k, v in match.items()):
            change = value - before.get((n, labels), 0.0)
            if abs(change) > 1e-12:
                out[labels] = change
    return out


@pytest.fixture
async def app(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_openai: fo.FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Awaitable[TestClient]]:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    monkeypatch.setattr(pipeline.random, "random", lambda: 0.0)
    await asyncio.to_thread(importlib.import_module, "litellm")

    async def make(**sections: Any) -> TestClient:
        pm = create_plugin_manager()
        pm.register(WeatherTools())
        sections.setdefault("providers", {"openai": {"base_url": fake_openai.url}})
        return await make_client(pm=pm, **sections)

    return make


async def test_counters_equal_the_usage_records_after_a_mixed_run(
    app: Any,
    token: str,
    auth_headers: dict[str, str],
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
) -> None:
    client = await app(chat={"max_retries": 1}, models={"fallbacks": {ANTHROPIC: [FALLBACK]}})
    before = await scrape(client, auth_headers)
    ws = await connect(client, token)

    # WebSocket: a 429 retried, then an answer with cache tokens.
    fake_anthropic.enqueue(fa.error_status(429, retry_after=0.01), fa.text_response("ok", usage=USAGE))
    assert (await chat(ws, "hi"))[-1]["type"] == "chat.stream.end"
    # WebSocket: a tool loop, three calls.
    fake_anthropic.enqueue(
        fa.tool_use_response("get_weather", {"city": "Paris"}),
        fa.tool_use_response("broken", {}, id="toolu_02"),
        fa.text_response("Sunny."),
    )
    assert (await chat(ws, "weather?", request_id="r2"))[-1]["type"] == "chat.stream.end"
    # WebSocket: the model fails twice (no retry left), the fallback answers.
    fake_anthropic.enqueue(fa.error_status(529), fa.error_status(529), fa.text_response("from the fallback"))
    assert (await chat(ws, "fall back", request_id="r3"))[-1]["type"] == "chat.stream.end"
    # WebSocket: an error the upstream sends (not retried), over the OpenAI provider.
    fake_openai.enqueue(fo.error_status(400, "bad request"))
    assert (await chat(ws, "bad", request_id="r4", model=OPENAI))[-1]["type"] == "error"
    # WebSocket: aborted mid-stream.
    fake_anthropic.enqueue(fa.text_response("one two three four", chunks=4).stall(30, after=5))
    await ws.send_json({"type": "chat.send", "id": "r5", "content": "long"})
    frames: list[dict[str, Any]] = []
    while not of(frames, "chat.stream.delta"):
        frames.append(await receive(ws))
    await ws.send_json({"type": "chat.abort", "id": "a5", "requestId": "r5"})
    while frames[-1]["type"] != "chat.stream.end":
        frames.append(await receive(ws))
    # WebSocket: refused before any call (no key for the model's provider).
    assert (await chat(ws, "no key", request_id="r6", model="gemini/gemini-2.5-flash"))[-1]["code"] == "NO_API_KEY"
    await ws.close()

    # POST /api/chat.
    fake_anthropic.enqueue(fa.text_response("over http"))
    await read_all(await post_chat(client, auth_headers, "chat1", user("hi")))
    # /v1/messages: the Anthropic pass-through, streamed and whole.
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    fake_anthropic.enqueue(fa.text_response("relayed", usage=USAGE), fa.text_response("whole"))
    async with api.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=[user_msg()]) as stream:
        await stream.get_final_message()
    await api.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[user_msg()])
    # /v1/messages translated (an OpenAI model), and /v1/chat/completions; then an upstream error there.
    fake_openai.enqueue(fo.text_response("translated", usage=fo.usage(11, 3)), fo.text_response("completed"))
    await api.messages.create(model=OPENAI, max_tokens=64, messages=[user_msg()])
    oai = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    stream2 = await oai.chat.completions.create(model=OPENAI, messages=[user_msg()], stream=True)
    async for _ in stream2:
        pass
    fake_openai.enqueue(fo.error_status(401, "bad key"))
    with pytest.raises(openai.APIStatusError):
        await oai.chat.completions.create(model=OPENAI, messages=[user_msg()])

    gw = client.server.app[STATE.REGISTRY]
    await wait_until(lambda: _idle(gw))
    records = await gw.usage.records()
    after = await scrape(client, auth_headers)
    assert {r["endpoint"] for r in records} >= {"ws", "http", "anthropic", "openai"}

    def key(r: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        labels = {"model": metrics.model_label(r["model"]), "client": r["client"] or "", "endpoint": r["endpoint"]}
        return tuple(sorted(labels.items()))

    requests = Counter(key(r) for r in records if r["answered"] is not False)
    assert delta(after, before, "agentspace_requests_total") == {k: float(v) for k, v in requests.items()}
    errors = Counter(tuple(sorted((*key(r), ("code", r["error"])))) for r in records if r["error"])
    assert delta(after, before, "agentspace_errors_total") == {k: float(v) for k, v in errors.items()}
    assert {dict(k)["code"] for k in errors} >= {"NO_API_KEY", "LLM_ERROR"}
    assert any(r["finishReason"] == "aborted" for r in records)
    kinds = {
        "input": "inputTokens",
        "output": "outputTokens",
        "cache_read": "cacheReadTokens",
        "cache_write": "cacheWriteTokens",
        "reasoning": "reasoningTokens",
    }
    tokens: Counter[tuple[tuple[str, str], ...]] = Counter()
    for r in records:
        for kind, field in kinds.items():
            if r[field]:
                tokens[tuple(sorted((*key(r), ("kind", kind))))] += r[field]
    assert delta(after, before, "agentspace_tokens_total") == {k: float(v) for k, v in tokens.items()}
    cost: Counter[tuple[tuple[str, str], ...]] = Counter()
    for r in records:
        if r["totalCost"]:
            cost[key(r)] += r["totalCost"]
    assert delta(after, before, "agentspace_cost_usd_total") == pytest.approx(dict(cost))

    # The same totals as the usage report.
    report = await (await client.get("/api/usage", headers=auth_headers)).json()
    grand = report["grandTotal"]
    assert sum(delta(after, before, "agentspace_requests_total").values()) == grand["requestCount"]
    assert sum(delta(after, before, "agentspace_errors_total").values()) == grand["errorCount"]
    assert sum(delta(after, before, "agentspace_cost_usd_total").values()) == pytest.approx(grand["totalCost"])
    input_total = sum(delta(after, before, "agentspace_tokens_total", kind="input").values())
    assert input_total == grand["inputTokens"]

    # Histograms: one duration per call that reached the upstream, one TTFT per call that streamed output.
    durations = sum(delta(after, before, "agentspace_request_duration_seconds_count").values())
    assert durations == sum(1 for r in records if r["attempts"] > 0)
    ttfts = sum(delta(after, before, "agentspace_time_to_first_token_seconds_count").values())
    assert ttfts == sum(1 for r in records if r["ttftMs"] is not None) >= 8
    assert all(r["ttftMs"] is None or 0 <= r["ttftMs"] <= r["latencyMs"] for r in records)
    # Retries (the 429, and the 529 retried before the fallback) and the fallback.
    retries = sum(delta(after, before, "agentspace_upstream_retries_total").values())
    assert retries == sum(r["attempts"] - 1 for r in records if r["attempts"] > 1) >= 2
    assert delta(after, before, "agentspace_fallbacks_total") == {(("fallback", FALLBACK), ("model", ANTHROPIC)): 1.0}
    # Store writes: the usage store and the sessions were timed.
    stores = {dict(k)["store"] for k in delta(after, before, "agentspace_store_write_seconds_count")}
    assert {"sessions", "usage:tinydb", "usage:metrics"} <= stores
    # Nothing in flight afterwards; no session id or text in any label.
    assert all(v == 0 for (n, _), v in after.items() if n == "agentspace_streams_in_flight")
    labels = " ".join(f"{k}={v}" for (_, ls) in after for k, v in ls)
    assert "chat1" not in labels and "s_" not in labels and "Sunny" not in labels


def user_msg() -> dict[str, Any]:
    return {"role": "user", "content": "Hello"}


async def _idle(gw: Any) -> bool:
    return not gw.locks


async def test_streams_in_flight_counts_turns_and_v1_calls(
    app: Any, token: str, auth_headers: dict[str, str], fake_anthropic: fa.FakeAnthropic
) -> None:
    client = await app()
    fake_anthropic.enqueue(fa.text_response("slow", chunks=2).stall(30, after=4))
    fake_anthropic.enqueue(fa.text_response("slow too", chunks=2).stall(30, after=4))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "hi"})
    frames: list[dict[str, Any]] = []
    while not of(frames, "chat.stream.delta"):
        frames.append(await receive(ws))
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    async with api.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=[user_msg()]) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                break
        now = await scrape(client, auth_headers)
        assert now[("agentspace_streams_in_flight", (("endpoint", "ws"),))] == 1
        assert now[("agentspace_streams_in_flight", (("endpoint", "anthropic"),))] == 1
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    while frames[-1]["type"] != "chat.stream.end":
        frames.append(await receive(ws))
    await ws.close()
    gw = client.server.app[STATE.REGISTRY]

    async def settled() -> bool:
        samples = await scrape(client, auth_headers)
        return not gw.locks and all(v == 0 for (n, _), v in samples.items() if n == "agentspace_streams_in_flight")

    await wait_until(settled)


async def test_metrics_need_the_token_unless_public(app: Any, auth_headers: dict[str, str]) -> None:
    client = await app()
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/metrics", headers=auth_headers)).status == 200
    await client.close()  # one server per data directory
    public = await app(metrics={"public": True})
    resp = await public.get("/metrics")
    assert resp.status == 200 and "agentspace_requests_total" in await resp.text()
    assert (await public.get("/api/sessions")).status == 401  # only /metrics is opened


async def test_the_plugin_can_be_left_out(
    make_client: Callable[..., Awaitable[TestClient]], auth_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "")
    client = await make_client(pm=create_plugin_manager())
    assert (await client.get("/metrics", headers=auth_headers)).status == 404
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "echo,metrics")
    names = create_plugin_manager().list_name_plugin()
    assert "agentspace.default_plugins.metrics" in {name for name, _ in names}
    assert "agentspace.default_plugins.telemetry" not in {name for name, _ in names}


def test_model_labels_stay_few() -> None:
    assert metrics.model_label(ANTHROPIC) == ANTHROPIC  # in the price list
    assert metrics.model_label("ollama/some-private-fine-tune-1234") == "other"
    assert metrics.client_label("x" * 200) == "other"


def test_the_readme_names_every_metric_and_every_endpoint_label() -> None:
    """The README's metric table is what /metrics exports (the plugin's own metrics), and it
    names every endpoint a usage record may carry (a new /v1 endpoint is a new value of the label)."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(agentspace_\w+)` \|", readme, re.MULTILINE))
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
        if family.name.startswith("agentspace_")
    }
    assert rows == exported
    source = "\n".join(p.read_text(encoding="utf-8") for p in (root / "agentspace").rglob("*.py"))
    endpoints = set(re.findall(r'(?:^ENDPOINT = |endpoint=)"(\w+)"', source, re.MULTILINE))
    assert {"ws", "http", "anthropic", "openai", "responses", "embeddings"} <= endpoints
    line = re.search(r"^`endpoint` is (.*)$", readme, re.MULTILINE)
    assert line is not None and set(re.findall(r"`(\w+)`", line[1])) >= endpoints
    usage_line = re.search(r"^Usage records carry `client` and `endpoint` \(([^)]*)\)", readme, re.MULTILINE)
    assert usage_line is not None and set(re.findall(r"`(\w+)`", usage_line[1])) == endpoints


async def test_a_v1_call_answered_by_a_fallback_is_counted_as_one(
    app: Any, token: str, auth_headers: dict[str, str], fake_anthropic: fa.FakeAnthropic
) -> None:
    """On /v1 each attempt is its own provider call, the fallback's opened for the fallback's model: the counter
    still names the model the client asked for and the one that answered (it counted none there)."""
    client = await app(chat={"max_retries": 0}, models={"fallbacks": {ANTHROPIC: [FALLBACK]}})
    before = await scrape(client, auth_headers)
    fake_anthropic.enqueue(fa.error_status(529), fa.text_response("translated"))
    fake_anthropic.enqueue(fa.error_status(529), fa.text_response("relayed"))
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    reply = await api.chat.completions.create(model=ANTHROPIC, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "translated"
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    message = await ant.messages.create(model=ANTHROPIC, max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].type == "text" and message.content[0].text == "relayed"
    await api.close()
    await ant.close()
    after = await scrape(client, auth_headers)
    assert delta(after, before, "agentspace_fallbacks_total") == {(("fallback", FALLBACK), ("model", ANTHROPIC)): 2.0}
