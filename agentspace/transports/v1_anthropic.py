"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API, drop-in.

Anthropic models go through the pass-through (``agentspace.passthrough``); other models are translated
(``agentspace.protocols.anthropic_messages``) and served by their provider. Errors use Anthropic's shape.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .. import passthrough
from ..meter import Meter
from ..protocols import anthropic_messages as am
from .v1_common import anthropic_model, client_name, gateway, session_id

ENDPOINT = "anthropic"


def _error(status: int, message: str) -> web.Response:
    return web.json_response(am.error_body(status, message), status=status)


async def _read_body(request: web.Request) -> tuple[dict[str, Any], bytes] | web.Response:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        return _error(413, f"Request exceeds the gateway's size limit ({e.text}); raise [server] max_body_bytes.")
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "There was an error parsing the body of your request: it is not JSON.")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _error(400, "model: Field required")
    return body, raw


async def messages(request: web.Request) -> web.StreamResponse:
    parsed = await _read_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, raw = parsed
    gw = gateway(request)
    model = anthropic_model(body["model"])
    if model is None:
        return _error(404, f"model: {body['model']} (use a claude-* id, or provider/model for another provider)")
    meter = Meter(gw, model, session_id=session_id(request), client=client_name(request), endpoint=ENDPOINT)
    if model.startswith("anthropic/"):
        return await passthrough.messages(request, gw, body, raw, model, meter)
    return await _translated(request, body, model, meter)


async def _translated(request: web.Request, body: dict[str, Any], model: str, meter: Meter) -> web.StreamResponse:
    return _error(404, f"model: {model} is not an Anthropic model; only Anthropic models are served here yet")


async def count_tokens(request: web.Request) -> web.StreamResponse:
    parsed = await _read_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, raw = parsed
    gw = gateway(request)
    model = anthropic_model(body["model"])
    if model is None:
        return _error(404, f"model: {body['model']}")
    if model.startswith("anthropic/"):
        relayed = await passthrough.count_tokens(request, gw, body, raw, model)
        if relayed is not None:
            return relayed
    # No count from the upstream: count locally, and say so.
    return web.json_response({"input_tokens": am.local_input_tokens(body)}, headers={"x-agentspace-estimated": "true"})
