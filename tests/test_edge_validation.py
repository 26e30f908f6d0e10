"""Hostile input checked at the edge (issue 15 items 5, 6, 8): lone surrogates, deeply nested JSON, ids of any
length or character, and log lines forged by a value with a newline. Every case goes through the running app
(WebSocket and ``POST /api/chat``) and reads the result back over HTTP."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from agentspace.logs import configure_logging
from agentspace.service import MAX_MODEL_ID
from agentspace.transports import state as STATE
from tests.fakes import anthropic_upstream as fa
from tests.fakes.openai_upstream import FakeOpenAI, error_status
from tests.support.ui_stream import assistant, post_chat, read_all, user
from tests.support.ws import chat, connect, receive, receive_after

CUT_EMOJI = "cut \ud83d here"  # what JSON.stringify gives for a string cut between an emoji's two halves
REPLACED = "cut \ufffd here"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    unhandled = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert unhandled == [], [r.getMessage() for r in unhandled]


async def get_session(client: TestClient, headers: dict[str, str], session_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/sessions/{session_id}", headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["session"]


# --- lone surrogates (issue 15 item 5) ----------------------------------------------------------


async def test_lone_surrogate_in_ws_message_text_is_stored_as_replacement(
    client: TestClient, token: str, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    ws = await connect(client, token)
    frames = await chat(ws, CUT_EMOJI)  # send_json escapes it as \ud83d, as JSON.stringify does
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    session = await get_session(client, auth_headers, frames[0]["sessionId"])
    assert session["messages"][0]["content"] == REPLACED
    assert session["messages"][0]["parts"] == [{"type": "text", "text": REPLACED}]
    assert session["title"].startswith("cut \ufffd")
    await ws.close()
    no_tracebacks(caplog)


async def test_lone_surrogate_in_http_messages_is_stored_as_replacement(
    client: TestClient, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    history = [user("earlier \udfff one", id="h1"), assistant("answer \ud800", id="h2"), user(CUT_EMOJI, id="u2")]
    chunks = await read_all(await post_chat(client, auth_headers, "surrogates", *history))
    assert chunks[-2]["type"] == "finish"
    session = await get_session(client, auth_headers, "surrogates")
    contents = [m["content"] for m in session["messages"]]
    assert contents[:3] == ["earlier \ufffd one", "answer \ufffd", REPLACED]
    assert [m["id"] for m in session["messages"]][:3] == ["h1", "h2", "u2"]
    no_tracebacks(caplog)


async def test_lone_surrogate_in_an_answer_is_streamed_and_stored_as_replacement(
    client: TestClient,
    token: str,
    auth_headers: dict[str, str],
    fake_anthropic: fa.FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream whose JSON cuts an emoji between its halves (``\\ud83d``): the answer still streams, ends, and
    is stored, the half as U+FFFD, on both chat transports (before, the delta could not be encoded for the socket,
    which then never got its end, nor the answer for the session file)."""
    fake_anthropic.enqueue(fa.text_response(CUT_EMOJI, chunks=1), fa.text_response(CUT_EMOJI, chunks=1))
    ws = await connect(client, token)
    frames = await asyncio.wait_for(chat(ws, "hi"), 30)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert "".join(f["delta"] for f in frames if f["type"] == "chat.stream.delta") == REPLACED
    session = await get_session(client, auth_headers, frames[0]["sessionId"])
    assert session["messages"][1]["content"] == REPLACED
    assert session["messages"][1]["parts"] == [{"type": "text", "text": REPLACED}]
    await ws.close()
    chunks = await read_all(await post_chat(client, auth_headers, "cut-answer", user("hi", id="u1")))
    assert chunks[-2]["type"] == "finish"
    assert "".join(c["delta"] for c in chunks[:-1] if c["type"] == "text-delta") == REPLACED
    assert (await get_session(client, auth_headers, "cut-answer"))["messages"][1]["content"] == REPLACED
    no_tracebacks(caplog)


async def test_lone_surrogate_in_an_upstream_error_is_sent_and_stored_as_replacement(
    client: TestClient,
    token: str,
    auth_headers: dict[str, str],
    fake_anthropic: fa.FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The upstream's error message is relayed to the client and marks the failed message: a cut emoji in it is
    U+FFFD too (before, the error frame could not be encoded, so the socket never got it, nor the store the mark)."""
    fake_anthropic.enqueue(fa.error_status(400, CUT_EMOJI))
    ws = await connect(client, token)
    frames = await asyncio.wait_for(chat(ws, "hi"), 30)
    assert frames[-1]["type"] == "error" and REPLACED in frames[-1]["message"], frames[-1]
    session = await get_session(client, auth_headers, frames[0]["sessionId"])
    assert REPLACED in session["messages"][0]["error"]["message"]
    await ws.close()
    no_tracebacks(caplog)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
async def test_lone_surrogate_in_an_answer_streamed_by_a_translating_v1_api_is_escaped(
    client: TestClient,
    auth_headers: dict[str, str],
    fake_anthropic: fa.FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """The /v1 APIs that translate an answer stream it with the cut emoji escaped (``\\ud83d``), as their whole
    answers and the Anthropic relay carry it: before, the chunk could not be encoded and the stream stopped with no
    end, the client waiting for it."""
    fake_anthropic.enqueue(fa.text_response(CUT_EMOJI, chunks=1))
    question = [{"role": "user", "content": "hi"}]
    body = {"messages": question} if path == "/v1/chat/completions" else {"input": question}
    resp = await client.post(
        path, json={"model": "anthropic/claude-sonnet-4-5", "stream": True, **body}, headers=auth_headers
    )
    assert resp.status == 200
    raw = (await asyncio.wait_for(resp.read(), 30)).decode()
    events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    if path == "/v1/chat/completions":
        assert raw.endswith("data: [DONE]\n\n")
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    else:
        assert events[-1]["type"] == "response.completed"
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == CUT_EMOJI
    no_tracebacks(caplog)


@pytest.mark.parametrize("field", ["model", "sessionId"])
async def test_lone_surrogate_in_a_ws_id_is_refused_naming_the_field(
    client: TestClient, token: str, auth_headers: dict[str, str], field: str
) -> None:
    ws = await connect(client, token)
    value = "anthropic/claude\ud800" if field == "model" else "s\udfff"
    reply = (await chat(ws, "hi", **{field: value}))[-1]
    assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "INVALID_MESSAGE", "r1")
    assert reply["message"].startswith(f"{field}:")
    assert (await (await client.get("/api/sessions", headers=auth_headers)).json())["sessions"] == []
    await ws.close()


async def test_lone_surrogate_in_an_http_message_id_or_model_is_refused(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    resp = await post_chat(client, auth_headers, "ids", user("hi", id="u\ud800"))
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "INVALID_MESSAGE"
    assert [f["path"] for f in error["fields"]] == ["messages[0].id"]
    resp = await post_chat(client, auth_headers, "ids", user("hi"), model="anthropic/\udfff")
    assert resp.status == 400 and [f["path"] for f in (await resp.json())["error"]["fields"]] == ["model"]
    assert (await client.get("/api/sessions/ids", headers=auth_headers)).status == 404


async def test_a_request_id_that_cannot_be_echoed_is_answered(client: TestClient, token: str) -> None:
    ws = await connect(client, token)
    for request_id in ("r\ud800", "x" * 300):
        reply = await receive_after(ws, {"type": "session.list", "id": request_id})
        assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "INVALID_MESSAGE", None)
        assert reply["message"].startswith("id:")
    assert (await receive_after(ws, {"type": "session.list", "id": "ok"}))["type"] == "session.list.result"
    await ws.close()


# --- deeply nested JSON (issue 15 item 6) -------------------------------------------------------

DEEP = ["[" * 3000, '{"a":' * 3000, "[" * 100_000]


async def test_deep_json_after_auth_is_refused_and_the_socket_stays_usable(
    make_client: Any, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    ws = await connect(client, token)
    for frame in DEEP:
        await ws.send_str(frame)
        reply = await receive(ws)
        assert (reply["type"], reply["code"], reply["requestId"]) == ("error", "INVALID_MESSAGE", None), reply
    frames = await chat(ws, "still here?")
    assert frames[-1]["type"] == "chat.stream.end"
    await ws.close()
    no_tracebacks(caplog)


@pytest.mark.parametrize("frame", DEEP[:2])
async def test_deep_json_as_the_first_frame_is_refused_cleanly(
    client: TestClient, token: str, caplog: pytest.LogCaptureFixture, frame: str
) -> None:
    """Before authentication, any frame that is not an auth frame is refused (UNAUTHORIZED) and the socket
    closed, as for other garbage; deep nesting is no exception and leaves no traceback."""
    ws = await client.ws_connect("/gateway")
    await ws.send_str(frame)
    reply = await receive(ws)
    assert reply["code"] == "UNAUTHORIZED"
    assert (await ws.receive(timeout=10)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    good = await connect(client, token)
    assert (await receive_after(good, {"type": "session.list", "id": "s"}))["type"] == "session.list.result"
    await good.close()
    no_tracebacks(caplog)


@pytest.mark.parametrize("body", DEEP)
async def test_deep_json_body_is_a_400(
    client: TestClient, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture, body: str
) -> None:
    resp = await client.post("/api/chat", data=body.encode(), headers=auth_headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_MESSAGE" and "JSON" in error["message"]
    no_tracebacks(caplog)


# --- bounded ids (issue 15 item 8) --------------------------------------------------------------

BAD_MODELS = ["anthropic/claude\nsonnet", "anthropic/" + "x" * 500_000, "anthropic/claude\x1b[2J", "anthropic/cl aude"]


@pytest.mark.parametrize("model", BAD_MODELS, ids=["newline", "500KB", "escape", "space"])
async def test_bad_model_ids_are_refused_on_both_transports(
    make_client: Any, token: str, auth_headers: dict[str, str], model: str
) -> None:
    client = await make_client(server={"max_frame_bytes": 2_000_000, "max_body_bytes": 2_000_000})
    ws = await connect(client, token)
    reply = (await chat(ws, "hi", model=model))[-1]
    assert (reply["code"], reply["requestId"]) == ("INVALID_MESSAGE", "r1") and reply["message"].startswith("model:")
    assert len(reply["message"]) < 300  # the value is not echoed back
    resp = await post_chat(client, auth_headers, "m", user("hi"), model=model)
    error = (await resp.json())["error"]
    assert resp.status == 400 and [f["path"] for f in error["fields"]] == ["model"]
    if len(model) < 1000:  # a longer URL is refused by the HTTP parser itself
        resp = await client.get("/api/sessions/m/context", params={"model": model}, headers=auth_headers)
        assert resp.status == 400 and [f["path"] for f in (await resp.json())["error"]["fields"]] == ["model"]
    assert (await (await client.get("/api/sessions", headers=auth_headers)).json())["sessions"] == []
    await ws.close()


async def test_model_ids_of_real_providers_pass(client: TestClient, token: str, auth_headers: dict[str, str]) -> None:
    """The character set admits the forms providers use: measured for, or MODEL_NOT_FOUND, never refused."""
    ws = await connect(client, token)
    session_id = (await chat(ws, "hi"))[0]["sessionId"]
    await ws.close()
    for model in (
        "bedrock/anthropic.claude-3-sonnet-20240229-v1:0",
        "vertex_ai/claude-3-5-sonnet@20240620",
        "openrouter/meta-llama/llama-3.1-70b-instruct",
        "anthropic/" + "m" * (MAX_MODEL_ID - 10),
    ):
        resp = await client.get(f"/api/sessions/{session_id}/context", params={"model": model}, headers=auth_headers)
        body = await resp.json()
        if resp.status == 400:  # a name the price list lacks for its provider: a typo, said so
            assert body["error"]["code"] == "MODEL_NOT_FOUND", body
        else:
            assert resp.status == 200 and body["model"] == model, body
    resp = await client.get(
        f"/api/sessions/{session_id}/context", params={"model": "z/" + "m" * (MAX_MODEL_ID - 2)}, headers=auth_headers
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("message_id", ["x" * 129, "u\n1", "u 1", "<script>"])
async def test_bad_message_ids_are_refused(client: TestClient, auth_headers: dict[str, str], message_id: str) -> None:
    resp = await post_chat(client, auth_headers, "mid", user("earlier", id=message_id), assistant("a"), user("now"))
    error = (await resp.json())["error"]
    assert resp.status == 400 and [f["path"] for f in error["fields"]] == ["messages[0].id"]
    assert (await client.get("/api/sessions/mid", headers=auth_headers)).status == 404


async def test_the_model_info_cache_is_bounded(make_client: Any, token: str, auth_headers: dict[str, str]) -> None:
    # A provider of the config's own (a custom endpoint): any model name it is asked for is measured.
    client = await make_client(providers={"custom": {"base_url": "http://127.0.0.1:9"}})
    ws = await connect(client, token)
    session_id = (await chat(ws, "hi"))[0]["sessionId"]
    await ws.close()
    models = client.app[STATE.REGISTRY].models  # the model lookup (registry.Models) and its caches
    bound = models._model_info.max_entries
    for i in range(bound + 20):
        resp = await client.get(
            f"/api/sessions/{session_id}/context", params={"model": f"custom/m-{i}"}, headers=auth_headers
        )
        assert resp.status == 200, await resp.text()
    assert len(models._model_info) == bound
    for i in range(bound + 20):  # typo'd names of a listed provider: the typo check's cache is bounded too
        resp = await client.get(
            f"/api/sessions/{session_id}/context", params={"model": f"anthropic/m-{i}"}, headers=auth_headers
        )
        assert resp.status == 400
    assert len(models._unknown) == bound


async def test_a_newline_from_upstream_cannot_forge_a_log_line(
    make_client: Any,
    fake_openai: FakeOpenAI,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server's log handler (``configure_logging``, as ``agentspace serve`` sets it up) writes one line
    per record: an upstream error quoting a client's text with a newline and an escape is escaped."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-logs-0123456789")
    # litellm's first import takes seconds on a loaded machine; done here, the chat's read timeout is the gateway's.
    await asyncio.to_thread(importlib.import_module, "litellm")
    client = await make_client(chat={"max_retries": 0}, providers={"openai": {"base_url": fake_openai.url}})
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(client.app[STATE.REGISTRY].config)
    forged = "2026-01-01 00:00:00,000 ERROR agentspace: forged"
    try:
        fake_openai.enqueue(error_status(400, f"bad input 'x\n{forged}\r\x1b[2J'"))
        chunks = await read_all(await post_chat(client, auth_headers, "logs", user("hi"), model="openai/gpt-4o"))
        assert chunks[-2]["type"] == "error"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "forged" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("20") and " WARNING " in lines[0] and "x\\n" + forged + "\\r\\x1b[2J" in lines[0]
    assert "\x1b" not in err
