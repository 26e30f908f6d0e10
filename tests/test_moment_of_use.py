"""Checks made at the moment of use (README.md#teams-and-budgets): a change to a client key, its limits or the
gateway token, made with the CLI on the same data directory or through /api/clients while the server runs
and takes calls, is seen by the very next call on every transport -- the WebSocket, POST /api/chat,
/v1/messages, /v1/messages/count_tokens, /v1/chat/completions, /v1/responses and /v1/embeddings -- through
the official SDKs against the fake upstreams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.clients import period_bounds
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state
from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import FakeAnthropic, text_response, tool_use_response
from tests.fakes.openai_upstream import FakeOpenAI
from tests.scale_servers import TOKEN, Redis, flush_redis
from tests.support.ui_stream import read_all, user
from tests.support.ws import chat, receive
from tests.tool_plugins import WeatherTools

MODEL = "anthropic/claude-sonnet-4-5"
EMBEDDING = "openai/text-embedding-3-small"
TRANSPORTS = ("ws", "http", "messages", "count_tokens", "chat_completions", "responses", "embeddings")
OK = {t: "ok" for t in TRANSPORTS}


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def base(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


def _sdk_code(e: anthropic.APIStatusError | openai.APIStatusError) -> str:
    """The gateway's error code behind an SDK's exception (each /v1 API answers in its own shape)."""
    text = str(e)
    if e.status_code == 401:
        return "UNAUTHORIZED"
    if e.status_code == 403:
        return "MODEL_NOT_ALLOWED" if "may not use" in text else "FORBIDDEN"
    if e.status_code == 429:
        return "BUDGET_EXCEEDED" if "budget" in text else "RATE_LIMITED"
    return f"HTTP {e.status_code}: {text}"


async def call(client: TestClient | str, key: str, transport: str) -> str:
    """One call of ``key``'s on ``transport``: "ok", or the code it was refused with."""
    url = client if isinstance(client, str) else base(client)
    if transport in ("ws", "http"):
        async with aiohttp.ClientSession() as http:
            if transport == "ws":
                try:
                    ws = await http.ws_connect(url + "/gateway", headers=bearer(key))
                except aiohttp.WSServerHandshakeError as e:
                    return "UNAUTHORIZED" if e.status == 401 else f"HTTP {e.status}"
                try:
                    frames = await chat(ws, "Hi")
                finally:
                    await ws.close()
                return "ok" if frames[-1]["type"] == "chat.stream.end" else str(frames[-1]["code"])
            body = {"id": "moment-http", "messages": [user("Hi!")], "trigger": "submit-message"}
            async with http.post(url + "/api/chat", json=body, headers=bearer(key)) as resp:
                if resp.status != 200:
                    return str((await resp.json())["error"]["code"])
                chunks = await read_all(resp)
        errors = [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]
        return "ok" if not errors else str(errors[0]["errorText"])
    try:
        if transport in ("messages", "count_tokens"):
            sdk = anthropic.AsyncAnthropic(api_key=key, base_url=url, max_retries=0)
            messages: Any = [{"role": "user", "content": "Hello"}]
            if transport == "messages":
                await sdk.messages.create(model=MODEL, max_tokens=64, messages=messages)
            else:
                await sdk.messages.count_tokens(model=MODEL, messages=messages)
            return "ok"
        api = openai.AsyncOpenAI(api_key=key, base_url=url + "/v1", max_retries=0)
        if transport == "chat_completions":
            await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=64)
        elif transport == "responses":
            await api.responses.create(model=MODEL, input="Hi", max_output_tokens=64)
        else:
            await api.embeddings.create(model=EMBEDDING, input="Hi")
        return "ok"
    except (anthropic.APIStatusError, openai.APIStatusError) as e:
        return _sdk_code(e)


async def every_transport(client: TestClient | str, key: str) -> dict[str, str]:
    return {t: await call(client, key, t) for t in TRANSPORTS}


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


# --- 1. keys ------------------------------------------------------------------------------------


REFUSED = {t: "UNAUTHORIZED" for t in TRANSPORTS}


async def change_key(client: TestClient, token: str, via: str, change: str, name: str) -> str | None:
    """Rotate, remove, or remove and add again the client ``name``, with the CLI or over /api/clients; the
    key that works now (None after a removal)."""
    admin = bearer(token)
    if change == "rotate":
        if via == "cli":
            return cli("clients", "rotate", name).strip()
        return str((await (await client.post(f"/api/clients/{name}/rotate", headers=admin)).json())["key"])
    if via == "cli":
        cli("clients", "remove", name)
    else:
        assert (await client.delete(f"/api/clients/{name}", headers=admin)).status == 204
    if change == "remove":
        return None
    if via == "cli":  # the same name again: a new client with a key of its own
        return cli("clients", "add", name).strip()
    return str((await (await client.post("/api/clients", headers=admin, json={"name": name})).json())["key"])


# Each test refuses a key once per transport: more failures from one source would be answered 429
# (security.MAX_FAILURES), not 401.
@pytest.mark.parametrize("change", ["rotate", "remove", "readd"])
@pytest.mark.parametrize("via", ["cli", "api"])
async def test_a_key_added_rotated_or_removed_is_seen_by_the_next_call_everywhere(
    client: TestClient, token: str, via: str, change: str
) -> None:
    if via == "cli":
        key = cli("clients", "add", "alice").strip()
    else:
        key = (await (await client.post("/api/clients", headers=bearer(token), json={"name": "alice"})).json())["key"]
    assert await every_transport(client, key) == OK  # added: accepted at once
    new_key = await change_key(client, token, via, change, "alice")
    assert await every_transport(client, key) == REFUSED
    if new_key is not None:
        assert await every_transport(client, new_key) == OK


async def revoked(ws: Any) -> tuple[dict[str, Any], Any]:
    """The refusal of a socket whose credential went, and its close code."""
    frame = await receive(ws)
    msg = await ws.receive(timeout=30)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
    return frame, ws.close_code


@pytest.mark.parametrize("change", ["cli-remove", "cli-rotate", "cli-readd", "api-remove", "api-rotate", "api-readd"])
async def test_an_open_socket_s_next_chat_send_after_its_key_went_is_refused_and_never_sent(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str, change: str
) -> None:
    key = cli("clients", "add", "carol").strip()
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    assert (await chat(ws, "first"))[-1]["type"] == "chat.stream.end"
    sent = len(fake_anthropic.requests)
    via, what = change.split("-")
    await change_key(client, token, via, what, "carol")
    # At once: the very next frame, whether or not the periodic check has run yet.
    await ws.send_json({"type": "chat.send", "id": "next", "content": "second"})
    frame, code = await revoked(ws)
    assert (frame["type"], frame["code"]) == ("error", "UNAUTHORIZED"), frame
    assert code == 4001
    assert len(fake_anthropic.requests) == sent  # nothing went upstream on the removed key


# --- 4. the gateway token -----------------------------------------------------------------------


async def test_the_gateway_token_rotated_with_the_cli_is_seen_by_the_next_call(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    assert await every_transport(client, token) == OK
    ws = await client.ws_connect("/gateway", headers=bearer(token))
    assert (await chat(ws, "first"))[-1]["type"] == "chat.stream.end"
    sent = len(fake_anthropic.requests)
    new_token = cli("token", "--rotate").strip()
    assert new_token != token
    await ws.send_json({"type": "chat.send", "id": "next", "content": "second"})
    frame, code = await revoked(ws)
    assert (frame["code"], code) == ("UNAUTHORIZED", 4001)
    assert len(fake_anthropic.requests) == sent
    assert await every_transport(client, token) == {t: "UNAUTHORIZED" for t in TRANSPORTS}
    assert await every_transport(client, new_token) == OK
    assert (await client.get("/api/clients", headers=bearer(token))).status == 401
    assert (await client.get("/api/clients", headers=bearer(new_token))).status == 200


# --- 2. limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["cli", "api"])
async def test_a_model_allowlist_set_and_cleared_applies_to_the_next_call(
    client: TestClient, token: str, via: str
) -> None:
    key = cli("clients", "add", "dave").strip()
    assert await every_transport(client, key) == OK

    async def change(**settings: Any) -> None:
        if via == "cli":
            value = settings["models"]
            cli("clients", "set", "dave", "--models", "none" if value is None else ",".join(value))
        else:
            resp = await client.patch("/api/clients/dave", headers=bearer(token), json=settings)
            assert resp.status == 200, await resp.text()

    await change(models=["openai/gpt-*"])
    assert await every_transport(client, key) == {t: "MODEL_NOT_ALLOWED" for t in TRANSPORTS}
    await change(models=None)
    assert await every_transport(client, key) == OK


@pytest.mark.parametrize("via", ["cli", "api"])
async def test_requests_made_before_an_rpm_was_set_count(client: TestClient, token: str, via: str) -> None:
    """A client without limits makes calls; an rpm set now counts the calls of the last minute, as a budget
    set later counts the spend before it."""
    key = cli("clients", "add", "erin").strip()
    assert await every_transport(client, key) == OK  # 7 calls in this minute
    if via == "cli":
        cli("clients", "set", "erin", "--rpm", "7")
    else:
        assert (await client.patch("/api/clients/erin", headers=bearer(token), json={"rpm": 7})).status == 200
    assert await every_transport(client, key) == {t: "RATE_LIMITED" for t in TRANSPORTS}
    cli("clients", "set", "erin", "--rpm", "none")
    assert await every_transport(client, key) == OK


async def test_tokens_used_before_a_tpm_was_set_count(client: TestClient) -> None:
    key = cli("clients", "add", "fay").strip()
    assert await call(client, key, "messages") == "ok"
    cli("clients", "set", "fay", "--tpm", "10")  # one call used more than 10 tokens
    assert await every_transport(client, key) == {t: "RATE_LIMITED" for t in TRANSPORTS}
    cli("clients", "set", "fay", "--tpm", "none")
    assert await every_transport(client, key) == OK


# --- budgets and the spend every view shows -------------------------------------------------------


async def spends(client: TestClient, token: str, name: str) -> dict[str, float]:
    """The client's spend in its period as the CLI (list and show), /api/clients (what the web app's clients
    page reads) and /api/usage (since the period's start) give it, side by side."""
    listed = json.loads(cli("clients", "list", "--json"))["clients"]
    (row,) = [c for c in listed if c["name"] == name]
    shown = json.loads(cli("clients", "show", name, "--json"))
    api = await (await client.get("/api/clients", headers=bearer(token))).json()
    (api_row,) = [c for c in api["clients"] if c["name"] == name]
    one = await (await client.get(f"/api/clients/{name}", headers=bearer(token))).json()
    since = row["spend"]["periodStart"]
    query = f"&since={since[:10]}" if since else ""
    usage = await (await client.get(f"/api/usage?by=client{query}", headers=bearer(token))).json()
    cli_usage = json.loads(cli("usage", "--by-client", "--json", *(["--since", since[:10]] if since else [])))
    return {
        "cli list": row["spend"]["usd"],
        "cli show": shown["spend"]["usd"],
        "api list": api_row["spend"]["usd"],
        "api one": one["client"]["spend"]["usd"],
        "api usage": round(usage["perClient"][name]["totalCost"], 10),
        "cli usage": round(cli_usage["perClient"][name]["totalCost"], 10),
    }


@pytest.mark.parametrize("via", ["cli", "api"])
async def test_a_budget_set_after_spend_counts_it_and_every_view_shows_the_same_spend(
    client: TestClient, token: str, via: str
) -> None:
    key = cli("clients", "add", "gus", "--period", "day").strip()
    assert await every_transport(client, key) == OK
    views = await spends(client, token, "gus")
    assert len(set(views.values())) == 1 and views["cli list"] > 0, views
    spent = views["cli list"]
    budget = spent * 0.99  # set below what was spent before it
    if via == "cli":
        cli("clients", "set", "gus", "--budget", f"{budget:.10f}")
    else:
        resp = await client.patch("/api/clients/gus", headers=bearer(token), json={"budgetUsd": budget})
        assert resp.status == 200
    refused = await every_transport(client, key)
    del refused["count_tokens"]  # billed nothing: not refused by a budget
    assert refused == {t: "BUDGET_EXCEEDED" for t in TRANSPORTS if t != "count_tokens"}
    assert await call(client, key, "count_tokens") == "ok"
    views = await spends(client, token, "gus")
    assert set(views.values()) == {spent}, views  # the refused calls cost nothing
    cli("clients", "set", "gus", "--budget", "none")
    assert await every_transport(client, key) == OK
    views = await spends(client, token, "gus")
    assert len(set(views.values())) == 1 and views["cli list"] > spent, views


async def test_a_budget_period_changed_back_and_forth_counts_every_call_of_the_period(
    client: TestClient, token: str
) -> None:
    """month -> day -> month: the month's spend counts the calls made while the period was a day."""
    key = cli("clients", "add", "hal", "--budget", "100", "--period", "month").strip()
    assert await call(client, key, "messages") == "ok"
    cli("clients", "set", "hal", "--period", "day")
    assert await call(client, key, "messages") == "ok"
    assert await call(client, key, "chat_completions") == "ok"
    cli("clients", "set", "hal", "--period", "month")
    views = await spends(client, token, "hal")
    records = await client.app[state.REGISTRY].usage.records(client="hal")
    start, _ = period_bounds("month", datetime.now(UTC))
    assert start is not None
    assert len(records) == 3
    total = round(sum(r["totalCost"] for r in records), 10)
    assert set(views.values()) == {total}, views


# --- 3. two replicas on PostgreSQL and Redis ----------------------------------------------------


async def acli(*args: str) -> str:
    """The CLI in a thread (its commands on the database run their own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
async def two(
    tmp_path: Path,
    fake_anthropic: FakeAnthropic,
    fake_openai: FakeOpenAI,
    pg_dsn: str,
    redis_srv: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[list[GatewayProcess]]:
    """Replicas A and B of one database and one Redis, each able to serve every transport (embeddings too)."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    providers = {"providers.openai": {"base_url": fake_openai.url}}
    servers = [GatewayProcess(tmp_path / n, fake_anthropic.url, storage=storage, **providers) for n in ("a", "b")]
    for server in servers:
        result = CliRunner().invoke(
            main, ["keys", "add", "openai", "--config", str(server.config_path)], input="sk-openai-test-0123456789\n"
        )
        assert result.exit_code == 0, result.output
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        for server in servers:
            if server.process is not None and server.process.returncode is None:
                await server.terminate()


async def admin_api(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    async with (
        aiohttp.ClientSession(headers=bearer(TOKEN)) as http,
        http.request(method, url, json=body) as resp,
    ):
        assert resp.status in (200, 201, 204), await resp.text()
        return None if resp.status == 204 else await resp.json()


async def test_a_change_through_one_replica_or_the_cli_is_seen_by_the_other_s_next_call(
    two: list[GatewayProcess],
) -> None:
    a, b = two
    config = str(a.config_path)
    key = (await admin_api("POST", f"{a.url}/api/clients", {"name": "team"}))["key"]
    assert await every_transport(b.url, key) == OK  # added on A: accepted on B at once

    async with aiohttp.ClientSession() as http, http.ws_connect(b.ws_url, headers=bearer(key)) as ws:  # on B
        new_key = (await admin_api("POST", f"{a.url}/api/clients/team/rotate"))["key"]
        await ws.send_json({"type": "chat.send", "id": "next", "content": "Hi"})
        frame, code = await revoked(ws)
        assert (frame["code"], code) == ("UNAUTHORIZED", 4001)
    assert await every_transport(b.url, key) == REFUSED
    assert await every_transport(b.url, new_key) == OK

    # Limits set with the CLI on the database: B's next call obeys them, as does A's.
    await acli("clients", "set", "team", "--config", config, "--models", "openai/gpt-*")
    assert await every_transport(b.url, new_key) == {t: "MODEL_NOT_ALLOWED" for t in TRANSPORTS}
    await acli("clients", "set", "team", "--config", config, "--models", "none", "--rpm", "14")
    # 14 calls in the last minute on B (the rpm counts every replica's calls): A refuses the next.
    assert await every_transport(a.url, new_key) == {t: "RATE_LIMITED" for t in TRANSPORTS}
    await admin_api("PATCH", f"{b.url}/api/clients/team", {"rpm": None})
    assert await every_transport(a.url, new_key) == OK

    await acli("clients", "remove", "team", "--config", config)
    assert await every_transport(a.url, new_key) == REFUSED  # on A: B has had its share of failed keys


async def replica_spends(two: list[GatewayProcess], name: str) -> dict[str, float]:
    config = str(two[0].config_path)
    row = json.loads(await acli("clients", "show", name, "--config", config, "--json"))
    views = {"cli": row["spend"]["usd"]}
    since = (row["spend"]["periodStart"] or "")[:10]
    for server, label in zip(two, "ab", strict=True):
        listed = await admin_api("GET", f"{server.url}/api/clients")
        (api_row,) = [c for c in listed["clients"] if c["name"] == name]
        views[f"{label} clients"] = api_row["spend"]["usd"]
        usage = await admin_api("GET", f"{server.url}/api/usage?by=client" + (f"&since={since}" if since else ""))
        views[f"{label} usage"] = round(usage["perClient"][name]["totalCost"], 10)
    return views


async def test_a_budget_set_with_the_cli_counts_spend_made_on_both_replicas_and_all_agree(
    two: list[GatewayProcess],
) -> None:
    a, b = two
    config = str(a.config_path)
    key = (await acli("clients", "add", "ops", "--config", config, "--period", "day")).splitlines()[0]
    assert await every_transport(a.url, key) == OK
    assert await every_transport(b.url, key) == OK
    views = await replica_spends(two, "ops")
    assert len(set(views.values())) == 1 and views["cli"] > 0, views
    spent = views["cli"]
    await acli("clients", "set", "ops", "--config", config, "--budget", f"{spent * 0.99:.10f}")
    billed = [t for t in TRANSPORTS if t != "count_tokens"]
    for server in (a, b):
        refused = await every_transport(server.url, key)
        assert {t: refused[t] for t in billed} == {t: "BUDGET_EXCEEDED" for t in billed}
    assert set((await replica_spends(two, "ops")).values()) == {spent}


async def test_a_budget_period_changed_back_and_forth_on_replicas_counts_every_call_of_the_period(
    two: list[GatewayProcess],
) -> None:
    """month -> day -> month through A: the month's spend in Redis counts the calls made on B meanwhile."""
    a, b = two
    key = (await admin_api("POST", f"{a.url}/api/clients", {"name": "hal", "budgetUsd": 100, "period": "month"}))["key"]
    assert await call(b.url, key, "messages") == "ok"  # the month's spend loaded into Redis
    await admin_api("PATCH", f"{a.url}/api/clients/hal", {"period": "day"})
    assert await call(b.url, key, "messages") == "ok"
    assert await call(a.url, key, "chat_completions") == "ok"
    await admin_api("PATCH", f"{a.url}/api/clients/hal", {"period": "month"})
    views = await replica_spends(two, "hal")
    assert len(set(views.values())) == 1, views
    # and the budget holds at the spend of all three: a budget just under it refuses the next call
    await admin_api("PATCH", f"{b.url}/api/clients/hal", {"budgetUsd": views["cli"] * 0.999})
    assert await call(a.url, key, "messages") == "BUDGET_EXCEEDED"


# --- a key that goes while its request's body is still arriving -----------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/messages",
            {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]},
        ),
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/responses", {"model": MODEL, "max_output_tokens": 64, "input": "Hi"}),
        ("/v1/embeddings", {"model": EMBEDDING, "input": "Hi"}),
        ("/v1/messages/count_tokens", {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}),
        ("/api/chat", {"id": "slow", "messages": [user("Hi")], "trigger": "submit-message"}),
    ],
)
@pytest.mark.parametrize("who", ["client", "admin"])
async def test_a_key_rotated_while_its_request_body_arrives_is_refused_at_the_call(
    client: TestClient,
    fake_anthropic: FakeAnthropic,
    fake_openai: FakeOpenAI,
    token: str,
    path: str,
    body: dict[str, Any],
    who: str,
) -> None:
    """The key (or the gateway token) is checked when the request starts and again when its provider call is
    made: a slow upload that outlives its credential sends nothing upstream."""
    key = cli("clients", "add", "slow").strip() if who == "client" else token
    rotate = ("clients", "rotate", "slow") if who == "client" else ("token", "--rotate")
    raw = json.dumps(body).encode()
    rotated = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield raw[:10]
        await rotated.wait()
        yield raw[10:]

    async with aiohttp.ClientSession() as http:
        sending = asyncio.ensure_future(
            http.post(base(client) + path, data=slowly(), headers={**bearer(key), "Content-Type": "application/json"})
        )
        await asyncio.sleep(0.3)  # the request is in, its body still coming
        await asyncio.to_thread(cli, *rotate)
        rotated.set()
        resp = await sending
        assert resp.status == 401, await resp.text()
        resp.release()
    assert fake_anthropic.requests == [] and fake_anthropic.count_requests == [] and fake_openai.requests == []


@pytest.mark.parametrize("who", ["client", "admin"])
@pytest.mark.parametrize("transport", ["ws", "http"])
async def test_a_key_rotated_mid_turn_ends_the_tool_loop_before_its_next_call(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: FakeAnthropic,
    token: str,
    transport: str,
    who: str,
) -> None:
    """The step running when the key (or the gateway token) goes is finished and billed; the next step of
    the loop is not made."""
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    key = cli("clients", "add", "tools").strip() if who == "client" else token
    rotate = ("clients", "rotate", "tools") if who == "client" else ("token", "--rotate")
    # Step one's answer waits for the rotation (a CLI run takes seconds on a loaded machine): the rotation then
    # surely comes between the two steps' calls.
    rotated = asyncio.Event()
    fake_anthropic.enqueue(tool_use_response("get_weather", {"city": "Oslo"}).held(rotated), text_response("Sunny."))
    async with aiohttp.ClientSession() as http:
        if transport == "ws":
            ws = await http.ws_connect(base(client) + "/gateway", headers=bearer(key))
            await ws.send_json({"type": "chat.send", "id": "t", "content": "Weather?"})
            while (await receive(ws))["type"] != "chat.stream.start":
                pass
            await asyncio.to_thread(cli, *rotate)
            rotated.set()
            while not ws.closed:  # the socket is closed as revoked; the turn goes on unseen
                await ws.receive(timeout=10)
            assert ws.close_code == 4001
        else:
            body = {"id": "weather", "messages": [user("Weather?")], "trigger": "submit-message"}
            async with http.post(base(client) + "/api/chat", json=body, headers=bearer(key)) as resp:
                assert resp.status == 200
                await resp.content.readline()  # the stream has started
                await asyncio.to_thread(cli, *rotate)
                rotated.set()
                chunks = await read_all(resp)
            errors = [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]
            assert errors and "rotated" in errors[0]["errorText"], chunks

    async def settled() -> bool:
        return len(await client.app[state.REGISTRY].usage.records(client="tools" if who == "client" else "admin")) == 1

    await wait_until(settled)
    assert len(fake_anthropic.requests) == 1  # step two was refused before its provider call


async def test_every_view_shows_the_same_spend_while_a_call_is_in_flight(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    """The spend is what was posted, in every view; what the calls in flight hold is shown apart."""
    key = cli("clients", "add", "ivy", "--budget", "1", "--period", "day").strip()
    assert await call(client, key, "messages") == "ok"
    posted = await spends(client, token, "ivy")
    assert len(set(posted.values())) == 1, posted
    fake_anthropic.enqueue(text_response("one two three four five six", chunks=6).with_delay(0.3))
    sdk = anthropic.AsyncAnthropic(api_key=key, base_url=base(client), max_retries=0)
    async with sdk.messages.stream(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        async for _ in stream.text_stream:
            break  # the call is in flight, its reservation held
        during = await spends(client, token, "ivy")
        listed = await (await client.get("/api/clients/ivy", headers=bearer(token))).json()
        await stream.get_final_message()
    assert during == posted, during
    assert listed["client"]["spend"]["inFlightUsd"] > 0
    after = await spends(client, token, "ivy")
    assert len(set(after.values())) == 1 and after["cli list"] > posted["cli list"], after
    listed = await (await client.get("/api/clients/ivy", headers=bearer(token))).json()
    assert listed["client"]["spend"]["inFlightUsd"] == 0


# --- 5. budget alerts: sent once per threshold of the budget as it is now -------------------------


class AlertReceiver:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.alerts.append(await request.json())
        return web.Response(status=204)


async def test_budget_alerts_follow_a_budget_changed_and_a_client_added_again(
    make_client: Callable[..., Awaitable[TestClient]], fake_anthropic: FakeAnthropic
) -> None:
    hook = AlertReceiver()
    app = web.Application()
    app.router.add_post("/alerts", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = await make_client(
            alerts={"webhook_url": f"http://127.0.0.1:{port}/alerts", "thresholds": [0.5, 1.0]},
            chat={"max_tokens": 16},
            thinking={"enabled": False},
        )

        def spending(input_tokens: int) -> Any:  # $3 per million input tokens
            return text_response("Ok.", usage={"input_tokens": input_tokens}, delta_usages=[{"output_tokens": 1}])

        async def chat_spending(key: str, input_tokens: int, alerts: int) -> list[tuple[str, float, float]]:
            fake_anthropic.enqueue(spending(input_tokens))
            assert await call(client, key, "http") == "ok"
            await wait_until(lambda: _at_least(hook, alerts))
            await asyncio.sleep(0.3)  # and no more than that
            return [(a["client"], a["threshold"], a["budgetUsd"]) for a in hook.alerts]

        key = cli("clients", "add", "team", "--budget", "0.01", "--period", "day").strip()
        assert await chat_spending(key, 2000, 1) == [("team", 0.5, 0.01)]  # $0.006: 60%
        cli("clients", "set", "team", "--budget", "0.1")  # raised: its thresholds are new ones
        assert await chat_spending(key, 20000, 2) == [("team", 0.5, 0.01), ("team", 0.5, 0.1)]  # $0.066: 66%

        cli("clients", "remove", "team")
        key = cli("clients", "add", "team", "--budget", "0.01", "--period", "day").strip()
        # The new client's $0.003 is 30% of its budget: the earlier client's spend is not its own.
        assert len(await chat_spending(key, 1000, 2)) == 2
        assert (await chat_spending(key, 1000, 3))[2:] == [("team", 0.5, 0.01)]  # its own 60%
    finally:
        await runner.cleanup()


async def _at_least(hook: AlertReceiver, n: int) -> bool:
    return len(hook.alerts) >= n


async def test_a_client_added_again_has_its_first_use_noted_at_once(client: TestClient, token: str) -> None:
    """Last use is written at most once a minute per key: a client added again under a removed one's name,
    or a rotated key, is a new key whose first use is noted at once."""
    key = cli("clients", "add", "kim").strip()
    assert await call(client, key, "messages") == "ok"

    async def used() -> bool:
        return json.loads(cli("clients", "show", "kim", "--json"))["lastUsedAt"] is not None

    await wait_until(used)
    cli("clients", "remove", "kim")
    key = cli("clients", "add", "kim").strip()
    assert not await used()
    assert await call(client, key, "messages") == "ok"
    await wait_until(used, timeout=30)


async def test_a_client_added_again_starts_with_an_empty_minute(client: TestClient) -> None:
    """Its rate limits count its own calls, not those of the removed client whose name it took."""
    key = cli("clients", "add", "lee").strip()
    assert await every_transport(client, key) == OK  # 7 calls in this minute
    cli("clients", "remove", "lee")
    key = cli("clients", "add", "lee", "--rpm", "7", "--tpm", "100000").strip()
    assert await every_transport(client, key) == OK
    assert await call(client, key, "messages") == "RATE_LIMITED"  # its own 7 calls


async def test_a_client_added_again_sees_none_of_the_removed_one_s_usage(client: TestClient) -> None:
    key = cli("clients", "add", "max").strip()
    assert await call(client, key, "messages") == "ok"
    cli("clients", "remove", "max")
    key = cli("clients", "add", "max").strip()
    own = await (await client.get("/api/usage", headers=bearer(key))).json()
    assert own["grandTotal"]["requestCount"] == 0
    async with aiohttp.ClientSession() as http, http.ws_connect(base(client) + "/gateway", headers=bearer(key)) as ws:
        await ws.send_json({"type": "usage.query", "id": "u"})
        assert (await receive(ws))["grandTotal"]["requestCount"] == 0
    assert json.loads(cli("clients", "show", "max", "--json"))["spend"]["usd"] == 0
