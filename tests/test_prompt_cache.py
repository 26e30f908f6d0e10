"""Automatic prompt caching of gateway-kept sessions, measured against the fake Anthropic upstream's prompt
cache (tests/fakes/anthropic_upstream.py, ``caching=True``), and the inspector's prediction of it."""

from __future__ import annotations

import asyncio
import importlib
import json
import random
from typing import Any

from aiohttp.test_utils import TestClient

from agentspace import Tool, hookimpl
from agentspace.pricing import cost_map, model_info
from agentspace.transports import state
from agentspace.types import ChatMessage, TextPart
from tests.fakes.anthropic_upstream import text_response, tool_use_response
from tests.fakes.openai_upstream import stream_response, text_deltas, tool_calls_response
from tests.fakes.openai_upstream import text_response as openai_text
from tests.fakes.openai_upstream import tool_call as openai_tool_call
from tests.fakes.openai_upstream import usage as openai_usage
from tests.support.ws import chat, connect, receive_after
from tests.test_litellm_provider import collect, make_request
from tests.tool_plugins import WeatherTools

MODEL = "anthropic/claude-sonnet-4-5"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo plans".split()


def turn_text(turn: int, size: int = 10_000) -> str:
    """About ``size`` bytes of prose, different for every turn."""
    rng = random.Random(turn)
    words: list[str] = [f"Turn {turn}:"]
    length = len(words[0])
    while length < size:
        words.append(rng.choice(WORDS) + ("." if rng.random() < 0.08 else ""))
        length += len(words[-1]) + 1
    return " ".join(words)


def breakpoints(body: dict[str, Any]) -> int:
    count = sum(1 for t in body.get("tools") or [] if "cache_control" in t)
    system = body.get("system")
    if isinstance(system, list):
        count += sum(1 for b in system if "cache_control" in b)
    for m in body["messages"]:
        if isinstance(m["content"], list):
            count += sum(1 for b in m["content"] if "cache_control" in b)
    return count


async def test_twenty_turns_read_what_the_last_wrote(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.caching = True
    info = model_info(_config(client), MODEL)
    ws = await connect(client, token)
    session_id: str | None = None
    billed: list[float] = []
    uncached: list[float] = []
    for turn in range(1, 21):
        text = turn_text(turn)
        predicted = None
        if session_id is not None:
            frame = {"type": "context.inspect", "id": f"i{turn}", "sessionId": session_id, "userMessage": text}
            reply = await receive_after(ws, frame)
            predicted = reply["totals"]
            names = {s["name"]: s for s in reply["sections"]}
            assert names["history"]["cache"] in ("read", "read+write")
            assert names["user_message"]["cache"] == "write"
            assert predicted["promptCache"] == "auto"
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, text, f"r{turn}", **extra)
        end = frames[-1]
        assert end["type"] == "chat.stream.end", end
        session_id = frames[0]["sessionId"]
        usage = end["usage"]
        prompt = usage["inputTokens"] + usage["cacheReadTokens"] + usage["cacheWriteTokens"]
        billed_input = usage["inputCost"]
        billed.append(billed_input)
        uncached.append(prompt * info.input_per_mtok / 1_000_000)
        if turn > 1:
            assert usage["cacheReadTokens"] > 0, usage  # read what the previous turn wrote
            assert predicted is not None
            print(turn, "prediction error", abs(predicted["costWithCache"] - billed_input) / billed_input)
            assert abs(predicted["costWithCache"] - billed_input) <= 0.05 * billed_input, (turn, predicted, usage)
            assert abs(predicted["costWithoutCache"] - uncached[-1]) <= 0.05 * uncached[-1]
    body = fake_anthropic.requests[-1].body
    assert 1 <= breakpoints(body) <= 4
    await check_records(client, session_id, fake_anthropic, billed)
    print("cached/uncached input cost, turns 2-20:", sum(billed[1:]) / sum(uncached[1:]))
    assert sum(billed[1:]) <= 0.25 * sum(uncached[1:]), (sum(billed[1:]), sum(uncached[1:]))
    await ws.close()


async def check_records(client: TestClient, session_id: str, fake: Any, billed: list[float]) -> None:
    """The session's usage records hold what the upstream reported for each call, priced as the cost map says
    (``billed``: the input cost each turn's answer showed)."""
    entry = cost_map()["claude-sonnet-4-5"]
    records = await client.app[state.REGISTRY].usage.records(session_id=session_id)
    records.sort(key=lambda r: r["timestamp"])
    assert len(records) == len(fake.reported) == len(billed)
    for record, reported, cost in zip(records, fake.reported, billed, strict=True):
        tokens = (record["inputTokens"], record["cacheReadTokens"], record["cacheWriteTokens"])
        assert tokens == (
            reported["input_tokens"],
            reported["cache_read_input_tokens"],
            reported["cache_creation_input_tokens"],
        )
        priced = (
            reported["input_tokens"] * entry["input_cost_per_token"]
            + reported["cache_read_input_tokens"] * entry["cache_read_input_token_cost"]
            + reported["cache_creation_input_tokens"] * entry["cache_creation_input_token_cost"]
        )
        assert abs(record["inputCost"] - priced) < 1e-9 and abs(cost - priced) < 1e-9


def _config(client: TestClient) -> Any:
    return client.app[state.REGISTRY].config


async def test_off_sends_no_breakpoints_and_the_inspector_says_so(
    make_client: Any, token: str, fake_anthropic: Any, plugin_manager: Any, auth_headers: dict[str, str]
) -> None:
    fake_anthropic.caching = True
    plugin_manager.register(WeatherTools())
    client = await make_client(chat={"prompt_cache": "off"}, pm=plugin_manager)
    # A tool loop through /api/chat: neither step is marked.
    fake_anthropic.enqueue(tool_use_response("get_weather", {"city": "Paris"}), text_response("Sunny."))
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": turn_text(9)}]}
    response = await client.post("/api/chat", json={"id": "off-http", "messages": [message]}, headers=auth_headers)
    assert response.status == 200 and '"type":"finish"' in await response.text()
    assert len(fake_anthropic.requests) == 2 and "cache_control" not in json.dumps(
        [r.body for r in fake_anthropic.requests]
    )
    ws = await connect(client, token)
    frames = await chat(ws, turn_text(1))
    session_id = frames[0]["sessionId"]
    frames = await chat(ws, turn_text(2), "r2", sessionId=session_id)
    assert frames[-1]["usage"]["cacheReadTokens"] == 0
    assert all(breakpoints(r.body) == 0 for r in fake_anthropic.requests)
    reply = await receive_after(ws, {"type": "context.inspect", "id": "i", "sessionId": session_id})
    totals = reply["totals"]
    assert totals["promptCache"] == "off" and totals["cacheReadTokens"] == totals["cacheWriteTokens"] == 0
    assert totals["costWithCache"] == totals["costWithoutCache"]
    await ws.close()


async def test_one_hour_writes_are_priced_as_such_and_expire(make_client: Any, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.caching = True
    client = await make_client(chat={"prompt_cache_ttl": "1h"})
    info = model_info(_config(client), MODEL)
    assert info.cache_write_1h_per_mtok == 2 * info.input_per_mtok  # the cost map's one-hour price
    ws = await connect(client, token)
    frames = await chat(ws, turn_text(1))
    session_id = frames[0]["sessionId"]
    body = fake_anthropic.requests[0].body
    ttls = {b["cache_control"]["ttl"] for m in body["messages"] for b in m["content"] if "cache_control" in b}
    assert ttls == {"1h"}
    usage = frames[-1]["usage"]
    expected = (usage["inputTokens"] * info.input_per_mtok + usage["cacheWriteTokens"] * 2 * info.input_per_mtok) / 1e6
    assert usage["cacheWriteTokens"] > 0 and abs(usage["inputCost"] - expected) < 1e-9
    frame = {"type": "context.inspect", "id": "i", "sessionId": session_id, "userMessage": turn_text(2)}
    predicted = (await receive_after(ws, frame))["totals"]["costWithCache"]
    billed = (await chat(ws, turn_text(2), "r2", sessionId=session_id))[-1]["usage"]["inputCost"]
    assert abs(predicted - billed) <= 0.05 * billed, (predicted, billed)
    fake_anthropic.advance(3601)  # the fake's cache expires; the next call writes it again
    usage = (await chat(ws, turn_text(3), "r3", sessionId=session_id))[-1]["usage"]
    assert usage["cacheReadTokens"] == 0 and usage["cacheWriteTokens"] > 0
    await ws.close()


async def test_tool_loop_steps_read_the_previous_step(
    make_client: Any, token: str, fake_anthropic: Any, plugin_manager: Any
) -> None:
    fake_anthropic.caching = True
    plugin_manager.register(WeatherTools())
    client = await make_client(pm=plugin_manager)
    ws = await connect(client, token)
    fake_anthropic.enqueue(tool_use_response("get_weather", {"city": "Paris"}), text_response("Sunny."))
    frames = await chat(ws, turn_text(1))
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    first, second = fake_anthropic.requests[-2:]
    assert "cache_control" in first.body["tools"][-1]
    assert breakpoints(second.body) <= 4
    usage = frames[-1]["usage"]  # both steps' usage: the second read what the first wrote
    assert usage["cacheReadTokens"] > 0 and usage["cacheWriteTokens"] > 0
    await ws.close()


def marks(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every ``cache_control`` in a Messages API body, by where it is."""
    found = [(f"tools[{i}]", t["cache_control"]) for i, t in enumerate(body.get("tools") or []) if "cache_control" in t]
    system = body.get("system")
    if isinstance(system, list):
        found += [(f"system[{i}]", b["cache_control"]) for i, b in enumerate(system) if "cache_control" in b]
    for i, m in enumerate(body["messages"]):
        if isinstance(m["content"], list):
            found += [
                (f"messages[{i}][{j}]", b["cache_control"]) for j, b in enumerate(m["content"]) if "cache_control" in b
            ]
    return found


async def test_v1_requests_are_never_changed(client: TestClient, token: str, fake_anthropic: Any) -> None:
    """``/v1`` requests are the client's own: none gets a mark it did not send, and the marks it sent arrive
    as they were (where they were, with their TTL), in a body the gateway relays unchanged."""
    fake_anthropic.caching = True
    headers = {"Authorization": f"Bearer {token}"}
    plain = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": turn_text(1)}]}
    response = await client.post("/v1/messages", json=plain, headers=headers)
    assert response.status == 200, await response.text()
    assert breakpoints(fake_anthropic.requests[-1].body) == 0
    assert fake_anthropic.requests[-1].body == plain
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    marked = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "tools": [
            # (one-hour marks first: the API refuses one after a 5-minute mark)
            {
                "name": "a",
                "description": "A",
                "input_schema": schema,
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            },
            {"name": "b", "description": "B", "input_schema": schema},
        ],
        "system": [
            {"type": "text", "text": turn_text(2, 6000), "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "text", "text": "Be brief."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": turn_text(3), "cache_control": {"type": "ephemeral"}}],
            },
            {"role": "assistant", "content": "Noted."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral", "ttl": "5m"}}],
            },
        ],
    }
    response = await client.post("/v1/messages", json=marked, headers=headers)
    assert response.status == 200, await response.text()
    sent = fake_anthropic.requests[-1].body
    assert marks(sent) == marks(marked) and len(marks(sent)) == 4
    assert sent == marked
    # An OpenAI-shaped /v1 request to Claude gets no marks either.
    chat = {
        "model": MODEL,
        "max_tokens": 50,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turn_text(4)}],
    }
    response = await client.post("/v1/chat/completions", json=chat, headers=headers)
    assert response.status == 200, await response.text()
    assert "cache_control" not in json.dumps(fake_anthropic.requests[-1].body)


async def test_claude_behind_litellm_gets_the_marks_and_openai_does_not(fake_openai: Any) -> None:
    history = [
        ChatMessage.user("first question"),
        ChatMessage("assistant", [TextPart("first answer")]),
        ChatMessage.user("second question"),
    ]
    fake_openai.enqueue(stream_response(text_deltas("ok")), stream_response(text_deltas("ok")))
    claude = make_request(fake_openai, history, cache_ttl="5m")
    claude.model = "openrouter/anthropic/claude-sonnet-4.5"
    await collect(claude)
    sent = fake_openai.requests[-1].body["messages"]
    marked = [i for i, m in enumerate(sent) if isinstance(m["content"], list) and "cache_control" in m["content"][-1]]
    assert marked == [0, 1, 3]  # system, the previous call's last message, the newest message
    await collect(make_request(fake_openai, history, cache_ttl="5m"))  # gpt-4o-mini caches on its own
    assert "cache_control" not in json.dumps(fake_openai.requests[-1].body)


async def test_http_chat_turns_read_the_cache_and_the_rest_inspector_predicts(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """The twenty turns of 10 KB through ``/api/chat`` (the AI SDK's transport) and the REST inspector."""
    fake_anthropic.caching = True
    info = model_info(_config(client), MODEL)
    session_id = "http-cached"
    billed: list[float] = []
    uncached: list[float] = []
    for turn in range(1, 21):
        text = turn_text(turn)
        if turn > 1:
            # POST: a 10 KB draft does not fit in a URL
            response = await client.post(
                f"/api/sessions/{session_id}/context", json={"userMessage": text}, headers=auth_headers
            )
            predicted = (await response.json())["totals"]
        message = {"id": f"m{turn}", "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post("/api/chat", json={"id": session_id, "messages": [message]}, headers=auth_headers)
        assert response.status == 200 and (await response.text()).endswith("data: [DONE]\n\n")
        session = (await (await client.get(f"/api/sessions/{session_id}", headers=auth_headers)).json())["session"]
        usage = session["messages"][-1]["usage"]
        billed.append(usage["inputCost"])
        prompt = usage["inputTokens"] + usage["cacheReadTokens"] + usage["cacheWriteTokens"]
        uncached.append(prompt * info.input_per_mtok / 1_000_000)
        if turn > 1:
            assert usage["cacheReadTokens"] > 0
            assert abs(predicted["costWithCache"] - usage["inputCost"]) <= 0.05 * usage["inputCost"], turn
            assert abs(predicted["costWithoutCache"] - uncached[-1]) <= 0.05 * uncached[-1], turn
    await check_records(client, session_id, fake_anthropic, billed)
    print("/api/chat cached/uncached input cost, turns 2-20:", sum(billed[1:]) / sum(uncached[1:]))
    assert sum(billed[1:]) <= 0.25 * sum(uncached[1:])


async def test_openai_caches_on_its_own_and_the_inspector_says_so(
    make_client: Any, token: str, fake_openai: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
    await asyncio.to_thread(importlib.import_module, "litellm")  # not inside a chat's receive timeout
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.enqueue(openai_text("Sure.", usage=openai_usage(3000, 5)))
    ws = await connect(client, token)
    frames = await chat(ws, turn_text(1), model="openai/gpt-4o-mini")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert "cache_control" not in json.dumps(fake_openai.requests[-1].body)
    reply = await receive_after(ws, {"type": "context.inspect", "id": "i", "sessionId": frames[0]["sessionId"]})
    totals = reply["totals"]
    session = await client.app[state.REGISTRY].sessions.get(frames[0]["sessionId"])
    print("LASTCALL", session["messages"][-1].get("lastCall"), session["messages"][-1].get("completedAt"))
    assert totals["promptCache"] == "provider"
    assert (totals["cacheReadTokens"], totals["cacheWriteTokens"]) == (2944, 0)  # 3,000 in blocks of 128
    assert totals["costWithCache"] < totals["costWithoutCache"]
    await ws.close()


async def test_a_history_limit_cuts_in_steps_so_the_cache_keeps_reading(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """With ``[chat] history_limit`` 8 the first message sent moves every 4 messages (2 turns), not every
    turn: between cuts each turn reads the previous turn's prefix from the cache."""
    fake_anthropic.caching = True
    client = await make_client({"chat": {"history_limit": 8}})
    ws = await connect(client, token)
    session_id: str | None = None
    firsts: list[str] = []
    reads: list[int] = []
    for turn in range(1, 15):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn, 6_000), f"r{turn}", **extra)
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
        reads.append(frames[-1]["usage"]["cacheReadTokens"])
        sent = fake_anthropic.requests[-1].body["messages"]
        assert len(sent) <= 8 + 1  # the window and the new message
        first = sent[0]["content"]
        firsts.append(json.dumps(first)[:40])
    # Turns 1-4 send the whole session; from turn 5 (9 messages before it) the window moves in steps.
    changes = sum(1 for a, b in zip(firsts[4:], firsts[5:], strict=False) if a != b)
    assert changes <= 5, firsts  # a sliding window would change the first message on all 9 turns
    steady = [r for i, r in enumerate(reads[1:], start=1) if firsts[i] == firsts[i - 1]]
    assert steady and all(r > 0 for r in steady), reads


class MarkedTool(Tool):
    """A plugin's tool whose definition carries its own ``cache_control`` (as Anthropic's docs show)."""

    def definition(self) -> dict[str, Any]:
        return {**Tool.definition(self), "cache_control": {"type": "ephemeral"}}


class MarkedTools:
    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def lookup(args: dict[str, Any]) -> str:
            return "found"

        schema = {"type": "object", "properties": {"q": {"type": "string"}}}
        register(MarkedTool("lookup_a", "Look something up", schema, lookup))
        register(MarkedTool("lookup_b", "Look something else up", schema, lookup))


async def test_marks_a_plugin_already_set_count_toward_the_limit_of_four(
    make_client: Any, token: str, fake_anthropic: Any, plugin_manager: Any
) -> None:
    """Two tool definitions arrive marked: the gateway adds at most two marks, the newest ones, and the
    upstream (which refuses a fifth) answers every turn, reading the cache."""
    fake_anthropic.caching = True
    plugin_manager.register(MarkedTools())
    client = await make_client(pm=plugin_manager)
    ws = await connect(client, token)
    session_id = None
    for turn in (1, 2, 3):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn), f"r{turn}", **extra)
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
        body = fake_anthropic.requests[-1].body
        assert breakpoints(body) <= 4
        assert "cache_control" in body["messages"][-1]["content"][-1]  # the newest message is still marked
        if turn > 1:
            assert frames[-1]["usage"]["cacheReadTokens"] > 0
    await ws.close()


def chat_marks(body: dict[str, Any]) -> list[tuple[int, str]]:
    """(message index, role) of every ``cache_control`` in a Chat Completions body."""
    found = []
    for i, m in enumerate(body["messages"]):
        content = m.get("content")
        blocks = content if isinstance(content, list) else []
        if "cache_control" in m or any(isinstance(b, dict) and "cache_control" in b for b in blocks):
            found.append((i, m["role"]))
    return found


async def test_claude_behind_litellm_is_marked_on_every_turn_and_tool_loop_step(
    make_client: Any, token: str, fake_openai: Any, plugin_manager: Any, monkeypatch: Any
) -> None:
    """Claude through OpenRouter (litellm): the WebSocket session's calls carry the marks in the Chat Completions
    form (the system prompt, the previous call's end, the newest message or tool result), never more than four."""
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    await asyncio.to_thread(importlib.import_module, "litellm")  # not inside a chat's receive timeout
    plugin_manager.register(WeatherTools())
    client = await make_client(providers={"openrouter": {"base_url": fake_openai.url}}, pm=plugin_manager)
    model = "openrouter/anthropic/claude-sonnet-4.5"
    fake_openai.enqueue(
        openai_text("First."),
        tool_calls_response(openai_tool_call("call_1", "get_weather", {"city": "Paris"})),
        openai_text("Sunny."),
    )
    ws = await connect(client, token)
    frames = await chat(ws, turn_text(1), model=model)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert chat_marks(fake_openai.requests[-1].body) == [(0, "system"), (1, "user")]
    frames = await chat(ws, turn_text(2), "r2", model=model, sessionId=frames[0]["sessionId"])
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    first, second = (r.body for r in fake_openai.requests[-2:])
    # Turn 2, step 1: the system prompt, the end of turn 1's call (its user message), the newest message.
    assert chat_marks(first) == [(0, "system"), (1, "user"), (3, "user")]
    # Step 2: the system prompt, the end of step 1's call (the newest user message), the tool result.
    assert chat_marks(second) == [(0, "system"), (3, "user"), (5, "tool")]
    await ws.close()


async def test_a_model_switch_reads_nothing_and_the_inspector_says_so(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    """Anthropic keeps a prompt cache per model: the first turn on another model writes its whole prefix, and the
    inspector, asked about that model, predicts no read; the next turn on it reads what that one wrote. Switched
    back, the first model still holds what it cached within the TTL: the inspector predicts that read too (it
    predicted none)."""
    fake_anthropic.caching = True
    ws = await connect(client, token)
    frames = await chat(ws, turn_text(1), "r1")
    session_id = frames[0]["sessionId"]
    await chat(ws, turn_text(2), "r2", sessionId=session_id)
    other, first = "anthropic/claude-sonnet-4-6", MODEL
    for turn, model, reads in [(3, other, False), (4, other, True), (5, first, True)]:
        text = turn_text(turn)
        frame = {"type": "context.inspect", "id": f"i{turn}", "sessionId": session_id, "userMessage": text}
        predicted = (await receive_after(ws, {**frame, "model": model}))["totals"]
        end = (await chat(ws, text, f"r{turn}", sessionId=session_id, model=model))[-1]
        assert end["type"] == "chat.stream.end", end
        assert (end["usage"]["cacheReadTokens"] > 0) is reads, (turn, end["usage"])
        assert (predicted["cacheReadTokens"] > 0) is reads, (turn, predicted)
        assert predicted["cacheReadTokens"] == end["usage"]["cacheReadTokens"], (turn, predicted, end["usage"])
    await ws.close()
