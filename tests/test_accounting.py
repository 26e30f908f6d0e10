"""What the upstream reported is never replaced by an estimate (issue 14 item 3, docs/accounting.md).

A stream cut, aborted or left by its client after ``message_start`` keeps the input and cache tokens the
upstream reported, and only the output it did not report is counted locally (``estimatedFields``). A call
the upstream never answered bills nothing. Each record says whether the upstream answered, the error, and
how many attempts the call took (issue 14 item 4). Through the WebSocket and ``POST /api/chat`` against
the fake upstreams; every record is compared with what the fake reported.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import pipeline
from agentspace.transports import state as STATE
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ui_stream import post_chat, user
from tests.support.ws import chat, connect, of, receive

ANTHROPIC = "anthropic/claude-sonnet-4-5"
OPENAI = "openai/gpt-4o-mini"
OPENAI_KEY = "sk-openai-test-fedcba9876543210"
CHUNKS = ["alpha ", "beta ", "gamma ", "delta "]
PARTIAL = "".join(CHUNKS)
# What the fake Anthropic reports in message_start: a small input, so an estimate of the prompt would differ.
REPORTED = {"input_tokens": 12, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3, "output_tokens": 1}


@pytest.fixture
async def app(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Awaitable[TestClient]]:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setattr(pipeline.random, "random", lambda: 0.0)
    # litellm takes seconds to import, more on a loaded machine: not inside a chat's receive timeout.
    await asyncio.to_thread(importlib.import_module, "litellm")

    async def make(**sections: Any) -> TestClient:
        sections.setdefault("providers", {"openai": {"base_url": fake_openai.url}})
        return await make_client(**sections)

    return make


async def records_of(client: TestClient, session_id: str) -> list[dict[str, Any]]:
    return await client.server.app[STATE.REGISTRY].usage.records(session_id=session_id)


async def last_message(client: TestClient, session_id: str) -> dict[str, Any]:
    return (await client.server.app[STATE.REGISTRY].sessions.get(session_id))["messages"][-1]


def assert_reported_input_kept(record: dict[str, Any]) -> None:
    assert (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"]) == (12, 5, 3)
    assert record["estimated"] is True and record["estimatedFields"] == ["outputTokens"]
    assert record["outputTokens"] > 1  # counted from the text streamed after the report
    assert record["answered"] is True


async def test_stream_cut_after_message_start_keeps_the_reported_input(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    client = await app()
    # message_start, ping, content_block_start, two deltas, then the connection drops.
    fake_anthropic.enqueue(fa.text_response(PARTIAL, chunks=CHUNKS, usage=REPORTED).cut_after(5))
    ws = await connect(client, token)
    frames = await chat(ws, "a question long enough that counting it locally would not give twelve tokens " * 3)
    assert frames[-1]["type"] == "error"
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await records_of(client, session_id)
    assert_reported_input_kept(record)
    assert (record["error"], record["attempts"], record["finishReason"]) == ("LLM_ERROR", 1, "error")
    message = await last_message(client, session_id)
    assert message["estimated"] is True and message["estimatedFields"] == ["outputTokens"]
    assert message["usage"]["inputTokens"] == 12 and message["usage"]["cacheReadTokens"] == 5
    await ws.close()


async def test_ws_abort_mid_stream_keeps_the_reported_input(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    client = await app()
    fake_anthropic.enqueue(fa.text_response(PARTIAL, chunks=CHUNKS, usage=REPORTED).stall(30, after=5))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "hi"})
    frames = []
    while len(of(frames, "chat.stream.delta")) < 2:
        frames.append(await receive(ws))
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    while frames[-1]["type"] != "chat.stream.end":
        frames.append(await receive(ws))
    assert frames[-1]["finishReason"] == "aborted"
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await records_of(client, session_id)
    assert_reported_input_kept(record)
    # A call stopped before its end says so in its error, which the reports count (docs/accounting.md).
    assert (record["error"], record["finishReason"]) == ("ABORTED", "aborted")
    assert frames[-1]["usage"]["inputTokens"] == 12
    await ws.close()


async def test_http_disconnect_with_abort_keeps_the_reported_input(
    app: Any, auth_headers: dict[str, str], fake_anthropic: fa.FakeAnthropic
) -> None:
    client = await app(chat={"on_disconnect": "abort"})
    fake_anthropic.enqueue(fa.text_response(PARTIAL, chunks=CHUNKS, usage=REPORTED).stall(30, after=5))
    resp = await post_chat(client, auth_headers, "chat1", user("hi"))
    seen = b""
    while seen.count(b"text-delta") < 2:
        seen += await asyncio.wait_for(resp.content.readany(), 10)
    resp.close()  # the client goes away mid-answer
    gw = client.server.app[STATE.REGISTRY]

    async def stored() -> bool:
        return "chat1" not in gw.locks and len(await gw.usage.records(session_id="chat1")) == 1

    await wait_until(stored)
    (record,) = await records_of(client, "chat1")
    assert_reported_input_kept(record)
    assert (record["error"], record["finishReason"]) == ("ABORTED", "aborted")


async def test_provider_without_usage_estimates_input_and_output(
    app: Any, token: str, fake_openai: fo.FakeOpenAI
) -> None:
    client = await app()
    fake_openai.enqueue(fo.text_response(PARTIAL, chunks=CHUNKS).cut_after(3))
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model=OPENAI)
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await records_of(client, session_id)
    assert record["estimatedFields"] == ["inputTokens", "outputTokens"] and record["estimated"] is True
    assert record["inputTokens"] > 0 and record["outputTokens"] > 0 and record["answered"] is True
    await ws.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_complete_answer_bills_exactly_what_was_reported(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, provider: str
) -> None:
    client = await app(chat={"max_retries": 2})
    if provider == "anthropic":
        fake_anthropic.enqueue(
            fa.error_status(429, retry_after=0.05),
            fa.text_response("ok", usage=REPORTED, delta_usages=[{"output_tokens": 9}]),
        )
        expected = (12, 9, 5, 3)
    else:
        fake_openai.enqueue(
            fo.error_status(429, retry_after=0.05), fo.text_response("ok", usage=fo.usage(20, 9, cached=5))
        )
        expected = (15, 9, 5, 0)
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model=ANTHROPIC if provider == "anthropic" else OPENAI)
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await records_of(client, session_id)
    assert (
        record["inputTokens"],
        record["outputTokens"],
        record["cacheReadTokens"],
        record["cacheWriteTokens"],
    ) == expected
    assert (record["estimated"], record["estimatedFields"], record["answered"], record["error"]) == (
        False,
        [],
        True,
        None,
    )
    assert record["attempts"] == 2  # the 429 and the call that answered
    await ws.close()


# --- calls the upstream never answered bill nothing ----------------------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_abort_sent_with_the_send_bills_nothing(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, provider: str
) -> None:
    client = await app()
    fake = fake_anthropic if provider == "anthropic" else fake_openai
    model = ANTHROPIC if provider == "anthropic" else OPENAI
    ws = await connect(client, token)
    # Both frames in one write to the socket: the abort is read right after the send.
    send = json.dumps({"type": "chat.send", "id": "r1", "content": "hi", "model": model})
    abort = json.dumps({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    await ws.send_str(send)
    await ws.send_str(abort)
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(ws))
    assert frames[-1]["type"] == "chat.stream.end" and frames[-1]["finishReason"] == "aborted"
    assert frames[-1]["usage"]["totalTokens"] == 0 and frames[-1]["usage"]["totalCost"] == 0
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    records = await records_of(client, session_id)
    assert all(r["totalTokens"] == 0 and r["totalCost"] == 0 and r["answered"] is False for r in records)
    if not fake.requests:
        assert records == []  # no provider call, no record
    message = await last_message(client, session_id)
    assert message["aborted"] is True and message["usage"]["totalTokens"] == 0 and message["estimated"] is False
    await ws.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_abort_during_a_retry_after_wait_bills_nothing(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, provider: str
) -> None:
    client = await app(chat={"max_retries": 3})
    if provider == "anthropic":
        fake: Any = fake_anthropic
        fake.enqueue(fa.error_status(429, retry_after=20), fa.text_response("too late"))
    else:
        fake = fake_openai
        fake.enqueue(fo.error_status(429, retry_after=20), fo.text_response("too late"))
    ws = await connect(client, token)
    await ws.send_json(
        {"type": "chat.send", "id": "r1", "content": "hi", "model": ANTHROPIC if provider == "anthropic" else OPENAI}
    )
    while not fake.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the 429 has been read: the turn waits out its Retry-After
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(ws))
    assert frames[-1]["finishReason"] == "aborted" and frames[-1]["usage"]["totalTokens"] == 0
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await records_of(client, session_id)
    assert (record["totalTokens"], record["totalCost"], record["estimated"]) == (0, 0, False)
    assert (record["answered"], record["attempts"], record["finishReason"]) == (False, 1, "aborted")
    await ws.close()
