"""The context-window policy: a long session against a model whose window is 50k tokens keeps answering under
``compact`` and ``truncate`` and gets CONTEXT_TOO_LONG under ``refuse``; compaction on demand (WebSocket,
REST, CLI); every summarising call is a usage record of its own (purpose ``compact``)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import Tool, hookimpl
from agentspace.context_policy import COMPACT_PROMPT
from agentspace.transports import state
from tests.fakes.anthropic_upstream import error_status, prompt_blocks, text_response, tool_use_response
from tests.support.ws import chat, connect, receive_after
from tests.test_prompt_cache import turn_text
from tests.tool_plugins import WeatherTools

MODEL = "anthropic/claude-sonnet-4-5"
WINDOW = 50_000
TURNS = 300
# The windows here leave [chat] max_tokens (4096) for the answer: no thinking budget on top of it (the room a
# budget takes is tested in test_audit28s_outside.py).
NO_BUDGET: dict[str, Any] = {"thinking": {"enabled": False}}


def small_window(policy: str) -> dict[str, Any]:
    return {
        "chat": {"context_policy": policy, "history_limit": 10_000},
        "pricing": {MODEL: {"context_window": WINDOW}},
        **NO_BUDGET,
    }


async def records(client: TestClient, session_id: str) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records(session_id=session_id)


async def long_http_session(client: TestClient, token: str, turns: int) -> tuple[str, list[dict[str, Any]]]:
    """``long_session`` through ``/api/chat``: each turn's last UI stream chunk before ``[DONE]``."""
    headers = {"Authorization": f"Bearer {token}"}
    session_id = "http-300"
    ends = []
    for turn in range(1, turns + 1):
        message = {"id": f"m{turn}", "role": "user", "parts": [{"type": "text", "text": turn_text(turn, 1000)}]}
        response = await client.post("/api/chat", json={"id": session_id, "messages": [message]}, headers=headers)
        assert response.status == 200
        chunks = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        ends.append(json.loads(chunks[-2]))
    return session_id, ends


async def long_session(client: TestClient, token: str, turns: int) -> tuple[str, list[dict[str, Any]]]:
    """``turns`` turns of about 1 KB each; the last frame of every turn."""
    ws = await connect(client, token)
    session_id = ""
    ends = []
    for turn in range(1, turns + 1):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn, 1000), f"r{turn}", **extra)
        session_id = session_id or frames[0]["sessionId"]
        ends.append(frames[-1])
    await ws.close()
    return session_id, ends


@pytest.mark.parametrize("transport", ["ws", "http"])
@pytest.mark.parametrize("policy", ["compact", "truncate"])
async def test_a_long_session_keeps_answering(
    make_client: Any, token: str, fake_anthropic: Any, policy: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_anthropic.caching = True  # the fake counts the real input, as the API does
    # 1,800 durable writes are not what this test is about: the disk's flushes are skipped (as in the benchmarks).
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    client = await make_client(small_window(policy))
    if transport == "ws":
        session_id, ends = await long_session(client, token, TURNS)
        failed = [e for e in ends if e["type"] != "chat.stream.end"]
    else:
        session_id, ends = await long_http_session(client, token, TURNS)
        failed = [e for e in ends if e["type"] != "finish"]
    assert not failed, failed[:1]
    window = WINDOW - 4096
    chat_calls = [r for r in fake_anthropic.requests if r.body.get("system") != _compact_prompt()]
    sent = [_prompt_tokens(r) for r in chat_calls]
    assert max(sent) <= window  # no call was ever larger than the window
    session = await client.app[state.REGISTRY].sessions.get(session_id)
    assert session is not None and len(session["messages"]) == 2 * TURNS  # nothing deleted
    marks = [m for m in session["messages"] if m.get("summary" if policy == "compact" else "contextCut")]
    assert marks, "the policy never ran"
    usage = await records(client, session_id)
    compactions = [r for r in usage if r.get("purpose") == "compact"]
    summarising_calls = len(fake_anthropic.requests) - len(chat_calls)
    if policy == "compact":
        assert len(compactions) == summarising_calls == len(marks) >= 1
        assert all(r["inputTokens"] > 0 for r in compactions)
        reply = await _inspect(client, token, session_id)
        assert "summary" in [s["name"] for s in reply["sections"]]
    else:
        assert compactions == [] and summarising_calls == 0
    assert len(usage) == len(fake_anthropic.requests)  # one record per provider call


async def test_refuse_says_context_too_long_with_the_numbers(make_client: Any, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.caching = True
    client = await make_client(small_window("refuse"))
    ws = await connect(client, token)
    session_id, refused = "", None
    for turn in range(1, TURNS + 1):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn, 1000), f"r{turn}", **extra)
        session_id = session_id or frames[0]["sessionId"]
        if frames[-1]["type"] == "error":
            refused = frames[-1]
            break
    assert refused is not None and refused["code"] == "CONTEXT_TOO_LONG", refused
    assert str(WINDOW - 4096) in refused["message"] and "4096" in refused["message"]
    calls = len(fake_anthropic.requests)
    frames = await chat(ws, turn_text(TURNS + 1, 1000), "again", sessionId=session_id)
    assert frames[-1]["code"] == "CONTEXT_TOO_LONG" and len(fake_anthropic.requests) == calls  # nothing sent
    # The inspector says the next call is past the window, with the same numbers.
    frame = {"type": "context.inspect", "id": "i", "sessionId": session_id, "userMessage": turn_text(TURNS + 2, 1000)}
    totals = (await receive_after(ws, frame))["totals"]
    assert totals["inputWindow"] == WINDOW - 4096 and totals["overWindow"] is True, totals
    # Compacting on demand makes the session usable again.
    reply = await receive_after(ws, {"type": "session.compact", "id": "c1", "sessionId": session_id})
    assert reply["type"] == "session.compacted" and reply["compacted"] is True, reply
    frames = await chat(ws, "and now?", "after", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    totals = (await receive_after(ws, {**frame, "id": "i2"}))["totals"]
    assert totals["overWindow"] is False
    await ws.close()


async def test_compact_on_demand_over_rest_and_cli(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    frames = await chat(ws, "My name is Ada and I like prime numbers.")
    session_id = frames[0]["sessionId"]
    await chat(ws, "What is 7 times 6?", "r2", sessionId=session_id)
    await ws.close()
    fake_anthropic.enqueue(text_response("Ada likes prime numbers; asked 7x6."))
    response = await client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers)
    body = await response.json()
    assert response.status == 200 and body["compacted"] is True and body["summarizedMessages"] == 2, body
    request = fake_anthropic.requests[-1].body
    assert "Ada" in json.dumps(request["messages"]) and "cache_control" not in json.dumps(request)
    reply = await _inspect(client, token, session_id)
    summary = next(s for s in reply["sections"] if s["name"] == "summary")
    assert summary["byteCount"] > len("Ada likes prime numbers")
    # The next call sends the summary in the system prompt and the latest turn only.
    await _chat_once(client, token, session_id, "Thanks")
    sent = fake_anthropic.requests[-1].body
    assert "Ada likes prime numbers" in json.dumps(sent["system"])
    assert "My name is Ada" not in json.dumps(sent["messages"])
    assert [r.get("purpose") for r in await records(client, session_id)].count("compact") == 1
    # Nothing to compact: one turn stays as it is.
    response = await client.post("/api/sessions/nope/compact", headers=auth_headers)
    assert response.status == 404


async def test_a_failed_summary_is_billed_as_an_error_and_the_turn_says_so(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    client = await make_client(chat={"max_retries": 0})
    ws = await connect(client, token)
    frames = await chat(ws, "first")
    session_id = frames[0]["sessionId"]
    await chat(ws, "second", "r2", sessionId=session_id)
    fake_anthropic.enqueue(error_status(529))
    reply = await receive_after(ws, {"type": "session.compact", "id": "c", "sessionId": session_id})
    assert reply["type"] == "error" and reply["code"] == "LLM_ERROR"
    compactions = [r for r in await records(client, session_id) if r.get("purpose") == "compact"]
    assert len(compactions) == 1 and compactions[0]["error"] == "LLM_ERROR" and not compactions[0]["answered"]
    await ws.close()


async def test_http_chat_compacts_too(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.caching = True
    client = await make_client(
        {"chat": {"history_limit": 10_000}, "pricing": {MODEL: {"context_window": 8_000}}, **NO_BUDGET}
    )
    session_id = "http-long"
    for turn in range(1, 30):
        body = {
            "id": session_id,
            "messages": [
                {"id": f"m{turn}", "role": "user", "parts": [{"type": "text", "text": turn_text(turn, 1000)}]}
            ],
        }
        response = await client.post("/api/chat", json=body, headers=auth_headers)
        text = await response.text()
        assert response.status == 200 and '"type":"finish"' in text, text[-300:]
    assert [r.get("purpose") for r in await records(client, session_id)].count("compact") >= 1


def _compact_prompt() -> str:
    return COMPACT_PROMPT


def _prompt_tokens(request: Any) -> int:
    return sum(tokens for _, tokens, _ in prompt_blocks(request.body))


async def _inspect(client: TestClient, token: str, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/sessions/{session_id}/context", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    return await response.json()


async def _chat_once(client: TestClient, token: str, session_id: str, text: str) -> None:
    ws = await connect(client, token)
    frames = await chat(ws, text, "once", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    await ws.close()


async def test_http_chat_refuses_with_the_numbers(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """Through ``/api/chat`` the refusal comes before any stream: 413 with the code and the numbers
    (docs/protocol.md: an error found before an answer starts streaming comes with its status)."""
    fake_anthropic.caching = True
    client = await make_client(small_window("refuse"))

    async def say(turn: int, text: str) -> tuple[int, str]:
        message = {"id": f"m{turn}", "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post(
            "/api/chat", json={"id": "http-refused", "messages": [message]}, headers=auth_headers
        )
        return response.status, await response.text()

    for turn in range(1, TURNS + 1):
        status, text = await say(turn, turn_text(turn, 1000))
        if status != 200:
            break
        assert '"type":"finish"' in text, text[-300:]
    assert status == 413, (status, text)
    error = json.loads(text)["error"]
    assert error["code"] == "CONTEXT_TOO_LONG"
    assert f"takes {WINDOW - 4096} ({WINDOW} in its window, minus 4096" in error["message"], error
    calls = len(fake_anthropic.requests)
    assert (await say(TURNS + 1, turn_text(TURNS + 1, 1000)))[0] == 413 and len(
        fake_anthropic.requests
    ) == calls  # nothing sent
    response = await client.post("/api/sessions/http-refused/compact", headers=auth_headers)
    assert response.status == 200 and (await response.json())["compacted"] is True
    status, text = await say(TURNS + 2, "and now?")
    assert status == 200 and '"type":"finish"' in text


async def test_a_failing_summary_leaves_the_oldest_turns_out_and_the_turn_answers(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    fake_anthropic.caching = True
    client = await make_client(
        {
            "chat": {"history_limit": 10_000, "compact_model": "openai/gpt-4o-mini"},
            "pricing": {MODEL: {"context_window": 8_000}},
            **NO_BUDGET,
        }
    )
    session_id, ends = await long_session(client, token, 25)
    assert all(end["type"] == "chat.stream.end" for end in ends)
    assert max(_prompt_tokens(r) for r in fake_anthropic.requests) <= 8_000 - 4096
    session = await client.app[state.REGISTRY].sessions.get(session_id)
    cuts = [m["contextCut"] for m in session["messages"] if m.get("contextCut")]
    assert cuts and all(c["compactError"] == "NO_API_KEY" for c in cuts)  # no OpenAI key
    assert not any(m.get("summary") for m in session["messages"])


class PageTools:
    """``read_page``: about 12 KB of text per call, so a tool loop grows the context between its steps."""

    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def read_page(args: dict[str, Any]) -> dict[str, Any]:
            return {"page": args["page"], "text": turn_text(1000 + int(args["page"]), 12_000)}

        register(Tool("read_page", "A page of the manual", {"type": "object", "properties": {"page": {}}}, read_page))


@pytest.mark.parametrize("policy", ["compact", "truncate", "refuse"])
async def test_a_tool_loop_that_grows_past_the_window_is_caught_before_its_next_step(
    make_client: Any,
    token: str,
    fake_anthropic: Any,
    plugin_manager: Any,
    policy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four turns of 8 KB fill about half the window; the fifth turn's model reads four pages of 12 KB, one a
    step. The policy runs before each step, so no call is larger than the window."""
    fake_anthropic.caching = True
    plugin_manager.register(PageTools())
    window = 20_000
    client = await make_client(
        {
            "chat": {"context_policy": policy, "history_limit": 10_000},
            "pricing": {MODEL: {"context_window": window}},
            **NO_BUDGET,
        },
        pm=plugin_manager,
    )
    scripted = fake_anthropic.next_response

    def respond() -> Any:  # the summarising calls get a summary; the turn's steps get the script
        if fake_anthropic.requests[-1].body.get("system") == COMPACT_PROMPT:
            return text_response("The user sent four long texts.")
        return scripted()

    monkeypatch.setattr(fake_anthropic, "next_response", respond)
    ws = await connect(client, token)
    session_id = ""
    for turn in range(1, 5):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn, 8_000), f"r{turn}", **extra)
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = session_id or frames[0]["sessionId"]
    before = len(fake_anthropic.requests)
    fake_anthropic.enqueue(
        *(tool_use_response("read_page", {"page": p}, id=f"toolu_{p}") for p in range(1, 5)), text_response("Done.")
    )
    frames = await chat(ws, "Read pages 1 to 4 of the manual.", "r5", sessionId=session_id)
    await ws.close()
    steps = [r for r in fake_anthropic.requests[before:] if r.body.get("system") != COMPACT_PROMPT]
    sent = [_prompt_tokens(r) for r in steps]
    assert max(sent) <= window - 4096, sent  # no step's call was larger than the window
    session = await client.app[state.REGISTRY].sessions.get(session_id)
    assert session is not None
    if policy == "refuse":
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "CONTEXT_TOO_LONG", frames[-1]
        assert 1 <= len(steps) < 5  # the steps that fitted were sent, the next one was not
        return
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert len(steps) == 5 and session["messages"][-1]["content"].endswith("Done.")
    assert "toolu_4" in json.dumps(steps[-1].body["messages"])  # the turn's own steps are all still sent
    key = "summary" if policy == "compact" else "contextCut"
    assert any(m.get(key) for m in session["messages"]), "the policy never ran"
    usage = await records(client, session_id)
    compactions = len(fake_anthropic.requests) - len(fake_anthropic.requests[:before]) - len(steps)
    assert [r.get("purpose") for r in usage].count("compact") == compactions == (1 if policy == "compact" else 0)
    assert len(usage) == len(fake_anthropic.requests)  # one record per provider call


async def test_the_summary_reads_the_tool_calls_and_their_results(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, plugin_manager: Any
) -> None:
    """A tool loop's facts are in its calls and results: the summarising model reads them, not only the answer's
    text (after the summary, no call sends them)."""
    plugin_manager.register(WeatherTools())
    client = await make_client(pm=plugin_manager)
    ws = await connect(client, token)
    fake_anthropic.enqueue(tool_use_response("get_weather", {"city": "Reykjavik"}), text_response("It is sunny."))
    frames = await chat(ws, "Weather in the capital of Iceland?")
    session_id = frames[0]["sessionId"]
    await chat(ws, "Thanks", "r2", sessionId=session_id)
    await ws.close()
    fake_anthropic.enqueue(text_response("The user asked for the weather in Reykjavik: sunny."))
    response = await client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers)
    assert response.status == 200 and (await response.json())["compacted"] is True
    request = fake_anthropic.requests[-1].body
    assert request["system"] == COMPACT_PROMPT
    transcript = json.dumps(request["messages"])
    assert "get_weather" in transcript and "Reykjavik" in transcript and "sunny" in transcript, transcript


@pytest.mark.parametrize("policy", ["compact", "truncate"])
async def test_a_message_too_long_on_its_own_is_refused_without_a_summary_or_a_cut(
    make_client: Any, token: str, fake_anthropic: Any, policy: str
) -> None:
    """When the newest turn alone does not fit, no cut can help: the turn fails with CONTEXT_TOO_LONG before a
    summarising call is made (and billed) or the earlier turns are marked as left out; the next turn answers."""
    client = await make_client(
        {"chat": {"context_policy": policy}, "pricing": {MODEL: {"context_window": 8_000}}, **NO_BUDGET}
    )
    ws = await connect(client, token)
    frames = await chat(ws, "hello")
    session_id = frames[0]["sessionId"]
    calls = len(fake_anthropic.requests)
    frames = await chat(ws, turn_text(2, 40_000), "r2", sessionId=session_id)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "CONTEXT_TOO_LONG", frames[-1]
    assert len(fake_anthropic.requests) == calls  # nothing sent, no summary either
    assert [r.get("purpose") for r in await records(client, session_id)].count("compact") == 0
    session = await client.app[state.REGISTRY].sessions.get(session_id)
    assert session is not None
    assert not any(m.get("summary") or m.get("contextCut") for m in session["messages"])
    frames = await chat(ws, "and a short one", "r3", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    await ws.close()


async def test_a_client_compacts_its_own_session_not_anothers_of_the_same_id(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """Two callers each have a session called ``plans``: a client key compacting its ``plans`` summarises its own
    turns (the summary comes back to it), marks its own session, and files the call under its own session."""
    created = await client.post("/api/clients", headers=auth_headers, json={"name": "alice"})
    alice = {"Authorization": f"Bearer {(await created.json())['key']}"}
    for headers, who in [(auth_headers, "the admin"), (alice, "alice")]:
        for n in (1, 2):
            message = {"id": f"m{n}", "role": "user", "parts": [{"type": "text", "text": f"{who} says {n}"}]}
            response = await client.post("/api/chat", json={"id": "plans", "messages": [message]}, headers=headers)
            assert response.status == 200
            await response.read()
    fake_anthropic.enqueue(text_response("A summary."))
    response = await client.post("/api/sessions/plans/compact", headers=alice)
    body = await response.json()
    assert response.status == 200 and body["sessionId"] == "plans" and body["compacted"] is True, body
    transcript = json.dumps(fake_anthropic.requests[-1].body["messages"])
    assert "alice says 1" in transcript and "the admin" not in transcript, transcript
    registry = client.app[state.REGISTRY]
    admins = await registry.sessions.get("plans")
    assert admins is not None and not any(m.get("summary") for m in admins["messages"])
    usage = await registry.usage.records()
    record = next(r for r in usage if r.get("purpose") == "compact")
    chats = {r["sessionId"] for r in usage if r.get("client") == "alice" and not r.get("purpose")}
    assert record["client"] == "alice" and chats == {record["sessionId"]}, (record, chats)
    mine = await (await client.get("/api/sessions/plans/context", headers=alice)).json()
    assert "summary" in [s["name"] for s in mine["sections"]]


async def test_the_summary_reads_what_the_calls_resend_not_answers_set_aside_or_failed_turns(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """An answer given again (``replaced``) and a turn refused as too long are resent to no model: the
    summarising model does not read them either (the summary would bring them back into every later call)."""
    client = await make_client({"pricing": {MODEL: {"context_window": 8_000}}, **NO_BUDGET})

    async def say(message_id: str, text: str, answer: str | None = None) -> int:
        if answer is not None:
            fake_anthropic.enqueue(text_response(answer))
        message = {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post("/api/chat", json={"id": "kept", "messages": [message]}, headers=auth_headers)
        await response.read()
        return response.status

    assert await say("m1", "Name a seabird", "The wandering albatross.") == 200
    assert await say("m1", "Name a seabird, please", "The pelican.") == 200
    assert await say("m2", "Too long: " + turn_text(2, 40_000)) == 413
    assert await say("m3", "Thanks", "You are welcome.") == 200
    fake_anthropic.enqueue(text_response("The user asked for a seabird: the pelican."))
    response = await client.post("/api/sessions/kept/compact", headers=auth_headers)
    assert response.status == 200 and (await response.json())["compacted"] is True
    transcript = json.dumps(fake_anthropic.requests[-1].body["messages"])
    assert "pelican" in transcript and "albatross" not in transcript and "Too long" not in transcript, transcript[:300]
