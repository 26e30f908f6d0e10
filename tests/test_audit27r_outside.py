"""Bad input on every way in (issue 27's hardening round), tried from outside once more: what a client sends
that no SDK would, answered in the API's own shape, never a 500 or a retriable storage error."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import anthropic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import tests.fakes.anthropic_upstream as fa
from agentspace.transports import state
from tests.support import ws
from tests.support.ui_stream import post_chat, read_all, user
from tests.test_clients import add_client, bearer


@pytest.mark.parametrize("method,path", [("POST", "/api/clients"), ("PATCH", "/api/clients/bob")])
async def test_a_budget_past_a_floats_range_is_refused_not_a_500(
    client: TestClient, token: str, method: str, path: str
) -> None:
    # JSON allows integers of any size; 10**400 cannot be a float, and math.isfinite raised OverflowError
    resp = await client.post("/api/clients", json={"name": "bob"}, headers=bearer(token))
    assert resp.status in (200, 201), await resp.text()
    body = (
        b'{"name": "carol", "budgetUsd": 1' + b"0" * 400 + b"}"
        if method == "POST"
        else b'{"budgetUsd": 1' + b"0" * 400 + b"}"
    )
    resp = await client.request(method, path, data=body, headers={**bearer(token), "Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_MESSAGE" and [f["path"] for f in error["fields"]] == ["budgetUsd"], error
    listed = await client.get("/api/clients", headers=bearer(token))
    assert [c["name"] for c in (await listed.json())["clients"]] == ["bob"]


async def test_a_title_with_a_nul_is_renamed_on_postgres_not_a_storage_error(
    make_client: Any, pg_dsn: str, token: str
) -> None:
    # PostgreSQL's text refuses NUL: PATCH answered 503 STORAGE_ERROR ("invalid byte sequence"), which tells the
    # client to retry what can never succeed; the other writes of titles drop the NUL
    client = await make_client(storage={"backend": "postgres", "dsn": pg_dsn})
    await read_all(await post_chat(client, bearer(token), "s1"))
    resp = await client.patch("/api/sessions/s1", json={"title": "a\u0000b"}, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["session"]["title"] == "ab"
    listed = await client.get("/api/sessions", headers=bearer(token))
    assert [s["title"] for s in (await listed.json())["sessions"]] == ["ab"]


@pytest.mark.parametrize("frame", [{}, {"sessionId": 5}])
async def test_session_compact_names_the_field_the_frame_lacks(client: TestClient, token: str, frame: Any) -> None:
    # the frame has an "id"; the refusal said "id: required", naming the one field that was there
    socket = await ws.connect(client, token)
    reply = await ws.receive_after(socket, {"type": "session.compact", "id": "c1", **frame})
    await socket.close()
    assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", reply
    assert reply["message"].startswith("sessionId: "), reply


@pytest.mark.parametrize("stream", [False, True])
async def test_a_relayed_call_the_upstream_never_answers_says_so_not_could_not_connect(
    make_client: Any, fake_anthropic: fa.FakeAnthropic, token: str, stream: bool
) -> None:
    # The relay told a client whose upstream took the request and then said nothing to check its network and
    # base_url; the translated endpoints say the upstream did not answer in time.
    client = await make_client(providers={"anthropic": {"base_url": fake_anthropic.url, "timeout_seconds": 1.0}})
    fake_anthropic.enqueue(fa.text_response().silent_for(3))
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as raised:
        await api.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
            stream=stream,  # type: ignore[call-overload]
        )
    assert raised.value.status_code == 502
    message = raised.value.body["error"]["message"]  # type: ignore[index]
    assert "did not answer in time" in message and "connect" not in message, message
    assert len(fake_anthropic.requests) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/api/chat", "/api/clients"])
async def test_a_body_whose_content_encoding_does_not_decode_is_a_400_in_the_apis_shape(
    client: TestClient, token: str, path: str
) -> None:
    # "Content-Encoding: gzip" over bytes that are not gzip: aiohttp raises while the body is read, and the
    # gateway answered 500 INTERNAL_ERROR, logged with a traceback, for every such request.
    headers = {**bearer(token), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post(path, data=b'{"model": "x"}', headers=headers)
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    elif path.startswith("/v1/"):
        assert body["error"]["type"] == "invalid_request_error", body
    else:
        assert body["error"]["code"] == "INVALID_MESSAGE", body
    # the real encoding is read as usual
    resp = await client.post(path, data=gzip.compress(b"[]"), headers=headers)
    assert resp.status == 400 and "Content-Encoding" not in await resp.text()


def _deflated(data: bytes) -> bytes:
    packer = zlib.compressobj()
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_read_on_every_route(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, token: str, encoding: str
) -> None:
    # The gateway inflates request bodies itself (off the event loop); every route that reads one still takes
    # them, and the pass-through sends the upstream the inflated JSON.
    pack = gzip.compress if encoding == "gzip" else _deflated
    headers = {**bearer(token), "Content-Type": "application/json", "Content-Encoding": encoding}

    async def post(method: str, path: str, body: Any) -> Any:
        resp = await client.request(method, path, data=pack(json.dumps(body).encode()), headers=headers)
        assert resp.status in (200, 201), (path, await resp.text())
        return resp

    chat = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    await post("POST", "/v1/chat/completions", chat)
    await post("POST", "/v1/messages", {**chat, "model": "claude-sonnet-4-5"})
    assert fake_anthropic.requests[-1].body["messages"] == chat["messages"]
    await post("POST", "/v1/responses", {"model": chat["model"], "input": "hi"})
    await read_all(await post("POST", "/api/chat", {"id": "s1", "messages": [user("hi")]}))
    await post("PATCH", "/api/sessions/s1", {"title": "packed"})
    await post("POST", "/api/clients", {"name": "bob", "budgetUsd": 5})
    await post("PATCH", "/api/clients/bob", {"budgetUsd": 6})
    assert len(fake_anthropic.requests) == 4


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/chat", "/api/clients"])
@pytest.mark.parametrize("encoding", ["br", "zstd"])
async def test_an_encoding_the_gateway_does_not_inflate_is_answered_in_the_apis_shape(
    client: TestClient, token: str, path: str, encoding: str
) -> None:
    # aiohttp answered these itself, 400 text/plain "Can not decode content-encoding: brotli (br). Please
    # install `Brotli`", which no SDK reads as an error of the API it speaks
    headers = {**bearer(token), "Content-Type": "application/json", "Content-Encoding": encoding}
    resp = await client.post(path, data=b"\x8b\x00compressed", headers=headers)
    assert resp.status == 400 and resp.content_type == "application/json", await resp.text()
    body = await resp.json()
    assert body["error"]["type" if path.startswith("/v1/") else "code"] in ("invalid_request_error", "INVALID_MESSAGE")


@pytest.mark.parametrize("label", ["project alpha", "release/2.0", "x" * 200])
async def test_usage_filed_under_a_session_header_can_be_looked_up_by_that_name(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, token: str, label: str
) -> None:
    # README: X-Agentspace-Session: NAME files usage under NAME (its first 200 characters). /api/usage and the
    # WebSocket's usage.query refused every such NAME that is no session id (a space, a slash, past 128
    # characters) with 400, though --by-session listed it.
    key = add_client("alice")
    chat = {"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", json=chat, headers={**bearer(key), "X-Agentspace-Session": label})
    assert resp.status == 200, await resp.text()
    for credential in (key, token):
        resp = await client.get("/api/usage", params={"sessionId": label}, headers=bearer(credential))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["grandTotal"]["requestCount"] == 1
    socket = await ws.connect(client, key)
    report = await ws.receive_after(socket, {"type": "usage.query", "id": "u1", "sessionId": label})
    await socket.close()
    assert report["type"] == "usage.report" and report["grandTotal"]["requestCount"] == 1, report
    resp = await client.get("/api/usage", params={"sessionId": "a\u0001b"}, headers=bearer(key))
    assert resp.status == 400 and (await resp.json())["error"]["fields"][0]["path"] == "sessionId"


class _Proxy:
    """An upstream at [providers.anthropic] base_url that answers what no API does (a proxy in between)."""

    def __init__(self) -> None:
        self.status, self.body, self.content_type = 200, b"", "application/json"

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


@pytest.mark.parametrize(
    "status,body,content_type",
    [
        (200, b"", "application/json"),
        (200, b"not json at all", "application/json"),
        (200, b'{"hello": "world"}', "application/json"),
        (502, b"<html><body>Bad gateway</body></html>", "text/html"),
    ],
    ids=["empty", "text", "other-json", "html-502"],
)
async def test_a_relayed_answer_that_is_no_message_is_an_error_in_anthropics_shape(
    make_client: Any, token: str, status: int, body: bytes, content_type: str
) -> None:
    # The pass-through handed a 200 with an empty, textual or foreign body to the client (whose SDK then
    # failed to parse it), and a proxy's HTML error page as it was; the translated endpoints say 502.
    proxy = _Proxy()
    proxy.status, proxy.body, proxy.content_type = status, body, content_type
    app = web.Application()
    app.router.add_post("/v1/messages", proxy.handle)
    app.router.add_post("/v1/messages/count_tokens", proxy.handle)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        client = await make_client(providers={"anthropic": {"base_url": str(upstream.make_url("")).rstrip("/")}})
        api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as raised:
            await api.messages.create(
                model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
            )
        assert raised.value.status_code == (502 if status == 200 else status)
        error = raised.value.body["error"]  # type: ignore[index]
        assert error["type"] == "api_error" and error["message"], error
        records = await client.server.app[state.REGISTRY].usage.records()
        assert [r["error"] for r in records] == ["LLM_ERROR"], records
        # count_tokens the same: an error in Anthropic's shape, or a 200 that is no count counted here
        messages: Any = [{"role": "user", "content": "hi"}]
        if status == 200:
            counted = await api.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
            assert counted.input_tokens > 0
        else:
            with pytest.raises(anthropic.APIStatusError) as raised:
                await api.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
            assert raised.value.status_code == status
            assert raised.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    finally:
        await upstream.close()


async def test_a_plain_get_of_the_websocket_says_what_it_is(client: TestClient, token: str) -> None:
    # aiohttp's refusal came out as {"code": "BAD_REQUEST", "message": "Bad Request"}: a code the API does not
    # have, and no hint that /gateway wants a WebSocket upgrade
    for headers in ({}, bearer(token)):
        resp = await client.get("/gateway", headers=headers)
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
        assert error["code"] == "INVALID_MESSAGE" and "WebSocket" in error["message"], error
