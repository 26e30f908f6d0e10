"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API, drop-in.

Anthropic models go through the pass-through (``agentspace.transports.v1_passthrough``); other models are translated
(``agentspace.protocols.anthropic_messages``) and served by their provider. Errors use Anthropic's shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..direct_call import DirectCall, request_input_tokens
from ..errors import ApiError
from ..events import ProviderError
from ..logs import redact
from ..meter import Meter
from ..protocols import anthropic_messages as am
from ..registry import ModelNotFound
from . import v1_passthrough as passthrough
from .bodies import ANTHROPIC_FIELDS, BUSY_MESSAGE, BodyInvalid, GatewayBusy, type_problem
from .v1_common import (
    BodyTooLarge,
    anthropic_model,
    client_name,
    gateway,
    provider_request,
    read_json_body,
    refusal,
    session_id,
    stream,
    whole,
)

ENDPOINT = "anthropic"
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _error(status: int, message: str) -> web.Response:
    return web.json_response(am.error_body(status, message), status=status)


async def _read_body(request: web.Request, unknown_hint: str = "") -> tuple[dict[str, Any], bytes, str] | web.Response:
    """The request's JSON body, its raw bytes and the gateway's id for its model, or the error response."""
    try:
        body, raw = await read_json_body(request)
    except BodyTooLarge as e:
        return _error(413, f"{e} (the gateway's limit for /v1 requests).")
    except BodyInvalid as e:
        return _error(400, f"There was an error parsing the body of your request: it is not JSON ({e}).")
    except GatewayBusy:
        return _error(503, BUSY_MESSAGE)
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    if (problem := type_problem(body, ANTHROPIC_FIELDS)) is not None:
        return _error(400, problem[1])
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _error(400, "model: Field required")
    model = anthropic_model(body["model"])
    if model is None:
        return _error(404, f"model: {body['model']}{unknown_hint}")
    return body, raw, model


async def messages(request: web.Request) -> web.StreamResponse:
    parsed = await _read_body(request, " (use a claude-* id, or provider/model for another provider)")
    if isinstance(parsed, web.Response):
        return parsed
    body, raw, model = parsed
    gw = gateway(request)
    try:  # a typo'd name is answered here, with the closest known id, before it is admitted or sent upstream
        gw.provider_for(model)
    except ModelNotFound as e:
        return _error(404, f"model: {e}")
    client = client_name(request)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = int(gw.config["chat"]["max_tokens"])
    try:  # the client's checks (SPEC 11), the pass-through included
        reservation = await gw.guard.admit(
            client, model, input_tokens=lambda: am.local_input_tokens(body), max_tokens=max_tokens
        )
    except ApiError as e:
        return refusal(request, e)
    meter = Meter(gw, model, session_id=session_id(request), client=client, endpoint=ENDPOINT, reservation=reservation)
    try:
        if model.startswith("anthropic/"):
            return await passthrough.messages(request, gw, body, raw, model, meter)
        return await _translated(request, body, model, meter)
    finally:
        await gw.guard.release(reservation)


async def _translated(request: web.Request, body: dict[str, Any], model: str, meter: Meter) -> web.StreamResponse:
    """A model that is not Anthropic's: the request translated for its provider, its events translated back."""
    gw = meter.gw
    try:
        gw.provider_for(model)
    except ModelNotFound as e:
        return _error(404, f"model: {e}")
    try:
        system, messages_, tools, max_tokens, budget, params = am.parse_request(body)
    except am.RequestError as e:
        return _error(400, e.message)
    call = DirectCall(gw, provider_request(gw, model, system, messages_, tools, max_tokens, budget, params), meter)
    try:
        await call.start()
    except ProviderError as e:
        return _provider_error(e)
    if not body.get("stream"):
        return await whole(call, lambda finish, usage: am.whole_message(body["model"], finish, usage), _provider_error)
    return await _stream(request, call, body["model"])


def _provider_error(e: ProviderError) -> web.Response:
    status = am.client_status(e.status, e.code)
    headers = {"retry-after": f"{e.retry_after:g}"} if e.retry_after is not None else None
    return web.json_response(am.error_body(status, redact(e.message)), status=status, headers=headers)


async def _stream(request: web.Request, call: DirectCall, model: str) -> web.StreamResponse:
    encoder = am.MessageEncoder(model)
    return await stream(
        request,
        call,
        STREAM_HEADERS,
        encoder.start(request_input_tokens(call.request)),
        encoder.encode,
        # as Anthropic sends an error once the stream has begun
        lambda e: encoder.error(am.client_status(e.status, e.code), redact(e.message)),
    )


async def count_tokens(request: web.Request) -> web.StreamResponse:
    parsed = await _read_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, raw, model = parsed
    gw = gateway(request)
    if model.startswith("anthropic/"):
        relayed = await passthrough.count_tokens(request, gw, body, raw, model)
        if relayed is not None:
            return relayed
    # No count from the upstream: count locally, and say so.
    return web.json_response({"input_tokens": am.local_input_tokens(body)}, headers={"x-agentspace-estimated": "true"})
