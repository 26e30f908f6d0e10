"""Errors of the drop-in ``/v1`` endpoints in the shape of the API each request speaks: the ``/v1`` clients
(the anthropic and openai SDKs, Claude Code) parse their own shape only."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ..protocols import anthropic_messages, openai_chat

# OpenAI's routes for stored responses (retrieve, delete, cancel, input items) and for compaction. The gateway
# serves none: it stores no responses (every /v1/responses call is stateless, ``store: false``), and a client
# that asks is told so rather than "No route".
_STORED_RESPONSE_ROUTES = (
    ("GET", re.compile(r"/v1/responses/(?P<id>[^/]+)")),
    ("DELETE", re.compile(r"/v1/responses/(?P<id>[^/]+)")),
    ("POST", re.compile(r"/v1/responses/(?P<id>[^/]+)/cancel")),
    ("GET", re.compile(r"/v1/responses/(?P<id>[^/]+)/input_items")),
    ("POST", re.compile(r"/v1/responses/compact")),
)
NO_STORED_RESPONSES = (
    "this gateway stores no responses (store is not supported: every call is stateless, as Codex's store: false "
    "asks). Send the whole conversation in `input` of POST /v1/responses."
)


def stored_response_problem(request: web.Request) -> str | None:
    """The 404's message for a route of OpenAI's stored responses (which the gateway has not), else None."""
    for method, path in _STORED_RESPONSE_ROUTES:
        if request.method == method and (match := path.fullmatch(request.path)) is not None:
            if "id" not in match.groupdict():
                return f"Compaction is not supported: {NO_STORED_RESPONSES}"
            return f"Response {match['id'][:100]!r} not found: {NO_STORED_RESPONSES}"
    return None


def wants_anthropic_shape(request: web.Request) -> bool:
    """Anthropic's shapes for /v1/messages*, and for /v1/models* when the client sent anthropic-version."""
    if request.path.startswith("/v1/messages"):
        return True
    return request.path.startswith("/v1/models") and "anthropic-version" in request.headers


def error_response(
    request: web.Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    openai_type: str | None = None,
) -> web.Response:
    """An error in the shape of the API the request speaks (the /v1 clients parse their own shape only);
    ``openai_type``: OpenAI's error type where the status's is not it (a rate limit on tokens)."""
    if wants_anthropic_shape(request):
        body: dict[str, Any] = anthropic_messages.error_body(status, message)
    else:
        body = openai_chat.error_body(status, message, code=code, error_type=openai_type)
    return web.json_response(body, status=status, headers=headers)
