"""One door (issue 31) tried from outside once more: the same request answered alike wherever it comes in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import chat, connect, receive
from tests.test_audit31_outside import assert_count_refused_as_the_call
from tests.test_clients import add_client, bearer, cli
from tests.test_metrics import delta, scrape

MESSAGES = [{"role": "user", "content": "Hi"}]


async def test_count_tokens_of_an_unknown_bare_model_name_is_refused_as_the_messages_call_refuses_it(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """A name that is no claude-* id and no provider/model: both answer the same 404, the hint included."""
    await assert_count_refused_as_the_call(client, auth_headers, "nosuch-model")
    assert fake_anthropic.requests == []


@pytest.mark.parametrize("status", [400, 413])
async def test_an_upstream_refusal_of_the_request_is_counted_under_one_code_on_every_way_in(
    make_client: Any,
    auth_headers: dict[str, str],
    fake_anthropic: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    """Anthropic refusing the request (400, 413) is the same record and the same ``agentspace_errors`` code
    whichever door the request came in by: LLM_ERROR, the provider refused the call (docs/protocol.md)."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    client = await make_client(chat={"max_retries": 0}, pm=create_plugin_manager())
    before = await scrape(client, auth_headers)
    answers = []
    ws = await connect(client, auth_headers["Authorization"].split()[1])
    fake_anthropic.enqueue(error_status(status))
    answers.append([f["code"] for f in await chat(ws, "Hi") if f["type"] == "error"])
    await ws.close()
    for path, body in (
        ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}),
        ("/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"}),
    ):
        fake_anthropic.enqueue(error_status(status))
        async with client.post(path, json=body, headers=auth_headers) as resp:
            answers.append(resp.status)  # each API passes the provider's status on
    assert answers == [["LLM_ERROR"], status, status, status], answers
    errors = delta(await scrape(client, auth_headers), before, "agentspace_errors_total")
    codes = {dict(labels)["endpoint"]: dict(labels)["code"] for labels in errors}
    assert codes == dict.fromkeys(("ws", "anthropic", "openai", "responses"), "LLM_ERROR"), codes


@pytest.mark.parametrize(
    ("field", "value"), [("model", 5), ("user", 7), ("dimensions", "8"), ("encoding_format", ["float"])]
)
async def test_a_field_of_the_wrong_type_is_refused_alike_on_every_openai_shaped_endpoint(
    client: TestClient, auth_headers: dict[str, str], field: str, value: Any
) -> None:
    """OpenAI answers a field of the wrong type with code ``invalid_type`` naming the field; so do
    /v1/chat/completions and /v1/responses, and /v1/embeddings as well (not "you must provide a model")."""
    base = {"model": "openai/text-embedding-3-small", "input": "Hi"}
    async with client.post("/v1/embeddings", json={**base, field: value}, headers=auth_headers) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 400 and (error["code"], error["param"]) == ("invalid_type", field), error
    if field in ("model", "user"):  # the fields the three APIs share: the same words too
        chat = {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES, field: value}
        async with client.post("/v1/chat/completions", json=chat, headers=auth_headers) as resp:
            assert (await resp.json())["error"] == error


@pytest.mark.parametrize("who", ["admin", "client"])
async def test_the_usage_of_a_damaged_session_is_reported_alike_by_the_cli_the_api_and_the_websocket(
    client: TestClient, token: str, isolated_env: Path, who: str
) -> None:
    """A session file that cannot be read does not take its usage records with it: ``agentspace usage
    --session`` reports them, and so do ``GET /api/usage?sessionId=`` and ``usage.query`` (not a 409)."""
    key = token if who == "admin" else add_client("alice")
    ws = await connect(client, key)
    session_id = str((await chat(ws, "hello"))[0]["sessionId"])
    await chat(ws, "again", "r2", sessionId=session_id)
    [path] = (isolated_env / "sessions").glob(f"{session_id}*.jsonl")
    path.write_bytes(b"{damaged\n" + path.read_bytes())
    expected = json.loads(cli("usage", "--session", session_id, "--json"))["grandTotal"]
    assert expected["requestCount"] == 2, expected
    async with client.get(f"/api/usage?sessionId={session_id}", headers=bearer(key)) as resp:
        report = await resp.json()
        assert resp.status == 200, report
    assert report["grandTotal"] == expected, report
    await ws.send_json({"type": "usage.query", "id": "u1", "sessionId": session_id})
    reply = await receive(ws)
    assert reply["type"] == "usage.report" and reply["grandTotal"] == expected, reply
    await ws.close()


async def test_every_status_the_session_routes_answer_is_in_the_served_openapi_document(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """A bad search (400) and a damaged session (409 SESSION_DAMAGED, docs/protocol.md) on each route that
    reads the session: the statuses are listed for the route in GET /api/openapi.json."""
    seen: dict[tuple[str, str], set[int]] = {}
    async with client.get("/api/sessions", params={"q": ""}, headers=auth_headers) as resp:
        seen[("get", "/api/sessions")] = {resp.status}
    routes = [
        ("get", "/api/sessions/{id}", None),
        ("patch", "/api/sessions/{id}", {"title": "renamed"}),
        ("get", "/api/sessions/{id}/context", None),
        ("post", "/api/sessions/{id}/context", {}),
        ("get", "/api/sessions/{id}/export", None),
        ("post", "/api/sessions/{id}/compact", None),
    ]
    ws = await connect(client, token)
    for method, route, body in routes:
        session_id = str((await chat(ws, "hello"))[0]["sessionId"])
        path = isolated_env / "sessions" / f"{session_id}.jsonl"
        path.write_bytes(b"{damaged\n" + path.read_bytes())
        async with client.request(method, route.format(id=session_id), json=body, headers=auth_headers) as resp:
            error = (await resp.json())["error"]
            assert error["code"] == "SESSION_DAMAGED", (route, error)
            seen[(method, route)] = {resp.status}
    await ws.close()
    async with client.get("/api/openapi.json", headers=auth_headers) as resp:
        document = await resp.json()
    for (method, route), statuses in seen.items():
        documented = {int(status) for status in document["paths"][route][method]["responses"]}
        assert statuses - documented == set(), (method, route, statuses, documented)


@pytest.mark.parametrize("header", ["Origin", "Host"])
async def test_a_host_or_origin_not_allowed_is_refused_on_v1_in_the_shape_of_its_api(
    client: TestClient, auth_headers: dict[str, str], header: str
) -> None:
    """docs/protocol.md: /v1 errors come in the shape of the API the request speaks; the 403 for a Host or
    Origin not allowed too (the SDKs parse their own shape only), as the 401 already is."""
    refused = {**auth_headers, header: "https://evil.example" if header == "Origin" else "evil.example"}
    message = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}
    async with client.post("/v1/messages", json=message, headers=refused) as resp:
        body = await resp.json()
        assert resp.status == 403 and body["type"] == "error", body
        assert body["error"]["type"] == "permission_error" and header in body["error"]["message"], body
    chat_body = {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}
    async with client.post("/v1/chat/completions", json=chat_body, headers=refused) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 403 and header in error["message"] and {"type", "param", "code"} <= set(error), error
    async with client.get("/api/sessions", headers=refused) as resp:  # the HTTP API: its own shape, as before
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"


async def test_a_preflight_from_an_allowed_origin_lets_the_sdks_headers_through_on_v1(
    make_client: Any, auth_headers: dict[str, str]
) -> None:
    """A page on an allowed origin may call /v1 as it calls /api: the browser builds of the SDKs send their
    own headers (x-api-key, anthropic-version, x-stainless-*), and a preflight that does not allow them
    stops the call in the browser before it is sent."""
    origin = "http://localhost:5173"
    client = await make_client(server={"allowed_origins": [origin]})
    requested = {
        "/v1/messages": "anthropic-dangerous-direct-browser-access, anthropic-version, content-type, x-api-key, "
        "x-stainless-lang, x-stainless-retry-count",
        "/v1/chat/completions": "authorization, content-type, x-stainless-lang, x-stainless-os",
        "/api/chat": "authorization, content-type",
    }
    for path, headers in requested.items():
        preflight_headers = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        }
        async with client.options(path, headers=preflight_headers) as resp:
            assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == origin
            allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {h.strip() for h in headers.split(",")} <= allowed, (path, allowed)


async def test_a_clients_report_per_session_adds_up_when_its_v1_label_is_the_name_of_its_scoped_session(
    client: TestClient,
) -> None:
    """Alice's chat "shared" is stored scoped (bob has one of that id), and her /v1 calls filed under the
    label "shared" (X-Agentspace-Session): her report per session shows both under the one name she knows,
    summed, so the sessions add up to her grand total (none of her calls is left out)."""
    bob, alice = add_client("bob"), add_client("alice")
    await read_all(await post_chat(client, bearer(bob), "shared"))
    await read_all(await post_chat(client, bearer(alice), "shared"))
    message = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": MESSAGES}
    headers = {**bearer(alice), "X-Agentspace-Session": "shared"}
    async with client.post("/v1/messages", json=message, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    async with client.get("/api/usage?by=session", headers=bearer(alice)) as resp:
        report = await resp.json()
    assert list(report["perSession"]) == ["shared"], report
    assert report["perSession"]["shared"] == report["grandTotal"], report
    assert report["grandTotal"]["requestCount"] == 2, report
