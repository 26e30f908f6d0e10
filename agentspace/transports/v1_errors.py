"""Errors of the drop-in ``/v1`` endpoints in the shape of the API each request speaks: the ``/v1`` clients
(the anthropic and openai SDKs, Claude Code) parse their own shape only."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..protocols import anthropic_messages, openai_chat


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
