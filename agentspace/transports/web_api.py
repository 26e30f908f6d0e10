"""Two HTTP routes the web app needs and the rest of the API lacks.

- ``DELETE /api/chat/{id}/stream``: stop the session's running answer (``chat.abort`` semantics: what was
  generated is kept, stored with ``aborted: true``, and billed). A browser's stop cannot be the fetch's
  abort alone: the gateway finishes an answer whose client went away (``[chat] on_disconnect``).
- ``PATCH /api/sessions/{id}`` with ``{"title": "..."}``: rename a session.
"""

from __future__ import annotations

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
