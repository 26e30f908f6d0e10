"""The route table (agentspace/transports/routes.py), the running app and the OpenAPI document
(agentspace/openapi.yaml) agree: every route is documented, every documented route is served, methods and
auth included; the documented enums are the code's; real answers match the documented schemas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import typing
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openapi_spec_validator
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace import hookimpl
from agentspace.cli import main
from agentspace.clients import PERIODS
from agentspace.errors import HTTP_STATUS
from agentspace.export import EXPORT_FORMATS
from agentspace.plugins import create_plugin_manager
from agentspace.service import HEALTH_STATUSES
from agentspace.storage.reports import REPORTS
from agentspace.transports import routes, ui_stream
from agentspace.transports.rest import HTTP_ERROR_CODES
from agentspace.transports.routes import Auth
from agentspace.types import ChatMessage, Part
from tests.fakes.anthropic_upstream import FakeAnthropic, text_response
from tests.support.ws import chat, connect, receive

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("get", "post", "put", "patch", "delete")


def doc_path(path: str) -> str:
    """A table path as the document writes it: ``{name:.+}`` is ``{name}``."""
    return re.sub(r"{(\w+):[^}]*}", r"{\1}", path)


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items() if method in METHODS}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.fixture
async def with_metrics(
    make_client: Callable[..., Awaitable[TestClient]], monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    """The app as `agentspace serve` runs it by default: with the optional built-in plugins (/metrics)."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    return await make_client(pm=create_plugin_manager())


async def test_every_route_is_in_the_table_and_documented_methods_and_auth_included(
    with_metrics: TestClient, auth_headers: dict[str, str]
) -> None:
    doc = routes.document()
    openapi_spec_validator.validate(doc)  # a valid OpenAPI 3.1 document
    documented = operations(doc)
    served = routes.served_operations(with_metrics.server.app)
    assert set(documented) == served
    table = {(r.method.lower(), doc_path(r.path)): r for r in routes.table()}
    assert len(table) == len(routes.table())  # no route twice
    plugin_routes = {key for key, op in documented.items() if "x-plugin" in op}
    assert plugin_routes == {("get", "/metrics")}
    assert set(table) == served - plugin_routes  # the table is every route of the gateway's own
    for key, op in documented.items():
        auth = table[key].auth if key in table else Auth.ADMIN  # /metrics: the gateway token only
        assert op["x-auth"] == auth, key
        assert (op.get("security") == []) == (auth in (Auth.NONE, Auth.SELF)), key
        path_params = {p["name"] for p in op.get("parameters", []) if "$ref" not in p and p["in"] == "path"}
        path_params |= {
            doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]["name"]
            for p in op.get("parameters", [])
            if "$ref" in p
        }
        assert path_params == set(re.findall(r"{(\w+)}", key[1])), key
    refs = {node["$ref"] for node in walk(doc) if "$ref" in node}
    for ref in refs:  # every reference resolves
        kind, name = ref.split("/")[2:]
        assert name in doc["components"][kind], ref
    # The document is served as the file says, with this app's every route.
    resp = await with_metrics.get("/api/openapi.json", headers=auth_headers)
    assert resp.status == 200 and await resp.json() == doc


async def test_the_served_document_leaves_out_routes_of_plugins_not_loaded(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    resp = await client.get("/api/openapi.json", headers=auth_headers)
    served_doc = await resp.json()
    assert set(operations(served_doc)) == routes.served_operations(client.server.app)
    assert "/metrics" not in served_doc["paths"] and "/metrics" in routes.document()["paths"]


def _request_path(path: str) -> str:
    return re.sub(r"{(\w+)(:[^}]*)?}", "x1", path)


async def test_the_auth_column_is_what_the_gateway_enforces(client: TestClient, isolated_env: Path) -> None:
    result = CliRunner().invoke(main, ["clients", "add", "bot"], catch_exceptions=False)
    key = result.stdout.strip()
    assert result.exit_code == 0 and key.startswith("as-")
    for route in routes.table():
        path = _request_path(route.path)
        anonymous = await client.request(route.method, path, json={})
        assert (anonymous.status == 401) == (route.auth in (Auth.CALLER, Auth.ADMIN)), (route, anonymous.status)
        if route.auth in (Auth.CALLER, Auth.ADMIN):
            as_client = await client.request(route.method, path, json={}, headers={"Authorization": f"Bearer {key}"})
            refused = as_client.status == 403 and (await as_client.json())["error"]["code"] == "FORBIDDEN"
            assert refused == (route.auth == Auth.ADMIN), (route, as_client.status)
            assert as_client.status != 401, route


async def test_every_get_route_answers_head_as_its_get_does(client: TestClient, auth_headers: dict[str, str]) -> None:
    """Uptime monitors and load balancers probe with HEAD (RFC 9110: a GET resource answers HEAD alike, without
    the body); ``/healthz`` answered it 405 while a plugin's ``add_get`` route (``/metrics``) took it."""
    for route in routes.table():
        if route.method != "GET":
            continue
        path = _request_path(route.path)
        for headers in ({}, auth_headers):
            async with client.get(path, headers=headers) as get:
                await get.read()
            async with client.head(path, headers=headers) as head:
                assert (head.status, await head.read()) == (get.status, b""), (route.path, headers, head.status)


async def test_head_of_a_running_answers_stream_is_its_headers_only(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """HEAD of ``GET /api/chat/{id}/stream`` while an answer streams: the stream's status and headers, no body
    (aiohttp writes a stream's body even for HEAD, which the client reads as a broken next response)."""
    ws = await connect(client, token)
    session_id = (await chat(ws, "first"))[0]["sessionId"]
    gate = asyncio.Event()
    fake_anthropic.enqueue(text_response("held answer").held(gate))
    await ws.send_json({"type": "chat.send", "id": "r2", "content": "second", "sessionId": session_id})
    while (await receive(ws))["type"] != "chat.stream.start":
        pass
    async with client.head(f"/api/chat/{session_id}/stream", headers=auth_headers) as head:
        assert (head.status, head.headers["Content-Type"], await head.read()) == (200, "text/event-stream", b"")
    async with client.get("/api/models", headers=auth_headers) as after:  # the connection is still good
        assert after.status == 200
    gate.set()
    while (await receive(ws))["type"] != "chat.stream.end":
        pass
    await ws.close()


class _NotesRoute:
    """A plugin route as docs/plugins.md shows them: the operator's, behind the gateway token."""

    @hookimpl
    def register_routes(self, app: web.Application) -> None:
        async def notes(request: web.Request) -> web.Response:
            return web.json_response({"notes": "the operator's"})

        app.router.add_get("/api/plugins/notes", notes)


async def test_a_plugin_route_takes_the_gateway_token_only(
    make_client: Callable[..., Awaitable[TestClient]], auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """docs/plugins.md: "Every route needs the gateway token": a plugin's handler cannot tell one client from
    another, so a client key gets 403, as on the admin routes."""
    pm = create_plugin_manager()
    pm.register(_NotesRoute())
    client = await make_client(pm=pm)
    key = CliRunner().invoke(main, ["clients", "add", "bot"], catch_exceptions=False).stdout.strip()
    assert (await client.get("/api/plugins/notes", headers=auth_headers)).status == 200
    for method in ("GET", "HEAD"):
        as_client = await client.request(method, "/api/plugins/notes", headers={"Authorization": f"Bearer {key}"})
        assert as_client.status == 403, method
    assert (await client.get("/api/plugins/notes")).status == 401
    assert (await client.get("/api/models", headers={"Authorization": f"Bearer {key}"})).status == 200


def _enums(doc: dict[str, Any], prop: str) -> list[list[Any]]:
    """The enums of every schema property named ``prop`` (and of parameters of that name)."""
    found = []
    for node in walk(doc):
        schema = node.get("properties", {}).get(prop)
        if isinstance(schema, dict) and "enum" in schema:
            found.append(schema["enum"])
        if node.get("name") == prop and "enum" in node.get("schema", {}):
            found.append(node["schema"]["enum"])
    assert found, prop
    return found


def _source_error_codes() -> set[str]:
    """Every error code a module of agentspace/ raises or answers with."""
    pattern = re.compile(r'(?:ApiError\(\s*|error_response\(\s*\d+,\s*|code=)"([A-Z_]+)"')
    codes = set()
    for file in (ROOT / "agentspace").rglob("*.py"):
        codes |= set(pattern.findall(file.read_text(encoding="utf-8")))
    assert {"INVALID_MESSAGE", "FORBIDDEN", "STREAM_IN_PROGRESS"} <= codes
    return codes


def test_documented_enums_are_the_codes() -> None:
    doc = routes.document()
    schemas = doc["components"]["schemas"]
    # /api/usage?by=: every report, each with its documented answer
    assert _enums(doc, "by") == [list(REPORTS)]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"`GET /api/usage\?by=([\w|\\-]+)", readme)  # the README's table lists them all too
    assert row is not None and row[1].split("\\|") == list(REPORTS)
    assert sorted(s["x-by"] for s in schemas.values() if "x-by" in s) == sorted(REPORTS)
    usage_answer = operations(doc)[("get", "/api/usage")]["responses"]["200"]["content"]["application/json"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in usage_answer["schema"]["anyOf"]} == {
        name for name, s in schemas.items() if "x-by" in s
    }
    # Error codes: errors.py's table, the codes of aiohttp's own errors, and every code the modules use
    codes = set(HTTP_STATUS) | set(HTTP_ERROR_CODES.values())
    assert set(schemas["Error"]["properties"]["error"]["properties"]["code"]["enum"]) == codes
    assert _source_error_codes() <= codes
    # /healthz's statuses
    assert schemas["Health"]["properties"]["status"]["enum"] == list(HEALTH_STATUSES)
    # Budget periods, export formats, the chat body's trigger and roles, stored message roles and part types
    assert all(enum == list(PERIODS) for enum in _enums(doc, "period"))
    assert _enums(doc, "format") == [list(EXPORT_FORMATS)]
    assert _enums(doc, "trigger") == [list(ui_stream.TRIGGERS)]
    assert schemas["UIMessage"]["properties"]["role"]["enum"] == list(ui_stream.ROLES)
    message = schemas["Message"]["properties"]
    assert message["role"]["enum"] == list(typing.get_args(typing.get_type_hints(ChatMessage)["role"]))
    part_types = [
        next(f.default for f in dataclasses.fields(part) if f.name == "type") for part in typing.get_args(Part)
    ]
    assert message["parts"]["items"]["properties"]["type"]["enum"] == part_types


def test_the_answers_said_to_carry_retry_after_declare_it() -> None:
    """An answer whose description says it comes with Retry-After declares the header (a client generated from
    the document reads the headers, not the prose): the 429s and the 503s that send it."""
    doc = routes.document()
    said = [
        (key, status, answer)
        for key, op in operations(doc).items()
        for status, answer in op["responses"].items()
        if "Retry-After" in answer.get("description", "")
    ]
    assert {status for _, status, _ in said} == {"429", "503"}
    for key, status, answer in said:
        assert answer.get("headers", {}).get("Retry-After") == {"$ref": "#/components/headers/RetryAfter"}, (
            key,
            status,
        )
    assert doc["components"]["headers"]["RetryAfter"]["schema"] == {"type": "integer", "minimum": 1}


def _validate(doc: dict[str, Any], method: str, path: str, status: str, body: Any) -> None:
    response = operations(doc)[(method, path)]["responses"][status]
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    # References are to the document's components: validate against the schema with them at its root.
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(body)


async def test_answers_match_the_documented_schemas(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    doc = routes.document()
    fake_anthropic.enqueue(text_response("Answer.", usage={"input_tokens": 10}, delta_usages=[{"output_tokens": 4}]))
    body = {"id": "demo", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]}
    resp = await client.post("/api/chat", json=body, headers=auth_headers)
    stream = await resp.text()
    assert resp.status == 200 and stream.endswith("data: [DONE]\n\n")
    finish = json.loads(next(line for line in stream.splitlines() if line.startswith('data: {"type":"finish"'))[6:])
    usage_schema = {"$ref": "#/components/schemas/Usage", "components": doc["components"]}
    jsonschema.Draft202012Validator(usage_schema).validate(finish["messageMetadata"]["usage"])

    async def check(method: str, path: str, url: str, status: int = 200) -> Any:
        resp = await client.request(method.upper(), url, headers=auth_headers)
        assert resp.status == status, await resp.text()
        answer = await resp.json()
        _validate(doc, method, path, str(status), answer)
        return answer

    for by in REPORTS:
        report = await check("get", "/api/usage", f"/api/usage?by={by}")
        assert report["grandTotal"]["requestCount"] == 1, by
    await check("get", "/healthz", "/healthz")
    await check("get", "/api/sessions", "/api/sessions")
    await check("get", "/api/sessions/{id}", "/api/sessions/demo")
    await check("get", "/api/sessions/{id}/context", "/api/sessions/demo/context")
    await check("get", "/api/models", "/api/models")
    await check("get", "/api/clients", "/api/clients")
    error = await check("get", "/api/sessions/{id}", "/api/sessions/nothing", 404)
    assert error["error"]["code"] == "SESSION_NOT_FOUND"
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: a code the document does not know
        _validate(doc, "get", "/api/sessions/{id}", "404", {"error": {"code": "NO_SUCH_CODE", "message": "x"}})
