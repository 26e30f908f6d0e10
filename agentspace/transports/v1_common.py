"""What the drop-in ``/v1`` endpoints share (docs/protocol.md): routes, errors in each API's own shape,
session attribution, model ids, and the HTTP client the Anthropic pass-through relays through."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

from aiohttp import web

from .. import security
from ..calls import ProviderCall, request_ceiling
from ..direct_call import DirectCall
from ..errors import ApiError
from ..events import ProviderError, ProviderEvent, ProviderFinish
from ..limits import CALL_COST_HINT
from ..providers.base import ProviderRequest
from ..providers.upstream_http import answers_shutdown, watch_client
from ..service import SHUTTING_DOWN_MESSAGE, Service, model_id_problem
from ..types import TokenUsage, clean_text
from . import bodies, state, v1_errors
from .bodies import BodyTooLarge

# Headers that attribute a call's usage to a session id (Codex sends session-id, older ones session_id).
SESSION_HEADERS = ("X-Agentspace-Session", "X-Claude-Code-Session-Id", "session-id", "session_id")

# The OpenAI error codes of the client checks; Anthropic's shape has the type of the status only.
REFUSAL_CODES = {
    "MODEL_NOT_ALLOWED": "model_not_allowed",
    "RATE_LIMITED": "rate_limit_exceeded",
    "BUDGET_EXCEEDED": "insufficient_quota",
    "UNAUTHORIZED": "invalid_api_key",
}

# limits.CALL_COST_HINT in the fields of the APIs that name them otherwise: a Responses request sets
# max_output_tokens and reasoning.effort; an embedding writes nothing back, its input is all it costs.
COST_HINTS = {
    "/v1/responses": "(its input, max_output_tokens and reasoning.effort at the model's prices): "
    "lower max_output_tokens or send less",
    "/v1/embeddings": "(its input at the model's price): send less",
}


# The body size the /v1 endpoints take: the larger of [server] max_body_bytes and Anthropic's own request
# limit, since Claude Code's requests (a long session's whole history, images) pass 1 MiB routinely. Only
# authenticated clients get this far: the token is checked before the body is read.
PROVIDER_MAX_BODY_BYTES = 32 * 1024 * 1024


def body_limit(request: web.Request) -> int:
    return max(int(service(request).config["server"]["max_body_bytes"]), PROVIDER_MAX_BODY_BYTES)


async def read_body(request: web.Request) -> bytes:
    """The raw body, the limit enforced while reading (``bodies.BodyTooLarge``)."""
    limit = body_limit(request)
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: web.Request) -> tuple[Any, bytes]:
    """The decoded JSON body and its bytes (``bodies.read_json``: bounded while read, large ones decoded off
    the loop). Raises ``BodyTooLarge``, ``BodyInvalid`` (a ValueError) or ``GatewayBusy``."""
    return await bodies.read_json(request, body_limit(request))


def service(request: web.Request) -> Service:
    """The service layer for the request's caller: every /v1 endpoint reaches the gateway through it."""
    return state.service(request.app, client_name(request), request.get(security.CREDENTIAL_KEY))


def session_id(request: web.Request) -> str | None:
    for name in SESSION_HEADERS:
        # A header's bytes that are no UTF-8 (Latin-1 ``café``, as http.client sends it) arrive as lone
        # surrogates, which no store can write: each becomes U+FFFD.
        value = clean_text(request.headers.get(name, "")).strip()
        if value:
            return value[:200]
    return None


def client_name(request: web.Request) -> str:
    """Who made the call: "admin" for the gateway token, else the client whose key it is."""
    return security.caller(request)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds (HTTP's delay-seconds), at least one."""
    return str(max(1, math.ceil(seconds)))


FINAL_REFUSALS = frozenset({"BUDGET_EXCEEDED", "MODEL_NOT_ALLOWED", "UNAUTHORIZED"})  # waiting cures none


def refusal(request: web.Request, error: ApiError) -> web.Response:
    """A call the client checks refused (``limits.Guard``), in the shape of the API the request speaks, with
    ``Retry-After`` when waiting helps."""
    headers = {}
    if error.retry_after is not None:
        headers["retry-after"] = retry_after(error.retry_after)
    if error.code in FINAL_REFUSALS:
        # The SDKs retry a 429 or a 503 by themselves; a spent budget (until the period ends), a model the client
        # may not use or a revoked key will not change in seconds: x-should-retry, which both SDKs honour, says so.
        # Shutting down, a full disk or Redis unreachable are cured by waiting: the SDKs retry them.
        headers["x-should-retry"] = "false"
    message = error.message
    if (hint := COST_HINTS.get(request.path)) is not None:
        message = message.replace(CALL_COST_HINT, hint)
    return v1_errors.error_response(
        request,
        error.status,
        f"{error.code}: {message}",
        code=REFUSAL_CODES.get(error.code),
        headers=headers,
        openai_type=error.limited,  # OpenAI's type of a 429: "requests" for an rpm, "tokens" for a tpm
    )


def served_name(v1: Service, name: str, ours: Callable[[str], str | None]) -> str | None:
    """Our id for the model a /v1 request names: a model group as configured, other ids as ``ours`` maps the
    SDK's names. A name it cannot map that looks like a group's mistyped is kept as sent, for ``Service.provider``
    to answer with the group, as on every transport. None: no model id."""
    if v1.group(name) is not None:
        return name
    model = ours(name)
    if model is None and model_id_problem(name) is None and v1.group_like(name) is not None:
        return name
    return model


def anthropic_model(model: str) -> str | None:
    """Our id for a model an Anthropic client names: a bare ``claude-*`` id means ``anthropic/claude-*``. None for
    one that is no model id (``model_id_problem``: a lone surrogate, a control character...)."""
    if model_id_problem(model) is not None:
        return None
    if "/" in model:
        return model
    if model.startswith("claude-"):
        return "anthropic/" + model
    return None


def openai_model(model: str) -> str | None:
    """Our id for a model an OpenAI client names: ``provider/model``, or a bare id the cost map knows (None for one
    that is no model id, as ``anthropic_model``)."""
    if model_id_problem(model) is not None:
        return None
    if "/" in model:
        return model
    if model.startswith("claude-"):
        return "anthropic/" + model
    prefix = _bare_model_prefixes().get(model)
    return f"{prefix}/{model}" if prefix else None


@lru_cache(maxsize=1)
def _bare_model_prefixes() -> dict[str, str]:
    """Bare chat model ids of the cost map -> their provider prefix (``gpt-4o-mini`` -> ``openai``; Responses-only
    models such as ``gpt-5.3-codex`` too, ``pricing.CHAT_MODES``)."""
    from ..pricing import CHAT_MODES, cost_map

    out = {}
    for key, entry in cost_map().items():
        provider = str(entry.get("litellm_provider", ""))
        if "/" not in key and provider and entry.get("mode") in CHAT_MODES:
            out[key] = "openai" if provider == "text-completion-openai" else provider
    return out


def as_sent(e: ProviderError, names: dict[str, str]) -> ProviderError:
    """``e`` with the fields a provider's refusal names (``param`` and its message's ``NAME, ...:`` lead) spelled
    as the client sent them: a translated request reaches the provider under Chat Completions names."""
    if e.param not in names:
        return e
    lead, sep, rest = e.message.partition(": ")
    message = ", ".join(names.get(n, n) for n in lead.split(", ")) + sep + rest if sep else e.message
    return ProviderError(
        e.code,
        message,
        retryable=e.retryable,
        retry_after=e.retry_after,
        status=e.status,
        param=names[e.param],
        upstream_code=e.upstream_code,
    )


def shutdown_error() -> ProviderError:
    """What a /v1 call stopped by the server's shutdown tells its client, in the API's own error shape."""
    return ProviderError("SERVICE_UNAVAILABLE", SHUTTING_DOWN_MESSAGE, status=503)


async def whole(
    request: web.Request,
    call: DirectCall,
    body: Callable[[ProviderFinish, TokenUsage], dict[str, Any]],
    error: Callable[[ProviderError], web.Response],
) -> web.Response:
    """A started call run to its end, answered as one JSON ``body``, or as ``error`` makes a provider error.
    A cancelled request (the client left) aborts the call; one the server's shutdown stopped is answered 503."""
    finish = None
    try:
        async for event in call.events():
            if isinstance(event, ProviderFinish):
                finish = event
    except ProviderError as e:
        return error(e)
    except asyncio.CancelledError:
        await asyncio.shield(asyncio.ensure_future(call.abort()))
        if not answers_shutdown(request):
            raise
        # the server's shutdown: a 503 the SDKs retry elsewhere, not a connection dropped
        return error(shutdown_error())
    assert finish is not None and call.meter.recorded is not None
    return web.json_response(body(finish, call.meter.recorded.usage))


async def stream(
    request: web.Request,
    call: DirectCall,
    headers: dict[str, str],
    start: bytes,
    encode: Callable[[ProviderEvent, TokenUsage | None], bytes],
    error: Callable[[ProviderError], bytes],
    end: bytes = b"",
) -> web.StreamResponse:
    """Stream a started call as server-sent events: ``start``, each event as ``encode`` frames it, ``end``.
    After the first bytes the status is sent, so a provider error goes in the stream as ``error`` frames it.
    A client that goes away (on a write, or while the upstream is silent) aborts the call."""
    resp = web.StreamResponse(headers=headers)
    task = asyncio.current_task()
    assert task is not None
    stop_watching = watch_client(request, task.cancel)  # a silent provider is not waited for once the client left
    try:
        await resp.prepare(request)
        await resp.write(start)
        async for event in call.events():
            recorded = call.meter.recorded
            frames = encode(event, recorded.usage if recorded is not None else None)
            if frames:
                await resp.write(frames)
                call.meter.first_output()  # the time to the first relayed output byte
        if end:
            await resp.write(end)
    except ProviderError as e:
        try:
            await resp.write(error(e))
        except ConnectionResetError:
            return resp
    except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError on write)
        await call.abort()
        return resp
    except asyncio.CancelledError:
        # The client went away: aiohttp cancelled the handler, or our watch did. Or the server's shutdown
        # stopped the call at its grace's end: the call is recorded aborted all the same, and the client still
        # there gets the stream's own error end (as for a provider error), not a body cut off.
        await asyncio.shield(asyncio.ensure_future(call.abort()))
        if not (resp.prepared and answers_shutdown(request)):
            raise
        try:
            await resp.write(error(shutdown_error()))
        except ConnectionResetError:
            return resp
    finally:
        stop_watching()
    await resp.write_eof()
    return resp


async def translated(
    request: web.Request,
    service: Service,
    meter: ProviderCall,
    preq: ProviderRequest,
    provider_error: Callable[[ProviderError], web.Response],
    answer: Callable[[DirectCall], Awaitable[web.StreamResponse]],
    *,
    whole: bool,
) -> web.StreamResponse:
    """One translated ``/v1`` call (docs/accounting.md): admitted, reserved and written ahead as ``meter``,
    started on its model or over a model group's deployments, answered by ``answer`` in the API's shape
    (``whole``: in one body, not streamed); every provider call it made is settled, whatever happened."""
    try:
        await meter.admit(lambda: request_ceiling(preq))
    except ApiError as e:
        return refusal(request, e)
    call: DirectCall | None = None
    task = asyncio.current_task()
    assert task is not None
    # A client gone before the model's first event (a reasoning model thinks for minutes, an upstream slow to
    # start) stops the call then, as on the pass-through: the upstream request closed, the call recorded as
    # aborted and its reservation given back, not held until the first token and billed in full.
    stop_watching = watch_client(request, task.cancel)
    try:
        try:
            call = await service.start_call(meter, preq, whole=whole)
        except ProviderError as e:
            return provider_error(e)
        except asyncio.CancelledError:  # (the call is recorded aborted by now)
            if not answers_shutdown(request):
                raise
            # the server's shutdown stopped it before its first event: a 503 the SDKs retry
            return provider_error(shutdown_error())
        except ApiError as e:  # a model group's next attempt, refused at its admission (routed_call._next_meter)
            return refusal(request, e)
        return await answer(call)
    finally:
        stop_watching()
        await meter.release()
        if call is not None and call.meter is not meter:  # a model group's attempt that answered
            await call.meter.release()
