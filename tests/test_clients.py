"""Clients (issue 18): keys, isolation, attribution, allowlists, rate limits and budgets, through
the real interfaces: the CLI (CliRunner), the WebSocket, POST /api/chat, /v1/messages with the anthropic
SDK and /v1/chat/completions with the openai SDK, against the fake upstreams."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.calls import ceiling_cost, messages_body_ceiling
from agentspace.cli import main
from agentspace.clients import period_bounds
from agentspace.limits import usd
from agentspace.plugins import create_plugin_manager
from agentspace.storage.embedded import clients as clients_module
from agentspace.transports import state
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status, text_response, tool_use_response
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.openai_upstream import text_response as openai_text
from tests.fakes.openai_upstream import usage as openai_usage
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import chat, of, receive
from tests.tool_plugins import WeatherTools

MODEL = "claude-sonnet-4-5"


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def add_client(name: str, *options: str) -> str:
    """``agentspace clients add``: the key it prints (once)."""
    key = cli("clients", "add", name, *options).strip()
    assert key.startswith("as-") and len(key) >= 3 + 43, key
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def url(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


def anthropic_sdk(client: TestClient, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=url(client), max_retries=0)


def openai_sdk(client: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=url(client) + "/v1", max_retries=0)


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


async def ws_chat(client: TestClient, key: str, content: str = "Hi", **extra: Any) -> list[dict[str, Any]]:
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        return await chat(ws, content, **extra)
    finally:
        await ws.close()


async def message(client: TestClient, key: str, **params: Any) -> Any:
    return await anthropic_sdk(client, key).messages.create(
        model=params.pop("model", MODEL),
        max_tokens=params.pop("max_tokens", 64),
        messages=params.pop("messages", [{"role": "user", "content": "Hello"}]),
        **params,
    )


# --- keys ---------------------------------------------------------------------------------------


def test_cli_manages_clients_and_never_shows_a_key_again(isolated_env: Path) -> None:
    key = add_client("alice", "--budget", "5", "--period", "week", "--rpm", "10", "--models", "anthropic/*")
    stored = isolated_env / "clients.json"
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600
    text = stored.read_text()
    assert key not in text  # only its hash
    key_hash = json.loads(text)["clients"]["alice"]["keyHash"]

    listing = cli("clients", "list")
    assert "alice" in listing and "$5" in listing and "10 rpm" in listing and "anthropic/*" in listing
    listed = json.loads(cli("clients", "list", "--json"))["clients"]
    assert listed[0]["budget"] == {"usd": 5.0, "period": "week"} and listed[0]["spend"]["usd"] == 0
    shown = cli("clients", "show", "alice", "--json")
    for out in (listing, json.dumps(listed), shown, cli("clients", "show", "alice")):
        assert key not in out and key_hash not in out

    cli("clients", "set", "alice", "--budget", "none", "--rpm", "none", "--tpm", "1000")
    changed = json.loads(cli("clients", "show", "alice", "--json"))
    assert changed["budget"] is None and changed["rpm"] is None and changed["tpm"] == 1000

    new_key = cli("clients", "rotate", "alice").strip()
    assert new_key.startswith("as-") and new_key != key

    duplicate = CliRunner().invoke(main, ["clients", "add", "alice"])
    assert duplicate.exit_code != 0 and "exists already" in duplicate.output
    bad = CliRunner().invoke(main, ["clients", "add", "bob", "--rpm", "lots"])
    assert bad.exit_code != 0 and "--rpm" in bad.output
    admin = CliRunner().invoke(main, ["clients", "add", "admin"])
    assert admin.exit_code != 0

    cli("clients", "remove", "alice")
    assert "No clients" in cli("clients", "list")


async def test_client_key_chats_on_every_transport_and_usage_is_attributed(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: FakeAnthropic,
    fake_openai: FakeOpenAI,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    key = add_client("alice")

    # WebSocket: header auth, and first-frame auth
    frames = await ws_chat(client, key)
    assert of(frames, "chat.stream.end"), frames
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": key})
    assert (await receive(ws))["type"] == "auth.ok"
    assert of(await chat(ws, "Again"), "chat.stream.end")
    await ws.close()
    # POST /api/chat
    resp = await post_chat(client, bearer(key), "chat-alice")
    assert resp.status == 200
    await read_all(resp)
    # /v1/messages (pass-through) with x-api-key, /v1/chat/completions with Bearer
    assert (await message(client, key)).content[0].text
    fake_openai.enqueue(openai_text("Hi from OpenAI"))
    completion = await openai_sdk(client, key).chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "Hi from OpenAI"
    # /v1/responses (Codex's session-id header) and /v1/embeddings
    fake_openai.enqueue(openai_text("Hi from Responses"))
    answer = await openai_sdk(client, key).responses.create(
        model="openai/gpt-4o-mini", input="Hi", extra_headers={"session-id": "codex-thread"}
    )
    assert answer.output_text == "Hi from Responses"
    vectors = await openai_sdk(client, key).embeddings.create(model="openai/text-embedding-3-small", input="Hi")
    assert vectors.data[0].embedding
    # the gateway token is the admin
    assert of(await ws_chat(client, token), "chat.stream.end")

    got = sorted((r["client"], r["endpoint"]) for r in await records(client))
    assert got == [
        ("admin", "ws"),
        ("alice", "anthropic"),
        ("alice", "embeddings"),
        ("alice", "http"),
        ("alice", "openai"),
        ("alice", "responses"),
        ("alice", "ws"),
        ("alice", "ws"),
    ]
    (codex,) = [r for r in await records(client) if r["endpoint"] == "responses"]
    assert codex["sessionId"] == "codex-thread"
    by_client = await (await client.get("/api/usage?by=client", headers=bearer(token))).json()
    assert by_client["perClient"]["alice"]["requestCount"] == 7
    assert by_client["perClient"]["admin"]["requestCount"] == 1
    # a client's usage is its own
    own = await (await client.get("/api/usage", headers=bearer(key))).json()
    assert own["grandTotal"]["requestCount"] == 7
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    await ws.send_json({"type": "usage.query", "id": "u"})
    assert (await receive(ws))["grandTotal"]["requestCount"] == 7
    await ws.close()
    # the CLI report per client; JSON gains perClient
    out = json.loads(cli("usage", "--by-client", "--json"))
    assert set(out["perClient"]) == {"admin", "alice"}
    assert "alice" in cli("usage", "--by-client")
    # last use is recorded
    listed = await (await client.get("/api/clients", headers=bearer(token))).json()
    assert listed["clients"][0]["lastUsedAt"] is not None


# --- isolation ----------------------------------------------------------------------------------


async def test_a_client_sees_only_its_own_sessions(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    alice, bob = add_client("alice"), add_client("bob")
    frames = await ws_chat(client, alice)
    session_id = of(frames, "chat.stream.start")[0]["sessionId"]
    path = f"/api/sessions/{session_id}"

    for method, route in (
        ("GET", path),
        ("GET", path + "/context"),
        ("DELETE", path),
    ):
        resp = await client.request(method, route, headers=bearer(bob))
        assert resp.status == 404, (method, route)
        assert (await resp.json())["error"]["code"] == "SESSION_NOT_FOUND"
    # nothing of bob's streams there: 204 without a body, as for a session id no one has (useChat's resume)
    resp = await client.get(f"/api/chat/{session_id}/stream", headers=bearer(bob))
    assert (resp.status, await resp.read()) == (204, b"")
    assert (await (await client.get("/api/sessions", headers=bearer(bob))).json())["sessions"] == []
    # nor over the WebSocket: continue it, inspect it, list it
    ws = await client.ws_connect("/gateway", headers=bearer(bob))
    error = (await chat(ws, "mine now", sessionId=session_id))[-1]
    assert error["type"] == "error" and error["code"] == "SESSION_NOT_FOUND"
    await ws.send_json({"type": "context.inspect", "id": "c", "sessionId": session_id})
    assert (await receive(ws))["code"] == "SESSION_NOT_FOUND"
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["sessions"] == []
    # abort: only a stream of the same connection can be aborted
    await ws.send_json({"type": "chat.abort", "id": "x", "requestId": "r1"})
    assert (await receive(ws))["type"] == "error"
    await ws.close()
    # bob's usage does not include alice's
    assert (await (await client.get("/api/usage", headers=bearer(bob))).json())["grandTotal"]["requestCount"] == 0

    # the owner and the admin see it
    assert (await client.get(path, headers=bearer(alice))).status == 200
    assert (await client.get(path, headers=bearer(token))).status == 200
    assert (await (await client.get("/api/sessions", headers=bearer(alice))).json())["sessions"][0]["id"] == session_id
    # the admin routes refuse a client
    for method in ("GET", "POST"):
        resp = await client.request(method, "/api/clients", headers=bearer(alice), json={"name": "eve"})
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert (await client.post("/api/clients/bob/rotate", headers=bearer(alice))).status == 403
    assert (await client.delete(path, headers=bearer(alice))).status == 204


async def test_a_v1_session_label_is_scoped_to_its_client(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_openai: FakeOpenAI,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two clients that send the same session-id header (Codex's) each see only their own calls under it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    alice, bob = add_client("alice"), add_client("bob")
    for key, times in ((alice, 2), (bob, 1)):
        for _ in range(times):
            await openai_sdk(client, key).responses.create(
                model="openai/gpt-4o-mini", input="Hi", extra_headers={"session-id": "shared-thread"}
            )
    for key, count in ((alice, 2), (bob, 1), (token, 3)):
        usage = await (await client.get("/api/usage?sessionId=shared-thread", headers=bearer(key))).json()
        assert usage["grandTotal"]["requestCount"] == count


async def test_rotated_and_removed_keys_are_refused_at_once_and_usage_stays(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    key = add_client("alice")
    assert of(await ws_chat(client, key), "chat.stream.end")
    new_key = cli("clients", "rotate", "alice").strip()  # the running server sees the file change
    assert (await client.get("/api/sessions", headers=bearer(key))).status == 401
    with pytest.raises(anthropic.AuthenticationError):
        await message(client, key)
    assert (await client.get("/api/sessions", headers=bearer(new_key))).status == 200

    cli("clients", "remove", "alice")
    assert (await client.get("/api/sessions", headers=bearer(new_key))).status == 401
    report = await (await client.get("/api/usage?by=client", headers=bearer(token))).json()
    assert report["perClient"]["alice"]["requestCount"] == 1
    assert json.loads(cli("usage", "--by-client", "--json"))["perClient"]["alice"]["requestCount"] == 1


async def test_a_last_use_noted_is_not_read_back_and_a_key_removed_by_hand_after_it_is_refused(
    client: TestClient, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server notes each client key's last use (once a minute per key) by writing the clients file. It used
    to read the file whole again at the next lookup, so every call after one parsed every client (62 ms at
    4,000 clients). It keeps what it wrote instead, as long as the file is the one it wrote: one put in its place
    by another program is read at the next lookup."""
    keys = {name: add_client(name) for name in ("alice", "bob")}
    stored = isolated_env / "clients.json"
    reads: list[Path] = []
    real = clients_module.read_private_file

    def reading(path: Path, fix: str) -> str:
        reads.append(path)
        return real(path, fix)

    monkeypatch.setattr(clients_module, "read_private_file", reading)
    for key in keys.values():
        assert (await client.get("/api/sessions", headers=bearer(key))).status == 200

    async def last_uses_written() -> bool:  # the server writes them just after the requests
        return all(doc["lastUsedAt"] for doc in json.loads(stored.read_text())["clients"].values())

    await wait_until(last_uses_written)
    reads.clear()
    for _ in range(3):
        for key in keys.values():
            assert (await client.get("/api/sessions", headers=bearer(key))).status == 200
    assert reads == []

    data = json.loads(stored.read_text())
    del data["clients"]["alice"]  # alice's key removed by hand, the file replaced whole
    by_hand = stored.with_name("by-hand.json")
    by_hand.write_text(json.dumps(data))
    os.chmod(by_hand, 0o600)
    os.replace(by_hand, stored)
    assert (await client.get("/api/sessions", headers=bearer(keys["alice"]))).status == 401
    assert (await client.get("/api/sessions", headers=bearer(keys["bob"]))).status == 200
    assert reads == [stored]


async def test_clients_over_http_for_the_admin(client: TestClient, token: str) -> None:
    admin = bearer(token)
    resp = await client.post(
        "/api/clients", headers=admin, json={"name": "ci", "budgetUsd": 2.5, "period": "day", "models": ["openai/*"]}
    )
    assert resp.status == 201
    created = await resp.json()
    key = created["key"]
    assert key.startswith("as-")
    assert created["client"]["budget"] == {"usd": 2.5, "period": "day"}
    assert created["client"]["spend"]["periodEnd"].endswith("T00:00:00Z")
    bad = await client.post("/api/clients", headers=admin, json={"name": "x", "rpm": -1})
    assert bad.status == 400 and (await bad.json())["error"]["fields"][0]["path"] == "rpm"
    patched = await client.patch("/api/clients/ci", headers=admin, json={"rpm": 30, "budgetUsd": None})
    assert (await patched.json())["client"]["rpm"] == 30
    listed = await (await client.get("/api/clients", headers=admin)).text()
    shown = await (await client.get("/api/clients/ci", headers=admin)).text()
    key_hash = json.loads((Path(client.app[state.REGISTRY].config.data_dir) / "clients.json").read_text())
    key_hash = key_hash["clients"]["ci"]["keyHash"]
    for text in (listed, shown):
        assert key not in text and key_hash not in text and "keyHash" not in text
    assert set(json.loads(listed)["clients"][0]) == {
        "name",
        "createdAt",
        "lastUsedAt",
        "budget",
        "spend",
        "rpm",
        "tpm",
        "models",
    }
    rotated = await (await client.post("/api/clients/ci/rotate", headers=admin)).json()
    assert rotated["key"] != key
    assert (await client.get("/api/sessions", headers=bearer(key))).status == 401
    assert (await client.get("/api/sessions", headers=bearer(rotated["key"]))).status == 200
    assert (await client.delete("/api/clients/ci", headers=admin)).status == 204
    assert (await client.get("/api/clients/ci", headers=admin)).status == 404


# --- model allowlist ----------------------------------------------------------------------------


async def test_model_allowlist_on_every_transport(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: FakeAnthropic,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    # A model with no deprecation date in the cost map: models past theirs are not listed.
    key = add_client("cheap", "--models", "openai/gpt-5.4-mini")

    error = (await ws_chat(client, key))[-1]  # the default model is anthropic/claude-sonnet-4-5
    assert error["type"] == "error" and error["code"] == "MODEL_NOT_ALLOWED"
    assert "openai/gpt-5.4-mini" in error["message"]
    resp = await post_chat(client, bearer(key), "c1")
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "MODEL_NOT_ALLOWED"
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        await message(client, key)  # the pass-through
    assert "MODEL_NOT_ALLOWED" in str(e.value)
    with pytest.raises(openai.PermissionDeniedError):
        await openai_sdk(client, key).chat.completions.create(
            model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}]
        )
    with pytest.raises(openai.PermissionDeniedError):
        await openai_sdk(client, key).responses.create(model="anthropic/claude-sonnet-4-5", input="Hi")
    with pytest.raises(openai.PermissionDeniedError):
        await openai_sdk(client, key).embeddings.create(model="openai/text-embedding-3-small", input="Hi")
    assert fake_anthropic.requests == [] and fake_openai.requests == []  # nothing went upstream
    assert await records(client) == []

    fake_openai.enqueue(openai_text("fine"))
    ok = await openai_sdk(client, key).chat.completions.create(
        model="openai/gpt-5.4-mini", messages=[{"role": "user", "content": "Hi"}]
    )
    assert ok.choices[0].message.content == "fine"
    fake_openai.enqueue(openai_text("translated"))  # /v1/messages, translated for a model it may use
    answer = await message(client, key, model="openai/gpt-5.4-mini")
    assert answer.content[0].text == "translated"
    with pytest.raises(anthropic.PermissionDeniedError):
        await message(client, key, model="openai/gpt-4o")
    models = (await (await client.get("/api/models", headers=bearer(key))).json())["models"]
    assert [m["id"] for m in models] == ["openai/gpt-5.4-mini"]
    listed = await openai_sdk(client, key).models.list()
    assert [m.id for m in listed.data] == ["openai/gpt-5.4-mini"]


# --- rate limits --------------------------------------------------------------------------------


async def test_requests_per_minute_and_a_retry_after_that_works(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    key = add_client("bot", "--rpm", "2")
    guard = client.app[state.REGISTRY].guard
    now = [1000.0]
    guard.monotonic = lambda: now[0]  # the sliding minute's clock

    assert of(await ws_chat(client, key), "chat.stream.end")
    now[0] += 20
    assert (await message(client, key)).content
    now[0] += 1
    with pytest.raises(anthropic.RateLimitError) as e:
        await message(client, key)
    retry_after = int(e.value.response.headers["retry-after"])
    assert 38 <= retry_after <= 40  # the first request leaves the window 60 s after it was made
    resp = await post_chat(client, bearer(key), "c1")
    assert resp.status == 429 and int(resp.headers["Retry-After"]) == retry_after
    assert (await resp.json())["error"]["code"] == "RATE_LIMITED"
    error = (await ws_chat(client, key))[-1]
    assert error["code"] == "RATE_LIMITED"

    now[0] += retry_after  # waiting as told is enough
    assert (await message(client, key)).content
    assert len(fake_anthropic.requests) == 3


async def test_tokens_per_minute(client: TestClient, fake_anthropic: FakeAnthropic) -> None:
    key = add_client("bot", "--tpm", "20")
    assert (await message(client, key)).content  # 25 input tokens and some output: past 20
    with pytest.raises(anthropic.RateLimitError):
        await message(client, key)


async def test_openai_shaped_refusals_name_what_ran_out(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's 429 says `type: "tokens"` past a tpm and `type: "requests"` past an rpm (code
    rate_limit_exceeded for both): a client that reads the type waits for the right thing."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    sdk = openai_sdk(client, add_client("heavy", "--tpm", "20"))
    fake_openai.enqueue(openai_text("Hi", usage=openai_usage(30, 7)))  # past 20 tokens
    await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    refusals = []
    with pytest.raises(openai.RateLimitError) as e:
        await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    refusals.append(e.value)
    with pytest.raises(openai.RateLimitError) as e:
        await sdk.responses.create(model="openai/gpt-4o-mini", input="Hi")
    refusals.append(e.value)
    with pytest.raises(openai.RateLimitError) as e:
        await sdk.embeddings.create(model="openai/text-embedding-3-small", input="Hi")
    refusals.append(e.value)
    for refused in refusals:
        assert (refused.type, refused.code) == ("tokens", "rate_limit_exceeded"), refused.body
        assert refused.response.headers["retry-after"]

    sdk = openai_sdk(client, add_client("chatty", "--rpm", "1"))
    fake_openai.enqueue(openai_text("Hi"))
    await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.RateLimitError) as e:
        await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert (e.value.type, e.value.code) == ("requests", "rate_limit_exceeded"), e.value.body


async def test_a_page_on_an_allowed_origin_can_read_when_to_retry(
    make_client: Callable[..., Awaitable[TestClient]], fake_anthropic: FakeAnthropic, token: str
) -> None:
    """Browsers show a page only the response headers CORS exposes: Retry-After and the relayed rate-limit
    headers are exposed on the answers that carry them."""
    origin = "http://app.example"
    client = await make_client(server={"allowed_origins": [origin]})
    key = add_client("page", "--rpm", "1")

    def exposed(resp: aiohttp.ClientResponse) -> set[str]:
        return {h.strip().lower() for h in resp.headers.get("Access-Control-Expose-Headers", "").split(",")}

    headers = {**bearer(key), "Origin": origin}
    async with aiohttp.ClientSession() as http:
        body = {"model": "anthropic/" + MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
        async with http.post(url(client) + "/v1/messages", json=body, headers=headers) as resp:
            assert resp.status == 200
        async with http.post(url(client) + "/v1/messages", json=body, headers=headers) as resp:  # past its rpm
            assert resp.status == 429 and resp.headers["Access-Control-Allow-Origin"] == origin
            assert resp.headers["Retry-After"] and "retry-after" in exposed(resp), resp.headers
        resp = await post_chat(client, headers, "page-chat")
        assert resp.status == 429 and resp.headers["Retry-After"]
        assert "retry-after" in exposed(resp), resp.headers
        resp.release()

        # the upstream's own 429, relayed with its request id and its rate-limit headers
        limited = error_status(429, retry_after=7)
        fake_anthropic.enqueue(
            replace(limited, headers={**limited.headers, "anthropic-ratelimit-requests-remaining": "0"})
        )
        admin = {**bearer(token), "Origin": origin}
        async with http.post(url(client) + "/v1/messages", json=body, headers=admin) as resp:
            assert resp.status == 429 and resp.headers["retry-after"] == "7"
            assert {"retry-after", "request-id", "anthropic-ratelimit-requests-remaining"} <= exposed(resp)


async def test_the_tool_loop_checks_before_each_step(
    make_client: Callable[..., Awaitable[TestClient]], fake_anthropic: FakeAnthropic
) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    key = add_client("bot", "--rpm", "1")
    fake_anthropic.enqueue(tool_use_response("get_weather", {"city": "Oslo"}), text_response("Sunny."))
    frames = await ws_chat(client, key, "Weather?")
    assert of(frames, "chat.stream.tool_result"), frames  # step one ran its tool
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "RATE_LIMITED"
    assert len(fake_anthropic.requests) == 1  # step two was refused before its provider call


# --- budgets ------------------------------------------------------------------------------------


async def spend_of(client: TestClient, name: str) -> float:
    return sum(r["totalCost"] for r in await records(client) if r["client"] == name)


def reservation_of(client: TestClient, **params: Any) -> float:
    """What ``message(client, key, **params)`` reserves: the most it can cost as sent (calls.py)."""
    gw = client.app[state.REGISTRY]
    model = "anthropic/" + params.get("model", MODEL)
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}], **params}
    return ceiling_cost(gw, model, messages_body_ceiling(gw, model, body))


async def test_budget_refuses_the_next_call_then_a_new_period_restores_it(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    one = reservation_of(client)  # about $0.00096; one call costs about $0.00012
    budget = one * 1.2  # room for a second call (spent + its reservation), not a third
    key = add_client("alice", "--budget", f"{budget:.10f}", "--period", "month")
    assert (await message(client, key)).content
    assert (await message(client, key)).content  # spent + this reservation still fit: admitted
    spent = await spend_of(client, "alice")
    assert spent + one > budget

    with pytest.raises(anthropic.RateLimitError) as e:
        await message(client, key)
    text = str(e.value)
    assert "BUDGET_EXCEEDED" in text and f"{usd(budget)} month budget" in text
    assert f"has {usd(budget - spent)} left" in text and f"may cost up to {usd(one)} as sent" in text
    assert f"spent {usd(spent)}," in text
    month_end = period_bounds("month", datetime.now(UTC))[1]  # a date and time that reads cleanly, once in UTC
    assert f"; it resets at {month_end:%Y-%m-%d} 00:00 UTC." in text, text
    assert e.value.response.headers["x-should-retry"] == "false"  # the SDKs do not retry it
    # A turn reserves [chat] max_tokens with the thinking budget on top: far more than is left.
    resp = await post_chat(client, bearer(key), "c2")
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "BUDGET_EXCEEDED"
    assert int(resp.headers["Retry-After"]) >= 1
    error = (await ws_chat(client, key))[-1]
    assert error["code"] == "BUDGET_EXCEEDED"
    with pytest.raises(openai.RateLimitError):
        await openai_sdk(client, key).chat.completions.create(
            model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}], max_tokens=64
        )

    # next month (an injected clock): the budget is there again
    guard = client.app[state.REGISTRY].guard
    now = datetime.now(UTC)
    guard.clock = lambda: now.replace(year=now.year + 1, month=1, day=1, hour=0, minute=5)
    assert (await message(client, key)).content


async def test_concurrent_calls_overshoot_a_budget_by_at_most_one_call(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    key = add_client("alice", "--budget", "1")
    assert (await message(client, key)).content
    spent_before = await spend_of(client, "alice")
    one = reservation_of(client)
    # Nearly spent: room for one call's reservation, and none left once that call has cost what the first did.
    budget = spent_before + one + spent_before / 2
    cli("clients", "set", "alice", "--budget", f"{budget:.10f}")
    fake_anthropic.default = text_response().with_delay(0.3)  # the calls overlap

    results = await asyncio.gather(*(message(client, key) for _ in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, anthropic.RateLimitError)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) + len(answered) == 20, results
    assert len(answered) == 1  # the one admitted while spend + reservations + its own fit the budget
    spent = await spend_of(client, "alice")
    assert spent <= budget


async def test_a_restart_keeps_the_spend(
    make_client: Callable[..., Awaitable[TestClient]], fake_anthropic: FakeAnthropic
) -> None:
    first = await make_client()
    one = reservation_of(first)
    key = add_client("alice", "--budget", f"{one * 1.05:.10f}", "--period", "total")
    assert (await message(first, key)).content
    await first.close()

    second = await make_client()  # the same data directory, a new process state
    with pytest.raises(anthropic.RateLimitError) as e:
        await message(second, key)
    assert "does not reset" in str(e.value)
    listed = json.loads(cli("clients", "list", "--json"))["clients"][0]
    assert listed["spend"]["usd"] + one > listed["budget"]["usd"]
    assert listed["spend"]["usd"] == pytest.approx(await spend_of(second, "alice"))


@pytest.mark.parametrize("name", ["ws", "http"])
async def test_the_names_of_the_records_from_before_clients_are_not_client_names(
    client: TestClient, token: str, name: str
) -> None:
    """Records written before clients existed name "ws" or "http" and are the gateway token's (``reports.owner``): a
    client of that name would have its records counted as the admin's, its spend read back as nothing (a restart
    forgot what it spent, and the budget with it) and the admin's reports on PostgreSQL as its own. Refused as
    "admin" is, on the CLI and over HTTP."""
    added = CliRunner().invoke(main, ["clients", "add", name, "--budget", "1"])
    assert added.exit_code != 0 and "as-" not in added.output, added.output
    resp = await client.post("/api/clients", headers=bearer(token), json={"name": name})
    assert resp.status == 400 and (await resp.json())["error"]["fields"][0]["path"] == "name"
    assert "No clients" in cli("clients", "list")


# --- secrets ------------------------------------------------------------------------------------


async def test_no_key_or_hash_in_logs_or_errors(
    client: TestClient, fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture, token: str
) -> None:
    caplog.set_level(logging.DEBUG)
    key = add_client("alice", "--rpm", "1", "--models", "anthropic/*")
    key_hash = json.loads((Path(client.app[state.REGISTRY].config.data_dir) / "clients.json").read_text())
    key_hash = key_hash["clients"]["alice"]["keyHash"]
    bodies = []
    assert (await message(client, key)).content
    for attempt in (message(client, key), message(client, key, model="openai/gpt-4o")):
        try:
            await attempt
        except anthropic.APIStatusError as e:
            bodies.append(e.response.text)
    resp = await post_chat(client, bearer(key), "c1")
    bodies.append(await resp.text())
    bodies.append(await (await client.get("/api/sessions", headers=bearer(key + "x"))).text())
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": key[:-1]})
    frame = await ws.receive()
    bodies.append(frame.data if frame.type == WSMsgType.TEXT else "")
    await ws.close()
    bodies.append(await (await client.get("/api/clients", headers=bearer(token))).text())
    assert len(bodies) == 6
    everything = "\n".join(bodies) + "\n" + caplog.text
    assert key not in everything and key[3:] not in everything and key_hash not in everything


async def test_a_clients_file_others_may_write_admits_no_client(
    client: TestClient, fake_anthropic: FakeAnthropic, isolated_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = add_client("alice")
    assert (await client.get("/api/sessions", headers=bearer(key))).status == 200
    stored = isolated_env / "clients.json"

    async def last_use_written() -> bool:  # the server writes it just after the request
        return json.loads(stored.read_text())["clients"]["alice"]["lastUsedAt"] is not None

    await wait_until(last_use_written)
    os.chmod(stored, 0o666)  # anyone could add a key of their own
    assert (await client.get("/api/sessions", headers=bearer(key))).status == 401
    assert "writable by other users" in caplog.text
    refused = CliRunner().invoke(main, ["clients", "list"])
    assert refused.exit_code != 0 and "writable by other users" in refused.output
