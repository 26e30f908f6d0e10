"""Issue 24 (one metered call) tried once more from outside: what a client is told a turn cost against the
records the turn made, through the real WebSocket and ``/api/chat``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentspace.storage.embedded.usage import UsageStore
from tests.fakes import anthropic_upstream as fa
from tests.support.ws import chat, connect, of
from tests.test_clients import add_client, bearer


def answered_then_failed() -> fa.FakeResponse:
    """An attempt the upstream answered (its message_start reported 5000 input tokens, which it bills) and
    then failed with a retryable error before any text."""
    events = list(fa.error_event().events)
    name, start = events[0]
    assert name == "message_start" and isinstance(start, dict)
    start["message"]["usage"]["input_tokens"] = 5000
    return fa.FakeResponse(tuple(events))


def turn_records(home: Path) -> list[dict[str, Any]]:
    return sorted(UsageStore(home).records_sync(), key=lambda r: r["timestamp"])


@pytest.mark.parametrize("transport", ["ws", "http"])
async def test_a_turns_usage_sums_the_record_of_an_attempt_retried_after_the_upstream_answered(
    make_client: Any, fake_anthropic: fa.FakeAnthropic, token: str, isolated_env: Path, transport: str
) -> None:
    """docs/protocol.md: "`usage` in `chat.stream.end` and the `finish` chunk is the sum of the turn's records".
    An attempt the upstream answered and then failed is retried as a call of its own, with its own record
    (docs/accounting.md); the turn's usage left it out: the client was told $0.01503 for a turn whose records
    billed $0.030045."""
    client = await make_client()
    fake_anthropic.enqueue(answered_then_failed(), fa.text_response("fine", usage={"input_tokens": 5000}))
    if transport == "ws":
        ws = await connect(client, token)
        frames = await chat(ws, "hi")
        await ws.close()
        (end,) = of(frames, "chat.stream.end")
        usage = end["usage"]
    else:
        body = {"id": "s1", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
        async with client.post("/api/chat", json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
            chunks = [json.loads(line[6:]) for line in (await resp.text()).splitlines() if line[6:].startswith("{")]
        (finish,) = [c for c in chunks if c["type"] == "finish"]
        usage = finish["messageMetadata"]["usage"]
    records = turn_records(isolated_env)
    assert [(r["inputTokens"], r["error"]) for r in records] == [(5000, "LLM_ERROR"), (5000, None)], records
    assert usage["inputTokens"] == 10000, usage
    assert usage["totalCost"] == pytest.approx(sum(r["totalCost"] for r in records)), (usage, records)
    # The session's stored answer says the same.
    async with client.get("/api/sessions", headers={"Authorization": f"Bearer {token}"}) as resp:
        (session,) = (await resp.json())["sessions"]
    async with client.get(f"/api/sessions/{session['id']}", headers={"Authorization": f"Bearer {token}"}) as resp:
        messages = (await resp.json())["session"]["messages"]
    assert messages[-1]["usage"]["inputTokens"] == 10000, messages[-1]


ADAPTIVE = "anthropic/claude-sonnet-4-6"  # takes adaptive thinking: the providers send it that way


async def test_a_call_with_adaptive_thinking_is_reserved_at_the_max_tokens_it_is_sent_with(
    make_client: Any, fake_anthropic: fa.FakeAnthropic
) -> None:
    """docs/accounting.md: a reservation is the most the request as sent can cost, and adaptive thinking stays
    within ``max_tokens``. A model that takes adaptive thinking is sent it (max_tokens 1000 with
    ``reasoning_effort: "high"``; a chat turn's 4096), but was reserved as if sent the budget form (17000 and
    12096 output tokens): a client with $0.10 left was refused calls that could cost at most $0.016 and $0.062,
    told they "may cost up to $0.255003"."""
    client = await make_client(thinking={"enabled": True, "budget_tokens": 8000}, chat={"max_tokens": 4096})
    key = add_client("tight", "--budget", "0.1")
    calls = {
        "/v1/chat/completions": {
            "model": ADAPTIVE,
            "max_tokens": 1000,
            "reasoning_effort": "high",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/v1/responses": {"model": ADAPTIVE, "max_output_tokens": 1000, "reasoning": {"effort": "high"}, "input": "hi"},
    }
    for path, body in calls.items():
        async with client.post(path, json=body, headers=bearer(key)) as resp:
            assert resp.status == 200, (path, await resp.text())
        sent = fake_anthropic.requests[-1].body
        assert (sent["max_tokens"], sent["thinking"]["type"]) == (1000, "adaptive"), (path, sent)
    ws = await connect(client, key)
    frames = await chat(ws, "hi", model=ADAPTIVE)
    await ws.close()
    assert of(frames, "chat.stream.end"), frames
    sent = fake_anthropic.requests[-1].body
    assert (sent["max_tokens"], sent["thinking"]["type"]) == (4096, "adaptive"), sent
