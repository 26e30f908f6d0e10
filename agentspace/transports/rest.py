"""The REST API (docs/protocol.md#http-api): sessions, context inspection, usage, models and deployments.

Handlers are thin: they call ``agentspace.service``, and the JSON shapes are those of the WebSocket replies
(``session.list.result``, ``context.inspection``, ``usage.report``) without ``type`` and ``requestId``.
``install_errors_and_cors`` installs what makes every error JSON (``{error: {code, message, fields?}}``, unknown
routes included; an ``ApiError`` raised by any HTTP handler, ``POST /api/chat`` too, is encoded in
``api_error_response``) and CORS for ``[server] allowed_origins`` (the security middleware has already
refused other origins).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web

from .. import attachments, security
from ..errors import ApiError, outage_error
from ..providers.upstream_http import answers_shutdown
from ..security import error_response
from ..service import SHUTTING_DOWN_MESSAGE, Service
from . import bodies, state, v1_errors
from .ui_stream import read_json

log = logging.getLogger(__name__)

CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = "600"
# Response headers a page on an allowed origin may read (past the CORS-safelisted ones): when to retry and
# whether to, the upstream's request id, a count that is an estimate; and every ``anthropic-*`` header
# relayed (its rate limits, anthropic-ratelimit-*), named one by one (a prefix is no CORS name).
CORS_EXPOSED = ("retry-after", "retry-after-ms", "x-should-retry", "request-id", "x-agentspace-estimated")

# Codes for errors aiohttp raises itself (no route, wrong method, body too large).
HTTP_ERROR_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE"}


# --- handlers -----------------------------------------------------------------------------------


def _service(request: web.Request) -> Service:
    """The service for the request's caller (the admin, or a client that sees only its own data)."""
    return state.service(request.app, security.caller(request))


async def list_sessions(request: web.Request) -> web.Response:
    limit: object = request.query.get("limit")
    if isinstance(limit, str) and limit.isascii() and limit.isdigit():  # not other scripts' digits
        limit = int(limit)
    if "q" in request.query:  # a search: the caller's sessions whose title or messages contain q
        found, more = await _service(request).search_sessions(request.query["q"], limit)
    else:
        found, more = await _service(request).list_sessions(limit)
    return web.json_response({"sessions": found.sessions, "damagedFiles": found.damaged_files, "more": more})


async def get_session(request: web.Request) -> web.StreamResponse:
    session = await _service(request).get_session(request.match_info["id"])
    if not attachments.stored_files(session.get("messages") or ()):
        return web.json_response({"session": session})
    # The files' data: URLs (up to [attachments] max_session_bytes of them, as base64) are spliced in, not
    # JSON-encoded: json.dumps holds the GIL for the whole document (the event loop waited 0.47 s for 75 MB,
    # on a worker thread as well), the splicing a file at a time, on a worker thread. Sent a file at a time.
    chunks = await asyncio.to_thread(attachments.json_with_data_urls, {"session": session})
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/json; charset=utf-8"})
    response.content_length = sum(map(len, chunks))
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def delete_session(request: web.Request) -> web.Response:
    await _service(request).delete_session(request.match_info["id"])
    return web.Response(status=204)


async def session_context(request: web.Request) -> web.Response:
    model = request.query.get("model") or None
    draft = request.query.get("userMessage")
    return web.json_response(
        await _service(request).inspect_context(request.match_info["id"], model, user_message=draft)
    )


async def session_context_for_draft(request: web.Request) -> web.Response:
    """The same, for a draft too long for a URL: ``{"model"?, "userMessage"?}`` in the body."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError("INVALID_MESSAGE", "The body must be a JSON object.")
    inspection = await _service(request).inspect_context(
        request.match_info["id"], body.get("model"), paths=("id", "model"), user_message=body.get("userMessage")
    )
    return web.json_response(inspection)


async def compact_session(request: web.Request) -> web.Response:
    try:
        return web.json_response(await _service(request).compact_session(request.match_info["id"]))
    except asyncio.CancelledError:  # (the summarising call is recorded aborted by now)
        if not answers_shutdown(request):
            raise
        # the server's shutdown stopped it at its grace's end: said, not a dropped connection
        raise ApiError("SERVICE_UNAVAILABLE", SHUTTING_DOWN_MESSAGE) from None


async def export_session(request: web.Request) -> web.Response:
    session_id = request.match_info["id"]
    fmt = request.query.get("format", "md")
    document, media_type = await _service(request).export_session(session_id, fmt)
    # A download (the web app's link): the file name is the session id, which is plain ASCII.
    headers = {hdrs.CONTENT_DISPOSITION: f'attachment; filename="{session_id}.{fmt}"'}
    return web.Response(text=document, headers={**headers, hdrs.CONTENT_TYPE: media_type})


async def usage(request: web.Request) -> web.Response:
    query = request.query
    report = await _service(request).usage(
        session_id=query.get("sessionId") or None, since=query.get("since") or None, by=query.get("by", "model")
    )
    return web.json_response(report)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": await _service(request).models()})


async def deployments(request: web.Request) -> web.Response:
    """The state of every deployment of the model groups (routing.py): the gateway token only."""
    return web.json_response({"deployments": await _service(request).deployments()})


# --- errors and CORS ----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights, and turn aiohttp's own HTTP errors and every ApiError into JSON errors."""
    if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers and _cors_origin(request):
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: CORS_METHODS,
                # The SDKs' browser builds send headers of their own (x-api-key, anthropic-version,
                # x-stainless-*) to /v1: those a page on an allowed origin asks for are allowed.
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
                or CORS_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: CORS_MAX_AGE,
            },
        )
    try:
        return await handler(request)
    except Exception as e:
        if request.writer.output_size:
            # The answer has begun (a stream, a plugin's route): a second one cannot follow it inside the same
            # body. The connection is dropped, and its client sees the body end unfinished.
            log.exception("%s %s failed after its answer began; the answer is cut", request.method, request.path)
            raise
        return _error_answer(request, e)


def _error_answer(request: web.Request, error: Exception) -> web.StreamResponse:
    """The JSON answer of ``error``, raised by a handler before its answer began (``errors_and_preflight``)."""
    if isinstance(error, ApiError):
        return api_error_response(error)
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        code = HTTP_ERROR_CODES.get(error.status) or HTTPStatus(error.status).name
        if error.status == 404:
            message = (
                v1_errors.stored_response_problem(request)
                or f"No route {request.method} {request.path}; the routes are listed at /api/openapi.json."
            )
        elif error.status == 405:
            allowed = error.headers.get(hdrs.ALLOW, "")
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}."
        else:
            message = error.reason
        if request.path.startswith("/v1/"):  # the /v1 clients parse their own API's error shape only
            response = v1_errors.error_response(request, error.status, message)
        else:
            response = error_response(error.status, code, message)
        if hdrs.ALLOW in error.headers:
            response.headers[hdrs.ALLOW] = error.headers[hdrs.ALLOW]
        return response
    if isinstance(error, web.RequestPayloadError):
        # The body could not be read: a Content-Encoding (gzip, deflate) whose data does not decode. The
        # caller's input, answered 400 without a traceback; the rest of the body is not read.
        log.info("%s %s: the body could not be read (%s)", request.method, request.path, error)
        request[bodies.UNREAD] = bodies.Unread.CLOSE
        message = "The request body could not be read: its Content-Encoding did not decode."
        if request.path.startswith("/v1/"):
            return v1_errors.error_response(request, 400, message, code="invalid_request_error")
        return api_error_response(ApiError("INVALID_MESSAGE", message))
    if isinstance(error, RecursionError):
        # Input nested deeper than the code that walks it can follow (JSON decodes to a few hundred
        # levels, later steps may follow fewer): the caller's input, not our defect, and no traceback.
        log.info("%s %s: input nested too deep", request.method, request.path)
        message = "The request is nested too deep (at most a few hundred levels)."
        if request.path.startswith("/v1/"):
            return v1_errors.error_response(request, 400, message, code="invalid_request_error")
        return api_error_response(ApiError("INVALID_MESSAGE", message))
    if (outage := outage_error(error)) is not None:  # the database or Redis is down: 503, no traceback
        log.warning("%s %s: %s (%r)", request.method, request.path, outage.message, error)
        if request.path.startswith("/v1/"):
            return v1_errors.error_response(request, 503, outage.message, headers={"Retry-After": "1"})
        return api_error_response(outage)
    # A defect of ours: logged with its traceback, answered as JSON without details.
    log.error("%s %s failed", request.method, request.path, exc_info=error)
    message = "The gateway failed to handle this request; see its log."
    if request.path.startswith("/v1/"):  # the /v1 clients parse their own API's shape only
        return v1_errors.error_response(request, 500, message)
    return api_error_response(ApiError("INTERNAL_ERROR", message))


def api_error_response(error: ApiError) -> web.Response:
    """The one HTTP encoding of an ApiError: ``{"error": {code, message, fields?}}`` with its status.
    ``fields`` goes out as ``[{path, message}]``, the shape the OpenAPI document gives."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.fields:
        body["fields"] = [{"path": path, "message": problem} for path, problem in error.fields.items()]
    response = web.json_response({"error": body}, status=error.status)
    if error.retry_after is not None:
        response.headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(error.retry_after)))
    return response


def _cors_origin(request: web.Request) -> str | None:
    origin = request.headers.get(hdrs.ORIGIN)
    return origin if origin and origin in state.config(request.app)["server"]["allowed_origins"] else None


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare sees every response, also the security middleware's 401/403 and SSE streams,
    # so a browser page can read those errors too.
    origin = _cors_origin(request)
    if origin is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        exposed = [n for n in response.headers if n.lower() in CORS_EXPOSED or n.lower().startswith("anthropic-")]
        if exposed:  # (browsers hide every other header from the page: Retry-After included)
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(dict.fromkeys(exposed))


def install_errors_and_cors(app: web.Application) -> None:
    """What every route shares: JSON errors and CORS (the routes themselves: ``routes.install``)."""
    app.middlewares.append(errors_and_preflight)
    app.on_response_prepare.append(_cors_headers)
