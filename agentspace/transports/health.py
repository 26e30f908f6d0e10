"""``GET /healthz``: whether this replica can serve (its storage and Redis answer), without a credential."""

from __future__ import annotations

from aiohttp import web

from . import state

# How long /healthz waits for Redis to answer a PING.
HEALTH_REDIS_SECONDS = 2.0


async def healthz(request: web.Request) -> web.Response:
    """``{"status": "ok" | "unavailable" | "shutting down"}``, with ``database`` and ``redis`` ("ok" or the reason) where the
    gateway uses them; 503 when one cannot be reached (not ready to serve: docs/deploy.md)."""
    gw = request.app.get(state.REGISTRY)
    body: dict[str, str] = {"status": "ok"}
    if request.app[state.SHUTTING_DOWN].is_set():  # draining: a load balancer sends new calls elsewhere
        return web.json_response({"status": "shutting down"}, status=503)
    if gw is not None and gw.storage is not None:
        problem = await gw.storage.health()
        if problem is not None:
            body.update(status="unavailable", storage=problem)
        if gw.storage.shared:
            body["database"] = problem or "ok"
    if gw is not None and gw.cluster is not None:
        problem = await gw.cluster.health(HEALTH_REDIS_SECONDS)
        body["redis"] = problem or "ok"
        if problem is not None:
            body["status"] = "unavailable"
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)
