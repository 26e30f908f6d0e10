"""A real ``agentspace serve`` killed (SIGKILL) while streams run on every way in, to both providers, for a
client with a budget and for the gateway token (no budget: its input is counted while the call runs), then
started twice: each stream has exactly one record, recovered, never a second one at the second start. An
Anthropic call keeps the input its ``message_start`` reported; an OpenAI call, which reports usage only at
its end, is billed the input counted here and the output relayed, both estimated (docs/accounting.md)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ledgers import journal_entries, wait_for_notes
from tests.test_reports_every_surface import run_cli

GPT = "openai/gpt-4o-mini"
SONNET = "anthropic/claude-sonnet-4-5"
PROMPT = "Tell me about the weather on the coast this week. " * 10


def bodies(model: str) -> list[tuple[str, dict[str, Any]]]:
    messages = [{"role": "user", "content": PROMPT}]
    return [
        ("/v1/chat/completions", {"model": model, "messages": messages, "stream": True}),
        (
            "/v1/chat/completions",
            {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": False}},
        ),
        ("/v1/responses", {"model": model, "input": PROMPT, "stream": True, "store": False}),
        ("/v1/messages", {"model": model, "messages": messages, "stream": True, "max_tokens": 500}),
    ]


async def test_killed_mid_stream_on_every_way_and_started_twice_records_each_stream_once(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-openai-0123456789")
    sections: Any = {"providers.openai": {"base_url": fake_openai.url, "api_key_env": "FAKE_OPENAI_KEY"}}
    data_dir = tmp_path / "data"
    fake_openai.default = fo.text_response("word " * 60, chunks=60, usage=fo.usage(2000, 60)).stall(120, after=6)
    fake_anthropic.default = fa.text_response("word " * 60, chunks=60, usage={"input_tokens": 4321}).stall(120, after=8)
    server = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    held: list[Any] = []  # the streams, open until the kill
    try:
        await server.start()
        key = (await asyncio.to_thread(run_cli, server, "clients", "add", "acme", "--budget", "5")).strip()
        async with aiohttp.ClientSession() as http:
            for credential in (key, server.token):
                headers = {"Authorization": f"Bearer {credential}", "anthropic-version": "2023-06-01"}
                for model in (GPT, SONNET):
                    for path, body in bodies(model):
                        resp = await http.post(server.url + path, json=body, headers=headers)
                        assert resp.status == 200, await resp.text()
                        await resp.content.readuntil(b"\n\n")  # output is flowing
                        held.append(resp)
                    ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {credential}"})
                    await ws.send_json({"type": "chat.send", "id": "r1", "content": PROMPT, "model": model})
                    while (await ws.receive_json(timeout=30))["type"] != "chat.stream.delta":
                        pass
                    held.append(ws)
            assert len(fake_anthropic.requests) + len(fake_openai.requests) == len(held) == 20

            def noted(entry: dict[str, Any]) -> bool:
                # The output relayed, and the input: reported (Anthropic), else counted here (OpenAI).
                has_input = isinstance(entry.get("usage"), dict) or int(entry.get("inputTokens") or 0) > 0
                return has_input and int(entry.get("relayedTokens") or 0) > 0

            await wait_for_notes(lambda: journal_entries(data_dir), len(held), noted)
            await server.kill()
    finally:
        await server.aclose()
    assert list(UsageStore(data_dir).records_sync()) == []  # nothing was posted before the kill

    for start in range(2):
        restarted = GatewayProcess(data_dir, fake_anthropic.url, **sections)
        try:
            await restarted.start()
            async with aiohttp.ClientSession() as http:
                listed = await http.get(
                    restarted.url + "/api/clients", headers={"Authorization": f"Bearer {restarted.token}"}
                )
                (acme,) = (await listed.json())["clients"]
            assert await restarted.terminate() == 0
        finally:
            await restarted.aclose()
        found = list(UsageStore(data_dir).records_sync())
        # The recovered calls are the client's spend, in every view; nothing of the dead process stays held.
        spent = sum(r["totalCost"] for r in found if r["client"] == "acme")
        assert acme["spend"]["usd"] == pytest.approx(spent) and acme["spend"]["inFlightUsd"] == 0
        assert f"${spent:.6f} / $5.0000 month" in await asyncio.to_thread(run_cli, restarted, "clients", "list")
        assert len(found) == len({r["id"] for r in found}) == len(held), f"start {start + 1}"
        assert sorted((r["client"], r["model"], r["endpoint"]) for r in found) == sorted(
            (client, model, endpoint)
            for client in ("acme", "admin")
            for model in (GPT, SONNET)
            for endpoint in ("openai", "openai", "responses", "anthropic", "ws")
        )
        for r in found:
            assert (r["recovered"], r["answered"], r["error"]) == (True, True, "INTERRUPTED"), r
            assert r["outputTokens"] > 0 and r["totalCost"] > 0
            if r["model"] == SONNET:
                assert (r["inputTokens"], r["estimatedFields"]) == (4321, ["outputTokens"]), r
            else:
                assert r["inputTokens"] > 0 and r["estimatedFields"] == ["inputTokens", "outputTokens"], r
    assert list((data_dir / "ledger").glob("journal-*.jsonl")) == []


async def test_a_pass_through_stream_killed_before_its_message_start_is_voided_as_when_its_client_leaves(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """An Anthropic stream is answered at its ``message_start`` (docs/accounting.md): relayed as-is, one whose
    upstream sent its status and headers and nothing more is voided when its client leaves
    (test_v1_client_turns.py), and so when the process dies then. A second stream, whose ``message_start`` is
    noted, shows the first one's notes are written too (a journal batch writes every entry noted before it)."""
    data_dir = tmp_path / "data"
    fake_anthropic.enqueue(
        fa.text_response("late", usage={"input_tokens": 4321}).stall(120, after=0),  # headers, then nothing
        fa.text_response("word " * 10, chunks=10, usage={"input_tokens": 555}).stall(120, after=1),
    )
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        key = (await asyncio.to_thread(run_cli, server, "clients", "add", "acme", "--budget", "5")).strip()
        headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        body = {"model": SONNET, "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 500}
        async with aiohttp.ClientSession() as http:
            held = [await http.post(server.url + "/v1/messages", json=body, headers=headers) for _ in range(2)]
            assert [resp.status for resp in held] == [200, 200]  # the gateway relays the upstream's headers
            await wait_for_notes(lambda: journal_entries(data_dir), 1, lambda e: isinstance(e.get("usage"), dict))
            await server.kill()
    finally:
        await server.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        assert await restarted.terminate() == 0
    finally:
        await restarted.aclose()
    found = sorted(UsageStore(data_dir).records_sync(), key=lambda r: r["inputTokens"])
    got = [(r["recovered"], r["answered"], r["inputTokens"], r["estimatedFields"]) for r in found]
    # The second stream's message_start reported its input and output (1), and nothing followed: every figure is
    # the upstream's, as when its client leaves then (docs/accounting.md, "What estimated means").
    assert got == [(True, False, 0, []), (True, True, 555, [])]
    assert found[0]["totalCost"] == 0


async def test_a_journal_a_kill_left_unnamed_is_removed_at_the_next_start_and_a_young_one_kept(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A process killed between creating its journal and naming it leaves an empty ``.creating`` file; the next
    start removes it. One made in the last minute may be another process's, not yet locked: it stays."""
    ledger = tmp_path / "data" / "ledger"
    ledger.mkdir(parents=True)
    old = ledger / ".journal-4242-deadbeef.jsonl.creating"
    young = ledger / ".journal-4343-cafef00d.jsonl.creating"
    old.touch()
    young.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    try:
        await server.start()
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    assert not old.exists()
    assert young.exists()
