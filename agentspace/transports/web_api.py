"""Two HTTP routes the web app needs and the rest of the API lacks.

- ``DELETE /api/chat/{id}/stream``: stop the session's running answer (``chat.abort`` semantics: what was
  generated is kept, stored with ``aborted: true``, and billed). A browser's stop cannot be the fetch's
  abort alone: the gateway finishes an answer whose client went away (``[chat] on_disconnect``).
- ``PATCH /api/sessions/{id}`` with ``{"title": "..."}``: rename a session.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import security
from ..service import Service
from . import state
from .ui_stream import read_json


def _service(request: web.Request) -> Service:
    """The service for the request's caller (the admin, or a client that sees only its own data)."""
    return state.service(request.app, security.caller(request))


async def stop_stream(request: web.Request) -> web.Response:
    await _service(request).stop_answer(request.match_info["id"])
    return web.Response(status=204)


async def rename_session(request: web.Request) -> web.Response:
    body = await read_json(request)
    title = body.get("title") if isinstance(body, dict) else None
    return web.json_response({"session": await _service(request).rename_session(request.match_info["id"], title)})


def setup_routes(app: web.Application) -> None:
    app.router.add_delete("/api/chat/{id}/stream", stop_stream)
    app.router.add_patch("/api/sessions/{id}", rename_session)


# --- their OpenAPI entries (merged into rest.OPENAPI), with the web app's page and files -----------------


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
    "description": "Session id (the chat id).",
}
_AUTH = {"401": _error("No or wrong gateway token."), "403": _error("Origin or Host not allowed.")}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/": {
        "get": {
            "summary": "The web app (no token: it signs in itself).",
            "security": [],
            "responses": {
                "200": {"description": "index.html", "content": {"text/html": {"schema": {"type": "string"}}}}
            },
        }
    },
    "/assets/{version}/{name}": {
        "get": {
            "summary": "The web app's files, cached for a year under the version index.html names.",
            "security": [],
            "parameters": [
                {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "The file."}, "404": _error("No such file in this version.")},
        }
    },
    "/api/chat/{id}/stream": {
        "delete": {
            "summary": "Stop the session's running answer (chat.abort): what was generated is kept, stored as aborted.",
            "parameters": [_ID],
            "responses": {
                "204": {"description": "Stopped; the stream ends with an abort chunk."},
                "400": _error("INVALID_MESSAGE: bad session id."),
                **_AUTH,
                "404": _error("NOT_FOUND: no answer is streaming in this session."),
            },
        }
    },
    "/api/sessions/{id}": {
        "patch": {
            "summary": "Rename a session.",
            "parameters": [_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["title"],
                            "properties": {"title": {"type": "string", "minLength": 1}},
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "The session's summary.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"session": {"$ref": "#/components/schemas/SessionSummary"}},
                            }
                        }
                    },
                },
                "400": _error("INVALID_MESSAGE: bad id or title."),
                **_AUTH,
                "404": _error("SESSION_NOT_FOUND"),
            },
        }
    },
}
