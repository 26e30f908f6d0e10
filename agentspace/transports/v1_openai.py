"""``POST /v1/chat/completions``: the OpenAI Chat Completions API, drop-in, for every model (docs/protocol.md).

Parses with ``protocols.openai_chat``, calls the model's provider through ``DirectCall`` (metered, one
usage record), encodes the provider's events as chunks. The provider is always asked for usage; the
client gets the usage chunk only when it sent ``stream_options.include_usage``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..calls import output_limit
from ..direct_call import DirectCall
from ..errors import ApiError
from ..events import ProviderError
from ..logs import redact
from ..prompt_cache import translated_cache_ttl
from ..protocols import openai_chat as oc
from ..providers.base import ProviderRequest
from ..service import Service
from ..types import json_bytes
from .bodies import BUSY_MESSAGE, OPENAI_FIELDS, BodyInvalid, GatewayBusy, type_problem
from .v1_common import (
    BodyTooLarge,
    openai_model,
    read_json_body,
    retry_after,
    served_name,
    service,
    session_id,
    stream,
    translated,
    whole,
)

ENDPOINT = "openai"
DONE = b"data: [DONE]\n\n"
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(oc.error_body(status, message, code=code, param=param), status=status, headers=headers)


def _provider_error(e: ProviderError) -> web.Response:
    status = oc.client_status(e.status, e.code)
    # When to retry, whatever the status: the upstream's advice on a 529 or 5xx too, as /v1/messages relays it
    # (the OpenAI SDK waits that long before its retry); a 429 always says it.
    headers = {"Retry-After": retry_after(e.retry_after)} if e.retry_after is not None else None
    if status == 429 and headers is None:
        headers = {"Retry-After": "1"}
    return _error(
        status, redact(e.message), code=oc.error_code(status, e.upstream_code), param=e.param, headers=headers
    )


async def served_model(service: Service, name: str) -> str | web.Response:
    """The gateway's id for the model an OpenAI-shaped request names (a model group as configured, other ids
    as the SDKs name them), or the 404 in OpenAI's shape when nothing serves it."""
    model = served_name(service, name, openai_model)
    if model is None:
        return _error(
            404,
            f"The model `{name}` does not exist. Use provider/model ids, e.g. openai/gpt-4o-mini.",
            code="model_not_found",
            param="model",
        )
    try:
        await service.provider(model)
    except ApiError as e:
        return _error(404, e.message, code="model_not_found", param="model")
    return model


def parsed_request(v1: Service, model: str, parsed: oc.ParsedRequest) -> ProviderRequest:
    """The provider request of an OpenAI-shaped request (Chat Completions or Responses), as the client sent it."""
    request = v1.provider_request(
        model, parsed.system, parsed.messages, parsed.tools, parsed.max_tokens, parsed.reasoning_budget, parsed.params
    )
    if request.thinking is not None:
        request.thinking.summarized = parsed.reasoning_summary
    group = v1.group(model)
    if parsed.max_tokens is None and group is None:  # (a group's deployments differ in their limits)
        request.max_tokens = output_limit(request)
    models = [d.model for d in group.deployments] if group is not None else [model]
    request.cache_ttl = translated_cache_ttl(v1.config, parsed.cache_ttl, models)
    return request


async def read_body(request: web.Request) -> tuple[Any, web.Response | None]:
    """The request's JSON body, or the OpenAI-shaped answer refusing it (413 too large, 400 not JSON, 503
    busy); for every OpenAI-shaped endpoint."""
    try:
        body, _ = await read_json_body(request)
    except BodyTooLarge as e:
        return None, _error(413, f"{e} (the gateway's limit for /v1 requests).")
    except BodyInvalid as e:
        return None, _error(400, f"We could not parse the JSON body of your request ({e}).")
    except GatewayBusy:
        return None, _error(503, BUSY_MESSAGE, headers={"Retry-After": "1"})
    return body, None


def _frame(chunk: dict[str, object]) -> bytes:
    return b"data: " + json_bytes(chunk) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, refused = await read_body(request)
    if refused is not None:
        return refused
    if isinstance(body, dict) and (problem := type_problem(body, OPENAI_FIELDS)) is not None:
        return _error(400, problem[1], code="invalid_type", param=problem[0])
    try:
        parsed = oc.parse_request(body)
    except oc.RequestError as e:
        return _error(400, e.message, param=e.param)
    v1 = service(request)
    model = await served_model(v1, parsed.model)
    if isinstance(model, web.Response):
        return model
    preq = parsed_request(v1, model, parsed)
    meter = v1.provider_call(model, session_id(request), ENDPOINT, fallbacks=True)

    async def answer(call: DirectCall) -> web.StreamResponse:
        if not parsed.stream:
            return await whole(
                request, call, lambda finish, usage: oc.completion(parsed.model, finish, usage), _provider_error
            )
        return await _stream(request, call, parsed.model, parsed.include_usage)

    return await translated(request, v1, meter, preq, _provider_error, answer, whole=not parsed.stream)


def _stream_error(e: ProviderError) -> bytes:
    """A provider error once the stream has begun goes in the stream, as OpenAI sends it."""
    status = oc.client_status(e.status, e.code)
    return _frame(oc.error_body(status, redact(e.message), code=oc.error_code(status, e.upstream_code)))


async def _stream(request: web.Request, call: DirectCall, model: str, include_usage: bool) -> web.StreamResponse:
    encoder = oc.ChunkEncoder(model, include_usage)
    return await stream(
        request,
        call,
        STREAM_HEADERS,
        _frame(encoder.start()),
        lambda event, usage: b"".join(_frame(f) for f in encoder.encode(event, usage)),
        _stream_error,
        end=DONE,
    )
