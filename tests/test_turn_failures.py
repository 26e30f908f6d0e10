"""A failed turn does not break its session (issue 14 item 1), and its call is recorded as an error.

The upstream refuses the first call (500 after every retry, or 400 "prompt is too long"): the failed user
message stays stored, marked with the error, and the next message goes upstream as its own user turn, with
the failed one not resent. Over the WebSocket, over ``POST /api/chat``, and after a restart.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import pipeline
from agentspace.transports import state as STATE
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ui_stream import DONE, post_chat, read_all, user
from tests.support.ws import chat, connect, of
from tests.test_faults import RefusingUpstream

ANTHROPIC = "anthropic/claude-sonnet-4-5"
OPENAI = "openai/gpt-4o-mini"
OPENAI_KEY = "sk-openai-test-fedcba9876543210"
TOO_LONG = "prompt is too long: 250000 tokens > 200000 maximum"
HUGE = "paste " * 200
RETRIES = 2


@pytest.fixture
async def app(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], Awaitable[TestClient]]:
    """``await app()``: the real app with both providers; the shortest backoff between retries."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setattr(pipeline.random, "random", lambda: 0.0)
    # litellm takes seconds to import, more on a loaded machine: not inside a chat's receive timeout.
    await asyncio.to_thread(importlib.import_module, "litellm")

    async def make() -> TestClient:
        return await make_client(chat={"max_retries": RETRIES}, providers={"openai": {"base_url": fake_openai.url}})

    return make


def refusal(provider: str, kind: str) -> list[Any]:
    """What the upstream answers to the first call: 500 to every attempt, or one 400 "prompt is too long"."""
    if provider == "anthropic":
        return [fa.error_status(500)] * (RETRIES + 1) if kind == "500" else [fa.error_status(400, TOO_LONG)]
    return [fo.error_status(500)] * (RETRIES + 1) if kind == "500" else [fo.error_status(400, TOO_LONG)]


def user_turns(provider: str, body: dict[str, Any]) -> list[Any]:
    """The user turns of an upstream request body, as the provider's wire format has them (without the prompt
    cache's marks, tests/test_prompt_cache.py)."""

    def unmarked(content: Any) -> Any:
        if isinstance(content, list):
            return [{k: v for k, v in block.items() if k != "cache_control"} for block in content]
        return content

    return [unmarked(m["content"]) for m in body["messages"] if m["role"] == "user"]


def only_new_text(provider: str, text: str) -> list[Any]:
    return [[{"type": "text", "text": text}]] if provider == "anthropic" else [text]


async def check_failed_turn_is_marked(client: TestClient, session_id: str, code: str, attempts: int) -> None:
    gw = client.server.app[STATE.REGISTRY]
    failed_user, failed_answer = (await gw.sessions.get(session_id))["messages"]
    assert failed_user["role"] == "user" and failed_user["content"] == HUGE
    assert failed_user["error"]["code"] == code == failed_answer["error"]["code"]
    assert failed_answer["content"] == "" and failed_answer["finishReason"] == "error"
    (record,) = await gw.usage.records(session_id=session_id)
    # The upstream never answered: an error, not a request, and it bills nothing (issue 14 items 3 and 4).
    assert (record["answered"], record["error"], record["attempts"]) == (False, code, attempts)
    assert (record["inputTokens"], record["outputTokens"], record["totalCost"], record["estimated"]) == (0, 0, 0, False)


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("kind", ["500", "400"])
async def test_ws_failed_turn_leaves_the_session_usable(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, provider: str, kind: str
) -> None:
    fake = fake_anthropic if provider == "anthropic" else fake_openai
    model = ANTHROPIC if provider == "anthropic" else OPENAI
    client = await app()
    fake.enqueue(*refusal(provider, kind))
    ws = await connect(client, token)
    frames = await chat(ws, HUGE, "r1", model=model)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "LLM_ERROR"
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    attempts = RETRIES + 1 if kind == "500" else 1
    assert len(fake.requests) == attempts
    await check_failed_turn_is_marked(client, session_id, "LLM_ERROR", attempts)

    fake.enqueue(fa.text_response("fine") if provider == "anthropic" else fo.text_response("fine"))
    frames = await chat(ws, "hello", "r2", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end" and frames[-1]["finishReason"] == "stop"
    assert user_turns(provider, fake.requests[-1].body) == only_new_text(provider, "hello")

    # And the next one too: the (hello, fine) pair is history, the failed message still is not.
    frames = await chat(ws, "again", "r3", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end"
    assert user_turns(provider, fake.requests[-1].body) == [
        *only_new_text(provider, "hello"),
        *only_new_text(provider, "again"),
    ]
    await ws.close()


@pytest.mark.parametrize("kind", ["500", "400"])
async def test_http_failed_turn_leaves_the_session_usable(
    app: Any, auth_headers: dict[str, str], fake_anthropic: fa.FakeAnthropic, kind: str
) -> None:
    client = await app()
    fake_anthropic.enqueue(*refusal("anthropic", kind))
    resp = await post_chat(client, auth_headers, "chat1", user(HUGE, "u1"))
    chunks = await read_all(resp)
    assert chunks[-1] == DONE and chunks[-2]["type"] == "error"
    attempts = RETRIES + 1 if kind == "500" else 1
    await check_failed_turn_is_marked(client, "chat1", "LLM_ERROR", attempts)

    # useChat keeps the failed message in its list and sends it along with the next one.
    fake_anthropic.enqueue(fa.text_response("fine"))
    resp = await post_chat(client, auth_headers, "chat1", user(HUGE, "u1"), user("hello", "u2"))
    chunks = await read_all(resp)
    assert chunks[-2]["type"] == "finish"
    assert user_turns("anthropic", fake_anthropic.requests[-1].body) == only_new_text("anthropic", "hello")


async def test_failed_turn_is_not_resent_after_a_restart(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    first = await app()
    fake_anthropic.enqueue(fa.error_status(400, TOO_LONG))
    ws = await connect(first, token)
    frames = await chat(ws, HUGE)
    assert frames[-1]["type"] == "error"
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    await ws.close()
    await first.close()

    second = await app()  # a new app on the same data directory
    fake_anthropic.enqueue(fa.text_response("fine"))
    ws = await connect(second, token)
    frames = await chat(ws, "hello", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end"
    assert user_turns("anthropic", fake_anthropic.requests[-1].body) == only_new_text("anthropic", "hello")
    gw = second.server.app[STATE.REGISTRY]
    messages = (await gw.sessions.get(session_id))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["error"]["code"] == "LLM_ERROR" and "error" not in messages[2]
    await ws.close()


async def test_context_inspection_leaves_the_failed_message_out(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    client = await app()
    fake_anthropic.enqueue(fa.error_status(400, TOO_LONG))
    ws = await connect(client, token)
    frames = await chat(ws, HUGE)
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    await ws.send_json({"type": "context.inspect", "id": "i1", "sessionId": session_id})
    reply = await ws.receive_json(timeout=10)
    history = next(s for s in reply["sections"] if s["name"] == "history")
    assert history["byteCount"] == 0  # what the next call sends: not the failed message
    await ws.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_connection_refused_is_an_unanswered_error(
    make_client: Any, token: str, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setattr(pipeline.random, "random", lambda: 0.0)
    async with RefusingUpstream() as upstream:
        url = upstream.url + ("" if provider == "anthropic" else "/v1")
        client = await make_client(chat={"max_retries": RETRIES}, providers={provider: {"base_url": url}})
        ws = await connect(client, token)
        frames = await chat(ws, "hi", model=ANTHROPIC if provider == "anthropic" else OPENAI)
        await ws.close()
    assert frames[-1]["type"] == "error"
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    (record,) = await client.server.app[STATE.REGISTRY].usage.records(session_id=session_id)
    assert (record["answered"], record["error"], record["attempts"]) == (False, "LLM_ERROR", RETRIES + 1)
    assert (record["totalTokens"], record["totalCost"]) == (0, 0)


async def test_concurrent_first_requests_for_one_new_session(
    app: Any, auth_headers: dict[str, str], fake_anthropic: fa.FakeAnthropic
) -> None:
    """The session is claimed before the user message's (awaited) write: the second request is refused."""
    client = await app()
    fake_anthropic.enqueue(fa.text_response("one").with_delay(0.05))
    first, second = await asyncio.gather(
        post_chat(client, auth_headers, "race", user("a", "u1")),
        post_chat(client, auth_headers, "race", user("b", "u2")),
    )
    statuses = sorted([first.status, second.status])
    assert statuses == [200, 409]
    winner = first if first.status == 200 else second
    assert (await read_all(winner))[-1] == DONE
    messages = (await client.server.app[STATE.REGISTRY].sessions.get("race"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
