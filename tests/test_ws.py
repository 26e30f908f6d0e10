"""The WebSocket protocol (docs/protocol.md) end to end: aiohttp's WebSocket client against the real app,
the real anthropic SDK against the fake Anthropic upstream over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace import Tool, hookimpl
from agentspace.cli import main as cli
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state as STATE
from tests.conftest import TEST_KEY, wait_until
from tests.fakes.anthropic_upstream import (
    citations_response,
    error_event,
    error_status,
    text_response,
    thinking_response,
    tool_use_response,
)
from tests.support.ws import chat, connect, of, receive, receive_after
from tests.tool_plugins import WeatherTools

# --- authentication -----------------------------------------------------------------------------


async def test_header_auth_and_full_chat(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(
        text_response("Hello there, friend", chunks=3, usage={"input_tokens": 31}, delta_usages=[{"output_tokens": 7}])
    )
    ws = await connect(client, token)
    frames = await chat(ws, "Hi!")
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["session.created", "chat.stream.start"]
    assert kinds[-1] == "chat.stream.end"
    assert all(f["requestId"] == "r1" for f in frames)
    created = frames[0]
    assert created["model"] == "anthropic/claude-sonnet-4-5" and created["sessionId"]
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "Hello there, friend"
    assert {f["contentType"] for f in of(frames, "chat.stream.delta")} == {"text"}
    end = frames[-1]
    assert end["finishReason"] == "stop"
    usage = end["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["totalTokens"]) == (31, 7, 38)
    assert usage["totalCost"] == pytest.approx((31 * 3 + 7 * 15) / 1e6)
    # what the SDK sent upstream: our key, the system prompt with the formatting prompt, the message
    sent = fake_anthropic.requests[-1]
    assert sent.api_key == TEST_KEY
    assert sent.body["messages"][-1]["content"][0]["text"] == "Hi!"
    assert "Markdown" in json.dumps(sent.body["system"])
    assert sent.body["thinking"]["type"] == "enabled" and "temperature" not in sent.body

    # the session continues: history goes upstream, no session.created this time
    frames = await chat(ws, "And again", "r2", sessionId=created["sessionId"])
    assert [f["type"] for f in frames][0] == "chat.stream.start"
    history = fake_anthropic.requests[-1].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    await ws.close()


async def test_a_model_slow_to_start_still_gets_the_stream_started(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    # The start frames go out before the model answers: a client sees its session id and the stream
    # starting while the model is still silent.
    # The model is silent until the start frames came (within two 4 s waits: slack for a loaded machine), then
    # the fake is released to answer.
    fake_anthropic.enqueue(text_response("Late answer.").stall(60.0, after=1))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi!"})
    started = [await receive(ws, timeout=4), await receive(ws, timeout=4)]
    assert [f["type"] for f in started] == ["session.created", "chat.stream.start"]
    fake_anthropic.release()
    frames = started + await chat_rest(ws, timeout=30)
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "Late answer."
    await ws.close()


async def chat_rest(ws: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(ws, timeout))
    return frames


async def test_first_frame_auth(client: TestClient, token: str) -> None:
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a1", "token": token})
    assert await receive(ws) == {"type": "auth.ok", "requestId": "a1"}
    await ws.send_json({"type": "session.list", "id": "l1"})
    assert (await receive(ws))["type"] == "session.list.result"
    await ws.close()


@pytest.mark.parametrize(
    "first", [{"type": "auth", "id": "a1", "token": "wrong"}, {"type": "session.list", "id": "x"}, "not json"]
)
async def test_bad_first_frame_is_refused_and_closed(client: TestClient, first: Any) -> None:
    ws = await client.ws_connect("/gateway")
    await (ws.send_str(first) if isinstance(first, str) else ws.send_json(first))
    frame = await receive(ws)
    assert frame["type"] == "error" and frame["code"] == "UNAUTHORIZED"
    closing = await ws.receive(timeout=20)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)


async def test_no_auth_within_timeout_closes(make_client: Any) -> None:
    client = await make_client(server={"auth_timeout_seconds": 0.2})
    ws = await client.ws_connect("/gateway")
    frame = await receive(ws)
    assert frame["code"] == "UNAUTHORIZED"
    assert (await ws.receive(timeout=20)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)


# --- streaming content --------------------------------------------------------------------------


async def test_reasoning_sources_and_code_fences(client: TestClient, token: str, fake_anthropic: Any) -> None:
    ws = await connect(client, token)
    fake_anthropic.enqueue(thinking_response("Pondering deeply.", "Done."))
    frames = await chat(ws, "think")
    assert "".join(f["delta"] for f in of(frames, "chat.stream.reasoning")) == "Pondering deeply."
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "Done."

    fake_anthropic.enqueue(citations_response())
    frames = await chat(ws, "search", "r2")
    urls = [f["source"]["url"] for f in of(frames, "chat.stream.source")]
    assert sorted(urls) == ["https://example.com/a", "https://example.com/b", "https://example.com/c"]
    assert all(f["source"].get("title") for f in of(frames, "chat.stream.source"))

    fake_anthropic.enqueue(
        text_response("Run:\n```sh\nls -la\n```\nDone", chunks=["Run:\n``", "`sh\nls", " -la\n```\nDo", "ne"])
    )
    frames = await chat(ws, "code", "r3")
    deltas = [(f["delta"], f["contentType"]) for f in of(frames, "chat.stream.delta")]
    assert "".join(d for d, _ in deltas) == "Run:\n```sh\nls -la\n```\nDone"
    code = "".join(d for d, t in deltas if t == "code")
    text = "".join(d for d, t in deltas if t == "text")
    assert code == "```sh\nls -la\n```\n"
    assert text == "Run:\nDone"
    await ws.close()


# --- errors -------------------------------------------------------------------------------------


async def test_malformed_frames_keep_connection_usable(make_client: Any, token: str) -> None:
    client = await make_client(server={"max_frame_bytes": 2000})
    ws = await connect(client, token)
    bad: list[Any] = [
        "not json",
        "[1, 2]",
        json.dumps({"id": "x"}),
        json.dumps({"type": "nope", "id": "u1"}),
        json.dumps({"type": "chat.send", "id": "c1"}),
        json.dumps({"type": "chat.send", "id": "c2", "content": 5}),
        json.dumps({"type": "chat.send", "id": "c3", "content": "x" * 3000}),
    ]
    for frame in bad:
        await ws.send_str(frame)
        reply = await receive(ws)
        assert reply["type"] == "error"
        assert reply["code"] in ("INVALID_MESSAGE", "PAYLOAD_TOO_LARGE"), reply
    await ws.send_bytes(b"\x00\x01")
    assert (await receive(ws))["code"] == "INVALID_MESSAGE"
    assert (await receive_after(ws, {"type": "nope", "id": "u2"}))["requestId"] == "u2"
    await ws.send_json({"type": "session.list", "id": "ok"})
    assert (await receive(ws))["type"] == "session.list.result"
    await ws.close()


async def test_unknown_session_and_model(client: TestClient, token: str) -> None:
    ws = await connect(client, token)
    reply = (await chat(ws, "hi", sessionId="does-not-exist"))[-1]
    assert (reply["code"], reply["requestId"]) == ("SESSION_NOT_FOUND", "r1")
    reply = (await chat(ws, "hi", "r2", model="no-slash-model"))[-1]
    assert reply["code"] == "MODEL_NOT_FOUND"
    reply = await receive_after(ws, {"type": "context.inspect", "id": "i1", "sessionId": "nope"})
    assert reply["code"] == "SESSION_NOT_FOUND"
    await ws.close()


async def test_missing_key_names_the_fix(client: TestClient, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    ws = await connect(client, token)
    reply = (await chat(ws, "hi"))[-1]
    assert reply["code"] == "NO_API_KEY"
    assert reply["message"] == "Anthropic API key not configured. Run: agentspace keys add anthropic"
    await ws.close()


async def test_upstream_errors(make_client: Any, token: str, fake_anthropic: Any) -> None:
    client = await make_client(chat={"max_retries": 0})
    ws = await connect(client, token)
    fake_anthropic.enqueue(error_status(429, retry_after=1))
    reply = (await chat(ws, "hi"))[-1]
    assert reply["code"] == "RATE_LIMITED"
    fake_anthropic.enqueue(error_event("overloaded_error", "Overloaded", text="partial answer"))
    frames = await chat(ws, "hi", "r2")
    assert frames[-1]["code"] == "LLM_ERROR"
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "partial answer"
    assert "sk-ant-test" not in json.dumps(frames)
    await ws.close()


async def test_retry_before_first_token(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(error_status(529), text_response("recovered"))
    ws = await connect(client, token)
    frames = await chat(ws, "hi")
    assert frames[-1]["type"] == "chat.stream.end"
    assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == "recovered"
    await ws.close()


# --- one stream at a time, abort, disconnect ------------------------------------------------------


async def test_concurrent_stream_rejected(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(text_response("slow " * 10, chunks=10).with_delay(0.05))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "first"})
    started = await receive(ws)
    session_id = started["sessionId"]
    await ws.send_json({"type": "chat.send", "id": "r2", "content": "second"})
    ws2 = await connect(client, token)
    await ws2.send_json({"type": "chat.send", "id": "s1", "content": "same session", "sessionId": session_id})
    assert (await receive(ws2))["code"] == "STREAM_IN_PROGRESS"
    frames = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if frame["type"] == "chat.stream.end":
            break
    rejected = [f for f in frames if f.get("requestId") == "r2"]
    assert rejected == [
        {"type": "error", "requestId": "r2", "code": "STREAM_IN_PROGRESS", "message": rejected[0]["message"]}
    ]
    await ws.close()
    await ws2.close()


async def test_abort_stores_partial_and_bills(
    client: TestClient, token: str, fake_anthropic: Any, auth_headers: Any
) -> None:
    fake_anthropic.enqueue(text_response("word " * 40, chunks=40).with_delay(0.05))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "go"})
    frames = []
    while len(of(frames, "chat.stream.delta")) < 3:
        frames.append(await receive(ws))
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    while frames[-1]["type"] != "chat.stream.end":
        frames.append(await receive(ws))
    assert frames[-1]["finishReason"] == "aborted"
    assert frames[-1]["usage"]["outputTokens"] > 0
    session_id = frames[0]["sessionId"]
    gw = client.server.app[STATE.REGISTRY]
    stored = (await gw.sessions.get(session_id))["messages"][-1]
    assert stored["aborted"] is True and stored["role"] == "assistant"
    assert stored["content"].startswith("word word")
    records = await gw.usage.records(session_id=session_id)
    assert len(records) == 1 and records[0]["estimated"] is True and records[0]["outputTokens"] > 0
    await ws.close()


async def test_disconnect_does_not_stop_generation(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(
        text_response("part " * 20, chunks=20, delta_usages=[{"output_tokens": 20}]).with_delay(0.03)
    )
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "go"})
    session_id = (await receive(ws))["sessionId"]
    await receive(ws)
    await ws.close()
    gw = client.server.app[STATE.REGISTRY]

    async def finished() -> bool:
        messages = (await gw.sessions.get(session_id))["messages"]
        return len(messages) == 2

    await wait_until(finished)
    stored = (await gw.sessions.get(session_id))["messages"][-1]
    assert stored["content"] == "part " * 20 and stored["aborted"] is False
    assert stored["finishReason"] == "stop" and stored["usage"]["outputTokens"] == 20
    records = await gw.usage.records(session_id=session_id)
    assert [r["outputTokens"] for r in records] == [20] and records[0]["estimated"] is False


# --- inspection, usage, sessions ----------------------------------------------------------------


async def test_inspect_usage_and_sessions(client: TestClient, token: str, fake_anthropic: Any) -> None:
    ws = await connect(client, token)
    fake_anthropic.enqueue(
        text_response(
            "one",
            usage={"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2},
            delta_usages=[{"output_tokens": 3}],
        )
    )
    frames = await chat(ws, "first question")
    session_id = frames[0]["sessionId"]
    end = frames[-1]["usage"]
    assert (end["cacheReadTokens"], end["cacheWriteTokens"]) == (4, 2)

    reply = await receive_after(ws, {"type": "context.inspect", "id": "i1", "sessionId": session_id})
    assert reply["type"] == "context.inspection" and reply["sessionId"] == session_id
    names = [s["name"] for s in reply["sections"]]
    # Only the sections that are registered: no memory or skills plugin is loaded here.
    assert names == ["system_prompt", "tools", "response_format", "history", "user_message"]
    history = next(s for s in reply["sections"] if s["name"] == "history")
    assert history["byteCount"] > len("first question") and history["tokenEstimate"] > 0
    assert reply["totals"]["byteCount"] == sum(s["byteCount"] for s in reply["sections"])
    assert reply["totals"]["costEstimate"] > 0

    reply = await receive_after(ws, {"type": "usage.query", "id": "u1"})
    model = reply["perModel"]["anthropic/claude-sonnet-4-5"]
    assert (model["inputTokens"], model["outputTokens"], model["requestCount"]) == (10, 3, 1)
    assert reply["grandTotal"]["requestCount"] == 1
    reply = await receive_after(ws, {"type": "usage.query", "id": "u2", "sessionId": "other"})
    assert reply["grandTotal"]["requestCount"] == 0

    reply = await receive_after(ws, {"type": "session.list", "id": "l1"})
    (session,) = reply["sessions"]
    assert session["id"] == session_id and session["messageCount"] == 2 and session["title"] == "first question"
    assert set(session) >= {"id", "title", "model", "createdAt", "lastActivityAt", "messageCount"}
    await ws.close()


async def test_cli_usage_totals_match_upstream(
    client: TestClient, token: str, fake_anthropic: Any, isolated_env: Any
) -> None:
    usages = [(12, 5, 3, 1), (40, 9, 0, 0), (7, 30, 2, 8)]
    for i, (inp, out, read, write) in enumerate(usages):
        fake_anthropic.enqueue(
            text_response(
                f"answer {i}",
                usage={"input_tokens": inp, "cache_read_input_tokens": read, "cache_creation_input_tokens": write},
                delta_usages=[{"output_tokens": out // 2}, {"output_tokens": out}],
            )
        )
    ws = await connect(client, token)
    for i in range(len(usages)):
        assert (await chat(ws, f"q{i}", f"r{i}"))[-1]["type"] == "chat.stream.end"
    await ws.close()
    await client.server.app[STATE.REGISTRY].usage.flush()
    result = CliRunner().invoke(cli, ["usage", "--by-model", "--json"], env={"AGENTSPACE_HOME": str(isolated_env)})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model = report["perModel"]["anthropic/claude-sonnet-4-5"]
    assert model["inputTokens"] == sum(u[0] for u in usages)
    assert model["outputTokens"] == sum(u[1] for u in usages)  # cumulative message_delta: last value, not the sum
    assert model["requestCount"] == 3
    assert report["grandTotal"]["totalTokens"] == sum(sum(u) for u in usages)


# --- the tool loop (tools are plugins) ----------------------------------------------------------


async def test_tool_loop(make_client: Any, token: str, fake_anthropic: Any) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    fake_anthropic.enqueue(
        tool_use_response("get_weather", {"city": "Paris"}, text="Checking."),
        tool_use_response("broken", {}, id="toolu_02"),
        text_response("It is sunny in Paris."),
    )
    ws = await connect(client, token)
    frames = await chat(ws, "weather?")
    calls = of(frames, "chat.stream.tool_call")
    results = of(frames, "chat.stream.tool_result")
    assert [(c["name"], c["input"]) for c in calls] == [("get_weather", {"city": "Paris"}), ("broken", {})]
    assert results[0]["output"] == {"city": "Paris", "forecast": "sunny"} and results[0]["isError"] is False
    assert results[1]["isError"] is True and "sensor offline" in results[1]["output"]
    assert frames[-1]["finishReason"] == "stop"
    assert frames[-1]["usage"]["inputTokens"] == 3 * 25  # the turn's total over three calls
    # the tool results went back to the model, the tools were sent and measured
    second = fake_anthropic.requests[1].body
    assert second["messages"][-1]["content"][0]["type"] == "tool_result"
    assert {t["name"] for t in second["tools"]} == {"get_weather", "broken"}
    gw = client.server.app[STATE.REGISTRY]
    assert len(await gw.usage.records(session_id=frames[0]["sessionId"])) == 3
    await ws.close()


async def test_max_steps_reached(make_client: Any, token: str, fake_anthropic: Any) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm, chat={"max_steps": 2})
    fake_anthropic.enqueue(*(tool_use_response("get_weather", {"city": c}, id=f"toolu_{c}") for c in ("A", "B", "C")))
    ws = await connect(client, token)
    frames = await chat(ws, "loop")
    assert len(fake_anthropic.requests) == 2
    assert len(of(frames, "chat.stream.tool_result")) == 2
    assert frames[-1]["finishReason"] == "tool-calls"
    await ws.close()


async def test_unknown_provider_prefix_is_model_not_found(client: TestClient, token: str) -> None:
    ws = await connect(client, token)
    reply = (await chat(ws, "hi", model="nosuchprovider/some-model"))[-1]
    assert reply["code"] == "MODEL_NOT_FOUND" and "agentspace models" in reply["message"]
    await ws.close()


async def test_refused_call_is_recorded_with_zero_tokens(make_client: Any, token: str, fake_anthropic: Any) -> None:
    """One usage record per call, but a call the upstream refused before any output costs nothing."""
    client = await make_client(chat={"max_retries": 0})
    fake_anthropic.enqueue(error_status(429, retry_after=1))
    ws = await connect(client, token)
    frames = await chat(ws, "hi")
    assert frames[-1]["code"] == "RATE_LIMITED"
    records = await client.server.app[STATE.REGISTRY].usage.records(session_id=frames[0]["sessionId"])
    assert [
        (r["inputTokens"], r["outputTokens"], r["totalCost"], r["estimated"], r["finishReason"]) for r in records
    ] == [(0, 0, 0, False, "error")]
    await ws.close()


# --- frame writing --------------------------------------------------------------------------------


async def test_compressed_and_plain_sockets_get_the_same_frames(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    # A plain socket gets each burst in one socket write (frames we encode); a socket with permessage-deflate
    # (what browsers negotiate) gets aiohttp's own compressed frames, one at a time. Clients see no difference.
    answer = "Some text, then code:\n```py\nprint(1)\n```\nand text again."
    results = []
    for compress in (0, 15):
        fake_anthropic.enqueue(text_response(answer, chunks=12))
        ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"}, compress=compress)
        assert ws.compress == compress
        frames = await chat(ws, "Hi!")
        await ws.close()
        results.append(
            [(f["type"], f.get("delta"), f.get("contentType")) for f in frames if f["type"] != "session.created"]
        )
    assert results[0] == results[1]
    deltas = [r for r in results[0] if r[0] == "chat.stream.delta"]
    assert "".join(d[1] for d in deltas) == answer and {d[2] for d in deltas} == {"text", "code"}


async def test_a_slow_reader_gets_every_frame_in_order(client: TestClient, token: str, fake_anthropic: Any) -> None:
    # More answer than the sockets' buffers hold (the client's receive buffer is kept small), while the client
    # reads nothing: bursts wait for the socket to drain, and nothing is lost or reordered.
    pieces = [f"{i:05d}" + "x" * 9_995 for i in range(600)]
    fake_anthropic.enqueue(text_response("".join(pieces), chunks=pieces))

    def small_receive_buffer(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await http.ws_connect(client.make_url("/gateway"), headers={"Authorization": f"Bearer {token}"})
        await ws.send_json({"type": "chat.send", "id": "big", "content": "Write a lot"})

        async def answered() -> bool:
            return bool(fake_anthropic.requests)

        await wait_until(answered)
        await asyncio.sleep(1.0)  # 6 MB of frames meet a client that reads nothing
        text = []
        while True:
            frame = await receive(ws)
            if frame["type"] == "chat.stream.delta":
                text.append(frame["delta"])
            elif frame["type"] == "chat.stream.end":
                break
            else:
                assert frame["type"] in ("session.created", "chat.stream.start"), frame
        assert "".join(text) == "".join(pieces)


class _SlowTools:
    """``wait`` never returns by itself: a tool that hangs (a stuck network call)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def wait(args: dict[str, Any]) -> Any:
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        register(Tool("wait", "Waits", {"type": "object", "properties": {}}, wait))


async def test_abort_while_a_tool_runs_stops_the_tool_and_ends_the_turn(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """chat.abort (and the shutdown's grace end, which aborts the same way) during a tool that never returns:
    the tool is cancelled and the turn ends aborted now, its answer stored, instead of waiting for the tool."""
    tools = _SlowTools()
    pm = create_plugin_manager()
    pm.register(tools)
    client = await make_client(pm=pm)
    fake_anthropic.enqueue(tool_use_response("wait", {}, text="Waiting."), text_response("never asked"))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "wait"})
    await asyncio.wait_for(tools.started.wait(), 30)
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(ws))
    assert (frames[-1]["type"], frames[-1]["finishReason"]) == ("chat.stream.end", "aborted")
    (result,) = of(frames, "chat.stream.tool_result")
    assert result["isError"] is True and result["output"] == "Tool wait was stopped."
    assert tools.cancelled and len(fake_anthropic.requests) == 1  # nothing called after the stop
    gw = client.server.app[STATE.REGISTRY]
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    stored = (await gw.sessions.get(session_id))["messages"][-1]
    assert stored["aborted"] is True and stored["content"] == "Waiting."
    assert len(await gw.usage.records(session_id=session_id)) == 1
    await ws.close()
