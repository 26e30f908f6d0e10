"""Credentials, limits and inputs (issue 27) tried again from outside, in the combinations the first tests
(tests/test_hardening.py) left out: the newer /v1 endpoints' bodies, secrets inside a relayed stream."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient

import tests.fakes.anthropic_upstream as fa
from agentspace.transports import state
from tests.conftest import TEST_KEY, wait_until
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.terminal import on_a_terminal
from tests.support.ui_stream import post_chat, user
from tests.test_clients import add_client, bearer, cli

OPENAI_KEY = "sk-openai-outside-0123456789abcdef"


async def openai_client(make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    client: TestClient = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    return client


# --- /v1/responses and /v1/embeddings: a wrong type is a 400 before anything is called ---------------

RESPONSES = {"model": "openai/gpt-4o-mini", "input": "hi", "max_output_tokens": 16}
EMBEDDINGS = {"model": "openai/text-embedding-3-small", "input": "hi"}
MISTYPED = [
    ("/v1/responses", {**RESPONSES, "stream": "false"}, "stream"),  # read by truthiness, it streamed
    ("/v1/responses", {**RESPONSES, "store": "false"}, "store"),
    ("/v1/responses", {**RESPONSES, "user": 5}, "user"),
    ("/v1/responses", {**RESPONSES, "service_tier": {"tier": "priority"}}, "service_tier"),
    ("/v1/responses", {**RESPONSES, "prompt_cache_key": [1]}, "prompt_cache_key"),
    ("/v1/responses", {**RESPONSES, "metadata": "x"}, "metadata"),
    ("/v1/responses", {**RESPONSES, "include": [5]}, "include"),
    ("/v1/responses", {**RESPONSES, "max_output_tokens": True}, "max_output_tokens"),
    ("/v1/embeddings", {**EMBEDDINGS, "input": [True, False]}, "input[0]"),  # JSON's true is no token id
    ("/v1/embeddings", {**EMBEDDINGS, "input": [[-1, 2]]}, "input[0]"),
    ("/v1/embeddings", {**EMBEDDINGS, "user": 5}, "user"),
]


async def test_mistyped_fields_on_responses_and_embeddings_are_400_with_no_call_and_no_record(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = await openai_client(make_client, fake_openai, monkeypatch)
    key = add_client("alice")
    for path, body, param in MISTYPED:
        async with client.post(path, json=body, headers=bearer(key)) as resp:
            answer = await resp.json()  # JSON, not an event stream
            assert resp.status == 400, (path, body, answer)
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], answer
    assert not fake_openai.requests  # nothing reached the provider
    assert await client.server.app[state.REGISTRY].usage.records() == []
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text
    # the same fields well typed are answered
    async with client.post(
        "/v1/responses", json={**RESPONSES, "stream": False, "store": False}, headers=bearer(key)
    ) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "completed"
    async with client.post("/v1/embeddings", json={**EMBEDDINGS, "input": [[0, 1]]}, headers=bearer(key)) as resp:
        assert resp.status == 200 and len((await resp.json())["data"]) == 1


# --- a count out of range is a 400, never a reservation -----------------------------------------------

HUGE = 10**400  # valid JSON, and no float: priced into a reservation it raised OverflowError


@pytest.mark.parametrize("value", [HUGE, 2**31, -1, 0])
async def test_a_token_count_out_of_range_is_400_on_every_v1_endpoint_for_a_budgeted_client(
    make_client: Any,
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: int,
) -> None:
    client = await openai_client(make_client, fake_openai, monkeypatch)
    key = add_client("alice", "--budget", "5")  # a reservation is priced from the count
    messages = [{"role": "user", "content": "hi"}]
    requests = [
        ("/v1/messages", "max_tokens", {"model": "claude-sonnet-4-5", "max_tokens": value, "messages": messages}),
        ("/v1/messages", "max_tokens", {"model": "openai/gpt-4o-mini", "max_tokens": value, "messages": messages}),
        (
            "/v1/messages",
            "thinking.budget_tokens",
            {
                "model": "openai/gpt-4o-mini",
                "max_tokens": 64,
                "thinking": {"type": "enabled", "budget_tokens": value},
                "messages": messages,
            },
        ),
        (
            "/v1/chat/completions",
            "max_tokens",
            {"model": "anthropic/claude-sonnet-4-5", "max_tokens": value, "messages": messages},
        ),
        (
            "/v1/chat/completions",
            "max_completion_tokens",
            {"model": "openai/gpt-4o-mini", "max_completion_tokens": value, "messages": messages},
        ),
        (
            "/v1/responses",
            "max_output_tokens",
            {"model": "openai/gpt-4o-mini", "max_output_tokens": value, "input": "hi"},
        ),
    ]
    for path, field, body in requests:
        headers = {**bearer(key), "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
        async with client.post(path, data=json.dumps(body), headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 400, (path, field, answer)
        if path == "/v1/messages":
            assert answer["error"]["type"] == "invalid_request_error" and field in answer["error"]["message"], answer
        else:
            assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == field, answer
    assert not fake_anthropic.requests and not fake_openai.requests
    assert await client.server.app[state.REGISTRY].usage.records() == []
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text


async def test_a_server_tools_max_uses_of_400_digits_is_priced_not_a_500(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    key = add_client("alice", "--budget", "5")
    headers = {**bearer(key), "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": HUGE}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [tool],
    }
    async with client.post("/v1/messages", data=json.dumps(body), headers=headers) as resp:
        answer = await resp.json()
    # as many searches as it allows cost more than the budget: refused as such, not as Redis unreachable
    assert resp.status == 429 and answer["error"]["message"].startswith("BUDGET_EXCEEDED"), answer
    assert not fake_anthropic.requests
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text


@pytest.mark.parametrize("digits", [400, 5000])  # no float; past Python's int() limit of 4300 digits
async def test_a_pdf_claiming_endless_pages_is_refused_clearly_never_a_failed_turn(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, caplog: pytest.LogCaptureFixture, digits: int
) -> None:
    free, budgeted = add_client("alice"), add_client("bob", "--budget", "5")
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Count " + b"9" * digits + b" /Kids [] >> endobj\n%%EOF"
    url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    message = user("what is in it?")
    message["parts"].insert(0, {"type": "file", "mediaType": "application/pdf", "filename": "a.pdf", "url": url})
    for key in (free, budgeted):
        async with await post_chat(client, bearer(key), "pdf", message) as resp:
            answer = await resp.json()
        assert resp.status == 413 and "Compact the session" in answer["error"]["message"], answer
    document = {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf).decode()}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8,
        "messages": [
            {"role": "user", "content": [{"type": "document", "source": document}, {"type": "text", "text": "hi"}]}
        ],
    }
    headers = {**bearer(budgeted), "anthropic-version": "2023-06-01"}
    async with client.post("/v1/messages", json=body, headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == 429 and answer["error"]["message"].startswith("BUDGET_EXCEEDED"), answer
    assert not fake_anthropic.requests
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text


# --- the pass-through: a secret inside the stream is redacted too ---------------------------------


async def test_an_error_event_inside_a_relayed_stream_never_shows_the_gateways_key(
    client: TestClient, fake_anthropic: fa.FakeAnthropic
) -> None:
    key = add_client("alice")
    api = anthropic.AsyncAnthropic(api_key=key, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    fake_anthropic.enqueue(fa.error_event("overloaded_error", f"overloaded; key {TEST_KEY} was sent", text="Hel"))
    raw = b""
    async with client.post(
        "/v1/messages",
        json={
            "model": "claude-sonnet-4-5",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={**bearer(key), "anthropic-version": "2023-06-01"},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert b"event: error" in raw and b"overloaded; key [redacted] was sent" in raw, raw
    assert TEST_KEY.encode() not in raw
    # the SDK reads the same error, with the key redacted
    fake_anthropic.enqueue(fa.error_event("overloaded_error", f"overloaded; key {TEST_KEY} was sent"))
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with api.messages.stream(
            model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for _ in stream:
                pass
    assert TEST_KEY not in json.dumps(raised.value.body) and "[redacted]" in str(raised.value.body)
    records = await client.server.app[state.REGISTRY].usage.records()
    assert len(records) == 2 and all(r["error"] == "LLM_ERROR" for r in records), records


# --- a name removed and added again while its calls run: the new client gets none of them -----------


async def test_calls_running_across_a_remove_and_add_again_stay_the_earlier_clients(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    # alice has no budget (her calls settle without a reservation), bob has one (with a reservation)
    alice, bob = add_client("alice"), add_client("bob", "--budget", "5")
    for _ in range(3):
        fake_anthropic.enqueue(fa.text_response("part " * 30, chunks=30).with_delay(0.05))
    chat_stream = await post_chat(client, bearer(alice), "project-x")  # /api/chat
    assert chat_stream.status == 200
    v1 = await client.post(
        "/v1/messages",  # the pass-through
        json={
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={**bearer(alice), "anthropic-version": "2023-06-01"},
    )
    assert v1.status == 200
    ws = await client.ws_connect("/gateway", headers=bearer(bob))
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "hi"})
    await chat_stream.content.readuntil(b"text-delta")
    await v1.content.readuntil(b"content_block_delta")
    while (await ws.receive_json(timeout=10))["type"] != "chat.stream.delta":
        pass

    new_keys = {}
    for name, options in (("alice", ()), ("bob", ("--budget", "5"))):
        await asyncio.to_thread(cli, "clients", "remove", name)
        new_keys[name] = (await asyncio.to_thread(cli, "clients", "add", name, *options)).strip()
    assert b'"type":"finish"' in await chat_stream.read()  # running HTTP streams finish
    assert b"message_stop" in await v1.read()

    async def report() -> dict[str, Any]:
        resp = await client.get("/api/usage?by=client", headers=bearer(token))
        return dict((await resp.json())["perClient"])

    async def all_recorded() -> bool:  # bob's turn goes on after his socket closed, unseen, and is billed
        per_client = await report()
        return all(per_client.get(n, {}).get("requestCount") == c for n, c in (("alice", 2), ("bob", 1)))

    await wait_until(all_recorded, timeout=20)
    for name, key in new_keys.items():  # the new clients of these names: no usage, no spend
        usage = await (await client.get("/api/usage", headers=bearer(key))).json()
        assert usage["grandTotal"]["requestCount"] == 0 and usage["grandTotal"]["totalCost"] == 0, (name, usage)
        shown = json.loads(await asyncio.to_thread(cli, "clients", "show", name, "--json"))
        assert shown["spend"]["usd"] == 0, (name, shown)
        listed = await (await client.get(f"/api/clients/{name}", headers=bearer(token))).json()
        assert listed["client"]["spend"]["usd"] == 0 and listed["client"]["spend"]["inFlightUsd"] == 0, listed
    assert (await (await client.get("/api/sessions", headers=bearer(new_keys["alice"]))).json())["sessions"] == []
    await ws.close()


async def test_a_running_answer_cannot_be_resumed_or_stopped_by_another_client_or_a_new_one_of_the_name(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    alice, bob = add_client("alice"), add_client("bob")
    fake_anthropic.enqueue(fa.text_response("part " * 60, chunks=60).with_delay(0.05))
    streaming = await post_chat(client, bearer(alice), "project-x")
    assert streaming.status == 200
    await streaming.content.readuntil(b"text-delta")

    async def refusals(key: str, session_id: str) -> list[tuple[int, Any]]:
        out = []
        for method in ("GET", "DELETE"):
            async with client.request(method, f"/api/chat/{session_id}/stream", headers=bearer(key)) as resp:
                out.append((resp.status, None if resp.status == 204 else await resp.json()))
        return out

    # bob: alice's running session answers as a free id does, naming only the id he gave
    free = await refusals(bob, "never-used")
    taken = await refusals(bob, "project-x")
    assert [(s, json.dumps(b).replace("never-used", "ID")) for s, b in free] == [
        (s, json.dumps(b).replace("project-x", "ID")) for s, b in taken
    ]
    # as for a new chat's id: nothing streams there (204, what the AI SDK's resume expects), nothing to stop (404)
    assert [status for status, _ in taken] == [204, 404], taken
    # alice removed and added again: the new alice neither reads nor stops the earlier one's answer
    await asyncio.to_thread(cli, "clients", "remove", "alice")
    new = (await asyncio.to_thread(cli, "clients", "add", "alice")).strip()
    assert [s for s, _ in await refusals(new, "project-x")] == [204, 404]
    rest = await streaming.read()  # the earlier answer runs to its end, whole
    assert b'"type":"finish","finishReason":"stop"' in rest and rest.count(b"text-delta") >= 2


async def test_sessions_export_on_a_terminal_escapes_stored_text(
    client: TestClient, fake_anthropic: fa.FakeAnthropic
) -> None:
    key = add_client("alice")
    async with await post_chat(client, bearer(key), "s1", user("hi \x1b[2J\x1b]0;pwned\x07 there")) as resp:
        await resp.read()
    title = "\x1b]0;TITLE\x07\x9b31m red"
    async with client.patch("/api/sessions/s1", json={"title": title}, headers=bearer(key)) as resp:
        assert resp.status == 200
    out = await asyncio.to_thread(on_a_terminal, "sessions", "export", "s1")
    assert b"\x1b" not in out and b"\x07" not in out and "\x9b".encode() not in out, out
    assert b"\\x1b]0;TITLE\\x07" in out and b"hi \\x1b[2J" in out, out  # shown, as escapes
    piped = await asyncio.to_thread(cli, "sessions", "export", "s1", "--format", "md")
    assert "\x1b]0;TITLE\x07" in piped  # into a file or a pipe: the text as it is


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
