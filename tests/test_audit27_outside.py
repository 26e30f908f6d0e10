"""Credentials, limits and inputs (issue 27) tried from outside a third time, with the fake upstreams playing
an upstream (or a proxy at ``[providers.X] base_url``) that reports what a provider never would."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestClient

import tests.fakes.anthropic_upstream as fa
import tests.fakes.openai_upstream as fo
from agentspace.gateway_token import load_or_create_token
from agentspace.transports import state
from scripts.harness import GatewayProcess
from tests.support import ws
from tests.support.ui_stream import post_chat
from tests.test_clients import add_client, bearer

MESSAGES = [{"role": "user", "content": "hi"}]

# Usage figures no provider reports: each was taken as reported, on every path that reads Anthropic's usage.
NONSENSE = [
    {"input_tokens": -1_000_000, "output_tokens": -5},  # a negative cost: the client's spend went down by $9
    {"input_tokens": 1e308, "output_tokens": 1e308},  # an infinite cost: /api/usage answered invalid JSON
    {"input_tokens": 10**30},  # no PostgreSQL bigint; $3e24 of spend
    {"input_tokens": True},  # the usage segment then read as damaged: every record in it left the reports
    {"input_tokens": "12"},  # 500 INTERNAL_ERROR (a second response written into the relayed stream)
    {"input_tokens": 2.5},  # fractional tokens
]


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("usage", NONSENSE, ids=["negative", "inf", "huge", "bool", "string", "fraction"])
async def test_usage_an_upstream_reports_out_of_range_is_never_billed_as_reported(
    make_client: Any, fake_anthropic: fa.FakeAnthropic, usage: dict[str, Any]
) -> None:
    client = await make_client()
    key = add_client("alice", "--budget", "5")
    api = anthropic.AsyncAnthropic(api_key=key, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    # the pass-through, whole and streamed (the SDK reads the relayed stream to its end)
    fake_anthropic.enqueue(fa.text_response(usage=usage))
    message = await api.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES)  # type: ignore[arg-type]
    assert message.content
    fake_anthropic.enqueue(fa.text_response(usage=usage))
    async with api.messages.stream(model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        assert await stream.get_final_text() == fa.DEFAULT_TEXT
    # the official SDK's provider: a translated /v1 call and a WebSocket turn
    fake_anthropic.enqueue(fa.text_response(usage=usage))
    async with client.post(
        "/v1/chat/completions",
        json={"model": "anthropic/claude-sonnet-4-5", "max_tokens": 20, "messages": MESSAGES},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200, await resp.text()
    fake_anthropic.enqueue(fa.text_response(usage=usage))
    socket = await ws.connect(client, key)
    frames = await ws.chat(socket, "hi")
    await socket.close()
    assert frames[-1]["type"] == "chat.stream.end", frames

    records = await client.server.app[state.REGISTRY].usage.records()
    assert len(records) == 4, records
    for record in records:
        for field in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens"):
            value = record[field]
            assert type(value) is int and 0 <= value < 2**31, (field, record)
        assert math.isfinite(record["totalCost"]) and 0 <= record["totalCost"] < 1, record
    async with client.get("/api/usage?by=client", headers=bearer(key)) as resp:
        report = _strict_json(await resp.text())
    assert report["damagedFiles"] == [] and report["perClient"]["alice"]["requestCount"] == 4, report
    admin = {"Authorization": f"Bearer {load_or_create_token(state.config(client.server.app).data_dir)}"}
    async with client.get("/api/clients", headers=admin) as resp:
        spend = _strict_json(await resp.text())["clients"][0]["spend"]["usd"]
    assert 0 < spend < 1, spend


OPENAI_NONSENSE = [
    {"prompt_tokens": -1_000_000, "completion_tokens": -5, "total_tokens": -1_000_005},
    {"prompt_tokens": 10**30, "completion_tokens": 3, "total_tokens": 10**30 + 3},
    {"prompt_tokens": 12, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": -7}},
]


@pytest.mark.parametrize("usage", OPENAI_NONSENSE, ids=["negative", "huge", "negative-reasoning"])
async def test_usage_an_openai_upstream_reports_out_of_range_is_never_billed_as_reported(
    make_client: Any, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch, usage: dict[str, Any]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-audit27-0123456789")
    client: TestClient = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    key = add_client("alice", "--budget", "5")
    fake_openai.enqueue(fo.text_response(usage=usage))
    async with client.post(
        "/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": MESSAGES}, headers=bearer(key)
    ) as resp:
        assert resp.status == 200, await resp.text()
    fake_openai.enqueue(fo.text_response(usage=usage))
    socket = await ws.connect(client, key)
    frames = await ws.chat(socket, "hi", model="openai/gpt-4o-mini")
    await socket.close()
    assert frames[-1]["type"] == "chat.stream.end", frames
    records = await client.server.app[state.REGISTRY].usage.records()
    assert len(records) == 2, records
    for record in records:
        for field in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens"):
            assert type(record[field]) is int and 0 <= record[field] < 2**31, (field, record)
        assert math.isfinite(record["totalCost"]) and 0 <= record["totalCost"] < 1, record


# --- a body trickled in: it must keep coming, or its connection is cut ---------------------------------


async def _trickle(port: int, path: str, key: str) -> bytes:
    """A chunked body one byte at a time (a few per second) until the server answers or hangs up; its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n".encode()
    )
    answer = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60  # far past the gateway's bound: never reached unless the body is read forever
    try:
        while loop.time() < deadline:
            writer.write(b"1\r\n \r\n")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.25)
            except TimeoutError:
                continue
            if not data:
                break
            answer += data
    except ConnectionError:
        # The gateway answered and closed while a byte was on its way: its answer came before, and read() would
        # raise the write's error before handing over what is buffered.
        answer += bytes(reader._buffer)
    finally:
        writer.close()
    return answer


async def test_a_body_trickled_in_is_cut_and_holds_no_share_of_the_large_bodies_budget(
    make_client: Any, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Three connections of a client key sending a chunked body a byte at a time held the share of large bodies
    (96 MiB, 32 MiB each) for as long as they kept going: every other caller's /v1 body over 1 MiB, the admin's
    included, waited 30 s and got 503."""
    client = await make_client(server={"header_timeout_seconds": 1.0})
    key = add_client("slow", "--rpm", "1")
    answers = await asyncio.gather(
        *(_trickle(client.port, "/v1/chat/completions", key) for _ in range(3)),
        _trickle(client.port, "/api/chat", key),
    )
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"type": "invalid_request_error"' in answers[0] and b'"code": "REQUEST_TIMEOUT"' in answers[-1], answers
    token = load_or_create_token(state.config(client.server.app).data_dir)
    big = {
        "model": "anthropic/claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "x" * 2**21}],
    }
    async with client.post("/v1/chat/completions", json=big, headers=bearer(token)) as resp:
        assert resp.status == 200, await resp.text()


# --- text that is no UTF-8: a header's bytes, a JSON escape of half a character --------------------------


async def _raw_post(port: int, path: str, body: bytes, headers: bytes) -> bytes:
    """One request written byte for byte (an HTTP library would encode or refuse these headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"anthropic-version: 2023-06-01\r\nConnection: close\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_session_header_or_model_id_that_is_no_utf8_is_never_a_500(
    make_client: Any, fake_anthropic: fa.FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    """A session header in Latin-1 (``café``, as Python's http.client sends it) and a model id holding a lone
    surrogate (``\\ud800``, valid JSON) reached the ledger's journal, which cannot write them: 500
    INTERNAL_ERROR with a traceback, on every /v1 endpoint."""
    client = await make_client(providers={"openai": {"base_url": "http://127.0.0.1:9"}})
    key = add_client("alice").encode()
    auth = b"Authorization: Bearer " + key + b"\r\n"
    chat = b'{"model": "anthropic/claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/v1/chat/completions", "/v1/messages"):
        for header in (b"X-Agentspace-Session: caf\xe9\r\n", b"X-Claude-Code-Session-Id: \xff\xfe\r\n"):
            answer = await _raw_post(client.port, path, chat, auth + header)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    surrogate = rb'{"model": "openai/x\ud800", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        answer = await _raw_post(client.port, path, surrogate, auth)
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 404 ")), answer[:300]
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text
    records = await client.server.app[state.REGISTRY].usage.records()
    assert len(records) == 4 and all(r["sessionId"] for r in records), records
    async with client.get("/api/usage?by=session", headers=bearer(key.decode())) as resp:
        assert resp.status == 200 and len((await resp.json())["perSession"]) == 2


async def _raw_get(port: int, path: str, headers: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_credential_that_is_no_utf8_is_refused_as_a_wrong_one(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A credential whose bytes are no UTF-8 (a header) or that holds a lone surrogate (the auth frame's JSON)
    could not be compared with the gateway token: anyone without a credential got aiohttp's text/plain 500 with a
    traceback in the log, on every route, and the WebSocket a broken connection."""
    for path, header in (
        ("/api/sessions", b"Authorization: Bearer \xe9\xe9\r\n"),
        ("/v1/models", b"x-api-key: \xffabcdef\r\n"),
    ):
        answer = await _raw_get(client.port, path, header)
        assert answer.startswith(b"HTTP/1.1 401 ") and b"application/json" in answer, answer[:300]
    async with client.ws_connect("/gateway") as socket:
        await socket.send_str('{"type": "auth", "id": "1", "token": "\\udcff"}')
        frame = await ws.receive(socket)
        assert frame["code"] == "UNAUTHORIZED", frame
        assert (await socket.receive()).type.name in ("CLOSE", "CLOSING", "CLOSED")
        assert socket.close_code == 4401
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text


# --- requests that are no HTTP: refused, without a traceback each ---------------------------------------


MALFORMED = [
    b"GET /api/sessions?q=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a byte no URL has
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",  # two Hosts
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
]


async def test_malformed_requests_from_anyone_are_refused_without_a_traceback_each(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """aiohttp logged each request it could not parse at ERROR with its traceback (11 lines): anyone who can
    reach the port could fill the log with them. They are one warning line, at most one a minute."""
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    url = await server.start()
    port = int(url.rsplit(":", 1)[1])
    try:
        for _ in range(5):
            for request in MALFORMED:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                await writer.drain()
                assert (await reader.read()).startswith(b"HTTP/1.0 400 "), request
                writer.close()
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
    finally:
        assert await server.terminate() == 0
    assert server.log_problems() == [], server.log()
    assert 1 <= server.log().count("malformed request") <= 2, server.log()


# --- session ids belong to their owner: the export too ------------------------------------------------


async def test_an_export_names_the_session_by_the_callers_id_never_the_stored_one(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    """A client's session whose id another caller had first is stored as ``<id>-c<hash>``. The export named it so
    (``Session `taken-c2bd806c97f```), where every other answer says ``taken``: exporting a session of one's own
    told whether anyone else had that id."""
    resp = await post_chat(client, auth_headers, "taken")
    await resp.read()
    key = add_client("alice")
    for chat_id in ("taken", "free"):
        resp = await post_chat(client, bearer(key), chat_id)
        assert resp.status == 200
        await resp.read()
    for chat_id in ("taken", "free"):
        async with client.get(f"/api/sessions/{chat_id}/export?format=md", headers=bearer(key)) as resp:
            markdown = await resp.text()
        assert f"Session `{chat_id}` ·" in markdown, markdown
        async with client.get(f"/api/sessions/{chat_id}/export?format=json", headers=bearer(key)) as resp:
            document = json.loads(await resp.text())
        assert document["session"]["id"] == chat_id, document["session"]["id"]
