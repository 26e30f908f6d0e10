"""One service layer for every transport: the WebSocket and HTTP refuse the same things with the same codes
(issue 16 item 2). Each test asks both transports of the running app and compares."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state as STATE
from tests.support.ws import chat, connect, receive_after


async def post_chat(client: TestClient, headers: dict[str, str], session_id: str, text: str, **extra: Any) -> Any:
    body = {
        "id": session_id,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        **extra,
    }
    return await client.post("/api/chat", json=body, headers=headers)


async def test_shutdown_refusal_is_the_same_code_on_both_transports(
    client: TestClient, token: str, auth_headers: dict[str, str]
) -> None:
    ws = await connect(client, token)
    client.app[STATE.SHUTTING_DOWN].set()  # what server shutdown sets first (server._finish_streams)
    reply = (await chat(ws, "too late"))[-1]
    assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "SERVICE_UNAVAILABLE", "r1")
    resp = await post_chat(client, auth_headers, "late", "too late")
    error = (await resp.json())["error"]
    assert resp.status == 503 and error["code"] == "SERVICE_UNAVAILABLE"
    assert error["message"] == reply["message"]
    client.app[STATE.SHUTTING_DOWN].clear()
    await ws.close()


async def test_unknown_model_in_context_inspection_is_refused_on_both(
    client: TestClient, token: str, auth_headers: dict[str, str]
) -> None:
    ws = await connect(client, token)
    end = (await chat(ws, "hello"))[-1]
    assert end["type"] == "chat.stream.end"
    session_id = (await receive_after(ws, {"type": "session.list", "id": "l"}))["sessions"][0]["id"]

    for model in ("nobody/serves-this", "no-slash"):
        reply = await receive_after(ws, {"type": "context.inspect", "id": "i", "sessionId": session_id, "model": model})
        assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "MODEL_NOT_FOUND", "i"), reply
        resp = await client.get(f"/api/sessions/{session_id}/context", params={"model": model}, headers=auth_headers)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "MODEL_NOT_FOUND"

    served = await receive_after(
        ws, {"type": "context.inspect", "id": "j", "sessionId": session_id, "model": "anthropic/claude-haiku-4-5"}
    )
    assert (served["type"], served["model"]) == ("context.inspection", "anthropic/claude-haiku-4-5")
    await ws.close()


@pytest.mark.parametrize(
    ("ws_field", "http_field", "value"),
    [
        ("sessionId", "id", "../etc"),
        ("sessionId", "id", "x" * 129),
        ("model", "model", "anthropic/claude\nsonnet"),
        ("model", "model", 7),
    ],
)
async def test_chat_fields_are_validated_alike(
    client: TestClient, token: str, auth_headers: dict[str, str], ws_field: str, http_field: str, value: Any
) -> None:
    """One validator for the chat fields: the same refusal, naming the field, on both transports."""
    ws = await connect(client, token)
    reply = (await chat(ws, "hi", **{ws_field: value}))[-1]
    assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "INVALID_MESSAGE", "r1"), reply
    assert reply["message"].startswith(ws_field + ":")

    if http_field == "id":
        body: dict[str, Any] = {"id": value, "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
        resp = await client.post("/api/chat", json=body, headers=auth_headers)
    else:
        resp = await post_chat(client, auth_headers, "valid-id", "hi", **{http_field: value})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "INVALID_MESSAGE"
    assert [f["path"] for f in error["fields"]] == [http_field]
    assert (await client.get("/api/sessions", headers=auth_headers)).status == 200
    assert (await (await client.get("/api/sessions", headers=auth_headers)).json())["sessions"] == []
    await ws.close()


async def test_usage_query_checks_the_session_id_on_both(
    client: TestClient, token: str, auth_headers: dict[str, str]
) -> None:
    ws = await connect(client, token)
    reply = await receive_after(ws, {"type": "usage.query", "id": "q", "sessionId": "a\tb"})
    assert (reply["code"], reply["requestId"]) == ("INVALID_MESSAGE", "q") and "sessionId" in reply["message"]
    resp = await client.get("/api/usage", params={"sessionId": "a\tb"}, headers=auth_headers)
    error = (await resp.json())["error"]
    assert resp.status == 400 and [f["path"] for f in error["fields"]] == ["sessionId"]
    await ws.close()
