"""Server-tool fees from outside, on every way in, for litellm's providers as for Anthropic: an upstream that
reports web searches in its usage (OpenAI-compatible ``usage.server_tool_use.web_search_requests``,
Anthropic's ``server_tool_use``) makes a record with those uses and their fee, priced by ``[pricing."MODEL"]
web_search_per_use`` where set, and the fee counts in the client's budget (docs/accounting.md)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_clients import add_client
from tests.test_exact_records import ANTHROPIC, OPENAI, WAYS, o_sdk, records

# Per search: the [pricing] overrides below, unlike the cost map's $0.01 (Anthropic) and gpt-4o-mini's tiers.
PRICED = {OPENAI: 0.025, ANTHROPIC: 0.02}


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    await asyncio.to_thread(importlib.import_module, "litellm")
    return await make_client(
        providers={"openai": {"base_url": fake_openai.url}},
        pricing={model: {"web_search_per_use": fee} for model, fee in PRICED.items()},
    )


def searched(provider: str, n: int) -> tuple[fa.FakeResponse | fo.FakeResponse, str]:
    """An answer after ``n`` web searches, as the provider reports them in its usage."""
    if provider == "openai":
        usage = {**fo.usage(200, 20), "server_tool_use": {"web_search_requests": n}}
        return fo.text_response("Found it.", usage=usage), OPENAI
    final = {"input_tokens": 200, "output_tokens": 20, "server_tool_use": {"web_search_requests": n}}
    return fa.text_response("Found it.", usage={"input_tokens": 200}, delta_usages=[final]), ANTHROPIC


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_each_way_in_records_the_reported_searches_at_the_configured_price(
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
    answer, model = searched(provider, 2)
    (fake_openai if provider == "openai" else fake_anthropic).enqueue(answer)  # type: ignore[arg-type]
    await WAYS[way][0](client, key, model, stream)
    (record,) = await records(client)
    assert record["serverToolUse"] == {"web_search": 2}
    assert record["serverToolCost"] == pytest.approx(2 * PRICED[model])
    assert record["totalCost"] == pytest.approx(record["inputCost"] + record["outputCost"] + 2 * PRICED[model])
    assert record["estimated"] is False and record["endpoint"] == WAYS[way][1]


async def test_fees_of_a_litellm_model_spend_the_budget(client: TestClient, fake_openai: fo.FakeOpenAI) -> None:
    """Two searches at $0.025 spend a $0.05 budget; the tokens alone (a hundredth of a cent) would not."""
    key = add_client("acme", "--budget", "0.05")
    answer, _ = searched("openai", 2)
    fake_openai.enqueue(answer)
    api = o_sdk(client, key)
    messages: list[dict[str, str]] = [{"role": "user", "content": "Search"}]
    await api.chat.completions.create(model=OPENAI, messages=messages, max_tokens=20)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as refused:
        await api.chat.completions.create(model=OPENAI, messages=messages, max_tokens=20)  # type: ignore[arg-type]
    assert "BUDGET_EXCEEDED" in refused.value.message
    assert len(fake_openai.requests) == 1


def cut_after_two_searches() -> fa.FakeResponse:
    """Two web searches run (their results streamed), then the upstream's stream breaks off mid-answer:
    before the final ``message_delta`` that would report them."""
    blocks: list[fa.Block] = [fa.text_block("Let me search.", chunks=1)]
    for i in range(2):
        blocks.append(fa.server_tool_use_block(f"query {i}", id=f"srvtoolu_{i}"))
        blocks.append(
            fa.web_search_result_block([(f"https://example.com/{i}", f"Result {i}")], tool_use_id=f"srvtoolu_{i}")
        )
    blocks.append(fa.text_block("Found it all.", chunks=3))
    return fa.message_response(*blocks, usage={"input_tokens": 200}).cut_after(22)


@pytest.mark.parametrize("way", list(WAYS))
async def test_searches_that_ran_before_the_stream_broke_off_are_billed_as_estimated(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, way: str
) -> None:
    key = add_client("acme")
    fake_anthropic.enqueue(cut_after_two_searches())
    with contextlib.suppress(Exception):  # the client sees the stream break off, each API its own way
        await WAYS[way][0](client, key, ANTHROPIC, True)
    (record,) = await records(client)
    assert record["inputTokens"] == 200  # as reported in message_start
    assert record["serverToolUse"] == {"web_search": 2}
    assert record["serverToolCost"] == pytest.approx(2 * PRICED[ANTHROPIC])
    assert "serverToolUse" in record["estimatedFields"] and record["estimated"] is True


async def test_searches_of_a_stream_cut_by_a_crash_are_billed_after_the_restart(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """SIGKILL while three streams (passed through, translated, WebSocket) are past their two web searches:
    after the restart each recovered record bills the searches (estimated), the reported input kept."""
    blocks: list[fa.Block] = [fa.text_block("Let me search.", chunks=1)]
    for i in range(2):
        blocks.append(fa.server_tool_use_block(f"query {i}", id=f"srvtoolu_{i}"))
        blocks.append(fa.web_search_result_block([(f"https://example.com/{i}", f"R{i}")], tool_use_id=f"srvtoolu_{i}"))
    blocks.append(fa.text_block("word " * 100, chunks=100))
    fake_anthropic.default = fa.message_response(*blocks, usage={"input_tokens": 5000}).stall(120, after=25)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
        messages = [{"role": "user", "content": "Search"}]
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers=headers)
            await ws.send_json({"type": "chat.send", "id": "r1", "content": "Search"})
            while (await ws.receive_json(timeout=30))["type"] != "chat.stream.delta":
                pass
            for path, body in (
                ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True}),
                ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "stream": True}),
            ):
                resp = await http.post(server.url + path, json={**body, "messages": messages}, headers=headers)
                assert resp.status == 200
                await resp.content.readany()
            await asyncio.sleep(1.5)  # the ledger's notes are written within a second
            assert len(fake_anthropic.requests) == 3
            await server.kill()
    finally:
        await server.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        await restarted.wait_for_log("recovered")
    finally:
        await restarted.aclose()
    found = list(UsageStore(data_dir).records_sync())
    assert sorted(r["endpoint"] for r in found) == ["anthropic", "openai", "ws"]
    for record in found:
        assert record["recovered"] is True and record["inputTokens"] == 5000, record
        assert record["serverToolUse"] == {"web_search": 2} and record["serverToolCost"] == pytest.approx(0.02)
        assert "serverToolUse" in record["estimatedFields"], record
