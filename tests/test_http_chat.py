"""POST /api/chat and GET /api/chat/{id}/stream (docs/protocol.md): the AI SDK UI message stream, end to end
against the real app and the fake Anthropic upstream, plus unit tests of the chunk encoder."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import events as ev
from agentspace.plugins import create_plugin_manager
from agentspace.transports.ui_stream import UIMessageStreamEncoder
from agentspace.types import Cost, TokenUsage
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import (
    citations_response,
    error_status,
    text_response,
    thinking_response,
    tool_use_response,
)
from tests.support.ui_stream import (
    DONE,
    assistant,
    check_protocol,
    next_chunk,
    of,
    post_chat,
    read_all,
    types,
    user,
)
from tests.tool_plugins import WeatherTools

# --- streaming ------------------------------------------------------------------------------------


async def test_text_answer_headers_chunks_and_storage(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(
        text_response("Hello there, friend", chunks=3, usage={"input_tokens": 31}, delta_usages=[{"output_tokens": 7}])
    )
    resp = await post_chat(client, auth_headers, "chat1", user("Hi!"))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    chunks = await read_all(resp)
    check_protocol(chunks)
    assert types(chunks) == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
        DONE,
    ]
    assert "".join(c["delta"] for c in of(chunks, "text-delta")) == "Hello there, friend"
    finish = chunks[-2]
    assert finish["finishReason"] == "stop"
    usage = finish["messageMetadata"]["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["totalTokens"]) == (31, 7, 38)
    assert finish["messageMetadata"]["ttftMs"] > 0  # the footer's TTFT, without reloading the session
    assert usage["totalCost"] == pytest.approx((31 * 3 + 7 * 15) / 1e6)

    # the chat id named the session; the message id is the stored answer's
    session = (await (await client.get("/api/sessions/chat1", headers=auth_headers)).json())["session"]
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
    assert session["messages"][0]["content"] == "Hi!"
    assert session["messages"][1]["id"] == chunks[0]["messageId"]
    assert session["messages"][1]["content"] == "Hello there, friend"
    records = (await (await client.get("/api/usage?sessionId=chat1", headers=auth_headers)).json())["grandTotal"]
    assert records["requestCount"] == 1
    sessions = (await (await client.get("/api/sessions", headers=auth_headers)).json())["sessions"]
    assert sessions[0]["id"] == "chat1" and sessions[0]["client"] == "admin"  # the owner: the gateway token


async def test_a_model_slow_to_start_still_gets_the_stream_started(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # The response headers go out with the first chunk, the start chunks, before the model answers: the
    # client's useChat sees the stream open while the model is still silent.
    # The model is silent until the start chunks came, then the fake is released to answer.
    fake_anthropic.enqueue(text_response("Late answer.").stall(60.0, after=1))
    resp = await asyncio.wait_for(post_chat(client, auth_headers, "slow", user("Hi!")), 1.5)
    assert resp.status == 200
    started = [await asyncio.wait_for(next_chunk(resp), 1.5) for _ in range(2)]
    assert types(started) == ["start", "start-step"]
    fake_anthropic.release()
    chunks = started + await read_all(resp)
    check_protocol(chunks)
    assert "".join(c["delta"] for c in of(chunks, "text-delta")) == "Late answer."


async def test_reasoning_then_text(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(thinking_response("Pondering deeply.", "Done."))
    chunks = await read_all(await post_chat(client, auth_headers, "think", user("think")))
    check_protocol(chunks)
    assert types(chunks)[:3] == ["start", "start-step", "reasoning-start"]
    assert "".join(c["delta"] for c in of(chunks, "reasoning-delta")) == "Pondering deeply."
    assert "".join(c["delta"] for c in of(chunks, "text-delta")) == "Done."
    assert types(chunks).index("reasoning-end") < types(chunks).index("text-start")
    assert of(chunks, "reasoning-start")[0]["id"] != of(chunks, "text-start")[0]["id"]


@pytest.mark.parametrize(
    ("model", "form"), [("anthropic/claude-opus-4-7", "adaptive"), ("anthropic/claude-sonnet-4-5", "enabled")]
)
async def test_a_turn_asks_claude_to_show_its_thinking(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any, model: str, form: str
) -> None:
    """Claude Opus 4.7 and later omit their thinking's text unless asked (``thinking.display``): a session's turn
    asks for it, so the reasoning shows in the web app with every Claude that thinks."""
    fake_anthropic.enqueue(thinking_response("Pondering deeply.", "Done."))
    body = {"id": f"show-{form}", "model": model, "messages": [user("think")]}
    resp = await client.post("/api/chat", json=body, headers=auth_headers)
    chunks = await read_all(resp)
    assert "".join(c["delta"] for c in of(chunks, "reasoning-delta")) == "Pondering deeply."
    thinking = fake_anthropic.requests[-1].body["thinking"]
    assert (thinking["type"], thinking["display"]) == (form, "summarized")


async def test_citations_become_source_url_chunks(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(citations_response())
    chunks = await read_all(await post_chat(client, auth_headers, "search", user("search")))
    check_protocol(chunks)
    sources = of(chunks, "source-url")
    assert sorted(s["url"] for s in sources) == [
        "https://example.com/a",
        "https://example.com/b",
        "https://example.com/c",
    ]
    assert all(s["title"] for s in sources)
    assert len({s["sourceId"] for s in sources}) == 3


async def test_tool_loop_chunks(make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    fake_anthropic.enqueue(
        tool_use_response("get_weather", {"city": "Paris"}, text="Checking."),
        tool_use_response("broken", {}, id="toolu_02"),
        text_response("It is sunny in Paris."),
    )
    chunks = await read_all(await post_chat(client, auth_headers, "tools", user("weather?")))
    check_protocol(chunks)
    calls = of(chunks, "tool-input-available")
    assert [(c["toolName"], c["input"]) for c in calls] == [("get_weather", {"city": "Paris"}), ("broken", {})]
    assert of(chunks, "tool-output-available") == [
        {
            "type": "tool-output-available",
            "toolCallId": calls[0]["toolCallId"],
            "output": {"city": "Paris", "forecast": "sunny"},
        }
    ]
    error = of(chunks, "tool-output-error")[0]
    assert error["toolCallId"] == "toolu_02" and "sensor offline" in error["errorText"]
    assert types(chunks).count("start-step") == types(chunks).count("finish-step") == 3
    assert chunks[-2]["finishReason"] == "stop"
    text_ids = [c["id"] for c in of(chunks, "text-start")]
    assert len(text_ids) == len(set(text_ids)) == 2  # a new part after each finish-step


async def test_upstream_error_is_an_error_chunk(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(error_status(400, "messages: bad request from upstream"))
    resp = await post_chat(client, auth_headers, "broken", user("hi"))
    assert resp.status == 200  # the stream had started: the error is in it
    chunks = await read_all(resp)
    check_protocol(chunks)
    assert types(chunks) == ["start", "start-step", "error", DONE]
    assert chunks[-2]["errorText"] and "sk-ant" not in chunks[-2]["errorText"]


# --- sessions -------------------------------------------------------------------------------------


async def test_history_is_imported_only_into_a_new_session(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("Three."), text_response("Four."))
    history = [
        user("one", "m1"),
        assistant("two", "m2"),
        {"id": "s", "role": "system", "parts": [{"type": "text", "text": "be terse"}]},
    ]
    await read_all(await post_chat(client, auth_headers, "imported", *history, user("three", "m3")))
    sent = fake_anthropic.requests[-1].body["messages"]
    assert [(m["role"], m["content"][0]["text"]) for m in sent] == [
        ("user", "one"),
        ("assistant", "two"),
        ("user", "three"),
    ]

    # Known session: the store's history wins over what the client claims; only the last user message is new.
    await read_all(await post_chat(client, auth_headers, "imported", user("forged", "x"), user("four", "m4")))
    sent = fake_anthropic.requests[-1].body["messages"]
    assert [m["content"][0]["text"] for m in sent] == ["one", "two", "three", "Three.", "four"]
    stored = (await (await client.get("/api/sessions/imported", headers=auth_headers)).json())["session"]["messages"]
    assert [m["content"] for m in stored] == ["one", "two", "three", "Three.", "four", "Four."]


async def test_regenerate_answers_the_last_user_message_again(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("First."), text_response("Second."))
    await read_all(await post_chat(client, auth_headers, "regen", user("q")))
    chunks = await read_all(await post_chat(client, auth_headers, "regen", user("q"), trigger="regenerate-message"))
    assert "".join(c["delta"] for c in of(chunks, "text-delta")) == "Second."
    # The question is asked again without its first answer, and the session holds it once, answered once.
    sent = fake_anthropic.requests[-1].body["messages"]
    assert [(m["role"], [b["text"] for b in m["content"]]) for m in sent] == [("user", ["q"])]
    session = (await (await client.get("/api/sessions/regen", headers=auth_headers)).json())["session"]
    assert [(m["role"], m["content"]) for m in session["messages"]] == [("user", "q"), ("assistant", "Second.")]
    export = await client.get("/api/sessions/regen/export?format=md", headers=auth_headers)
    assert "First." not in await export.text()
    # Edited (useChat's sendMessage with the message's id): the new text is asked and kept, the old answer set aside.
    fake_anthropic.enqueue(text_response("Edited."))
    await read_all(await post_chat(client, auth_headers, "regen", user("q, reworded")))
    assert [b["text"] for b in fake_anthropic.requests[-1].body["messages"][0]["content"]] == ["q, reworded"]
    session = (await (await client.get("/api/sessions/regen", headers=auth_headers)).json())["session"]
    assert [(m["role"], m["content"]) for m in session["messages"]] == [
        ("user", "q, reworded"),
        ("assistant", "Edited."),
    ]
    # The next question follows the last answer, not the earlier ones.
    fake_anthropic.enqueue(text_response("Third."))
    await read_all(
        await post_chat(client, auth_headers, "regen", user("q, reworded"), assistant("Edited."), user("next", "u2"))
    )
    sent = fake_anthropic.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and "Edited." in str(sent[1]["content"])


async def test_thread_id_names_the_session(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("ok"))
    resp = await client.post("/api/chat", json={"threadId": "thread-7", "messages": [user("hi")]}, headers=auth_headers)
    await read_all(resp)
    assert (await client.get("/api/sessions/thread-7", headers=auth_headers)).status == 200


async def test_model_choice(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(text_response("ok"))
    await read_all(await post_chat(client, auth_headers, "haiku", user("hi"), model="anthropic/claude-haiku-4-5"))
    assert fake_anthropic.requests[-1].body["model"] == "claude-haiku-4-5"

    resp = await post_chat(client, auth_headers, "nomodel", user("hi"), model="no-provider-prefix")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "MODEL_NOT_FOUND"


# --- refused requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ([1, 2], [""]),
        ({"messages": [user("hi")]}, ["id"]),
        ({"id": "../etc", "messages": [user("hi")]}, ["id"]),
        ({"id": "c", "messages": []}, ["messages"]),
        ({"id": "c", "messages": "hi"}, ["messages"]),
        ({"id": "c", "messages": [assistant("only me")]}, ["messages"]),
        ({"id": "c", "messages": [{"id": "u", "role": "robot", "parts": []}]}, ["messages[0].role"]),
        ({"id": "c", "messages": [{"id": "u", "role": "user"}]}, ["messages[0].parts"]),
        (
            {"id": "c", "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": 5}, "x"]}]},
            ["messages[0].parts[0].text", "messages[0].parts[1]"],
        ),
        ({"id": "c", "messages": [user("   ")]}, ["messages[0].parts"]),
        ({"id": "c", "messages": [user("hi")], "model": 3, "trigger": "resubmit"}, ["model", "trigger"]),
        # Two messages with one id: the second would be stored over the first (or answered as its edit).
        ({"id": "c", "messages": [user("a", id="m"), assistant("b", id="m"), user("c")]}, ["messages[1].id"]),
        ({"id": "c", "messages": [user("a", id="m"), user("c", id="m")]}, ["messages[1].id"]),
    ],
)
async def test_invalid_bodies(client: TestClient, auth_headers: dict[str, str], body: Any, paths: list[str]) -> None:
    resp = await client.post("/api/chat", json=body, headers=auth_headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_MESSAGE" and error["message"]
    assert [f["path"] for f in error["fields"]] == paths


async def test_not_json_unauthorized_and_too_large(make_client: Any, auth_headers: dict[str, str]) -> None:
    client = await make_client(server={"max_body_bytes": 4096})
    resp = await client.post("/api/chat", data=b"{nope", headers=auth_headers)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "INVALID_MESSAGE"

    resp = await client.post("/api/chat", json={"id": "c", "messages": [user("hi")]})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    resp = await client.post(
        "/api/chat", json={"id": "c", "messages": [user("hi")]}, headers={"Authorization": "Bearer wrong"}
    )
    assert resp.status == 401

    resp = await post_chat(client, auth_headers, "big", user("x" * 5000))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_one_stream_per_session_across_transports(
    client: TestClient, auth_headers: dict[str, str], token: str, fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("word " * 20, chunks=20).with_delay(0.05))
    first = await post_chat(client, auth_headers, "busy", user("go"))
    assert (await next_chunk(first))["type"] == "start"

    second = await post_chat(client, auth_headers, "busy", user("again"))
    assert second.status == 409 and (await second.json())["error"]["code"] == "STREAM_IN_PROGRESS"
    ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"})
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "and again", "sessionId": "busy"})
    assert (await ws.receive_json(timeout=10))["code"] == "STREAM_IN_PROGRESS"
    await ws.close()

    chunks = await read_all(first)
    assert "".join(c["delta"] for c in of(chunks, "text-delta")) == "word " * 20


# --- disconnects and resuming ---------------------------------------------------------------------


async def _stored_answer(client: TestClient, headers: dict[str, str], chat_id: str) -> dict[str, Any]:
    async def answered() -> bool:
        resp = await client.get(f"/api/sessions/{chat_id}", headers=headers)
        return resp.status == 200 and len((await resp.json())["session"]["messages"]) == 2

    await wait_until(answered)
    return (await (await client.get(f"/api/sessions/{chat_id}", headers=headers)).json())["session"]["messages"][-1]


async def test_disconnect_lets_the_answer_finish(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(
        text_response("part " * 20, chunks=20, delta_usages=[{"output_tokens": 20}]).with_delay(0.03)
    )
    resp = await post_chat(client, auth_headers, "gone", user("go"))
    while (await next_chunk(resp))["type"] != "text-delta":
        pass
    resp.close()  # the browser tab closed

    stored = await _stored_answer(client, auth_headers, "gone")
    assert stored["content"] == "part " * 20 and stored["aborted"] is False and stored["finishReason"] == "stop"
    report = await (await client.get("/api/usage?sessionId=gone", headers=auth_headers)).json()
    assert report["grandTotal"]["requestCount"] == 1 and report["grandTotal"]["outputTokens"] == 20


async def test_disconnect_aborts_when_configured(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await make_client(chat={"on_disconnect": "abort"})
    fake_anthropic.enqueue(text_response("part " * 40, chunks=40).with_delay(0.05))
    resp = await post_chat(client, auth_headers, "stop", user("go"))
    while (await next_chunk(resp))["type"] != "text-delta":
        pass
    resp.close()

    stored = await _stored_answer(client, auth_headers, "stop")
    assert stored["aborted"] is True and stored["finishReason"] == "aborted"
    assert 0 < len(stored["content"]) < len("part " * 40)
    report = await (await client.get("/api/usage?sessionId=stop", headers=auth_headers)).json()
    assert report["grandTotal"]["requestCount"] == 1  # billed all the same


async def test_resume_replays_from_the_start_and_follows(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    assert (await client.get("/api/chat/idle/stream", headers=auth_headers)).status == 204
    text = "".join(f"w{i} " for i in range(20))
    fake_anthropic.enqueue(text_response(text, chunks=20).with_delay(0.05))
    first = await post_chat(client, auth_headers, "live", user("go"))
    seen = [await next_chunk(first) for _ in range(5)]
    assert seen[-1]["type"] == "text-delta"

    resumed = await client.get("/api/chat/live/stream", headers=auth_headers)
    assert resumed.status == 200 and resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
    replay = await read_all(resumed)
    check_protocol(replay)
    assert replay[:5] == seen  # the same chunks, ids included
    assert "".join(c["delta"] for c in of(replay, "text-delta")) == text
    assert types(replay)[-2:] == ["finish", DONE]
    assert await read_all(first) == [*replay[5:]]

    assert (await client.get("/api/chat/live/stream", headers=auth_headers)).status == 204
    assert (await client.get("/api/chat/no%20good/stream", headers=auth_headers)).status == 400


# --- the encoder ----------------------------------------------------------------------------------


def encode(*events: ev.StreamEvent) -> list[Any]:
    encoder = UIMessageStreamEncoder()
    frames = b"".join(encoder.encode(e) for e in events).decode()
    assert frames.endswith("\n\n")
    out = []
    for frame in frames.split("\n\n")[:-1]:
        assert frame.startswith("data: ")
        data = frame[len("data: ") :]
        out.append(DONE if data == DONE else json.loads(data))
    return out


def test_encoder_tool_events_and_part_switching() -> None:
    chunks = encode(
        ev.StreamStart("s", "m", "msg_1", True),
        ev.StepStart(0),
        ev.ReasoningDelta("hmm"),
        ev.TextDelta("Let me "),
        ev.SourceEvent("https://a.example"),
        ev.TextDelta("check."),
        ev.ReasoningDelta("more"),
        ev.ToolCallEvent("call_1", "lookup", {"q": 1}),
        ev.StepFinish(0, "tool-calls", TokenUsage(1, 1), Cost()),
        ev.ToolResultEvent("call_1", "lookup", {"ok": True}, False),
        ev.ToolResultEvent("call_2", "lookup", "Tool lookup failed: boom", True),
        ev.ToolResultEvent("call_3", "lookup", {"rows": [1, 2]}, False),
        ev.StepStart(1),
        ev.TextDelta("Done."),
        ev.StepFinish(1, "stop", TokenUsage(1, 1), Cost()),
        ev.StreamEnd("stop", TokenUsage(2, 2), Cost(0.5, 0.25)),
    )
    check_protocol(chunks)
    assert chunks[:6] == [
        {"type": "start", "messageId": "msg_1"},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "hmm"},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "text-start", "id": "text-2"},
    ]
    # a source does not interrupt the text part
    assert types(chunks)[6:9] == ["text-delta", "source-url", "text-delta"]
    assert chunks[7] == {"type": "source-url", "sourceId": "source-3", "url": "https://a.example"}
    assert {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "lookup", "input": {"q": 1}} in chunks
    assert {"type": "tool-output-available", "toolCallId": "call_1", "output": {"ok": True}} in chunks
    assert {"type": "tool-output-error", "toolCallId": "call_2", "errorText": "Tool lookup failed: boom"} in chunks
    assert {"type": "tool-output-available", "toolCallId": "call_3", "output": {"rows": [1, 2]}} in chunks
    assert chunks[-2] == {
        "type": "finish",
        "finishReason": "stop",
        "messageMetadata": {
            "usage": {
                "inputTokens": 2,
                "outputTokens": 2,
                "totalTokens": 4,
                "cacheReadTokens": 0,
                "cacheWriteTokens": 0,
                "reasoningTokens": 0,
                "inputCost": 0.5,
                "outputCost": 0.25,
                "totalCost": 0.75,
                "priceKnown": True,
            }
        },
    }


def test_encoder_aborted_and_failed_turns() -> None:
    aborted = encode(
        ev.StreamStart("s", "m", "msg_1", False),
        ev.StepStart(0),
        ev.TextDelta("par"),
        ev.StreamEnd("aborted", TokenUsage(5, 1, estimated=True), Cost(), aborted=True),
    )
    check_protocol(aborted)
    assert types(aborted)[-5:] == ["text-delta", "text-end", "abort", "finish", DONE]
    assert aborted[-2]["finishReason"] == "other"

    failed = encode(
        ev.StreamStart("s", "m", "msg_1", False),
        ev.StepStart(0),
        ev.TextDelta("par"),
        ev.StreamError("LLM_ERROR", "The model is overloaded."),
    )
    check_protocol(failed)
    assert failed[-3:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "error", "errorText": "The model is overloaded."},
        DONE,
    ]


async def test_stored_user_message_keeps_the_client_id(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    await read_all(await post_chat(client, auth_headers, "ids", user("Hello", id="client-msg-1")))
    resp = await client.get("/api/sessions/ids", headers=auth_headers)
    messages = (await resp.json())["session"]["messages"]
    assert [m["id"] for m in messages if m["role"] == "user"] == ["client-msg-1"]
