"""Random and malformed WebSocket frames and HTTP bodies (hypothesis) never crash or wedge the server:
each gets an answer (an error frame, a 4xx, a stream) or a clean close, nothing is logged as an unhandled
error, and a well-behaved client on another connection keeps working throughout."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentspace import security
from tests.support.ws import chat, connect, receive

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
MAX_FRAME = 2000

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message_types = st.sampled_from(
    ["chat.send", "chat.abort", "context.inspect", "usage.query", "session.list", "auth"]
) | st.text(max_size=12)
# Strings with lone surrogates, as JSON.stringify writes a string cut mid-emoji (json.dumps escapes them alike).
surrogate_texts = st.text(st.characters() | st.characters(categories=["Cs"]), min_size=1, max_size=12)
# Nesting deeper than the JSON decoder recurses (issue 15 item 6).
deep_json = st.sampled_from(["[" * 3000, '{"a":' * 3000, "[" * 100_000])
session_ids = st.sampled_from(["", "../etc/passwd", "a" * 200, "s_missing", "x/y", "\u0000"]) | st.text(max_size=20)

protocol_frames = st.fixed_dictionaries(
    {"type": message_types | json_scalars, "id": st.text(max_size=10) | st.integers() | json_values | surrogate_texts},
    optional={
        "content": st.text(max_size=60) | json_values | st.just("x" * (MAX_FRAME + 10)) | surrogate_texts,
        "sessionId": session_ids | json_values | surrogate_texts,
        "model": st.sampled_from(
            ["anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini", "nope", "a/", "/b", "anthropic/claude\nx"]
        )
        | json_values
        | surrogate_texts,
        "requestId": st.text(max_size=10) | json_values,
        "token": st.text(max_size=50),
    },
).map(lambda d: json.dumps(d))

frames = st.one_of(
    protocol_frames,
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.text(min_size=MAX_FRAME + 1, max_size=MAX_FRAME + 50),  # over [server] max_frame_bytes
    deep_json,
)


@pytest.fixture
async def server(make_client: Any, token: str, caplog: pytest.LogCaptureFixture) -> Any:
    client = await make_client(
        server={"max_frame_bytes": MAX_FRAME, "max_body_bytes": 4000, "messages_per_minute": 100_000}
    )
    good = await connect(client, token)
    yield client, token, good
    await good.send_json({"type": "chat.send", "id": "final", "content": "still there?"})
    frames_ = []
    while not frames_ or frames_[-1]["type"] not in ("chat.stream.end", "error"):
        frames_.append(await receive(good))
    assert frames_[-1]["type"] == "chat.stream.end"
    await good.close()
    unhandled = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert unhandled == [], [r.getMessage() for r in unhandled]


async def still_works(good: Any, tag: str) -> None:
    await good.send_json({"type": "session.list", "id": tag})
    reply = await receive(good)
    assert (reply["type"], reply["requestId"]) == ("session.list.result", tag)


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=6))
async def test_random_frames_after_auth(server: Any, sent: list[Any]) -> None:
    client, token, good = server
    ws = await connect(client, token)
    for frame in sent:
        if ws.closed:
            break
        await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
    if not ws.closed:
        await ws.send_json({"type": "session.list", "id": "sentinel"})
    for _ in range(200):  # read up to the sentinel's answer, or the close
        msg = await ws.receive(timeout=10)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            assert ws.close_code == 1009  # only a frame past 4x the limit closes the socket
            break
        assert msg.type == WSMsgType.TEXT
        reply = json.loads(msg.data)
        assert isinstance(reply, dict) and isinstance(reply.get("type"), str)
        if reply["type"] == "error":
            assert reply["code"] in (
                "INVALID_MESSAGE",
                "PAYLOAD_TOO_LARGE",
                "SESSION_NOT_FOUND",
                "STREAM_IN_PROGRESS",
                "MODEL_NOT_FOUND",
                "NO_API_KEY",
                "LLM_ERROR",
                "RATE_LIMITED",
            ), reply
        if reply.get("requestId") == "sentinel" and reply["type"] == "session.list.result":
            break
    else:
        raise AssertionError("no answer to the sentinel")
    await ws.close()
    await still_works(good, "after-frames")


@FUZZ
@given(first=frames)
async def test_random_first_frame_before_auth(server: Any, first: Any) -> None:
    client, _, good = server
    ws = await client.ws_connect("/gateway")
    await (ws.send_bytes(first) if isinstance(first, bytes) else ws.send_str(first))
    msg = await ws.receive(timeout=10)
    if msg.type == WSMsgType.TEXT:
        assert json.loads(msg.data)["code"] == "UNAUTHORIZED"
        msg = await ws.receive(timeout=10)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    await ws.close()
    client.server.app[security.AUTH_FAILURES]._levels.clear()  # the failures would rate-limit this address
    await still_works(good, "after-preauth")


ui_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "reasoning", "file", "step-start"]) | json_scalars},
    optional={"text": st.text(max_size=30) | json_scalars | surrogate_texts},
)
ui_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | json_scalars},
    optional={
        "id": st.text(max_size=8) | json_scalars | surrogate_texts,
        "parts": st.lists(ui_parts | json_scalars, max_size=3) | json_scalars,
    },
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "id": session_ids | json_scalars,
        "threadId": session_ids,
        "messages": st.lists(ui_messages | json_scalars, max_size=3) | json_values,
        "model": st.sampled_from(["anthropic/claude-sonnet-4-5", "nope"]) | json_scalars | surrogate_texts,
        "trigger": st.sampled_from(["submit-message", "regenerate-message"]) | json_scalars,
    },
)
http_bodies = st.one_of(
    chat_bodies.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.just(b"{" * 5000),
    deep_json.map(str.encode),
)


@FUZZ
@given(body=http_bodies, path_id=session_ids)
async def test_random_http_bodies_and_ids(server: Any, body: bytes, path_id: str) -> None:
    client, token, good = server
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    resp = await client.post("/api/chat", data=body, headers=headers)
    assert resp.status in (200, 400, 404, 409, 413), await resp.text()
    if resp.status == 200:
        text = await resp.text()
        assert text.endswith("data: [DONE]\n\n")
        # What was answered was stored: the session reads back.
        session_id = json.loads(body)["id"] if "id" in json.loads(body) else json.loads(body)["threadId"]
        resp = await client.get(f"/api/sessions/{session_id}", headers=headers)
        assert resp.status == 200, await resp.text()
    else:
        assert "code" in (await resp.json())["error"]
    quoted = quote(path_id, safe="") or "%20"
    for method, path in (
        ("GET", f"/api/sessions/{quoted}"),
        ("GET", f"/api/sessions/{quoted}/context"),
        ("GET", f"/api/chat/{quoted}/stream"),
    ):
        resp = await client.request(method, path, headers=headers)
        assert resp.status < 500, (path, resp.status, await resp.text())
        await resp.read()
    await still_works(good, "after-http")


async def test_the_well_behaved_client_can_chat(server: Any) -> None:
    client, token, _ = server
    ws = await connect(client, token)
    frames_ = await chat(ws, "hello")
    assert frames_[-1]["type"] == "chat.stream.end"
    await ws.close()
