"""``POST /v1/responses``: the OpenAI Responses API (what Codex speaks), drop-in, for every model.

Parses with ``protocols.openai_responses``, calls the model's provider through ``DirectCall`` (metered, one
usage record, endpoint ``responses``), and encodes the provider's events as Responses stream events or one
``response`` object. Stateless: the client sends the whole conversation (``store: false``). OpenAI models
are called through Chat Completions upstream (litellm), like every other model.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..direct_call import DirectCall
from ..events import ProviderError
from ..logs import redact
from ..protocols import openai_chat as oc
from ..protocols import openai_responses as orr
from ..types import json_bytes
from .bodies import RESPONSES_FIELDS, type_problem
from .v1_common import (
    as_sent,
    service,
    session_id,
    stream,
    translated,
    whole,
)
from .v1_openai import STREAM_HEADERS, _error, _provider_error, parsed_request, read_body, served_model

ENDPOINT = "responses"

# The Chat Completions names a provider's refusal uses, as a Responses request names the fields.
RESPONSES_NAMES = {
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _responses_error(e: ProviderError) -> web.Response:
    """``_provider_error`` with the fields a refusal names spelled as OpenAI's Responses API names them."""
    return _provider_error(as_sent(e, RESPONSES_NAMES))


def _frame(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + json_bytes(event) + b"\n\n"


async def responses(request: web.Request) -> web.StreamResponse:
    body, refused = await read_body(request)
    if refused is not None:
        return refused
    if isinstance(body, dict) and (problem := type_problem(body, RESPONSES_FIELDS)) is not None:
        return _error(400, problem[1], code="invalid_type", param=problem[0])
    try:
        parsed, encrypted = orr.parse_request(body)
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
                request,
                call,
                lambda finish, usage: orr.response_object(body, parsed.model, finish, usage, encrypted),
                _responses_error,
            )
        encoder = orr.EventEncoder(body, parsed.model, encrypted)

        def failed(e: ProviderError) -> bytes:  # once the stream has begun, as OpenAI ends it
            status = oc.client_status(e.status, e.code)
            return _frame(encoder.failed(orr.failed_code(status, e.upstream_code), redact(e.message)))

        return await stream(
            request,
            call,
            STREAM_HEADERS,
            b"".join(_frame(e) for e in encoder.start()),
            lambda event, usage: b"".join(_frame(e) for e in encoder.encode(event, usage)),
            failed,
        )

    return await translated(request, v1, meter, preq, _responses_error, answer, whole=not parsed.stream)
