"""Graceful shutdown of a real ``agentspace serve`` process: SIGTERM refuses new turns, lets running streams
finish within [server] shutdown_grace_seconds, stores the rest as aborted, flushes the stores and closes
sockets with GOING_AWAY (1001). The slow upstream runs in the test process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema

from agentspace.storage.embedded.sessions import SessionStore
from agentspace.storage.embedded.usage import UsageStore
from agentspace.transports.routes import document
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ledgers import journal_entries, wait_for_notes

FAST = "done " * 8
SLOW = "slow " * 400


async def frames_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    frames = []
    while not frames or frames[-1]["type"] not in (kind, "error"):
        frames.append(await ws.receive_json(timeout=30))
    return frames


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The code of the close frame the server sent (not ``ws.close_code``: a client that reads the frame
    after the server has gone records 1006, because its own close reply can no longer be sent)."""
    for _ in range(1000):
        msg = await ws.receive(timeout=30)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return int(msg.data)
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code
    raise AssertionError("the socket stayed open")


async def test_sigterm_finishes_within_grace_and_stores_the_rest_as_aborted(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    fake_anthropic.enqueue(
        fa.text_response(FAST, chunks=8, delta_usages=[{"output_tokens": 8}]).with_delay(0.1),  # ~1.4 s in all
        fa.text_response(SLOW, chunks=400).with_delay(0.1),  # ~40 s: cut short by the 3 s grace
    )
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 3.0})
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession() as http:
            fast = await http.ws_connect(server.ws_url, headers=headers)
            slow = await http.ws_connect(server.ws_url, headers=headers)
            idle = await http.ws_connect(server.ws_url, headers=headers)
            await fast.send_json({"type": "chat.send", "id": "fast", "content": "quick one"})
            fast_frames = await frames_until(fast, "chat.stream.delta")
            await slow.send_json({"type": "chat.send", "id": "slow", "content": "long one"})
            slow_frames = await frames_until(slow, "chat.stream.delta")

            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_log("running stream(s)")  # shutdown has begun
            async with http.get(server.url + "/healthz") as health:  # draining: new calls go elsewhere
                body = await health.json()
                assert (health.status, body) == (503, {"status": "shutting down"})
            # the answer is the one the OpenAPI document gives /healthz
            doc = document()
            schema = {**doc["paths"]["/healthz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]}
            jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(body)
            await idle.send_json({"type": "chat.send", "id": "late", "content": "too late"})
            refused = await idle.receive_json(timeout=30)
            assert (refused["type"], refused["code"]) == (
                "error",
                "SERVICE_UNAVAILABLE",
            ) and "shutting down" in refused["message"]

            fast_frames += await frames_until(fast, "chat.stream.end")
            slow_frames += await frames_until(slow, "chat.stream.end")
            assert (fast_frames[-1]["type"], fast_frames[-1]["finishReason"]) == ("chat.stream.end", "stop")
            assert (slow_frames[-1]["type"], slow_frames[-1]["finishReason"]) == ("chat.stream.end", "aborted")
            assert [await close_code(ws) for ws in (fast, slow, idle)] == [1001, 1001, 1001]
        assert await server.process.wait() == 0
    finally:
        await server.aclose()
    assert server.log_problems() == []

    sessions, usage = SessionStore(server.data_dir), UsageStore(server.data_dir)
    fast_id, slow_id = fast_frames[0]["sessionId"], slow_frames[0]["sessionId"]
    complete = sessions.get_sync(fast_id)["messages"][-1]  # type: ignore[index]
    assert complete["content"] == FAST and complete["aborted"] is False and complete["finishReason"] == "stop"
    partial = sessions.get_sync(slow_id)["messages"][-1]  # type: ignore[index]
    assert partial["aborted"] is True and partial["finishReason"] == "aborted"
    assert 0 < len(partial["content"]) < len(SLOW) and SLOW.startswith(partial["content"])
    received = "".join(f["delta"] for f in slow_frames if f["type"] == "chat.stream.delta")
    assert partial["content"] == received  # what the client saw is what was stored
    assert [(r["finishReason"], r["outputTokens"]) for r in usage.records_sync(session_id=fast_id)] == [("stop", 8)]
    (record,) = usage.records_sync(session_id=slow_id)
    assert record["finishReason"] == "aborted" and record["estimated"] is True and record["outputTokens"] > 0
    assert len(sessions.summaries_sync()) == 2  # the late request created nothing


async def two_turns_then_a_stalled_summary(
    fake_anthropic: fa.FakeAnthropic, http: aiohttp.ClientSession, server: GatewayProcess
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """The compaction tests' arrange: a session of two answered turns over the WebSocket, and the upstream's next
    answer (the summary) sending message_start (5000 input tokens) and ping, then nothing for a minute. The socket
    and the session's id."""
    fake_anthropic.enqueue(
        fa.text_response("first answer"),
        fa.text_response("second answer"),
        fa.text_response("summary " * 50, chunks=50, usage={"input_tokens": 5000}).stall(60, after=2),
    )
    ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
    await ws.send_json({"type": "chat.send", "id": 1, "content": "one"})
    session_id = (await frames_until(ws, "chat.stream.end"))[0]["sessionId"]
    await ws.send_json({"type": "chat.send", "id": 2, "content": "two", "sessionId": session_id})
    await frames_until(ws, "chat.stream.end")
    return ws, session_id


async def summary_call_answered(server: GatewayProcess) -> None:
    """Until the ledger notes the usage the upstream reported for the summary's call (its message_start)."""
    await wait_for_notes(
        lambda: journal_entries(server.data_dir),
        1,
        lambda e: e.get("purpose") == "compact" and isinstance(e.get("usage"), dict),
    )


def assert_the_summary_call_recorded_aborted(server: GatewayProcess, session_id: str) -> None:
    (record,) = [r for r in UsageStore(server.data_dir).records_sync(session_id=session_id) if r["purpose"]]
    assert (record["purpose"], record["finishReason"], record["error"]) == ("compact", "aborted", "ABORTED")
    assert record["inputTokens"] == 5000 and record["answered"] is True and record["recovered"] is not True


async def test_a_compaction_the_upstream_took_is_recorded_when_shutdown_stops_it(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """The upstream bills a compaction's call once it answered: stopped by the shutdown, the call is recorded
    (aborted, with the input the upstream reported), not given back as if it was never sent."""
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 1.0})
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws, session_id = await two_turns_then_a_stalled_summary(fake_anthropic, http, server)
            headers = {"Authorization": f"Bearer {server.token}"}
            compact = asyncio.create_task(
                http.post(f"{server.url}/api/sessions/{session_id}/compact", headers=headers, json={})
            )
            await summary_call_answered(server)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            # Stopped at the grace's end, as a /v1 call is: the client hears why (it waited ~13 s more, then lost
            # its connection).
            refused = await compact
            assert refused.status == 503, await refused.text()
            assert (await refused.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    finally:
        await server.aclose()

    assert_the_summary_call_recorded_aborted(server, session_id)


async def test_a_compaction_asked_for_over_the_websocket_is_stopped_and_refused_at_the_grace_end(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """The same over the WebSocket: ``session.compact`` is stopped at the grace's end like the HTTP compaction,
    its call recorded aborted before the sinks close, and the client gets the refusal's error frame before the
    socket closes with GOING_AWAY. It ran on until aiohttp's own shutdown timeout, and the client got no answer."""
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 1.0})
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws, session_id = await two_turns_then_a_stalled_summary(fake_anthropic, http, server)
            await ws.send_json({"type": "session.compact", "id": 3, "sessionId": session_id})
            await summary_call_answered(server)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            refused = await ws.receive_json(timeout=30)
            assert (refused["type"], refused["requestId"], refused["code"]) == ("error", 3, "SERVICE_UNAVAILABLE")
            assert "shutting down" in refused["message"]
            assert await close_code(ws) == 1001
            assert await server.process.wait() == 0
    finally:
        await server.aclose()

    assert_the_summary_call_recorded_aborted(server, session_id)
