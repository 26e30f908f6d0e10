"""docs/accounting.md's worked example, run through the gateway: client ``ci-bot`` with a $0.25 monthly
budget, $0.04 spent, a WebSocket chat on Sonnet 4.5 with ``[chat] max_tokens = 4096`` and thinking on (budget
8000) whose first step counts 1,200 input tokens; a fake Anthropic upstream reports the example's usage. The
figures the doc gives are the ones the gateway reserves, refuses with, posts and recovers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from agentspace.storage.embedded.usage import UsageStore
from agentspace.tokens import count_tokens
from agentspace.transports import state
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ledgers import journal_entries, wait_for_notes
from tests.support.ws import chat, of, receive
from tests.test_clients import add_client, anthropic_sdk, bearer

MODEL = "anthropic/claude-sonnet-4-5"
DOC = Path(__file__).resolve().parent.parent / "docs" / "accounting.md"
# No system prompt: the step's whole input is the user's message, made to count 1,200 tokens.
CHAT = {"system_prompt": "", "formatting_prompt": "", "max_tokens": 4096}
QUESTION = "a" + " a" * 1199


def example() -> str:
    doc = DOC.read_text(encoding="utf-8")
    return " ".join(doc[doc.index("## A worked example") :].split())


async def spend_of(client: TestClient, name: str, token: str) -> float:
    resp = await client.get(f"/api/clients/{name}", headers=bearer(token))
    return float((await resp.json())["client"]["spend"]["usd"])


async def test_steps_one_to_four_are_what_the_gateway_does(
    make_client: Callable[..., Awaitable[TestClient]], fake_anthropic: fa.FakeAnthropic, token: str
) -> None:
    assert count_tokens(QUESTION) == 1200
    client = await make_client(chat=CHAT, thinking={"enabled": True, "budget_tokens": 8000})
    key = add_client("ci-bot", "--budget", "0.25")
    # $0.04 spent this month: 10,000 input tokens ($0.03) and a web search ($0.01).
    fake_anthropic.enqueue(
        fa.text_response(
            "earlier",
            usage={"input_tokens": 10000},
            delta_usages=[{"output_tokens": 0, "server_tool_use": {"web_search_requests": 1}}],
        )
    )
    await anthropic_sdk(client, key).messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "earlier"}]
    )
    assert await spend_of(client, "ci-bot", token) == pytest.approx(0.04)

    # 1-2. The turn goes upstream with max_tokens 12096; message_start reports 1,180 input tokens, then the
    # answer waits a moment (the call is in flight) and ends with 2,300 output tokens.
    fake_anthropic.enqueue(
        fa.text_response("The answer.", usage={"input_tokens": 1180}, delta_usages=[{"output_tokens": 2300}]).stall(
            3, after=3
        )
    )
    first = await client.ws_connect("/gateway", headers=bearer(key))
    await first.send_json({"type": "chat.send", "id": "r1", "content": QUESTION})
    frames = [await receive(first)]
    while len(fake_anthropic.requests) < 2:
        await asyncio.sleep(0.01)
    assert fake_anthropic.requests[1].body["max_tokens"] == 12096
    assert fake_anthropic.requests[1].body["thinking"] == {
        "type": "enabled",
        "budget_tokens": 8000,
        "display": "summarized",
    }

    # 3. A second chat meanwhile is refused, with what is left and what it needs.
    second = await client.ws_connect("/gateway", headers=bearer(key))
    refused = await chat(second, QUESTION)
    await second.close()
    assert refused[-1]["code"] == "BUDGET_EXCEEDED"
    text = example()
    assert "$0.02406 left" in refused[-1]["message"] and "$0.02406 left" in text
    # Checked before anything of it is stored: against its output, the least its first call reserves.
    assert "first call needs at least $0.18144" in refused[-1]["message"]
    assert "$0.04 + $0.18594 (in flight) + $0.18144 = $0.40738 > $0.25" in text
    assert "its first call needs at least $0.18144" in text
    assert len(fake_anthropic.requests) == 2  # the refused chat sent nothing

    # 4. The first call ends: posted at the reported figures; the spend is $0.07804.
    while frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(first))
    await first.close()
    assert frames[-1]["type"] == "chat.stream.end"
    session = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await client.app[state.REGISTRY].usage.records(session_id=session)
    assert (record["inputTokens"], record["outputTokens"], record["estimated"]) == (1180, 2300, False)
    assert record["totalCost"] == pytest.approx(0.03804)
    assert "Posted: $0.00354 + $0.0345 = $0.03804; spend is now $0.07804" in text
    assert await spend_of(client, "ci-bot", token) == pytest.approx(0.07804)


async def test_step_five_a_killed_server_posts_the_relayed_output_at_the_next_start(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    # 5. message_start reports 1,180 input tokens; 900 output tokens' worth of text (3,596 characters, about
    # four a token) reaches the client, then the upstream goes quiet and the server is killed.
    pieces = ["x" * 2048, "y" * 1024, "z" * 524]
    fake_anthropic.enqueue(
        fa.text_response("".join(pieces), chunks=pieces, usage={"input_tokens": 1180}).stall(120, after=6)
    )
    data_dir = tmp_path / "data"
    sections: dict[str, Any] = {"chat": CHAT, "thinking": {"enabled": True, "budget_tokens": 8000}}
    server = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers=bearer(server.token))
            await ws.send_json({"type": "chat.send", "id": "r1", "content": QUESTION})
            relayed = ""
            while len(relayed) < 3596:
                frame = json.loads((await ws.receive(timeout=30)).data)
                if frame["type"] == "chat.stream.delta":
                    relayed += frame.get("delta") or frame.get("text") or ""
            # The output relayed is noted every half second, written within a second (later under load).
            await wait_for_notes(lambda: journal_entries(data_dir), 1, lambda e: e.get("relayedTokens") == 900)
            await server.kill()
    finally:
        await server.aclose()

    restarted = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    try:
        await restarted.start()
        await restarted.wait_for_log("recovered")
    finally:
        await restarted.aclose()
    (record,) = list(UsageStore(data_dir).records_sync())
    assert (record["inputTokens"], record["outputTokens"]) == (1180, 900)
    assert (record["recovered"], record["estimatedFields"], record["error"]) == (True, ["outputTokens"], "INTERRUPTED")
    assert record["totalCost"] == pytest.approx(0.01704)
    assert (
        '900 output tokens (estimated), `recovered: true`, `estimatedFields: ["outputTokens"]`, $0.01704' in example()
    )
