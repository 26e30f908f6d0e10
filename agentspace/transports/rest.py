"""The REST API (SPEC section 4): sessions, context inspection, usage, models, and its OpenAPI document.

Handlers are thin: they call ``agentspace.service``, and the JSON shapes are those of the WebSocket replies
(``session.list.result``, ``context.inspection``, ``usage.report``) without ``type`` and ``requestId``.
``setup_routes`` also installs what makes every error JSON (``{error: {code, message, fields?}}``, unknown
routes included; an ``ApiError`` raised by any HTTP handler, ``POST /api/chat`` too, is encoded in
``api_error_response``) and CORS for ``[server] allowed_origins`` (the security middleware has already
refused other origins).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web

from .. import security
from ..errors import ApiError, outage_error
from ..security import error_response
from ..service import Service
from . import clients_api, state, v1_errors, web_api
from .ui_stream import read_json

log = logging.getLogger(__name__)

CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = "600"

# Codes for errors aiohttp raises itself (no route, wrong method, body too large).
HTTP_ERROR_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


# --- handlers -----------------------------------------------------------------------------------


def _service(request: web.Request) -> Service:
    """The service for the request's caller (the admin, or a client that sees only its own data)."""
    return state.service(request.app, security.caller(request))


async def list_sessions(request: web.Request) -> web.Response:
    if "q" in request.query:  # a search: the caller's sessions whose title or messages contain q
        found = await _service(request).search_sessions(request.query["q"])
        return web.json_response({"sessions": found, "damagedFiles": []})
    listing = await _service(request).list_sessions()
    return web.json_response({"sessions": listing.sessions, "damagedFiles": listing.damaged_files})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response({"session": await _service(request).get_session(request.match_info["id"])})


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
    return web.json_response(await _service(request).compact_session(request.match_info["id"]))


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


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


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
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: CORS_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: CORS_MAX_AGE,
            },
        )
    try:
        return await handler(request)
    except ApiError as e:
        return api_error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(e.status) or HTTPStatus(e.status).name
        if e.status == 404:
            message = f"No route {request.method} {request.path}; the routes are listed at /api/openapi.json."
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}; allowed: {e.headers.get(hdrs.ALLOW, '')}."
        else:
            message = e.reason
        response = error_response(e.status, code, message)
        if hdrs.ALLOW in e.headers:
            response.headers[hdrs.ALLOW] = e.headers[hdrs.ALLOW]
        return response
    except RecursionError:
        # Input nested deeper than the code that walks it can follow (JSON decodes to a few hundred
        # levels, later steps may follow fewer): the caller's input, not our defect, and no traceback.
        log.info("%s %s: input nested too deep", request.method, request.path)
        message = "The request is nested too deep (at most a few hundred levels)."
        if request.path.startswith("/v1/"):
            return v1_errors.error_response(request, 400, message, code="invalid_request_error")
        return api_error_response(ApiError("INVALID_MESSAGE", message))
    except Exception as e:
        if (outage := outage_error(e)) is not None:  # the database or Redis is down: 503, no traceback
            log.warning("%s %s: %s (%r)", request.method, request.path, outage.message, e)
            if request.path.startswith("/v1/"):
                return v1_errors.error_response(request, 503, outage.message, headers={"Retry-After": "1"})
            return api_error_response(outage)
        # A defect of ours: logged with its traceback, answered as JSON without details.
        log.exception("%s %s failed", request.method, request.path)
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


def setup_routes(app: web.Application) -> None:
    app.middlewares.append(errors_and_preflight)
    app.on_response_prepare.append(_cors_headers)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{id}", get_session)
    app.router.add_delete("/api/sessions/{id}", delete_session)
    app.router.add_get("/api/sessions/{id}/context", session_context)
    app.router.add_post("/api/sessions/{id}/context", session_context_for_draft)
    app.router.add_post("/api/sessions/{id}/compact", compact_session)
    app.router.add_get("/api/sessions/{id}/export", export_session)
    app.router.add_get("/api/usage", usage)
    app.router.add_get("/api/models", models)
    app.router.add_get("/api/deployments", deployments)
    app.router.add_get("/api/openapi.json", openapi)


# --- the OpenAPI document -----------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NULLABLE_STR = {"type": ["string", "null"]}
_SESSION_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
    "description": "Session id (the chat id).",
}
_SSE = {"text/event-stream": {"schema": {"type": "string"}, "x-ai-sdk": "UI message stream protocol v1"}}
_AUTH_ERRORS = {"401": _error("No or wrong gateway token."), "403": _error("Origin or Host not allowed.")}
# The token counts of a usage object (types.usage_to_dict), also summed in the totals.
_TOKEN_FIELDS = (
    "inputTokens",
    "outputTokens",
    "totalTokens",
    "cacheReadTokens",
    "cacheWriteTokens",
    "reasoningTokens",
)
_TOTALS = {
    "type": "object",
    "properties": {k: _INT for k in (*_TOKEN_FIELDS, "requestCount", "estimatedCount")} | {"totalCost": _NUM},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "agentspace",
        "version": "1",
        "description": "A self-hosted LLM gateway. Every route but /healthz needs the gateway token "
        "(`agentspace token`) as `Authorization: Bearer <token>`. Errors are "
        "`{error: {code, message}}`. The WebSocket protocol at /gateway is described in SPEC section 3.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Liveness check (no auth).",
                "security": [],
                "responses": {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}})},
            }
        },
        "/gateway": {
            "get": {
                "summary": "WebSocket upgrade for the JSON frame protocol (SPEC section 3).",
                "description": "Authenticate with the Authorization header or a first {type: 'auth', id, token} frame.",
                "security": [],
                "responses": {
                    "101": {"description": "Switching protocols"},
                    "403": _error("Origin or Host not allowed."),
                },
            }
        },
        "/api/chat": {
            "post": {
                "summary": "Chat, streamed as the Vercel AI SDK UI message stream (useChat's default transport).",
                "description": "The last user message is answered. `id` names the session; an unknown id creates it, "
                "importing the earlier messages' text. Frames `data: <chunk>`: start, start-step, "
                "text-start/-delta/-end, reasoning-start/-delta/-end, source-url, tool-input-available, "
                "tool-output-available, tool-output-error, finish-step, abort (aborted answers), "
                "finish {finishReason, messageMetadata: {usage}} or error {errorText}, then `data: [DONE]`.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatRequest")}}},
                "responses": {
                    "200": {
                        "description": "The answer as server-sent events.",
                        "headers": {"x-vercel-ai-ui-message-stream": {"schema": {"const": "v1"}}},
                        "content": _SSE,
                    },
                    "400": _error("INVALID_MESSAGE (with `fields: [{path, message}]`) or MODEL_NOT_FOUND."),
                    **_AUTH_ERRORS,
                    "409": _error("STREAM_IN_PROGRESS: the session is already streaming an answer."),
                    "413": _error("PAYLOAD_TOO_LARGE: the body exceeds [server] max_body_bytes."),
                    "503": _error("SERVICE_UNAVAILABLE: the gateway is shutting down."),
                },
            }
        },
        "/api/chat/{id}/stream": {
            "get": {
                "summary": "Resume the session's running answer, replayed from its first chunk.",
                "parameters": [_SESSION_ID],
                "responses": {
                    "200": {"description": "The answer as server-sent events.", "content": _SSE},
                    "204": {"description": "No answer is streaming in this session."},
                    "400": _error("INVALID_MESSAGE: bad session id."),
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Stop the session's running answer, on whichever replica runs it; what was generated "
                "is kept, marked aborted, and billed.",
                "parameters": [_SESSION_ID],
                "responses": {
                    "204": {"description": "The answer is being stopped."},
                    "404": _error("NOT_FOUND: no answer is streaming in this session."),
                    "400": _error("INVALID_MESSAGE: bad session id."),
                    **_AUTH_ERRORS,
                },
            },
        },
        "/api/sessions": {
            "get": {
                "summary": "Sessions, most recent activity first; with `q`, those whose title or messages contain it.",
                "parameters": [
                    {
                        "name": "q",
                        "in": "query",
                        "schema": _STR,
                        "description": "Search (case-insensitive): the caller's sessions whose title or message text "
                        "contains this phrase, each with `match`, the text around the first hit.",
                    }
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["sessions"],
                            "properties": {"sessions": {"type": "array", "items": _ref("SessionSummary")}},
                        }
                    ),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/api/sessions/{id}": {
            "get": {
                "summary": "A session with its messages.",
                "parameters": [_SESSION_ID],
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["session"], "properties": {"session": _ref("Session")}}
                    ),
                    "400": _error("INVALID_MESSAGE: bad session id."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                },
            },
            "delete": {
                "summary": "Delete a session.",
                "parameters": [_SESSION_ID],
                "responses": {
                    "204": {"description": "Deleted."},
                    "400": _error("INVALID_MESSAGE: bad session id."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                    "409": _error("STREAM_IN_PROGRESS: the session is streaming an answer."),
                },
            },
        },
        "/api/sessions/{id}/context": {
            "get": {
                "summary": "What the next call would send, measured per section (bytes, tokens, cost).",
                "parameters": [
                    _SESSION_ID,
                    {
                        "name": "model",
                        "in": "query",
                        "schema": _STR,
                        "description": "Measure for this model instead of the session's.",
                    },
                    {
                        "name": "userMessage",
                        "in": "query",
                        "schema": _STR,
                        "description": "The message about to be sent, measured as the user_message section.",
                    },
                ],
                "responses": {
                    "200": _json(_ref("ContextInspection")),
                    "400": _error("INVALID_MESSAGE or MODEL_NOT_FOUND."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                },
            },
            "post": {
                "summary": "The same, for a message about to be sent that is too long for a URL.",
                "parameters": [_SESSION_ID],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"model": _STR, "userMessage": _STR}}
                        }
                    }
                },
                "responses": {
                    "200": _json(_ref("ContextInspection")),
                    "400": _error("INVALID_MESSAGE or MODEL_NOT_FOUND."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                },
            },
        },
        "/api/sessions/{id}/compact": {
            "post": {
                "summary": "Summarise every turn but the latest into the session's summary (billed, purpose compact).",
                "parameters": [_SESSION_ID],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "sessionId": _STR,
                                "compacted": _BOOL,
                                "summarizedMessages": _INT,
                                "summary": _STR,
                            },
                        }
                    ),
                    "400": _error("INVALID_MESSAGE: bad session id."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                    "409": _error("STREAM_IN_PROGRESS: the session is streaming an answer."),
                    "502": _error("LLM_ERROR: the summarising call failed."),
                },
            }
        },
        "/api/sessions/{id}/export": {
            "get": {
                "summary": "The session as a download: Markdown (`format=md`, default) or JSON (`format=json`).",
                "parameters": [
                    _SESSION_ID,
                    {"name": "format", "in": "query", "schema": {"enum": ["md", "json"]}},
                ],
                "responses": {
                    "200": {
                        "description": "The document (Content-Disposition: attachment).",
                        "content": {"text/markdown": {"schema": _STR}, "application/json": {"schema": _STR}},
                    },
                    "400": _error("INVALID_MESSAGE: bad session id or format."),
                    **_AUTH_ERRORS,
                    "404": _error("SESSION_NOT_FOUND"),
                },
            }
        },
        "/api/usage": {
            "get": {
                "summary": "Tokens and cost per model (the usage.report shape), per UTC day or per client; a client key gets its own.",
                "parameters": [
                    {
                        "name": "by",
                        "in": "query",
                        "schema": {
                            "enum": ["model", "day", "client", "session", "day-model", "deployment"],
                            "default": "model",
                        },
                    },
                    {"name": "sessionId", "in": "query", "schema": _STR},
                    {
                        "name": "since",
                        "in": "query",
                        "schema": _STR,
                        "description": "A duration ago (30m, 24h, 7d, 2w) or an ISO date/time (UTC unless it has an offset).",
                    },
                ],
                "responses": {
                    "200": _json({"oneOf": [_ref("UsageByModel"), _ref("UsageByDay")]}),
                    "400": _error("INVALID_MESSAGE: bad `by` or `since`."),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/api/models": {
            "get": {
                "summary": "Models usable with the configured keys (as `agentspace models --json`).",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["models"],
                            "properties": {"models": {"type": "array", "items": _ref("Model")}},
                        }
                    ),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/api/deployments": {
            "get": {
                "summary": "Each deployment of the model groups: active or cooling down, in flight, errors, latency.",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["deployments"],
                            "properties": {"deployments": {"type": "array", "items": {"type": "object"}}},
                        }
                    ),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/api/openapi.json": {
            "get": {"summary": "This document.", "responses": {"200": _json({"type": "object"}), **_AUTH_ERRORS}}
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": _STR,
                            "message": _STR,
                            "fields": {
                                "type": "array",
                                "items": {"type": "object", "properties": {"path": _STR, "message": _STR}},
                            },
                        },
                    }
                },
            },
            "ChatRequest": {
                "type": "object",
                "required": ["id", "messages"],
                "properties": {
                    "id": {
                        **_SESSION_ID["schema"],
                        "description": "The chat id; names the session (`threadId` is accepted too).",
                    },
                    "threadId": _STR,
                    "messages": {"type": "array", "minItems": 1, "items": _ref("UIMessage")},
                    "model": {**_STR, "description": "provider/model; default: the session's, else [models] default."},
                    "trigger": {"enum": ["submit-message", "regenerate-message"]},
                },
            },
            "UIMessage": {
                "type": "object",
                "required": ["role", "parts"],
                "properties": {
                    "id": _STR,
                    "role": {"enum": ["user", "assistant", "system"]},
                    "parts": {
                        "type": "array",
                        "items": {"type": "object", "required": ["type"], "properties": {"type": _STR, "text": _STR}},
                    },
                    "metadata": {},
                },
            },
            "SessionSummary": {
                "type": "object",
                "properties": {
                    "id": _STR,
                    "title": _NULLABLE_STR,
                    "model": _STR,
                    "createdAt": _STR,
                    "lastActivityAt": _NULLABLE_STR,
                    "messageCount": _INT,
                    "client": _NULLABLE_STR,
                },
            },
            "Session": {
                "allOf": [
                    _ref("SessionSummary"),
                    {"type": "object", "properties": {"messages": {"type": "array", "items": _ref("Message")}}},
                ]
            },
            "Message": {
                "type": "object",
                "required": ["id", "role", "content", "parts", "createdAt"],
                "properties": {
                    "id": _STR,
                    "role": {"enum": ["user", "assistant"]},
                    "content": _STR,
                    "parts": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {
                                "type": {"enum": ["text", "reasoning", "source", "tool-call", "tool-result"]}
                            },
                        },
                    },
                    "model": _STR,
                    "createdAt": _STR,
                    "completedAt": _STR,
                    "usage": _ref("Usage"),
                    "estimated": _BOOL,
                    "finishReason": _STR,
                    "latencyMs": _NUM,
                    "ttftMs": {"type": ["number", "null"]},
                    "aborted": _BOOL,
                    "error": {"type": "object", "properties": {"code": _STR, "message": _STR}},
                },
            },
            "Usage": {
                "type": "object",
                "properties": {k: _INT for k in _TOKEN_FIELDS}
                | {k: _NUM for k in ("inputCost", "outputCost", "totalCost")}
                | {"priceKnown": _BOOL},
            },
            "ContextInspection": {
                "type": "object",
                "properties": {
                    "sessionId": _STR,
                    "model": _STR,
                    "sections": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": _STR,
                                "byteCount": _INT,
                                "tokenEstimate": _INT,
                                "costEstimate": _NUM,
                                "cache": {"enum": ["read", "write", "read+write", "none"]},
                                "cacheReadTokens": _INT,
                                "cacheWriteTokens": _INT,
                            },
                        },
                    },
                    "totals": {
                        "type": "object",
                        "properties": {
                            "byteCount": _INT,
                            "tokenEstimate": _INT,
                            "costEstimate": _NUM,
                            "promptCache": {"enum": ["auto", "off", "provider"]},
                            "calibratedTokens": _INT,
                            "cacheReadTokens": _INT,
                            "cacheWriteTokens": _INT,
                            "uncachedTokens": _INT,
                            "costWithCache": _NUM,
                            "costWithoutCache": _NUM,
                        },
                    },
                },
            },
            "UsageByModel": {
                "type": "object",
                "required": ["perModel", "grandTotal"],
                "properties": {"perModel": {"type": "object", "additionalProperties": _TOTALS}, "grandTotal": _TOTALS},
            },
            "UsageByDay": {
                "type": "object",
                "required": ["perDay", "grandTotal"],
                "properties": {"perDay": {"type": "object", "additionalProperties": _TOTALS}, "grandTotal": _TOTALS},
            },
            "Model": {
                "type": "object",
                "properties": {
                    "id": _STR,
                    "provider": _STR,
                    "inputPerMTok": _NUM,
                    "outputPerMTok": _NUM,
                    "contextWindow": {"type": ["integer", "null"]},
                    "supportsReasoning": _BOOL,
                    "supportsTools": _BOOL,
                    "deprecationDate": _NULLABLE_STR,
                    "deprecated": _BOOL,
                    "priceKnown": _BOOL,
                    "default": _BOOL,
                },
            },
        },
    },
}
OPENAPI["paths"].update(clients_api.OPENAPI_PATHS)  # /api/clients (SPEC 11)
# The web app's routes (transports.web_app, web_api) are documented here too.
for _path, _operations in web_api.OPENAPI_PATHS.items():
    OPENAPI["paths"].setdefault(_path, {}).update(_operations)
