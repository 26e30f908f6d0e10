"""One rule for the usage of a call cut short (docs/accounting.md, "What estimated means"): the same upstream
behaviour gives the same record on every path -- a WebSocket turn, ``/v1/messages`` (relayed to Anthropic) and
``/v1/chat/completions`` (translated), each left by its client mid-stream, and the same three streams cut by a
SIGKILL and recovered at the next start. A real ``agentspace serve`` against the fake Anthropic upstream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentspace.storage.embedded.usage import UsageStore
from agentspace.storage.ledger import read_journal
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ledgers import journal_entries, wait_for_notes

PROMPT = "Tell me about the weather on the coast this week."


def searches_then_text(input_tokens: int) -> fa.FakeResponse:
    """Two web searches run (billed as they run; their count comes with the final message_delta), then text."""
    blocks: list[fa.Block] = [fa.text_block("Let me search.", chunks=1)]
    for i in range(2):
        blocks.append(fa.server_tool_use_block(f"query {i}", id=f"srvtoolu_{i}"))
        blocks.append(fa.web_search_result_block([(f"https://example.com/{i}", f"R{i}")], tool_use_id=f"srvtoolu_{i}"))
    blocks.append(fa.text_block("word " * 100, chunks=100))
    return fa.message_response(*blocks, usage={"input_tokens": input_tokens}).stall(120, after=25)


# name: (the upstream's answer, stalled before its end; the fields every record names; output beyond the report)
BEHAVIOURS: dict[str, tuple[Any, list[str], bool]] = {
    # message_start reported 4321 input and 1 output token, then text: the output is counted here.
    "text after the report": (
        lambda: fa.text_response("word " * 60, chunks=60, usage={"input_tokens": 4321}).stall(120, after=8),
        ["outputTokens"],
        True,
    ),
    # message_start alone: every figure is the upstream's (its output of 1 too), nothing is named.
    "the report alone": (
        lambda: fa.text_response("word " * 60, chunks=60, usage={"input_tokens": 555}).stall(120, after=1),
        [],
        False,
    ),
    # Server tools seen to run and text: both named, in the one order.
    "searches and text": (lambda: searches_then_text(777), ["outputTokens", "serverToolUse"], True),
}


async def open_streams(http: aiohttp.ClientSession, server: GatewayProcess) -> list[Any]:
    """A stream on each of the three ways in, each past its upstream's first event."""
    headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
    messages = [{"role": "user", "content": PROMPT}]
    ws = await http.ws_connect(server.ws_url, headers=headers)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": PROMPT})
    while (await ws.receive_json(timeout=30))["type"] != "chat.stream.start":
        pass
    held: list[Any] = [ws]
    for path, body in (
        ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True}),
        ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "stream": True}),
    ):
        resp = await http.post(server.url + path, json={**body, "messages": messages}, headers=headers)
        assert resp.status == 200, await resp.text()
        held.append(resp)
    return held


def noted(with_output: bool, fields: list[str]) -> Any:
    """The entry's notes a record relies on: the report (with the server tools seen), and the output relayed."""

    def check(entry: dict[str, Any]) -> bool:
        usage = entry.get("usage")
        if not isinstance(usage, dict):
            return False
        if "serverToolUse" in fields and "serverToolUse" not in (usage.get("estimatedFields") or ()):
            return False
        return not with_output or int(entry.get("relayedTokens") or 0) > 0

    return check


async def until(done: Any) -> None:
    """Poll ``done()`` (a thread) until it is true, or fail after 30 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not await asyncio.to_thread(done):
        assert loop.time() < deadline, f"not yet: {done.__doc__}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
async def test_a_call_cut_short_names_the_same_estimated_fields_on_every_path_live_and_recovered(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, behaviour: str
) -> None:
    answer, fields, with_output = BEHAVIOURS[behaviour]
    fake_anthropic.default = answer()
    data_dir = tmp_path / "data"
    # A WebSocket client that leaves stops its turn, as a /v1 client that leaves stops its call.
    server = GatewayProcess(data_dir, fake_anthropic.url, chat={"on_disconnect": "abort"})
    check = noted(with_output, fields)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            left = await open_streams(http, server)
            await wait_for_notes(lambda: journal_entries(data_dir), 3, check)
            ws, *responses = left  # the clients leave mid-stream
            await ws.close()
            for resp in responses:
                resp.close()

            def recorded_and_closed() -> bool:
                """the left calls recorded, their ledger entries closed"""
                journal = [e for path in (data_dir / "ledger").glob("journal-*.jsonl") for e in read_journal(path)]
                return len(list(UsageStore(data_dir).records_sync())) == 3 and not journal

            await until(recorded_and_closed)
            held = await open_streams(http, server)  # open until the kill
            await wait_for_notes(lambda: journal_entries(data_dir), 3, check)
            assert len(fake_anthropic.requests) == 6
            await server.kill()
            assert len(held) == 3
    finally:
        await server.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        assert await restarted.terminate() == 0
    finally:
        await restarted.aclose()
    found = list(UsageStore(data_dir).records_sync())
    got = {
        (r["recovered"], r["endpoint"]): (
            r["answered"],
            r["estimatedFields"],
            r["estimated"],
            r["finishReason"],
            r["error"],
        )
        for r in found
    }
    # Stopped before its end, live: said so on every transport (a recovery says INTERRUPTED).
    ended = {False: ("aborted", "ABORTED"), True: ("error", "INTERRUPTED")}
    assert got == {
        (recovered, endpoint): (True, fields, bool(fields), *ended[recovered])
        for recovered in (False, True)
        for endpoint in ("anthropic", "openai", "ws")
    }
    assert len(found) == 6
    reported_input = {r["inputTokens"] for r in found}
    assert len(reported_input) == 1 and reported_input != {0}, found  # message_start's, on every path
    for r in found:
        assert r["outputTokens"] > 1 if with_output else r["outputTokens"] == 1, r  # 1: message_start's
