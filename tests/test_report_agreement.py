"""Every usage report gives the same numbers (docs/accounting.md), on both storage backends: after a mixed run
against a real ``agentspace serve`` -- chat turns and /v1 calls, Anthropic and an OpenAI-compatible model
through litellm, embeddings, an upstream 500, a stream cut after ``message_start``, web searches --
``agentspace usage`` (every ``--by``, ``--json``), ``GET /api/usage`` (every ``by``, as the web app's usage
page asks for it) and the ``/metrics`` counters all equal the sums of the stored records, field by field."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentspace.storage.reports import REPORTS, SUMMED
from scripts.harness import write_config
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_server_tool_fee_column import run_cli, stored_records
from tests.test_web_app import Gateway, ThreadedFake, served

SONNET = "anthropic/claude-sonnet-4-5"
HAIKU = "anthropic/claude-haiku-4-5"
GPT = "openai/gpt-4o-mini"
EMBED = "openai/text-embedding-3-small"


class ThreadedOpenAI:
    """The fake OpenAI upstream on its own event loop in a thread (the gateway is another process)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake: fo.FakeOpenAI = asyncio.run_coroutine_threadsafe(fo.FakeOpenAI().start(), self.loop).result(10)

    def enqueue(self, *responses: fo.FakeResponse) -> None:
        self.loop.call_soon_threadsafe(self.fake.enqueue, *responses)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(params=["tinydb", "postgres"])
def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Gateway, ThreadedOpenAI]]:
    fake, openai_fake = ThreadedFake(), ThreadedOpenAI()
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-openai-test-0123456789")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    storage: dict[str, Any] = {"data_dir": str(data_dir)}
    if request.param == "postgres":
        storage |= {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
    config = tmp_path / "agentspace.toml"
    write_config(
        config,
        {
            "storage": storage,
            "models": {"default": SONNET},
            "chat": {"max_retries": 0},
            "thinking": {"enabled": False},
            "providers.anthropic": {"base_url": fake.fake.url},
            "providers.openai": {"base_url": openai_fake.fake.url, "api_key_env": "FAKE_OPENAI_KEY"},
        },
    )
    try:
        with served(tmp_path, config, data_dir, fake, launch=None, load_plugins="metrics") as gw:
            yield gw, openai_fake
    finally:
        fake.close()
        openai_fake.close()


def post(gateway: Gateway, path: str, body: dict[str, Any], key: str) -> Any:
    """A /v1 call as the SDKs send it; the JSON answer, or the raw body of a stream; None on an HTTP error."""
    req = urllib.request.Request(
        gateway.url + path,
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            raw = response.read()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, http.client.IncompleteRead, OSError):  # a stream cut mid-way
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def mixed_run(gateway: Gateway, openai_fake: ThreadedOpenAI, key: str) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    # /api/chat, Sonnet: cache reads and writes, two web searches.
    gateway.fake.enqueue(
        fa.message_response(
            fa.server_tool_use_block("q0", id="srvtoolu_0"),
            fa.web_search_result_block([("https://example.com/0", "Result 0")], tool_use_id="srvtoolu_0"),
            fa.server_tool_use_block("q1", id="srvtoolu_1"),
            fa.web_search_result_block([("https://example.com/1", "Result 1")], tool_use_id="srvtoolu_1"),
            fa.text_block("Two searches."),
            usage={"input_tokens": 1234, "cache_read_input_tokens": 567, "cache_creation_input_tokens": 89},
        )
    )
    gateway.chat("s1", "Look it up")
    # /api/chat: the upstream fails (no retry): an error, nothing billed.
    gateway.fake.enqueue(fa.error_status(500))
    gateway.chat("s2", "Fail")
    # /v1/messages, Haiku, a client's key, streamed and cut after message_start: input kept, output estimated.
    gateway.fake.enqueue(
        fa.text_response("alpha beta gamma delta ", chunks=4, usage={"input_tokens": 4321}).cut_after(5)
    )
    post(gateway, "/v1/messages", {"model": HAIKU, "max_tokens": 64, "messages": messages, "stream": True}, key)
    # /v1/messages, Haiku, whole: cache figures and two web searches.
    gateway.fake.enqueue(
        fa.text_response(
            "ok",
            usage={"input_tokens": 111, "cache_read_input_tokens": 222, "cache_creation_input_tokens": 333},
            delta_usages=[{"output_tokens": 44, "server_tool_use": {"web_search_requests": 2}}],
        )
    )
    post(gateway, "/v1/messages", {"model": HAIKU, "max_tokens": 64, "messages": messages}, key)
    # /v1/chat/completions and /v1/responses on the OpenAI model: cached and reasoning tokens.
    openai_fake.enqueue(fo.text_response("ok", usage=fo.usage(2000, 456, cached=700, reasoning=123)))
    post(gateway, "/v1/chat/completions", {"model": GPT, "messages": messages, "stream": True}, key)
    openai_fake.enqueue(fo.text_response("ok", usage=fo.usage(900, 80, cached=100, reasoning=30)))
    post(gateway, "/v1/responses", {"model": GPT, "input": "Hi", "store": False}, gateway.token)
    openai_fake.enqueue(fo.error_status(429))
    post(gateway, "/v1/chat/completions", {"model": GPT, "messages": messages}, key)
    # /v1/embeddings.
    openai_fake.loop.call_soon_threadsafe(setattr, openai_fake.fake, "embedding_tokens", 777)
    post(gateway, "/v1/embeddings", {"model": EMBED, "input": ["a b", "c"]}, key)


def ws_usage_report(gateway: Gateway, key: str, session: str | None = None) -> dict[str, Any]:
    async def query() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                gateway.url.replace("http", "ws", 1) + "/gateway", headers={"Authorization": f"Bearer {key}"}
            )
            await ws.send_json({"type": "usage.query", "id": "u1", **({"sessionId": session} if session else {})})
            while (frame := await ws.receive_json(timeout=10))["type"] != "usage.report":
                pass
            await ws.close()
            return dict(frame)

    return asyncio.run(query())


def sums(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What every grand total must be: the records summed as docs/accounting.md says."""
    return {
        **{f: sum(r[f] for r in records) for f in ("inputTokens", "outputTokens", "cacheReadTokens")},
        **{f: sum(r[f] for r in records) for f in ("cacheWriteTokens", "reasoningTokens", "totalTokens")},
        "totalCost": pytest.approx(sum(r["totalCost"] for r in records), abs=1e-9),
        "serverToolCost": pytest.approx(sum(r["serverToolCost"] for r in records), abs=1e-9),
        "serverToolUses": sum(sum(r["serverToolUse"].values()) for r in records),
        "requestCount": sum(1 for r in records if r["answered"]),
        "errorCount": sum(1 for r in records if r["error"]),
        "estimatedCount": sum(1 for r in records if r["estimated"]),
    }


def totals(t: dict[str, Any]) -> dict[str, Any]:
    return {f: t[f] for f in SUMMED}


def test_every_report_gives_the_numbers_of_the_records(gateway: tuple[Gateway, ThreadedOpenAI]) -> None:
    gw, openai_fake = gateway
    key = run_cli(gw, "clients", "add", "acme").strip()
    mixed_run(gw, openai_fake, key)
    records = stored_records(gw)
    # One record per upstream request.
    assert len(records) == len(gw.fake.fake.requests) + len(openai_fake.fake.requests) == 8
    expected = sums(records)
    assert expected["errorCount"] >= 3 and expected["estimatedCount"] >= 1 and expected["reasoningTokens"] == 153

    # agentspace usage --json, every grouping: the same grand total, and groups that add up to it.
    groupings = {"model": "perModel", "day": "perDay", "client": "perClient", "session": "perSession"}
    groupings |= {"deployment": "perDeployment", "endpoint": "perEndpoint"}
    for by, key_name in groupings.items():
        report = json.loads(run_cli(gw, "usage", f"--by-{by}", "--json"))
        assert totals(report["grandTotal"]) == expected, by
        api = gw.get(f"/api/usage?by={by}")
        assert api[key_name] == report[key_name], by  # the API and the CLI: the very same groups
        for field in ("totalTokens", "requestCount", "errorCount", "serverToolUses"):
            assert sum(g[field] for g in report[key_name].values()) == expected[field], (by, field)
    for by in REPORTS:  # every report of the API, the web app's included
        assert totals(gw.get(f"/api/usage?by={by}")["grandTotal"]) == expected, by
        assert totals(gw.get(f"/api/usage?by={by}&since=2000-01-01")["grandTotal"]) == expected, by

    # One session's usage, each way it can be asked for.
    s1 = sums([r for r in records if r["sessionId"] == "s1"])
    assert s1["serverToolUses"] == 2 and s1["cacheWriteTokens"] == 89
    assert totals(json.loads(run_cli(gw, "usage", "--session", "s1", "--json"))["grandTotal"]) == s1
    assert totals(gw.get("/api/usage?sessionId=s1")["grandTotal"]) == s1
    assert totals(ws_usage_report(gw, gw.token, "s1")["grandTotal"]) == s1

    # The WebSocket's usage.report, for the gateway token and for the client (its own records only); the same
    # client's GET /api/usage.
    mine = sums([r for r in records if r["client"] == "acme"])
    assert totals(ws_usage_report(gw, gw.token)["grandTotal"]) == expected
    assert totals(ws_usage_report(gw, key)["grandTotal"]) == mine
    assert totals(gw.get("/api/usage", key=key)["grandTotal"]) == mine

    # The client's spend, as the budget counts it (API and CLI): its records' cost, server-tool fees included.
    spend = sum(r["totalCost"] for r in records if r["client"] == "acme")
    assert sum(r["serverToolCost"] for r in records if r["client"] == "acme") == pytest.approx(0.02)
    assert gw.get("/api/clients/acme")["client"]["spend"]["usd"] == pytest.approx(spend, abs=1e-9)
    assert json.loads(run_cli(gw, "clients", "show", "acme", "--json"))["spend"]["usd"] == pytest.approx(
        spend, abs=1e-9
    )

    # /metrics: the counters of the same calls.
    req = urllib.request.Request(gw.url + "/metrics", headers={"Authorization": f"Bearer {gw.token}"})
    with urllib.request.urlopen(req, timeout=10) as response:
        samples = [s for f in text_string_to_metric_families(response.read().decode()) for s in f.samples]

    def metric(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    kinds = {"input": "inputTokens", "output": "outputTokens", "cache_read": "cacheReadTokens"}
    kinds |= {"cache_write": "cacheWriteTokens", "reasoning": "reasoningTokens"}
    for kind, field in kinds.items():
        assert metric("agentspace_tokens_total", kind=kind) == expected[field], kind
    assert metric("agentspace_cost_usd_total") == expected["totalCost"]
    assert metric("agentspace_server_tool_cost_usd_total") == expected["serverToolCost"]
    assert metric("agentspace_server_tool_uses_total") == expected["serverToolUses"]
    assert metric("agentspace_requests_total") == expected["requestCount"]
    assert metric("agentspace_errors_total") == expected["errorCount"]
