"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API, drop-in.

Anthropic models go through the pass-through (the relay, ``agentspace.providers.anthropic_relay``); other models are translated
(``agentspace.protocols.anthropic_messages``) and served by their provider. Errors use Anthropic's shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..calls import ProviderCall, messages_body_ceiling, request_input_tokens
from ..direct_call import DirectCall
from ..errors import ApiError
from ..events import ProviderError
from ..logs import redact
from ..protocols import anthropic_messages as am
from ..providers import anthropic_relay as relay
from ..registry import ModelNotFound
from ..routed_call import relay_group, relays
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
    translated,
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
    # A model group (routing.py) is named as configured; other ids as the SDK names them.
    model = body["model"] if gateway(request).router.group(body["model"]) else anthropic_model(body["model"])
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
    meter = ProviderCall(gw, model, session_id=session_id(request), client=client_name(request), endpoint=ENDPOINT)
    group = gw.router.group(model)
    if group is not None and relays(group):  # a group of Anthropic deployments: passed through, routed
        try:
            await meter.admit(lambda: messages_body_ceiling(gw, model, body))
        except ApiError as e:
            return refusal(request, e)
        try:
            return await relay_group(request, gw, body, raw, meter, group)
        finally:
            await meter.release()
    if model.startswith("anthropic/"):
        try:  # the checks at the moment of the call, its reservation and its pending entry (calls.py)
            await meter.admit(lambda: messages_body_ceiling(gw, model, body))
        except ApiError as e:
            return refusal(request, e)
        try:
            return await relay.messages(request, gw, body, raw, model, meter)
        finally:
            await meter.release()
    return await _translated(request, body, model, meter)


async def _translated(
    request: web.Request, body: dict[str, Any], model: str, meter: ProviderCall
) -> web.StreamResponse:
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
    preq = provider_request(gw, model, system, messages_, tools, max_tokens, budget, params)

    async def answer(call: DirectCall) -> web.StreamResponse:
        if not body.get("stream"):
            return await whole(
                call, lambda finish, usage: am.whole_message(body["model"], finish, usage), _provider_error
            )
        return await _stream(request, call, body["model"])

    return await translated(request, meter, preq, _provider_error, answer)


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
    try:  # the same checks as a call (allowlist, rate limits, a valid key, not shutting down); nothing reserved
        await ProviderCall(
            gw, model, session_id=session_id(request), client=client_name(request), endpoint=ENDPOINT
        ).admit(None)
    except ApiError as e:
        return refusal(request, e)
    if model.startswith("anthropic/"):
        relayed = await relay.count_tokens(request, gw, body, raw, model)
        if relayed is not None:
            return relayed
    # No count from the upstream: count locally, and say so.
    return web.json_response({"input_tokens": am.local_input_tokens(body)}, headers={"x-agentspace-estimated": "true"})
