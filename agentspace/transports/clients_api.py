"""``/api/clients``: the clients over HTTP, for the gateway token only (the security middleware
answers 403 to a client key). The same operations as ``agentspace clients``; a key is in the answer of
``POST /api/clients`` and ``POST /api/clients/{name}/rotate`` only, and no answer carries a key hash.

Shapes: ``GET /api/clients`` -> ``{clients: [client]}``; ``client`` is ``{name, createdAt, lastUsedAt,
budget: {usd, period} | null, spend: {usd, periodStart, periodEnd}, rpm, tpm, models}``.
"""

from __future__ import annotations

from aiohttp import web

from .. import security
from ..service import Service
from . import state
from .ui_stream import read_json


def _service(request: web.Request) -> Service:
    return state.service(request.app, security.caller(request))


async def list_clients(request: web.Request) -> web.Response:
    return web.json_response({"clients": await _service(request).list_clients()})


async def create_client(request: web.Request) -> web.Response:
    client, key = await _service(request).add_client(await read_json(request))
    # The key, this once; the gateway keeps its hash only.
    return web.json_response({"client": client, "key": key}, status=201)


async def get_client(request: web.Request) -> web.Response:
    return web.json_response({"client": await _service(request).get_client(request.match_info["name"])})


async def update_client(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response({"client": await _service(request).update_client(request.match_info["name"], body)})


async def delete_client(request: web.Request) -> web.Response:
    await _service(request).remove_client(request.match_info["name"])
    request.app[state.CREDENTIALS_CHANGED].set()  # its open sockets here close now
    return web.Response(status=204)


async def rotate_client(request: web.Request) -> web.Response:
    client, key = await _service(request).rotate_client(request.match_info["name"])
    request.app[state.CREDENTIALS_CHANGED].set()  # sockets opened with the old key close now
    return web.json_response({"client": client, "key": key})
