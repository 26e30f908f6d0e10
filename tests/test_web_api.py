"""The HTTP routes the web app added: stopping a running answer, renaming a session, usage per session and per
day and model, and the same-origin page allowed to call the API (over HTTP against the real app)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import text_response


def chat_body(session_id: str, text: str) -> dict[str, Any]:
    return {"id": session_id, "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}]}


async def test_delete_stream_stops_the_answer_and_keeps_it(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("".join(f"w{i} " for i in range(40)), chunks=40).with_delay(0.05))
    resp = await client.post("/api/chat", json=chat_body("stop-me", "count"), headers=auth_headers)
    assert resp.status == 200
    received = b""
    while received.count(b'"type":"text-delta"') < 5:
        chunk = await resp.content.readany()
        assert chunk, received
        received += chunk
    stopped = await client.delete("/api/chat/stop-me/stream", headers=auth_headers)
    assert stopped.status == 204
    received += await resp.content.read()
    assert b'{"type":"abort"}' in received and received.endswith(b"data: [DONE]\n\n")
    session = await (await client.get("/api/sessions/stop-me", headers=auth_headers)).json()
    answer = session["session"]["messages"][-1]
    assert answer["aborted"] is True and answer["content"].startswith("w0 w1") and "w39" not in answer["content"]
    again = await client.delete("/api/chat/stop-me/stream", headers=auth_headers)
    assert again.status == 404 and (await again.json())["error"]["code"] == "NOT_FOUND"
    assert (await client.delete("/api/chat/stop-me/stream")).status == 401


async def test_patch_session_renames_it(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(text_response("ok"))
    await (await client.post("/api/chat", json=chat_body("named", "first words"), headers=auth_headers)).read()
    resp = await client.patch("/api/sessions/named", json={"title": "  A   better title "}, headers=auth_headers)
    assert resp.status == 200 and (await resp.json())["session"]["title"] == "A better title"
    listed = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert [s["title"] for s in listed["sessions"] if s["id"] == "named"] == ["A better title"]
    bad = await client.patch("/api/sessions/named", json={"title": ""}, headers=auth_headers)
    assert bad.status == 400 and (await bad.json())["error"]["fields"][0]["path"] == "title"
    missing = await client.patch("/api/sessions/nope", json={"title": "x"}, headers=auth_headers)
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "SESSION_NOT_FOUND"


async def test_usage_by_session_and_by_day_and_model(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(
        text_response("a", usage={"input_tokens": 10}), text_response("b", usage={"input_tokens": 20})
    )
    for sid in ("s-one", "s-two"):
        await (await client.post("/api/chat", json=chat_body(sid, "hi"), headers=auth_headers)).read()
    gw_report = await (await client.get("/api/usage?by=model", headers=auth_headers)).json()
    by_session = await (await client.get("/api/usage?by=session", headers=auth_headers)).json()
    assert set(by_session["perSession"]) == {"s-one", "s-two"}
    assert (
        by_session["perSession"]["s-one"]["inputTokens"] == 10 and by_session["grandTotal"] == gw_report["grandTotal"]
    )
    by_day_model = await (await client.get("/api/usage?by=day-model&since=1d", headers=auth_headers)).json()
    (day,) = by_day_model["perDay"].values()
    assert day == gw_report["perModel"]
    bad = await client.get("/api/usage?by=week", headers=auth_headers)
    assert bad.status == 400 and "session" in (await bad.json())["error"]["message"]


async def test_the_page_served_by_the_gateway_may_call_its_api(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    own = str(client.make_url("")).rstrip("/")
    resp = await client.get("/api/sessions", headers={**auth_headers, "Origin": own})
    assert resp.status == 200
    other = await client.get("/api/sessions", headers={**auth_headers, "Origin": "http://evil.example"})
    assert other.status == 403
    page = await client.get("/")  # no token: the page signs in itself
    assert page.status == 200 and "Content-Security-Policy" in page.headers
