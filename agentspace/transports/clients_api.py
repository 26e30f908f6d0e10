"""``/api/clients``: the clients (SPEC 11) over HTTP, for the gateway token only (the security middleware
answers 403 to a client key). The same operations as ``agentspace clients``; a key is in the answer of
``POST /api/clients`` and ``POST /api/clients/{name}/rotate`` only, and no answer carries a key hash.

Shapes: ``GET /api/clients`` -> ``{clients: [client]}``; ``client`` is ``{name, createdAt, lastUsedAt,
budget: {usd, period} | null, spend: {usd, periodStart, periodEnd}, rpm, tpm, models}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import security
from ..service import Service, parse_json
from . import state


def _service(request: web.Request) -> Service:
    return state.service(request.app, security.caller(request))


async def list_clients(request: web.Request) -> web.Response:
    return web.json_response({"clients": await _service(request).list_clients()})


async def create_client(request: web.Request) -> web.Response:
    client, key = await _service(request).add_client(parse_json(await request.read()))
    # The key, this once; the gateway keeps its hash only.
    return web.json_response({"client": client, "key": key}, status=201)


async def get_client(request: web.Request) -> web.Response:
    return web.json_response({"client": await _service(request).get_client(request.match_info["name"])})


async def update_client(request: web.Request) -> web.Response:
    body = parse_json(await request.read())
    return web.json_response({"client": await _service(request).update_client(request.match_info["name"], body)})


async def delete_client(request: web.Request) -> web.Response:
    await _service(request).remove_client(request.match_info["name"])
    request.app[state.CREDENTIALS_CHANGED].set()  # its open sockets here close now
    return web.Response(status=204)


async def rotate_client(request: web.Request) -> web.Response:
    client, key = await _service(request).rotate_client(request.match_info["name"])
    request.app[state.CREDENTIALS_CHANGED].set()  # sockets opened with the old key close now
    return web.json_response({"client": client, "key": key})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/clients", list_clients)
    app.router.add_post("/api/clients", create_client)
    app.router.add_get("/api/clients/{name}", get_client)
    app.router.add_patch("/api/clients/{name}", update_client)
    app.router.add_delete("/api/clients/{name}", delete_client)
    app.router.add_post("/api/clients/{name}/rotate", rotate_client)


# --- the OpenAPI document's part (merged into rest.OPENAPI) ---------------------------------------

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_CLIENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "createdAt": {"type": "string"},
        "lastUsedAt": {"type": ["string", "null"]},
        "budget": {
            "type": ["object", "null"],
            "properties": {"usd": {"type": "number"}, "period": {"enum": ["day", "week", "month", "total"]}},
        },
        "spend": {
            "type": "object",
            "properties": {
                "usd": {"type": "number"},
                "periodStart": {"type": ["string", "null"]},
                "periodEnd": {"type": ["string", "null"]},
            },
        },
        "rpm": _NULLABLE_INT,
        "tpm": _NULLABLE_INT,
        "models": {"type": "array", "items": {"type": "string"}},
    },
}
_SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "budgetUsd": _NULLABLE_NUMBER,
        "period": {"enum": ["day", "week", "month", "total"]},
        "rpm": _NULLABLE_INT,
        "tpm": _NULLABLE_INT,
        "models": {"type": "array", "items": {"type": "string"}, "description": "Model id patterns (wildcards)."},
    },
}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ONE = {"type": "object", "properties": {"client": _CLIENT_SCHEMA}}
_WITH_KEY = {"type": "object", "properties": {"client": _CLIENT_SCHEMA, "key": {"type": "string"}}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ADMIN_ERRORS = {"401": _ERROR, "403": {**_ERROR, "description": "FORBIDDEN: a client key (admin route)."}}
_BODY = {"content": {"application/json": {"schema": _SETTINGS_SCHEMA}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/clients": {
        "get": {
            "summary": "Every client with its spend in the current period (gateway token only).",
            "responses": {
                "200": _ok({"type": "object", "properties": {"clients": {"type": "array", "items": _CLIENT_SCHEMA}}}),
                **_ADMIN_ERRORS,
            },
        },
        "post": {
            "summary": "Add a client; the answer carries its key, the only time it is shown.",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            **_SETTINGS_SCHEMA,
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, **_SETTINGS_SCHEMA["properties"]},
                        }
                    }
                }
            },
            "responses": {"201": _ok(_WITH_KEY, "Created."), "400": _ERROR, **_ADMIN_ERRORS},
        },
    },
    "/api/clients/{name}": {
        "get": {
            "summary": "One client.",
            "parameters": [_NAME],
            "responses": {"200": _ok(_ONE), **_ADMIN_ERRORS, "404": _ERROR},
        },
        "patch": {
            "summary": "Change a client's budget, period, rate limits or models (null clears a limit).",
            "parameters": [_NAME],
            "requestBody": _BODY,
            "responses": {"200": _ok(_ONE), "400": _ERROR, **_ADMIN_ERRORS, "404": _ERROR},
        },
        "delete": {
            "summary": "Remove a client; its key stops working, its usage records stay.",
            "parameters": [_NAME],
            "responses": {"204": {"description": "Removed."}, **_ADMIN_ERRORS, "404": _ERROR},
        },
    },
    "/api/clients/{name}/rotate": {
        "post": {
            "summary": "A new key for the client (in the answer, once); the old key is refused from now on.",
            "parameters": [_NAME],
            "responses": {"200": _ok(_WITH_KEY), **_ADMIN_ERRORS, "404": _ERROR},
        }
    },
}
