"""The REST API (docs/protocol.md#http-api): sessions, context, usage, models, the OpenAPI document, JSON errors, CORS."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import ContextSection, hookimpl
from agentspace.storage import SessionStore
from agentspace.transports import state as STATE
from tests.fakes.anthropic_upstream import text_response
from tests.support.ui_stream import post_chat, read_all, user

ORIGIN = "http://app.example"


async def chat(
    client: TestClient, headers: dict[str, str], fake: Any, chat_id: str, text: str = "hi", **kw: Any
) -> None:
    fake.enqueue(text_response("Answer.", usage={"input_tokens": 10}, delta_usages=[{"output_tokens": 4}]))
    await read_all(await post_chat(client, headers, chat_id, user(text), **kw))


async def get_json(client: TestClient, path: str, headers: dict[str, str], status: int = 200) -> Any:
    resp = await client.get(path, headers=headers)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


# --- sessions -------------------------------------------------------------------------------------


async def test_sessions_list_get_delete(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    assert await get_json(client, "/api/sessions", auth_headers) == {"sessions": [], "damagedFiles": [], "more": False}
    await chat(client, auth_headers, fake_anthropic, "first", "What is up?")
    await chat(client, auth_headers, fake_anthropic, "second")

    sessions = (await get_json(client, "/api/sessions", auth_headers))["sessions"]
    assert [s["id"] for s in sessions] == ["second", "first"]  # most recent first
    assert {"id", "title", "model", "createdAt", "lastActivityAt", "messageCount"} <= set(sessions[0])
    assert sessions[1]["title"] == "What is up?" and sessions[1]["messageCount"] == 2

    session = (await get_json(client, "/api/sessions/first", auth_headers))["session"]
    assert session["id"] == "first" and session["model"] == "anthropic/claude-sonnet-4-5"
    answer = session["messages"][1]
    assert answer["content"] == "Answer." and answer["usage"]["outputTokens"] == 4 and answer["finishReason"] == "stop"

    assert (await client.delete("/api/sessions/first", headers=auth_headers)).status == 204
    error = (await get_json(client, "/api/sessions/first", auth_headers, 404))["error"]
    assert error["code"] == "SESSION_NOT_FOUND"
    resp = await client.delete("/api/sessions/first", headers=auth_headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "SESSION_NOT_FOUND"
    assert [s["id"] for s in (await get_json(client, "/api/sessions", auth_headers))["sessions"]] == ["second"]


@pytest.mark.parametrize("path", ["/api/sessions/a.b", "/api/sessions/" + "x" * 129, "/api/sessions/a%20b/context"])
async def test_bad_session_ids(client: TestClient, auth_headers: dict[str, str], path: str) -> None:
    error = (await get_json(client, path, auth_headers, 400))["error"]
    assert error["code"] == "INVALID_MESSAGE" and error["fields"][0]["path"] == "id"


async def test_context_inspection(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    await chat(client, auth_headers, fake_anthropic, "ctx", "first question")
    reply = await get_json(client, "/api/sessions/ctx/context", auth_headers)
    assert reply["sessionId"] == "ctx" and reply["model"] == "anthropic/claude-sonnet-4-5"
    names = [s["name"] for s in reply["sections"]]
    # Only the sections that are registered: no memory or skills plugin is loaded here.
    assert names == ["system_prompt", "tools", "response_format", "history", "user_message"]
    history = next(s for s in reply["sections"] if s["name"] == "history")
    assert history["byteCount"] > len("first question") and history["tokenEstimate"] > 0
    assert reply["totals"]["byteCount"] == sum(s["byteCount"] for s in reply["sections"])

    other = await get_json(client, "/api/sessions/ctx/context?model=anthropic/claude-haiku-4-5", auth_headers)
    assert other["model"] == "anthropic/claude-haiku-4-5"
    assert other["totals"]["costEstimate"] < reply["totals"]["costEstimate"]
    error = (await get_json(client, "/api/sessions/ctx/context?model=bogus", auth_headers, 400))["error"]
    assert error["code"] == "MODEL_NOT_FOUND"
    error = (await get_json(client, "/api/sessions/nope/context", auth_headers, 404))["error"]
    assert error["code"] == "SESSION_NOT_FOUND"


# --- usage and models -----------------------------------------------------------------------------


async def test_usage_reports(client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    empty = await get_json(client, "/api/usage", auth_headers)
    assert empty["perModel"] == {} and empty["grandTotal"]["requestCount"] == 0
    await chat(client, auth_headers, fake_anthropic, "u1")
    await chat(client, auth_headers, fake_anthropic, "u2", model="anthropic/claude-haiku-4-5")

    report = await get_json(client, "/api/usage?by=model", auth_headers)
    assert set(report["perModel"]) == {"anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5"}
    sonnet = report["perModel"]["anthropic/claude-sonnet-4-5"]
    assert (sonnet["inputTokens"], sonnet["outputTokens"], sonnet["totalTokens"], sonnet["requestCount"]) == (
        10,
        4,
        14,
        1,
    )
    assert sonnet["totalCost"] == pytest.approx((10 * 3 + 4 * 15) / 1e6)
    assert report["grandTotal"]["requestCount"] == 2 and report["grandTotal"]["totalTokens"] == 28

    only = await get_json(client, "/api/usage?sessionId=u2", auth_headers)
    assert list(only["perModel"]) == ["anthropic/claude-haiku-4-5"]

    by_day = await get_json(client, "/api/usage?by=day&since=1h", auth_headers)
    (day,) = by_day["perDay"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) and by_day["perDay"][day]["requestCount"] == 2
    future = await get_json(client, "/api/usage?since=2999-01-01", auth_headers)
    assert future["grandTotal"]["requestCount"] == 0

    for query, path in (("by=week", "by"), ("since=yesterday", "since")):
        error = (await get_json(client, f"/api/usage?{query}", auth_headers, 400))["error"]
        assert error["code"] == "INVALID_MESSAGE" and error["fields"][0]["path"] == path


async def test_models(client: TestClient, auth_headers: dict[str, str]) -> None:
    models = (await get_json(client, "/api/models", auth_headers))["models"]
    by_id = {m["id"]: m for m in models}
    default = by_id["anthropic/claude-sonnet-4-5"]
    assert default["provider"] == "anthropic" and default["default"] is True
    assert (default["inputPerMTok"], default["outputPerMTok"]) == (3.0, 15.0)
    assert (
        default["contextWindow"] > 100_000 and default["supportsReasoning"] is True and default["supportsTools"] is True
    )
    assert default["priceKnown"] is True and "deprecationDate" in default
    assert {m["provider"] for m in models} == {"anthropic"}  # the only provider with a key


# --- the document, errors, CORS -------------------------------------------------------------------


async def test_openapi_documents_every_route(client: TestClient, auth_headers: dict[str, str]) -> None:
    assert (await client.get("/api/openapi.json")).status == 401
    doc = await get_json(client, "/api/openapi.json", auth_headers)
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in client.server.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served
    for path, ops in doc["paths"].items():
        for op in ops.values():
            declared = op.get("parameters", [])  # shared ones are references to the document's components
            declared = [
                doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p for p in declared
            ]
            params = {p["name"] for p in declared if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), path
    refs = set(re.findall(r'"#/components/(\w+)/(\w+)"', str(doc).replace("'", '"')))
    assert all(name in doc["components"][kind] for kind, name in refs)


async def test_healthz_and_json_errors(client: TestClient, auth_headers: dict[str, str]) -> None:
    assert await get_json(client, "/healthz", {}) == {"status": "ok"}
    error = (await get_json(client, "/api/nothing-here", auth_headers, 404))["error"]
    assert error["code"] == "NOT_FOUND" and "/api/openapi.json" in error["message"]
    resp = await client.put("/api/sessions", headers=auth_headers)
    assert resp.status == 405 and resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == "METHOD_NOT_ALLOWED" and "GET" in resp.headers["Allow"]
    error = (await get_json(client, "/api/sessions", {"Authorization": "Bearer nope"}, 401))["error"]
    assert error["code"] == "UNAUTHORIZED"


async def test_cors_is_off_by_default(client: TestClient, auth_headers: dict[str, str]) -> None:
    resp = await client.get("/api/sessions", headers={**auth_headers, "Origin": ORIGIN})
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get("/api/sessions", headers=auth_headers)
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_for_allowed_origins(make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any) -> None:
    client = await make_client(server={"allowed_origins": [ORIGIN]})
    preflight = await client.options(
        "/api/chat",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed_headers = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers
    assert "Origin" in preflight.headers.getall("Vary")

    resp = await client.get("/api/sessions", headers={**auth_headers, "Origin": ORIGIN})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    # errors and streams carry the header too, so the page can read them
    resp = await client.get("/api/sessions", headers={"Origin": ORIGIN})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    fake_anthropic.enqueue(text_response("hi"))
    resp = await post_chat(client, {**auth_headers, "Origin": ORIGIN}, "cors", user("hi"))
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    await read_all(resp)

    resp = await client.get("/api/sessions", headers={**auth_headers, "Origin": "http://evil.example"})
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers


async def test_delete_refused_while_streaming(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(text_response("slow " * 10, chunks=10).with_delay(0.05))
    resp = await post_chat(client, auth_headers, "streaming", user("go"))
    gw = client.server.app[STATE.REGISTRY]
    assert "streaming" in gw.locks
    deleted = await client.delete("/api/sessions/streaming", headers=auth_headers)
    assert deleted.status == 409 and (await deleted.json())["error"]["code"] == "STREAM_IN_PROGRESS"
    await read_all(resp)
    assert (await client.delete("/api/sessions/streaming", headers=auth_headers)).status == 204


class SlowSection:
    """A context section that takes a while (a plugin reading a remote memory, say): the provider is called late."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl
    def register_context_sections(self, register: Any, config: Any) -> None:
        async def build(request: Any) -> str:
            self.started.set()
            await self.release.wait()
            return "Remembered facts."

        register(ContextSection("slow-memory", build))


async def test_a_new_session_is_readable_before_the_provider_is_called(
    make_client: Any, plugin_manager: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # The user message is stored before the provider is called: a read meanwhile finds the session and it.
    slow = SlowSection()
    plugin_manager.register(slow)
    client = await make_client()
    fake_anthropic.enqueue(text_response("Answer."))

    async def ask() -> Any:
        # The answer's headers come once the context is assembled (the context-window policy may refuse with
        # a status first), so the request runs beside the reads below.
        return await read_all(await post_chat(client, auth_headers, "early", user("Remember me")))

    answer = asyncio.ensure_future(ask())
    await asyncio.wait_for(slow.started.wait(), 10)
    session = (await get_json(client, "/api/sessions/early", auth_headers))["session"]
    assert [m["content"] for m in session["messages"]] == ["Remember me"]
    assert not fake_anthropic.requests  # the provider has not been called yet
    slow.release.set()
    await answer
    session = (await get_json(client, "/api/sessions/early", auth_headers))["session"]
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]


async def test_the_user_message_is_on_disk_while_the_model_works(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    # The model takes a second before its first token: the message is on disk meanwhile.
    client = await make_client()
    fake_anthropic.enqueue(text_response("Answer.").stall(1.0, after=1))
    resp = await post_chat(client, auth_headers, "durable", user("Keep this"))
    deadline = asyncio.get_running_loop().time() + 0.8
    on_disk = None
    while on_disk is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        on_disk = SessionStore(isolated_env).get_sync("durable")  # reads the file, as the CLI does
    assert on_disk is not None, "the user message was not written while the model worked"
    assert [m["content"] for m in on_disk["messages"]] == ["Keep this"]
    while not fake_anthropic.requests and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)  # the write comes first, the provider call right after it
    assert len(fake_anthropic.requests) == 1 and not resp.content.at_eof()  # no token yet: still answering
    await read_all(resp)
    assert [m["role"] for m in SessionStore(isolated_env).get_sync("durable")["messages"]] == ["user", "assistant"]
