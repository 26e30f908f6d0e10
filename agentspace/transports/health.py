"""``GET /healthz``: whether this replica can serve (its storage and Redis answer), without a credential."""

from __future__ import annotations

from aiohttp import web

from . import state


async def healthz(request: web.Request) -> web.Response:
    """``{"status": "ok" | "unavailable" | "shutting down"}`` (``Service.health``); 503 unless "ok" (not ready to
    serve: docs/deploy.md)."""
    body = await state.service(request.app).health()
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)
