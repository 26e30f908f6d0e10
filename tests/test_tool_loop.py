"""The agent loop through every provider path and both transports: the real litellm against the fake OpenAI
upstream (the Anthropic path is in test_ws.py and test_http_chat.py), plus the installed echo plugin."""

from __future__ import annotations

import importlib.util
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import Tool, hookimpl
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state
from tests.fakes.openai_upstream import (
    text_response,
    tool_call,
    tool_calls_response,
    usage,
)
from tests.support.ui_stream import check_protocol, post_chat, read_all, types, user
from tests.support.ui_stream import of as chunks_of
from tests.support.ws import chat, connect, of

MODEL = "openai/gpt-4o-mini"


class Tools:
    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def add(args: dict[str, Any]) -> int:
            return int(args["a"]) + int(args["b"])

        async def explode(args: dict[str, Any]) -> Any:
            raise ValueError("boom")

        async def clock(args: dict[str, Any]) -> dict[str, Any]:
            return {"now": datetime(2026, 11, 22, 6, 0, tzinfo=UTC), "zones": ("UTC",)}

        schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
        register(Tool("add", "Add two integers", schema, add))
        register(Tool("explode", "Always fails", {"type": "object", "properties": {}}, explode))
        register(Tool("clock", "The time", {"type": "object", "properties": {}}, clock))


@pytest.fixture
async def openai_client(make_client: Any, fake_openai: Any, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-key")
    pm = create_plugin_manager()
    pm.register(Tools())
    return await make_client(pm=pm, models={"default": MODEL}, providers={"openai": {"base_url": fake_openai.url}})


def script_tool_turn(fake: Any) -> None:
    """Step 1: two parallel calls (one fails, arguments in pieces); step 2: an unknown tool; step 3: text."""
    fake.enqueue(
        tool_calls_response(
            tool_call("call_1", "add", ['{"a": ', '2, "b"', ": 3}"]),
            tool_call("call_2", "explode", {}),
            interleave=True,
            usage=usage(20, 8),
        ),
        tool_calls_response(tool_call("call_3", "no_such_tool", {"x": 1}), usage=usage(40, 4)),
        text_response("The sum is 5.", usage=usage(60, 6, cached=10)),
    )


async def test_litellm_tool_loop_over_websocket(openai_client: TestClient, token: str, fake_openai: Any) -> None:
    script_tool_turn(fake_openai)
    ws = await connect(openai_client, token)
    frames = await chat(ws, "What is 2 + 3?")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    calls = of(frames, "chat.stream.tool_call")
    assert [(c["name"], c["input"]) for c in calls] == [
        ("add", {"a": 2, "b": 3}),
        ("explode", {}),
        ("no_such_tool", {"x": 1}),
    ]
    results = {r["toolCallId"]: r for r in of(frames, "chat.stream.tool_result")}
    assert results["call_1"]["output"] == 5 and results["call_1"]["isError"] is False
    assert results["call_2"]["isError"] is True and "boom" in results["call_2"]["output"]
    assert results["call_3"]["isError"] is True and "Unknown tool" in results["call_3"]["output"]
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "The sum is 5."
    end = frames[-1]
    assert end["finishReason"] == "stop"
    # turn totals over three calls; cached tokens are reported apart from fresh input
    assert (end["usage"]["inputTokens"], end["usage"]["cacheReadTokens"], end["usage"]["outputTokens"]) == (
        20 + 40 + 50,
        10,
        18,
    )

    # the results went back to the model as tool messages, and the tools were sent as functions
    second = fake_openai.requests[1].body
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert {m["tool_call_id"] for m in tool_messages} == {"call_1", "call_2"}
    assert {t["function"]["name"] for t in second["tools"]} == {"add", "explode", "clock"}
    records = await openai_client.server.app[state.REGISTRY].usage.records(session_id=frames[0]["sessionId"])
    assert [r["model"] for r in records] == [MODEL] * 3 and not any(r["estimated"] for r in records)

    # the tools section measures exactly the definitions that were sent
    await ws.send_json({"type": "context.inspect", "id": "i1", "sessionId": frames[0]["sessionId"]})
    inspection = json.loads((await ws.receive(timeout=10)).data)
    tools = next(s for s in inspection["sections"] if s["name"] == "tools")
    sent = [
        {
            "name": t["function"]["name"],
            "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"],
        }
        for t in second["tools"]
    ]
    assert tools["byteCount"] == len(json.dumps(sent, ensure_ascii=False).encode()) and tools["tokenEstimate"] > 0

    # the stored turn is valid history for the next one
    fake_openai.enqueue(text_response("Anything else?"))
    frames = await chat(ws, "thanks", "r2", sessionId=frames[0]["sessionId"])
    assert frames[-1]["type"] == "chat.stream.end"
    roles = [m["role"] for m in fake_openai.requests[-1].body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant", "user"]
    await ws.close()


async def test_litellm_tool_loop_over_sse(
    openai_client: TestClient, auth_headers: dict[str, str], fake_openai: Any
) -> None:
    script_tool_turn(fake_openai)
    chunks = await read_all(await post_chat(openai_client, auth_headers, "tools-sse", user("What is 2 + 3?")))
    check_protocol(chunks)
    inputs = chunks_of(chunks, "tool-input-available")
    assert [c["toolName"] for c in inputs] == ["add", "explode", "no_such_tool"]
    assert chunks_of(chunks, "tool-output-available") == [
        {"type": "tool-output-available", "toolCallId": "call_1", "output": 5}
    ]
    assert {c["toolCallId"] for c in chunks_of(chunks, "tool-output-error")} == {"call_2", "call_3"}
    assert types(chunks).count("finish-step") == 3
    # each step's tool results come before its finish-step
    assert types(chunks).index("tool-output-available") < types(chunks).index("finish-step")
    finish = chunks[-2]
    assert finish["type"] == "finish" and finish["finishReason"] == "stop"
    assert finish["messageMetadata"]["usage"]["outputTokens"] == 18


async def test_max_steps_over_sse(
    make_client: Any, auth_headers: dict[str, str], fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-key")
    pm = create_plugin_manager()
    pm.register(Tools())
    client = await make_client(
        pm=pm, models={"default": MODEL}, providers={"openai": {"base_url": fake_openai.url}}, chat={"max_steps": 2}
    )
    fake_openai.enqueue(*(tool_calls_response(tool_call(f"call_{i}", "add", {"a": i, "b": 1})) for i in range(3)))
    chunks = await read_all(await post_chat(client, auth_headers, "steps", user("loop forever")))
    check_protocol(chunks)
    assert len(fake_openai.requests) == 2
    assert len(chunks_of(chunks, "tool-output-available")) == 2
    assert chunks[-2]["finishReason"] == "tool-calls"


@pytest.mark.skipif(importlib.util.find_spec("agentspace_echo") is None, reason="pip install ./plugins/agentspace-echo")
async def test_echo_plugin_through_the_gateway(make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed provider plugin, found through its entry point, serves chats with realistic usage."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "echo")
    client = await make_client(
        pm=create_plugin_manager(),
        models={"default": "echo/reasoning"},
        pricing={"echo/reasoning": {"input_per_mtok": 0, "output_per_mtok": 0}},
    )
    ws = await connect(client, token)
    frames = await chat(ws, "say this back")
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "say this back"
    assert of(frames, "chat.stream.reasoning")
    end = frames[-1]
    assert end["usage"]["inputTokens"] > 0 and end["usage"]["outputTokens"] > 0 and end["usage"]["totalCost"] == 0
    session = await client.server.app[state.REGISTRY].sessions.get(frames[0]["sessionId"])
    assert json.dumps(session["messages"][-1]["parts"]).count("reasoning") == 1
    await ws.close()


async def test_tool_output_that_json_lacks_becomes_text(
    openai_client: TestClient, token: str, fake_openai: Any
) -> None:
    """A tool may return datetimes or tuples: the model, the client and the store all get JSON."""
    fake_openai.enqueue(tool_calls_response(tool_call("call_t", "clock", {})), text_response("It is six."))
    ws = await connect(openai_client, token)
    frames = await chat(ws, "what time is it?")
    expected = {"now": "2026-11-22 06:00:00+00:00", "zones": ["UTC"]}
    assert of(frames, "chat.stream.tool_result")[0]["output"] == expected
    tool_message = next(m for m in fake_openai.requests[1].body["messages"] if m["role"] == "tool")
    assert json.loads(tool_message["content"]) == expected
    stored = await openai_client.server.app[state.REGISTRY].sessions.get(frames[0]["sessionId"])
    assert {
        "type": "tool-result",
        "toolCallId": "call_t",
        "name": "clock",
        "output": expected,
        "isError": False,
    } in stored["messages"][-1]["parts"]
    await ws.close()


class UndecodableTools:
    """Tools whose text came from bytes decoded with ``surrogateescape`` (a file that is not UTF-8): lone surrogates."""

    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def read(args: dict[str, Any]) -> dict[str, Any]:
            return {"text": b"caf\xe9".decode("utf-8", "surrogateescape")}

        async def fail(args: dict[str, Any]) -> Any:
            raise ValueError(b"bad \xff byte".decode("utf-8", "surrogateescape"))

        register(Tool("read", "Read a file", {"type": "object", "properties": {}}, read))
        register(Tool("fail", "Always fails", {"type": "object", "properties": {}}, fail))


async def test_a_tool_result_with_lone_surrogates_is_sent_and_stored_with_replacements(
    make_client: Any, fake_openai: Any, token: str, auth_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool's output and a tool's error reach the client, the model and the store with U+FFFD for what UTF-8 cannot
    carry (before, the result frame could not be encoded and the turn never ended on the socket)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-key")
    pm = create_plugin_manager()
    pm.register(UndecodableTools())
    client = await make_client(pm=pm, models={"default": MODEL}, providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.enqueue(
        tool_calls_response(tool_call("call_1", "read", {}), tool_call("call_2", "fail", {}), usage=usage(20, 8)),
        text_response("done", usage=usage(30, 2)),
    )
    ws = await connect(client, token)
    frames = await chat(ws, "read it")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    results = {r["toolCallId"]: r for r in of(frames, "chat.stream.tool_result")}
    assert results["call_1"]["output"] == {"text": "caf\ufffd"}
    assert results["call_2"]["isError"] is True and "bad \ufffd byte" in results["call_2"]["output"]
    resp = await client.get(f"/api/sessions/{frames[0]['sessionId']}", headers=auth_headers)
    stored = [p for m in (await resp.json())["session"]["messages"] for p in m["parts"] if p["type"] == "tool-result"]
    assert [p["output"] for p in stored][:1] == [{"text": "caf\ufffd"}]
    await ws.close()
