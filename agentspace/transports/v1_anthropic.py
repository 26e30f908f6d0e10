"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API, drop-in.

Anthropic models go through the pass-through (the relay, ``agentspace.providers.anthropic_relay``); other models are translated
(``agentspace.protocols.anthropic_messages``) and served by their provider. Errors use Anthropic's shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..calls import ProviderCall, request_input_tokens
from ..direct_call import DirectCall
from ..errors import ApiError
from ..events import CONTEXT_LENGTH_EXCEEDED, ProviderError
from ..logs import redact
from ..protocols import anthropic_messages as am
from ..providers import anthropic_relay as relay
from ..routed_call import count_group_tokens, relay_fallbacks, relay_group, relays
from ..service import Service
from .bodies import ANTHROPIC_FIELDS, BUSY_MESSAGE, BodyInvalid, GatewayBusy, type_problem
from .v1_common import (
    BodyTooLarge,
    anthropic_model,
    as_sent,
    read_json_body,
    refusal,
    retry_after,
    served_name,
    service,
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


# What a name that is no claude-* id and no provider/model is answered with, by the call and its count alike.
UNKNOWN_HINT = " (use a claude-* id, or provider/model for another provider)"


async def _read_body(request: web.Request) -> tuple[dict[str, Any], bytes, str] | web.Response:
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
    model = served_name(service(request), body["model"], anthropic_model)
    if model is None:
        return _error(404, f"model: {body['model']}{UNKNOWN_HINT}")
    return body, raw, model


async def messages(request: web.Request) -> web.StreamResponse:
    parsed = await _read_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, raw, model = parsed
    v1 = service(request)
    try:  # a typo'd name is answered here, with the closest known id, before it is admitted or sent upstream
        await v1.provider(model)
    except ApiError as e:
        return _error(404, f"model: {e.message}")
    return await _answer(request, v1, body, raw, model, [])


async def _answer(
    request: web.Request, v1: Service, body: dict[str, Any], raw: bytes, model: str, seen: list[str]
) -> web.StreamResponse:
    # The model the client asked for may go on to its [models] fallbacks; a fallback does not go on to its own.
    meter = v1.provider_call(model, session_id(request), ENDPOINT, fallbacks=not seen)
    meter.continues = bool(seen)  # a fallback: the client's request was counted already
    if seen:  # the observation hooks see the model the client asked for (the first tried), as for every fallback
        meter.requested = seen[0]
    group = v1.group(model)
    if group is None and not model.startswith("anthropic/") or group is not None and not relays(group):
        return await _translated(request, v1, body, model, meter)  # fallbacks included (routed_call.start_direct)
    # Passed through: an Anthropic model, or a group of Anthropic deployments (routed).
    try:  # the checks at the moment of the call, its reservation and its pending entry (calls.py)
        await meter.admit(lambda: v1.messages_ceiling(model, body))
    except ApiError as e:
        return refusal(request, e)
    try:
        if group is not None:
            response = await relay_group(request, meter.gw, body, raw, meter, group)
        else:
            response = await relay.messages(request, meter.gw, body, raw, model, meter)
    finally:
        await meter.release()
    # Failed before anything was written: the group's fallbacks (or the model's), each answered as here.
    return await relay_fallbacks(
        meter, model, group, seen, response, lambda fallback: _answer(request, v1, body, raw, fallback, seen)
    )


async def _translated(
    request: web.Request, v1: Service, body: dict[str, Any], model: str, meter: ProviderCall
) -> web.StreamResponse:
    """A model that is not Anthropic's: the request translated for its provider, its events translated back."""
    try:
        await v1.provider(model)
    except ApiError as e:
        return _error(404, f"model: {e.message}")
    try:
        system, messages_, tools, max_tokens, budget, params = am.parse_request(body)
    except am.RequestError as e:
        return _error(400, e.message)
    # Claude Code asks every model for 32,000 tokens; a model that writes fewer (gpt-4o-mini: 16,384) has its API
    # refuse that. Its own limit asks for the same answer.
    limit = v1.gw.model_info(model).max_output_tokens
    preq = v1.provider_request(model, system, messages_, tools, min(max_tokens, limit or max_tokens), budget, params)

    async def answer(call: DirectCall) -> web.StreamResponse:
        if not body.get("stream"):
            return await whole(
                request, call, lambda finish, usage: am.whole_message(body["model"], finish, usage), _provider_error
            )
        return await _stream(request, call, body["model"])

    return await translated(request, v1, meter, preq, _provider_error, answer, whole=not body.get("stream"))


# The Chat Completions names a provider's refusal uses, as a Messages request names the fields.
MESSAGES_NAMES = {
    "stop": "stop_sequences",
    "max_completion_tokens": "max_tokens",
    "response_format": "output_config.format",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "reasoning_effort": "output_config.effort",
}


def _provider_error(e: ProviderError) -> web.Response:
    e = as_sent(e, MESSAGES_NAMES)
    status = am.client_status(e.status, e.code)
    headers = {"retry-after": retry_after(e.retry_after)} if e.retry_after is not None else None
    message = e.message
    if e.upstream_code == CONTEXT_LENGTH_EXCEEDED:  # in Anthropic's words, which Claude Code compacts on
        message = f"prompt is too long: {message}"
    return web.json_response(am.error_body(status, redact(message)), status=status, headers=headers)


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
    try:  # a model nothing serves is a 404, as the messages call answers it (not a count)
        await service(request).provider(model)
    except ApiError as e:
        return _error(404, f"model: {e.message}")
    call = service(request).provider_call(model, session_id(request), ENDPOINT)
    try:  # the same checks as a call (allowlist, rate limits, a valid key, not shutting down); nothing reserved
        await call.admit(None)
    except ApiError as e:
        return refusal(request, e)
    group = service(request).group(model)
    if group is not None:  # a model group: the count of its Anthropic deployments' upstream (routed_call.py)
        relayed = await count_group_tokens(request, call.gw, body, raw, group)
        if relayed is not None:
            return relayed
    elif model.startswith("anthropic/"):
        relayed = await relay.count_tokens(request, call.gw, body, raw, model)
        if relayed is not None:
            return relayed
    # No count from the upstream: count locally, and say so.
    return web.json_response({"input_tokens": am.local_input_tokens(body)}, headers={"x-agentspace-estimated": "true"})
