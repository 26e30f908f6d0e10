"""Two HTTP routes the web app needs and the rest of the API lacks.

- ``DELETE /api/chat/{id}/stream``: stop the session's running answer (``chat.abort`` semantics: what was
  generated is kept, stored with ``aborted: true``, and billed). A browser's stop cannot be the fetch's
  abort alone: the gateway finishes an answer whose client went away (``[chat] on_disconnect``).
- ``PATCH /api/sessions/{id}`` with ``{"title": "..."}``: rename a session.
"""

from __future__ import annotations

from aiohttp import web

from ..security import error_response
from ..stores.sessions import TITLE_LENGTH, SessionNotFound
from . import state
from .ui_stream import BadRequest, checked_session_id, invalid, read_json

# Longer than the titles made from a first message, still one line in a sidebar.
MAX_TITLE_LENGTH = 4 * TITLE_LENGTH


async def stop_stream(request: web.Request) -> web.Response:
    try:
        session_id = checked_session_id(request.match_info["id"])
    except BadRequest as e:
        return e.response()
    turn = request.app[state.GATEWAY].active.get(session_id)
    if turn is None or turn.done:
        return error_response(404, "NOT_FOUND", f"No answer is streaming in session {session_id!r}.")
    turn.abort()
    return web.Response(status=204)


async def rename_session(request: web.Request) -> web.Response:
    try:
        session_id = checked_session_id(request.match_info["id"])
        body = await read_json(request)
        title = body.get("title") if isinstance(body, dict) else None
        if not isinstance(title, str) or not title.strip():
            raise invalid([{"path": "title", "message": "required: a non-empty string"}])
        title = " ".join(title.split())
        if len(title) > MAX_TITLE_LENGTH:
            raise invalid([{"path": "title", "message": f"at most {MAX_TITLE_LENGTH} characters"}])
    except BadRequest as e:
        return e.response()
    sessions = request.app[state.GATEWAY].sessions
    try:
        await sessions.set_title(session_id, title)
    except SessionNotFound:
        return error_response(404, "SESSION_NOT_FOUND", f"No session {session_id!r}.")
    return web.json_response({"session": {k: v for k, v in (await sessions.get(session_id) or {}).items() if k != "messages"}})


def setup_routes(app: web.Application) -> None:
    app.router.add_delete("/api/chat/{id}/stream", stop_stream)
    app.router.add_patch("/api/sessions/{id}", rename_session)
