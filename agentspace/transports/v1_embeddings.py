"""``POST /v1/embeddings``: the OpenAI Embeddings API, drop-in, for every embedding model litellm serves.

Behind the same client checks as every provider call (model allowlist, rate limits, budget), and metered
once: the input tokens the provider reported (a local count where it reported none), priced from the cost
map, endpoint ``embeddings``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..calls import Ceiling, cut_short_usage
from ..errors import ApiError
from ..events import ProviderError
from ..protocols.openai_chat import RequestError
from ..providers import litellm as litellm_provider
from ..providers.upstream_http import answers_shutdown
from ..routed_call import embed_group
from ..service import Service
from ..tokens import count_ceiling_tokens, count_tokens
from ..types import TokenUsage
from .bodies import EMBEDDINGS_FIELDS, type_problem
from .v1_common import refusal, service, session_id, shutdown_error
from .v1_openai import _error, _provider_error, read_body

ENDPOINT = "embeddings"
FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def parse(body: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """(model, inputs, options) of an embeddings request."""
    if not isinstance(body, dict):
        raise RequestError("body", "The request body must be a JSON object.")
    for name in body:
        if name not in FIELDS:
            raise RequestError(name, f"{name} is not an Embeddings parameter this gateway supports.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "you must provide a model parameter")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if raw and isinstance(raw, list) and all(_token_id(t) for t in raw):
        inputs = [raw]  # one input as token ids
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("input", "input must be a string, an array of strings, or token arrays")
    for i, item in enumerate(inputs):
        if not (isinstance(item, str) or (isinstance(item, list) and all(_token_id(t) for t in item))):
            raise RequestError(f"input[{i}]", "each input must be a string or an array of token ids")
    options: dict[str, Any] = {}
    fmt = body.get("encoding_format")
    if fmt is not None:
        if fmt not in ("float", "base64"):
            raise RequestError("encoding_format", "encoding_format must be float or base64")
        options["encoding_format"] = fmt
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise RequestError("dimensions", "dimensions must be a positive integer")
        options["dimensions"] = dimensions
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise RequestError("user", "user must be a string")
        options["user"] = user
    return model, inputs, options


def _token_id(value: Any) -> bool:
    """A token id: a non-negative integer (JSON's true is not one, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _local_tokens(inputs: list[Any], ceiling: bool = False) -> int:
    count = count_ceiling_tokens if ceiling else count_tokens  # a reservation: the most they may be billed as
    return sum(count(item) if isinstance(item, str) else len(item) for item in inputs)


async def _unserved(v1: Service, models: list[str]) -> web.Response | None:
    """The 400 or 404 for a model that has no embeddings here (each of a group's deployments); None: served."""
    try:
        for served in models:
            if not isinstance(await v1.provider(served), litellm_provider.LiteLLMProvider):
                return _error(400, f"{served} has no embeddings on this gateway.", param="model")
    except ApiError as e:
        return _error(404, e.message, code="model_not_found", param="model")
    return None


async def _read(request: web.Request) -> tuple[str, list[Any], dict[str, Any]] | web.Response:
    """The request's (model, inputs, options), or the answer refusing it (``read_body``'s, or a 400)."""
    body, refused = await read_body(request)
    if refused is not None:
        return refused
    if isinstance(body, dict) and (problem := type_problem(body, EMBEDDINGS_FIELDS)) is not None:
        return _error(400, problem[1], code="invalid_type", param=problem[0])  # as the other OpenAI endpoints
    try:
        return parse(body)
    except RequestError as e:
        return _error(400, e.message, param=e.param)


async def embeddings(request: web.Request) -> web.StreamResponse:
    read = await _read(request)
    if isinstance(read, web.Response):
        return read
    name, inputs, options = read
    v1 = service(request)
    group = v1.group(name)  # a model group of embedding models (docs/routing.md)
    # Bare ids are OpenAI's (text-embedding-3-small).
    model = name if group is not None or "/" in name else f"openai/{name}"
    if (
        unserved := await _unserved(v1, [d.model for d in group.deployments] if group is not None else [model])
    ) is not None:
        return unserved
    preq = v1.provider_request(model, "", [], [], None, None, {})
    meter = v1.provider_call(model, session_id(request), ENDPOINT)

    def ceiling() -> Ceiling:  # the input: embeddings write nothing back
        return Ceiling(_local_tokens(inputs, ceiling=True), 0)

    try:  # the checks at the moment of the call, its reservation
        await meter.admit(ceiling)
    except ApiError as e:
        return refusal(request, e)
    answered = meter
    try:
        try:
            if group is not None:
                vectors, usage, answered = await embed_group(meter.gw, preq, meter, group, inputs, options, ceiling)
            else:
                meter.begin()
                meter.sent_whole()
                vectors, usage = await litellm_provider.embed(v1.config, preq, inputs, options)
        except ProviderError as e:
            if meter.recorded is None and group is None:
                await meter.record(TokenUsage(), "error", error=e.code, answered=False)
            return _provider_error(e)
        except ApiError as e:  # a group's next attempt, refused at its admission (routed_call._next_meter)
            return refusal(request, e)
        except asyncio.CancelledError:
            # The client left while the whole answer was awaited, or the server's shutdown stopped it at its grace's
            # end: the upstream has the request and bills its input, as a whole Messages answer the client left
            # (providers/anthropic_relay.py).
            if group is None:
                await meter.left_whole()
            if not answers_shutdown(request):
                raise
            # the server's shutdown: a 503 the SDKs retry elsewhere, as for a whole chat call (v1_common.whole)
            return _provider_error(shutdown_error())
        if usage is None:  # a provider that reports nothing: counted here (an embedding has no output)
            usage = cut_short_usage(None, lambda: _local_tokens(inputs), lambda: 0)
        await answered.record(usage, "stop")
        tokens = answered.recorded.usage.input_tokens if answered.recorded is not None else 0
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
    finally:
        await meter.release()
        if answered is not meter:
            await answered.release()
