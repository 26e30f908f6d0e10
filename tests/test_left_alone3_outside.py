"""What the last closing note noticed and left alone, third round (protocol and hardening), tried from outside:
through the HTTP routes, the WebSocket and the SDKs against the running app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import Postgres
from tests.support.ws import chat, connect, receive
from tests.test_audit28s_outside import user
from tests.test_disk_full import BIG, disk, fill, ws_turn  # noqa: F401 - disk: the fixture
from tests.test_ws import _SlowTools

USER = [{"role": "user", "content": "hi"}]


async def test_a_chat_bodys_message_id_must_be_a_message_id(client: TestClient, auth_headers: dict[str, str]) -> None:
    """``messageId`` (``useChat``'s ``regenerate()`` and an edit's ``sendMessage``: the message answered again)
    was never checked: a number, an object or an id no message may have was taken without a word. It is a
    message id or absent (null: as absent), else a 400 naming the field, and nothing is stored."""
    for value in (5, {"id": "u1"}, ["u1"], True, "x" * 300, "has space"):
        body = {"id": "regen", "messages": [user("u1", "hi")], "trigger": "regenerate-message", "messageId": value}
        response = await client.post("/api/chat", json=body, headers=auth_headers)
        assert response.status == 400, (value, await response.text())
        error = (await response.json())["error"]
        assert error["code"] == "INVALID_MESSAGE" and [f["path"] for f in error["fields"]] == ["messageId"], error
    listed = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert listed["sessions"] == []
    for value in (None, "u1"):
        body = {"id": "regen", "messages": [user("u1", "hi")], "trigger": "regenerate-message", "messageId": value}
        response = await client.post("/api/chat", json=body, headers=auth_headers)
        assert response.status == 200, await response.text()
        await response.read()


def openai_sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


async def test_a_responses_json_schema_format_needs_its_name(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    """OpenAI requires ``text.format.name`` of a ``json_schema`` format; the gateway named it "response" and
    went on, so a request OpenAI refuses worked here. A 400 naming the field, as OpenAI's, and nothing sent."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    for fmt in ({"type": "json_schema", "schema": schema}, {"type": "json_schema", "schema": schema, "name": 5}):
        with pytest.raises(openai.BadRequestError) as refused:
            await openai_sdk(client, token).responses.create(
                model="anthropic/claude-sonnet-4-5",
                input="hi",
                text={"format": fmt},  # type: ignore[typeddict-item]
            )
        assert refused.value.param == "text.format.name", refused.value.body
    assert fake_anthropic.requests == []


async def test_the_stored_response_routes_say_the_gateway_stores_no_responses(client: TestClient, token: str) -> None:
    """Retrieving, deleting or cancelling a response, listing its input items and compacting were the generic
    "No route" 404: a client (Codex compacts remotely) was not told why. They say, in OpenAI's error shape,
    that the gateway stores no responses (``store`` is not supported: every call is stateless)."""
    sdk = openai_sdk(client, token)
    calls = {
        "retrieve": sdk.responses.retrieve("resp_1"),
        "delete": sdk.responses.delete("resp_1"),
        "cancel": sdk.responses.cancel("resp_1"),
        "input_items": sdk.responses.input_items.list("resp_1"),
        "compact": sdk.responses.compact(model="anthropic/claude-sonnet-4-5", input="hi"),
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as missing:
            await call
        assert "this gateway stores no responses" in missing.value.message, (name, missing.value.body)
        assert missing.value.type == "invalid_request_error", missing.value.body
    unknown = await client.get("/v1/nothing", headers={"Authorization": f"Bearer {token}"})
    assert unknown.status == 404 and "No route GET /v1/nothing" in (await unknown.json())["error"]["message"]


async def test_the_anthropic_model_list_is_paged_as_anthropics(client: TestClient, token: str) -> None:
    """``GET /v1/models`` with ``anthropic-version`` answered every model whatever ``limit``, ``after_id`` or
    ``before_id`` said, and always ``has_more: false``: a client reading pages of 20 (Anthropic's default) got
    them all at once, and one asking for the next page got the first again. Paged as Anthropic pages it."""
    sdk = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    every = [m.id for m in (await sdk.models.list(limit=1000)).data]
    assert len(every) > 3, every
    first = await sdk.models.list(limit=2)
    assert [m.id for m in first.data] == every[:2] and first.has_more
    assert (first.first_id, first.last_id) == (every[0], every[1])
    assert [m.id async for m in await sdk.models.list(limit=2)] == every  # the SDK follows after_id
    after = await sdk.models.list(limit=2, after_id=every[1])
    assert [m.id for m in after.data] == every[2:4]
    before = await sdk.models.list(limit=2, before_id=every[3])
    assert [m.id for m in before.data] == every[1:3] and before.has_more
    last = await sdk.models.list(limit=2, after_id=every[-2])
    assert [m.id for m in last.data] == every[-1:] and not last.has_more
    assert len((await sdk.models.list()).data) == min(20, len(every))
    for query in ({"limit": 0}, {"limit": 1001}, {"after_id": "claude-none"}):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await sdk.models.list(**query)  # type: ignore[arg-type]
        assert next(iter(query)) in refused.value.message, refused.value.body


async def test_answers_finished_in_a_database_outage_log_one_line_each_no_traceback(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """PostgreSQL stops while a WebSocket turn and a ``/v1/messages`` call stream. Each usage record the store
    refused logged "usage sink 'postgres' could not store record" as an ERROR with a traceback, and the turn's
    answer "storing the answer ... failed" likewise: an outage, not a defect of ours, which is one warning line
    (the rule for the refusals since the last round). The client is told as before (STORAGE_ERROR)."""
    pg = Postgres()
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg.dsn})
    try:
        await gateway.start()
        admin = {"Authorization": f"Bearer {gateway.token}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.ws_url, headers=admin) as ws:
            turn_gate, v1_gate = asyncio.Event(), asyncio.Event()
            fake_anthropic.enqueue(fa.text_response("a turn's answer").held(turn_gate))
            fake_anthropic.enqueue(fa.text_response("a /v1 answer").held(v1_gate))
            await ws.send_json({"type": "chat.send", "id": "r1", "content": "hi"})
            frames = [await receive(ws)]
            while len(fake_anthropic.requests) < 1:
                await asyncio.sleep(0.02)
            body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True, "messages": USER}
            v1 = asyncio.create_task(
                http.post(gateway.url + "/v1/messages", json=body, headers={**admin, "anthropic-version": "2023-06-01"})
            )
            while len(fake_anthropic.requests) < 2:
                await asyncio.sleep(0.02)
            pg.stop()
            turn_gate.set()
            v1_gate.set()
            while frames[-1]["type"] not in ("chat.stream.end", "error"):
                frames.append(await receive(ws))
            assert frames[-1]["code"] == "STORAGE_ERROR", frames[-1]
            async with await v1 as resp:
                assert resp.status == 200 and "message_stop" in await resp.text()
            await gateway.wait_for_log("storing the answer in session")
            await gateway.wait_for_log("usage sink 'postgres' could not store record")
            assert not gateway.log_problems(), gateway.log_problems()
            lines = [line for line in gateway.log().splitlines() if "could not store record" in line]
            assert len(lines) == 2 and all("WARNING" in line and "Connection refused" in line for line in lines)
    finally:
        await gateway.aclose()
        pg.close()


async def test_healthz_says_the_data_directory_refuses_writes_until_it_takes_them_again(
    disk: Path,  # noqa: F811
    fake_anthropic: fa.FakeAnthropic,
) -> None:
    """``/healthz`` answered 200 ``ok`` while every turn was refused with STORAGE_ERROR on a full disk: a load
    balancer kept sending calls to a replica that could store none. Since a write failed, it is a 503 that names
    the data directory, as a database out of reach is for PostgreSQL; room again, ok again. (It knows by the
    writes that failed: no probe writes while the writes succeed.)"""
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/healthz") as resp:
                assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
            filler = fill(disk)
            refused = await ws_turn(server, server.token, "hello " + BIG)
            assert refused[-1]["code"] == "STORAGE_ERROR", refused[-1]
            async with http.get(f"{server.url}/healthz") as resp:
                body = await resp.json()
            assert resp.status == 503 and body["status"] == "unavailable", body
            assert "data directory" in body["storage"] and "No space left" in body["storage"], body
            filler.unlink()
            async with http.get(f"{server.url}/healthz") as resp:
                assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
            assert (await ws_turn(server, server.token, "hello again"))[-1]["type"] == "chat.stream.end"
    finally:
        await server.aclose()


async def test_a_tool_that_never_returns_times_out_into_an_error_the_model_sees(
    make_client: Callable[..., Awaitable[TestClient]], token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A plugin's tool that never returns (a stuck network call) held its turn, and its session, forever. After
    ``[chat] tool_timeout_seconds`` it is cancelled and its result is an error the model sees; the turn goes on."""
    tools = _SlowTools()
    pm = create_plugin_manager()
    pm.register(tools)
    client = await make_client(pm=pm, chat={"tool_timeout_seconds": 0.5})
    fake_anthropic.enqueue(fa.tool_use_response("wait", {}, text="Waiting."), fa.text_response("It timed out."))
    ws = await connect(client, token)
    frames = await asyncio.wait_for(chat(ws, "wait"), 60)
    await ws.close()
    assert (frames[-1]["type"], frames[-1]["finishReason"]) == ("chat.stream.end", "stop"), frames[-1]
    (result,) = [f for f in frames if f["type"] == "chat.stream.tool_result"]
    message = "Tool wait did not return within 0.5 s ([chat] tool_timeout_seconds)."
    assert result["isError"] is True and result["output"] == message, result
    assert tools.cancelled
    sent = fake_anthropic.requests[1].body["messages"][-1]["content"][0]
    assert sent["type"] == "tool_result" and sent["is_error"] is True and message in str(sent["content"]), sent


async def test_claude_codes_effort_without_thinking_is_the_reasoning_effort_or_refused(
    make_client: Callable[..., Awaitable[TestClient]], token: str, fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``output_config.effort`` without ``thinking`` (Claude Code's effort setting with thinking off) was dropped
    for a non-Anthropic model on ``/v1/messages``: a reasoning model answered at its default effort. It is the
    model's reasoning effort where it has one, and a 400 naming it where it has none, nothing sent."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    sdk = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    for effort, sent in (("low", "low"), ("high", "high"), ("max", "high")):
        await sdk.messages.create(
            model="openai/gpt-5", max_tokens=2000, messages=USER, extra_body={"output_config": {"effort": effort}}
        )
        assert fake_openai.requests[-1].body["reasoning_effort"] == sent, fake_openai.requests[-1].body
    asked = len(fake_openai.requests)
    for model, effort in (("openai/gpt-4o-mini", "low"), ("openai/gpt-5", "fast")):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await sdk.messages.create(
                model=model, max_tokens=2000, messages=USER, extra_body={"output_config": {"effort": effort}}
            )
        assert refused.value.body["error"]["message"].startswith("output_config.effort"), refused.value.body  # type: ignore[index]
    assert len(fake_openai.requests) == asked


async def test_an_upstream_rate_limit_message_ending_in_a_period_reads_as_one_sentence(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    """Anthropic's own 429 message ends in a period; ours then read "...rate limit.. Try again shortly."."""
    fake_anthropic.enqueue(fa.error_status(429, "Number of requests has exceeded your rate limit.", retry_after=120))
    ws = await connect(client, token)
    frames = await chat(ws, "hi")
    await ws.close()
    message = frames[-1]["message"]
    assert message == (
        "Anthropic rate limit reached: Number of requests has exceeded your rate limit. Try again shortly."
    ), frames[-1]
