"""``/api/clients``: the clients over HTTP, for the gateway token only (the security middleware
answers 403 to a client key). The same operations as ``agentspace clients``; a key is in the answer of
``POST /api/clients`` and ``POST /api/clients/{name}/rotate`` only, and no answer carries a key hash.

Shapes: ``GET /api/clients`` -> ``{clients: [client]}``; ``client`` is ``{name, createdAt, lastUsedAt,
budget: {usd, period} | null, spend: {usd, periodStart, periodEnd}, rpm, tpm, models}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..clients import Client, apply_settings, name_problem, settings_problems
from ..errors import ApiError
from ..registry import Registry
from ..service import invalid, parse_json
from ..storage.errors import ClientExists, ClientNotFound
from ..types import now_iso
from . import state

SETTINGS = ("budgetUsd", "period", "rpm", "tpm", "models")


async def _public(gw: Registry, client: Client) -> dict[str, Any]:
    return client.public(await gw.guard.spend(client), gw.guard.clock())


async def _client(gw: Registry, name: str) -> Client:
    client = await gw.clients.get(name)
    if client is None:
        raise ApiError("NOT_FOUND", f"No client {name!r}.")
    return client


async def _settings(request: web.Request) -> dict[str, Any]:
    body = parse_json(await request.read())
    if not isinstance(body, dict):
        raise invalid({"": "the body must be a JSON object"})
    unknown = [k for k in body if k not in (*SETTINGS, "name")]
    if unknown:
        raise invalid({k: f"unknown field; expected one of {', '.join(SETTINGS)}" for k in unknown})
    if problems := settings_problems(body):
        raise invalid(problems)
    return body


async def list_clients(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    return web.json_response({"clients": [await _public(gw, c) for c in await gw.clients.list()]})


async def create_client(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    body = await _settings(request)
    name = body.pop("name", None)
    if (problem := name_problem(name)) is not None:
        raise invalid({"name": problem})
    client = Client(name=name, key_hash="", created_at=now_iso())
    apply_settings(client, body)
    try:
        key = await gw.clients.add(client)
    except ClientExists:
        raise ApiError("INVALID_MESSAGE", f"A client {name!r} exists already.", {"name": "taken"}) from None
    # The key, this once; the gateway keeps its hash only.
    return web.json_response({"client": await _public(gw, client), "key": key}, status=201)


async def get_client(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    return web.json_response({"client": await _public(gw, await _client(gw, request.match_info["name"]))})


async def update_client(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    body = await _settings(request)
    if "name" in body:
        raise invalid({"name": "a client cannot be renamed; add a new one"})
    try:
        client = await gw.clients.update(request.match_info["name"], lambda c: apply_settings(c, body))
    except ClientNotFound:
        raise ApiError("NOT_FOUND", f"No client {request.match_info['name']!r}.") from None
    return web.json_response({"client": await _public(gw, client)})


async def delete_client(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    try:
        await gw.clients.remove(request.match_info["name"])
    except ClientNotFound:
        raise ApiError("NOT_FOUND", f"No client {request.match_info['name']!r}.") from None
    state.credentials_changed(request.app)  # its open sockets close now
    return web.Response(status=204)


async def rotate_client(request: web.Request) -> web.Response:
    gw = request.app[state.REGISTRY]
    name = request.match_info["name"]
    try:
        key = await gw.clients.rotate(name)
    except ClientNotFound:
        raise ApiError("NOT_FOUND", f"No client {name!r}.") from None
    state.credentials_changed(request.app)  # sockets opened with the old key close now
    return web.json_response({"client": await _public(gw, await _client(gw, name)), "key": key})
