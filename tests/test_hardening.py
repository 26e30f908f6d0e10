"""Credentials, limits and inputs (issue 27), through the real interfaces: the WebSocket, HTTP, the SDKs and
the CLI (click's runner) against the real app and the fake upstreams."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace import hookimpl
from agentspace.cli import main
from agentspace.config import ConfigError, load_config
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state
from agentspace.transports import ws as ws_module
from agentspace.transports.ws import REVOKED_CLOSE_CODE
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso
from scripts.harness import GatewayProcess
from tests.conftest import TEST_KEY, wait_until
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status, text_response
from tests.scale_servers import TOKEN as REPLICA_TOKEN
from tests.scale_servers import Postgres, Redis
from tests.support.ui_stream import post_chat, user
from tests.support.ws import chat, of, receive
from tests.test_clients import add_client, bearer, cli


async def closed_with(ws: Any, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
    """Read until the socket closes: its close code and the frames before it."""
    frames = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == WSMsgType.TEXT:
            frames.append(json.loads(msg.data))
            continue
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
        return ws.close_code, frames


# --- 1. rotation and removal cut open sockets -----------------------------------------------------


async def test_rotating_a_key_closes_its_open_sockets_at_once(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    alice, bob = add_client("alice"), add_client("bob")
    ws_alice = await client.ws_connect("/gateway", headers=bearer(alice))
    assert of(await chat(ws_alice, "Hi"), "chat.stream.end")
    ws_bob = await client.ws_connect("/gateway", headers=bearer(bob))
    # first-frame auth (the browser's way) is tracked too
    ws_first = await client.ws_connect("/gateway")
    await ws_first.send_json({"type": "auth", "id": "a", "token": alice})
    assert (await receive(ws_first))["type"] == "auth.ok"

    cli("clients", "rotate", "alice")  # another process: the server sees the file change
    code, _ = await closed_with(ws_alice)
    assert code == REVOKED_CLOSE_CODE
    assert (await closed_with(ws_first))[0] == REVOKED_CLOSE_CODE
    # bob's socket is untouched
    await ws_bob.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws_bob))["type"] == "session.list.result"
    await ws_bob.close()


async def test_after_removal_no_frame_is_answered(client: TestClient, fake_anthropic: FakeAnthropic) -> None:
    key = add_client("alice")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    assert of(await chat(ws, "Hi"), "chat.stream.end")
    cli("clients", "remove", "alice")
    # at once, before any periodic check: each frame checks the credential first
    for frame in (
        {"type": "session.list", "id": "l"},
        {"type": "usage.query", "id": "u"},
        {"type": "context.inspect", "id": "c", "sessionId": "x"},
    ):
        if ws.closed:
            break
        await ws.send_json(frame)
    code, frames = await closed_with(ws)
    assert code == REVOKED_CLOSE_CODE
    assert all(f["type"] == "error" and f["code"] == "UNAUTHORIZED" for f in frames), frames


async def test_gateway_token_rotation_closes_admin_sockets(client: TestClient, token: str) -> None:
    ws = await client.ws_connect("/gateway", headers=bearer(token))
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["type"] == "session.list.result"
    new = cli("token", "--rotate").strip().splitlines()[-1].strip()
    assert (await closed_with(ws))[0] == REVOKED_CLOSE_CODE
    ws = await client.ws_connect("/gateway", headers=bearer(new))
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["type"] == "session.list.result"
    await ws.close()


async def test_rotation_over_http_closes_at_once_and_a_running_turn_is_billed(
    make_client: Any, fake_anthropic: FakeAnthropic, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic check within the test: only the change announced by /api/clients can close the socket.
    monkeypatch.setattr(ws_module, "CREDENTIAL_CHECK_SECONDS", 60.0)
    client = await make_client()
    key = add_client("alice")
    fake_anthropic.enqueue(
        text_response("part " * 20, chunks=20, delta_usages=[{"output_tokens": 20}]).with_delay(0.05)
    )
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "go"})
    session_id = (await receive(ws))["sessionId"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await client.post("/api/clients/alice/rotate", headers=bearer(token))).status == 200
    code, _ = await closed_with(ws)
    assert code == REVOKED_CLOSE_CODE and loop.time() - started < 30  # not the periodic check
    gw = client.server.app[state.REGISTRY]

    async def billed() -> bool:
        return len(await gw.usage.records(session_id=session_id)) == 1

    await wait_until(billed)
    assert (await gw.usage.records(session_id=session_id))[0]["outputTokens"] == 20


# --- 2. /metrics is the admin's ---------------------------------------------------------------


async def test_a_client_key_cannot_read_metrics(make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    client = await make_client(pm=create_plugin_manager())
    key = add_client("alice")
    resp = await client.get("/metrics", headers=bearer(key))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert "agentspace_" not in await resp.text()
    assert (await client.get("/metrics", headers=bearer(token))).status == 200


# --- 3, 8, 11. /v1 bodies: bounded while read, typed, never a 500 ---------------------------------


async def post_raw(client: TestClient, path: str, key: str, data: bytes) -> tuple[int, dict[str, Any], Any]:
    headers = {**bearer(key), "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    async with client.post(path, data=data, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_deep_malformed_and_mistyped_bodies_get_400_in_the_apis_shape(
    client: TestClient, fake_anthropic: FakeAnthropic, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = add_client("alice")
    anthropic_shape = path == "/v1/messages"
    base = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}
    bodies = [
        b"[" * 100_000 + b"]" * 100_000,  # too deep for the decoder
        b'{"model": "anthropic/claude-sonnet-4-5", "messages": [',  # malformed
        json.dumps({**base, "stream": "false"}).encode(),  # a string is not a boolean
        json.dumps({**base, "max_tokens": "16"}).encode(),
        json.dumps({**base, "temperature": True}).encode(),
        b'{"model": "anthropic/claude-sonnet-4-5", "max_tokens": 16, "temperature": NaN, "messages": []}',
    ]
    for data in bodies:
        status, _, body = await post_raw(client, path, key, data)
        assert status == 400, (data[:80], body)
        if anthropic_shape:
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        else:
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body
    assert not fake_anthropic.requests  # nothing reached the provider
    # deep but decodable: answered (the field is not read), never a 500
    deep = {**base, "metadata": {"a": json.loads("[" * 900 + "]" * 900)}}
    status, _, body = await post_raw(client, path, key, json.dumps(deep).encode())
    assert status in (200, 400), body
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text


async def test_a_container_bomb_is_refused_while_read_and_the_connection_closed(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    key = add_client("alice", "--models", "openai/*")
    data = b'{"model": "anthropic/claude-sonnet-4-5", "messages": [' + b"{}," * (8 * 1024 * 1024) + b"{}]}"
    status, headers, body = await post_raw(client, "/v1/chat/completions", key, data)
    assert status == 400 and "objects and arrays" in body["error"]["message"]
    assert headers.get("Connection", "").lower() == "close"  # the rest is not read
    # a large body of text is read and decoded (off the event loop), then checked as usual
    text = "word " * (3 * 1024 * 1024)
    status, _, body = await post_raw(
        client,
        "/v1/chat/completions",
        key,
        json.dumps({"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": text}]}).encode(),
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed", body


# --- 4. stored data cannot drive the admin's terminal ----------------------------------------------

EVIL = "\u001b]0;PWNED\u0007\u001b[31mred\u001b[0m\nforged row\r\u009b2J\u202eevil"


def assert_inert(output: str, *, lines: bool = False) -> None:
    """No control character reaches the terminal; unless ``lines`` (a message's text), no forged line."""
    assert not any(c in output for c in "\u001b\u0007\r\u009b\u202e"), repr(output)
    assert lines or not any(line.startswith("forged row") for line in output.splitlines()), output


async def test_cli_output_escapes_control_characters_from_stored_data(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    ws = await client.ws_connect("/gateway", headers=bearer(token))
    frames = await chat(ws, "Hi " + EVIL)
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    await ws.close()
    resp = await client.patch(f"/api/sessions/{session_id}", json={"title": EVIL}, headers=bearer(token))
    assert resp.status == 200
    listing = await asyncio.to_thread(cli, "sessions", "list")
    assert_inert(listing)
    assert "\\x1b]0;PWNED\\x07" in listing and len(listing.strip().splitlines()) == 3  # header, rule, one row
    shown = await asyncio.to_thread(cli, "sessions", "show", session_id)
    assert_inert(shown, lines=True)
    assert "\\x1b]0;PWNED" in shown
    # a client name cannot hold controls (refused), and the usage tables escape every cell
    assert_inert(await asyncio.to_thread(cli, "usage", "--by-model", "--by-client"))


# --- 5. numbers are finite and in range ------------------------------------------------------------


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "1e400", "-1", "1e12"])
def test_cli_refuses_a_budget_that_is_not_a_finite_amount(budget: str) -> None:
    result = CliRunner().invoke(main, ["clients", "add", "x", "--budget", budget])
    assert result.exit_code == 2 and "--budget" in result.output, result.output
    assert CliRunner().invoke(main, ["clients", "list", "--json"]).stdout.count('"name"') == 0


async def test_api_clients_refuses_nan_and_infinity(client: TestClient, token: str) -> None:
    for raw in (
        b'{"name": "x", "budgetUsd": NaN}',
        b'{"name": "x", "budgetUsd": Infinity}',
        b'{"name": "x", "budgetUsd": 1e400}',
        b'{"name": "x", "rpm": 1e400}',
        b'{"name": "x", "tpm": 100000000000000000000}',
    ):
        resp = await client.post(
            "/api/clients", data=raw, headers={**bearer(token), "Content-Type": "application/json"}
        )
        assert resp.status == 400, raw
    add_client("ok", "--budget", "5")
    resp = await client.patch("/api/clients/ok", data=b'{"budgetUsd": NaN}', headers=bearer(token))
    assert resp.status == 400
    listing = await client.get("/api/clients", headers=bearer(token))
    assert json.loads(await listing.text(), parse_constant=lambda c: pytest.fail(c))["clients"][0]["budget"]["usd"] == 5


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0"])
def test_config_refuses_numbers_that_are_not_finite_or_negative(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agentspace.toml"
    path.write_text(f"[server]\nheartbeat_seconds = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        load_config(str(path))


# --- 12. only configured providers are reachable ---------------------------------------------------


@pytest.mark.parametrize("model", ["ollama/x", "llamafile/x", "lm_studio/x", "hosted_vllm/x"])
async def test_an_unconfigured_local_provider_is_not_reachable(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, model: str
) -> None:
    status, _, body = await post_raw(
        client,
        "/v1/chat/completions",
        token,
        json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode(),
    )
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    ws = await client.ws_connect("/gateway", headers=bearer(token))
    assert (await chat(ws, "hi", model=model))[-1]["code"] == "MODEL_NOT_FOUND"
    await ws.close()


# --- 14, 15. a missing provider key: 424 NO_API_KEY everywhere, at once ----------------------------


# Less common providers too: litellm_keys.py knows where litellm looks for each one's key.
MISSING_KEY_MODELS = (
    "openai/gpt-4o-mini",
    "groq/openai/gpt-oss-120b",
    "mistral/mistral-small-latest",
    "deepseek/deepseek-chat",
    "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "openrouter/openai/gpt-4o-mini",
    "cohere/command-r-08-2024",
    "xai/grok-4.20-0309-reasoning",
    "perplexity/sonar",
    "fireworks_ai/accounts/fireworks/models/deepseek-r1",
)


async def test_a_missing_provider_key_is_424_on_every_api_and_known_without_litellm(tmp_path: Path) -> None:
    upstream = FakeAnthropic()
    await upstream.start()
    gateway = GatewayProcess(tmp_path / "data", upstream.url)
    try:
        await gateway.start()
        headers = {"Authorization": f"Bearer {gateway.token}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:
            for model in MISSING_KEY_MODELS:
                body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
                prefix = model.split("/")[0]
                async with http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    openai_body = await resp.json()
                    assert resp.status == 424, (model, openai_body)
                error = openai_body["error"]
                assert error["code"] == "no_api_key" and f"keys add {prefix}" in error["message"], error
                async with http.post(gateway.url + "/v1/messages", json=body, headers=headers) as resp:
                    assert resp.status == 424 and (await resp.json())["error"]["type"] == "api_error"
                async with http.ws_connect(gateway.ws_url, headers=headers) as ws:
                    await ws.send_json({"type": "chat.send", "id": "1", "content": "hi", "model": model})
                    frame = json.loads((await ws.receive(timeout=10)).data)
                    assert frame["code"] == "NO_API_KEY", (model, frame)
        # litellm (seconds to import) was not imported to find that out: it logs every import it does
        assert "litellm imported" not in gateway.log()
    finally:
        await gateway.aclose()
        await upstream.close()


# --- 13. repeated warnings are rate-limited --------------------------------------------------------


async def test_unknown_model_ids_log_one_warning_per_interval(
    make_client: Any, token: str, fake_openai: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A provider with its own base_url serves ids the price list does not know (a typo check would refuse
    # them elsewhere): each has no known price, and each would log its own warning without the rate limit.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    with caplog.at_level(logging.WARNING):
        for i in range(30):
            await api.chat.completions.create(
                model=f"openai/made-up-{i}", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    lines = [r for r in caplog.records if "no price known" in r.getMessage()]
    assert len(lines) <= 1, [r.getMessage() for r in lines]  # none when an earlier test logged it
    assert len(await client.server.app[state.REGISTRY].usage.records()) == 30  # every call still counted


# --- 7. the pass-through redacts configured secrets ------------------------------------------------


async def test_the_pass_through_never_relays_the_gateways_key(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    headers = {**bearer(token), "anthropic-version": "2023-06-01"}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for status, says in ((400, "header x-api-key"), (401, "refused the gateway's API key")):
        echo = error_status(status, f"header x-api-key: {TEST_KEY}")
        echo = replace(echo, headers={**echo.headers, "anthropic-echo": f"key={TEST_KEY}"})
        fake_anthropic.enqueue(echo)
        async with client.post("/v1/messages", json=body, headers=headers) as resp:
            text = await resp.text()
            assert resp.status == (424 if status == 401 else status) and says in text, text
            assert TEST_KEY not in text and TEST_KEY not in str(resp.headers)
            if status == 400:
                assert resp.headers["anthropic-echo"] == "key=[redacted]"


# --- a provider key the upstream refuses: the gateway's problem, 424 on every API -------------------


async def test_the_gateways_key_refused_upstream_is_424_on_every_api_never_401(
    make_client: Any,
    token: str,
    fake_anthropic: FakeAnthropic,
    fake_openai: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tests.fakes.openai_upstream as fo

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-refused")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_anthropic.api_key = "sk-ant-the-one-anthropic-knows"  # so the gateway's (TEST_KEY) gets a 401
    fake_openai.default = fo.error_status(401, "Incorrect API key provided")
    port = client.port
    messages = [{"role": "user", "content": "hi"}]
    refused = "Anthropic refused the gateway's API key (HTTP 401). Run: agentspace keys add anthropic"

    # the pass-through, streamed or not, and its token count: the anthropic SDK's shape, never AuthenticationError
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{port}", max_retries=0)
    for stream in (False, True):
        with caplog.at_level(logging.WARNING), pytest.raises(anthropic.APIStatusError) as raised:
            await ant.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=messages, stream=stream)
        assert not isinstance(raised.value, anthropic.AuthenticationError)
        assert raised.value.status_code == 424 and raised.value.body == {
            "type": "error",
            "error": {"type": "api_error", "message": refused},
        }
    with pytest.raises(anthropic.APIStatusError) as raised:
        await ant.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)  # type: ignore[arg-type]
    assert raised.value.status_code == 424 and TEST_KEY not in str(raised.value.body)
    logged = [r.getMessage() for r in caplog.records if "refused the gateway's API key" in r.getMessage()]
    assert logged and "invalid x-api-key" in logged[0] and TEST_KEY not in logged[0]

    # the translated endpoints: an Anthropic model over the OpenAI APIs, an OpenAI embedding model
    oai = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    for call in (
        lambda: oai.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=messages),  # type: ignore[arg-type]
        lambda: oai.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=messages, stream=True),  # type: ignore[arg-type]
        lambda: oai.responses.create(model="anthropic/claude-sonnet-4-5", input="hi"),
        lambda: oai.embeddings.create(model="openai/text-embedding-3-small", input="hi"),
    ):
        with pytest.raises(openai.APIStatusError) as oraised:
            await call()
        assert not isinstance(oraised.value, openai.AuthenticationError)
        assert oraised.value.status_code == 424 and oraised.value.code == "no_api_key", oraised.value.body

    # the WebSocket's error frame and /api/chat's error chunk
    ws = await client.ws_connect("/gateway", headers=bearer(token))
    frames = await chat(ws, "hi")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "NO_API_KEY", frames
    assert "keys add anthropic" in frames[-1]["message"]
    await ws.close()
    async with await post_chat(client, bearer(token), "refused") as resp:
        text = (await resp.read()).decode()
        assert '"type":"error"' in text and "keys add anthropic" in text and TEST_KEY not in text

    records = await client.server.app[state.REGISTRY].usage.records()
    assert [r["error"] for r in records] == ["NO_API_KEY"] * 8  # one record per call, none answered


# --- 18, 19. outages: 503 in each API's shape for every credential, /healthz says which -------------


async def test_database_and_redis_outages_are_503s_in_each_apis_shape(tmp_path: Path, fake_anthropic: Any) -> None:
    pg, redis_srv = Postgres(), Redis()  # their own servers: this test stops them
    storage = {"backend": "postgres", "dsn": pg.dsn, "redis_url": redis_srv.url}
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    chat_body = {
        "model": "anthropic/claude-sonnet-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    }
    try:
        await gateway.start()
        admin = {"Authorization": f"Bearer {gateway.token}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.url + "/healthz") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok", "database": "ok", "redis": "ok"}
            async with http.post(gateway.url + "/api/clients", json={"name": "alice", "rpm": 100}, headers=admin) as r:
                alice = {**bearer((await r.json())["key"]), "anthropic-version": "2023-06-01"}

            async def expect_503(path: str, headers: dict[str, str], shape: str) -> str:
                async with http.post(gateway.url + path, json=chat_body, headers=headers) as resp:
                    assert resp.status == 503 and resp.content_type == "application/json", await resp.text()
                    body = await resp.json()
                if shape == "anthropic":
                    assert body["type"] == "error" and body["error"]["message"], body
                else:
                    assert body["error"]["message"] and "type" in body["error"], body
                return str(body["error"]["message"])

            redis_srv.close()
            async with http.get(gateway.url + "/healthz") as resp:
                health = await resp.json()
                assert resp.status == 503 and health["database"] == "ok" and "Redis" in health["redis"], health
            # alice's limits are counted in Redis (the gateway token has none: its /v1 calls need no Redis)
            assert "could not reach Redis" in await expect_503("/v1/chat/completions", alice, "openai")
            assert "could not reach Redis" in await expect_503("/v1/messages", alice, "anthropic")
            for i, who in enumerate((alice, admin)):  # a chat takes its stream lock in Redis: the same 503
                chat = {
                    "id": f"s{i}",
                    "messages": [{"id": f"m{i}", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
                }
                async with http.post(gateway.url + "/api/chat", json=chat, headers=who) as resp:
                    assert resp.status == 503 and (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"

            pg.stop()
            async with http.get(gateway.url + "/healthz") as resp:
                health = await resp.json()
                assert resp.status == 503 and "database" in health["database"], health
            # alice's key is looked up in the database (the gateway token's /v1 calls are answered, their
            # records kept for the database's return): the refusal names the database, not Redis
            for path, shape in (("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")):
                message = await expect_503(path, alice, shape)
                assert "could not use its database" in message and "Redis" not in message, message
            for who in (alice, admin):
                async with http.get(gateway.url + "/api/sessions", headers=who) as resp:
                    assert resp.status == 503 and (await resp.json())["error"]["code"] == "STORAGE_ERROR"
            async with http.get(
                gateway.url + "/gateway",
                headers={
                    **alice,
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            ) as resp:
                assert resp.status == 503
        assert not gateway.log_problems(), gateway.log_problems()
    finally:
        await gateway.aclose()
        redis_srv.close()
        pg.close()


# --- 16, 17. replicas fail safe when Redis restarts or dies ----------------------------------------


def restart_redis(server: Redis) -> None:
    """Stop Redis and start an empty one on the same port (no persistence: every key is gone)."""
    server.close()
    server.proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(server.port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_a_redis_restart_keeps_the_lock_and_a_dead_redis_ends_a_resume_with_an_error(
    tmp_path: Path, fake_anthropic: FakeAnthropic, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", REPLICA_TOKEN)
    redis_srv = Redis()  # its own: this test restarts and stops it
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    a, b = (GatewayProcess(tmp_path / n, fake_anthropic.url, storage=storage) for n in ("a", "b"))
    fake_anthropic.enqueue(text_response(" ".join(f"w{n}" for n in range(120)), chunks=120).with_delay(0.1))
    chat_body = {"id": "s1", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {REPLICA_TOKEN}"}) as http:
            started = await http.post(f"{a.url}/api/chat", json=chat_body)
            assert started.status == 200
            await started.content.readuntil(b"text-delta")

            await asyncio.to_thread(restart_redis, redis_srv)  # the lock is gone from Redis...
            await asyncio.sleep(4.5)  # ...until A's next renewal takes it again
            async with http.post(
                f"{b.url}/api/chat", json={**chat_body, "messages": [{**chat_body["messages"][0], "id": "u2"}]}
            ) as busy:
                assert busy.status == 409, await busy.text()
            resumed = await http.get(f"{b.url}/api/chat/s1/stream")
            assert resumed.status == 200  # A still streams it: not 204

            redis_srv.close()  # Redis dies while B relays: the resume ends, with an error, within seconds
            began = time.monotonic()
            tail = await asyncio.wait_for(resumed.read(), 30)
            assert b'"type":"error"' in tail and tail.endswith(b"data: [DONE]\n\n"), tail[-300:]
            assert time.monotonic() - began < 15
            await asyncio.wait_for(started.read(), 60)  # A's own client gets its whole answer
    finally:
        for server in (a, b):
            await server.aclose()
        redis_srv.close()


# --- 6. a session header cannot charge another client's session ------------------------------------


async def test_a_session_header_cannot_charge_another_clients_session(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    alice, bob = add_client("alice"), add_client("bob")
    ws = await client.ws_connect("/gateway", headers=bearer(bob))
    bobs = of(await chat(ws, "Hi"), "chat.stream.start")[0]["sessionId"]
    await ws.close()
    api = anthropic.AsyncAnthropic(api_key=alice, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    for header in ("X-Agentspace-Session", "X-Claude-Code-Session-Id"):
        await api.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={header: bobs},
        )
    admin_view = await (await client.get(f"/api/usage?sessionId={bobs}", headers=bearer(token))).json()
    assert admin_view["grandTotal"]["requestCount"] == 1  # bob's own call only
    cli_view = json.loads(await asyncio.to_thread(cli, "usage", "--session", bobs, "--json"))
    assert cli_view["grandTotal"]["requestCount"] == 1
    bob_view = await (await client.get(f"/api/usage?sessionId={bobs}", headers=bearer(bob))).json()
    assert bob_view["grandTotal"]["requestCount"] == 1
    # alice sees her calls under the id she named, in her own namespace
    alice_view = await (await client.get(f"/api/usage?sessionId={bobs}", headers=bearer(alice))).json()
    assert alice_view["grandTotal"]["requestCount"] == 2


async def test_a_gateway_token_session_shows_only_the_gateway_tokens_records(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    alice = add_client("alice")
    async with await post_chat(client, bearer(token), "project-x") as resp:
        await resp.read()
    # a record of the gateway token's from before records named their client
    gw = client.server.app[state.REGISTRY]
    older = UsageRecord(
        "older-1", now_iso(), "anthropic/claude-sonnet-4-5", "anthropic", "project-x", None,
        TokenUsage(10, 5), Cost(0.001, 0.001), 5.0, "stop", endpoint="ws",
    )  # fmt: skip
    await gw.usage.append(older)
    # alice names the same id: a /v1 label of her own, and her own session on /api/chat (scoped to her)
    api = anthropic.AsyncAnthropic(api_key=alice, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    await api.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Agentspace-Session": "project-x"},
    )
    async with await post_chat(client, bearer(alice), "project-x") as resp:
        await resp.read()

    async def usage(key: str, session_id: str) -> dict[str, Any]:
        return await (await client.get(f"/api/usage?sessionId={session_id}", headers=bearer(key))).json()

    # the gateway token's session: its chat and the older record, none of alice's calls under that id
    assert (await usage(token, "project-x"))["grandTotal"]["requestCount"] == 2
    cli_view = json.loads(await asyncio.to_thread(cli, "usage", "--session", "project-x", "--json"))
    assert cli_view["grandTotal"]["requestCount"] == 2
    # alice's session of the same visible id: her chat only, none of the gateway token's records
    alices = await usage(alice, "project-x")
    assert alices["grandTotal"]["requestCount"] == 1
    scoped = {s["id"] for s in (await (await client.get("/api/sessions", headers=bearer(token))).json())["sessions"]}
    (alices_stored,) = scoped - {"project-x"}
    assert (await usage(token, alices_stored))["grandTotal"]["requestCount"] == 1  # the admin sees it as hers


# --- 10. a removed client's name, added again, is a new client --------------------------------------


async def test_re_adding_a_removed_name_is_a_new_client_with_no_history(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    old = add_client("alice", "--budget", "5")
    ws = await client.ws_connect("/gateway", headers=bearer(old))
    session_id = of(await chat(ws, "Hi"), "chat.stream.start")[0]["sessionId"]
    await ws.close()
    cli("clients", "remove", "alice")
    result = CliRunner().invoke(main, ["clients", "add", "alice", "--budget", "5"])
    assert result.exit_code == 0 and "this is a new client" in result.stderr, result.stderr
    new = result.stdout.strip()

    assert (await (await client.get("/api/sessions", headers=bearer(new))).json())["sessions"] == []
    assert (await client.get(f"/api/sessions/{session_id}", headers=bearer(new))).status == 404
    ws = await client.ws_connect("/gateway", headers=bearer(new))
    assert (await chat(ws, "mine?", sessionId=session_id))[-1]["code"] == "SESSION_NOT_FOUND"
    await ws.send_json({"type": "usage.query", "id": "u"})
    assert (await receive(ws))["grandTotal"]["requestCount"] == 0
    await ws.close()
    shown = json.loads(await asyncio.to_thread(cli, "clients", "show", "alice", "--json"))
    assert shown["spend"]["usd"] == 0
    listed = await (await client.get("/api/clients/alice", headers=bearer(token))).json()
    assert listed["client"]["spend"]["usd"] == 0
    # the earlier alice's usage stays in the admin's reports
    report = await (await client.get("/api/usage?by=client", headers=bearer(token))).json()
    assert report["perClient"]["alice"]["requestCount"] == 1


# --- 9. session ids are scoped to their owner ----------------------------------------------------


async def test_another_clients_session_id_is_a_free_one_and_cannot_be_taken(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    alice, bob = add_client("alice"), add_client("bob")
    fake_anthropic.enqueue(text_response("part " * 30, chunks=30).with_delay(0.05))
    streaming = await post_chat(client, bearer(bob), "project-x")
    assert streaming.status == 200
    await streaming.content.readuntil(b"text-delta")
    # while bob's answer streams, alice's "project-x" is her own new session, as a free id would be
    async with await post_chat(client, bearer(alice), "project-x") as mine:
        assert mine.status == 200 and b'"type":"finish"' in await mine.read()
    await streaming.read()
    async with await post_chat(client, bearer(alice), "project-x", user("again", "u2")) as again:
        assert again.status == 200
        await again.read()

    async def session(key: str) -> dict[str, Any]:
        resp = await client.get("/api/sessions/project-x", headers=bearer(key))
        assert resp.status == 200
        return (await resp.json())["session"]

    bobs, alices = await session(bob), await session(alice)
    assert bobs["id"] == alices["id"] == "project-x"  # each knows it by the name it chose
    assert len(bobs["messages"]) == 2 and len(alices["messages"]) == 4  # nothing mixed
    assert [s["id"] for s in (await (await client.get("/api/sessions", headers=bearer(alice))).json())["sessions"]] == [
        "project-x"
    ]
    ws = await client.ws_connect("/gateway", headers=bearer(alice))
    frames = await chat(ws, "over the socket", sessionId="project-x")
    assert of(frames, "chat.stream.start")[0]["sessionId"] == "project-x"
    await ws.send_json({"type": "context.inspect", "id": "c", "sessionId": "project-x"})
    assert (await receive(ws))["sessionId"] == "project-x"
    await ws.close()
    # the admin sees both, under their stored ids (alice's: <id>-c<hash of the client>)
    admin_ids = {s["id"] for s in (await (await client.get("/api/sessions", headers=bearer(token))).json())["sessions"]}
    assert len(admin_ids) == 2 and "project-x" in admin_ids, admin_ids  # bob's, named first
    assert any(i.startswith("project-x-c") for i in admin_ids), admin_ids
    assert len((await session(bob))["messages"]) == 2


async def test_a_rotation_on_one_replica_closes_the_keys_sockets_on_the_other(replicas: list[GatewayProcess]) -> None:
    a, b = replicas
    admin = {"Authorization": f"Bearer {REPLICA_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(a.url + "/api/clients", json={"name": "alice"}, headers=admin) as resp:
            key = (await resp.json())["key"]
        async with http.ws_connect(b.ws_url, headers=bearer(key)) as ws:
            await ws.send_json({"type": "session.list", "id": "l"})
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "session.list.result"
            async with http.post(a.url + "/api/clients/alice/rotate", headers=admin) as resp:
                assert resp.status == 200
            code, _ = await closed_with(ws, timeout=10)
            assert code == REVOKED_CLOSE_CODE


class _HalfAnswer:
    """A plugin route that fails after its answer began."""

    @hookimpl
    def register_routes(self, app: web.Application, config: Any) -> None:
        async def half(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await response.prepare(request)
            await response.write(b"first part\n")
            raise RuntimeError("the plugin broke mid-answer")

        app.router.add_get("/api/plugins/half/stream", half)


async def test_a_route_that_fails_after_its_answer_began_is_cut_not_answered_twice(
    make_client: Any, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    pm = create_plugin_manager()
    pm.register(_HalfAnswer())
    client = await make_client(pm=pm)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{client.port}/api/plugins/half/stream", headers=auth_headers) as resp:
            assert resp.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
    # The part that was sent, then the end of the connection: no second answer inside the body.
    assert received == b"first part\n"
    assert any("failed after its answer began" in r.getMessage() for r in caplog.records)
