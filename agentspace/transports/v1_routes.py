"""The routes of the drop-in ``/v1`` APIs (SPEC section 10) and their OpenAPI description."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..providers.upstream_http import close_http_client
from . import rest, v1_anthropic, v1_embeddings, v1_models, v1_openai, v1_responses


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", v1_anthropic.messages)
    app.router.add_post("/v1/messages/count_tokens", v1_anthropic.count_tokens)
    app.router.add_post("/v1/chat/completions", v1_openai.chat_completions)
    app.router.add_post("/v1/responses", v1_responses.responses)
    app.router.add_post("/v1/embeddings", v1_embeddings.embeddings)
    app.router.add_get("/v1/models", v1_models.list_models)
    app.on_cleanup.append(close_http_client)
    # /api/openapi.json documents every route.
    rest.OPENAPI["paths"].update(OPENAPI_PATHS)
    rest.OPENAPI["components"]["securitySchemes"]["apiKey"] = {"type": "apiKey", "in": "header", "name": "x-api-key"}


def _v1_op(summary: str, description: str, *, body: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "description": description + " Auth: `Authorization: Bearer <token>` or `x-api-key: <token>`; "
        "`X-Agentspace-Session` (or `X-Claude-Code-Session-Id`) files the usage under that session id. "
        "Errors come in that API's own shape and status.",
        "security": [{"bearer": []}, {"apiKey": []}],
        "responses": {
            "200": {"description": "As the provider's API answers (JSON, or server-sent events when streamed)."},
            "401": {"description": "No or wrong token."},
        },
    }
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    return op


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/messages": {
        "post": _v1_op(
            "Anthropic Messages API, drop-in (stream and not).",
            "Anthropic models (`claude-*`, `anthropic/*`) are passed through with the client's anthropic-version and "
            "anthropic-beta headers, the upstream's events relayed unchanged; other models are translated.",
        )
    },
    "/v1/messages/count_tokens": {
        "post": _v1_op(
            "Anthropic token counting.",
            "Anthropic's count; else a local count of system, messages and tools, marked `x-agentspace-estimated: true`.",
        )
    },
    "/v1/chat/completions": {
        "post": _v1_op(
            "OpenAI Chat Completions API, drop-in (stream and not), for every model.",
            "The usage chunk comes with `stream_options.include_usage`.",
        )
    },
    "/v1/responses": {
        "post": _v1_op(
            "OpenAI Responses API, drop-in (stream and not), for every model; stateless.",
            "Function tools, structured output (`text.format`), reasoning summaries; `previous_response_id` is "
            "refused (the gateway stores no responses: send the whole `input`, with `store: false`).",
        )
    },
    "/v1/embeddings": {
        "post": _v1_op(
            "OpenAI Embeddings API, drop-in, for every embedding model litellm serves.",
            "Counted once per call: the input tokens, endpoint `embeddings`.",
        )
    },
    "/v1/models": {
        "get": _v1_op(
            "The models the caller may use.",
            "OpenAI's list shape; Anthropic's when the request has anthropic-version.",
            body=False,
        )
    },
}
