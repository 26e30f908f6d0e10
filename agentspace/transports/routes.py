"""Every HTTP route of the gateway, in one table, and the one function that adds routes to the app.

A route is a method, a path, its handler, who may call it (``Auth``) and whether it calls a provider outside
a turn (``provider_call``: the shutdown stops it when its grace ends, as it stops the turns). ``install`` adds
the table's routes, then the plugins' (the ``register_routes`` hook; the built-in ``/metrics`` is one):
nothing else adds routes. The routes are documented in ``agentspace/openapi.yaml`` (data, not code), served as
JSON at ``GET /api/openapi.json``; ``tests/test_routes.py`` checks that the table, the running app and the
document agree, methods, auth and enums included. The WebSocket at ``/gateway`` is described in docs/protocol.md.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import pluggy
from aiohttp import web

from .. import security
from ..config import Config
from ..providers.upstream_http import close_http_client
from . import (
    bodies,
    clients_api,
    health,
    rest,
    state,
    ui_stream,
    v1_anthropic,
    v1_embeddings,
    v1_models,
    v1_openai,
    v1_responses,
    web_api,
    web_app,
    ws,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Auth(enum.StrEnum):
    """Who may call a route. ``security.security_middleware`` enforces it by path (``/api/deployments`` in its
    handler); tests/test_routes.py checks that what it enforces is this column."""

    NONE = "none"  # no credential: the health check, the web app's page and files
    SELF = "self"  # the handler authenticates: the WebSocket takes the header or a first auth frame
    CALLER = "caller"  # the gateway token or a client key (a client sees its own data only)
    ADMIN = "admin"  # the gateway token only


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: Auth
    provider_call: bool = False


def table() -> list[Route]:
    """The gateway's own routes. The web app's files are read here, once."""
    site = web_app.WebApp()
    a = Auth
    return [
        Route("GET", "/healthz", health.healthz, a.NONE),
        Route("GET", "/gateway", ws.gateway_handler, a.SELF),
        # The Vercel AI SDK's chat transport (docs/protocol.md#the-ui-message-stream)
        Route("POST", "/api/chat", ui_stream.chat_handler, a.CALLER),
        Route("GET", "/api/chat/{id}/stream", ui_stream.resume_handler, a.CALLER),
        Route("DELETE", "/api/chat/{id}/stream", web_api.stop_stream, a.CALLER),
        # Sessions, context, usage, models
        Route("GET", "/api/sessions", rest.list_sessions, a.CALLER),
        Route("GET", "/api/sessions/{id}", rest.get_session, a.CALLER),
        Route("PATCH", "/api/sessions/{id}", web_api.rename_session, a.CALLER),
        Route("DELETE", "/api/sessions/{id}", rest.delete_session, a.CALLER),
        Route("GET", "/api/sessions/{id}/context", rest.session_context, a.CALLER),
        Route("POST", "/api/sessions/{id}/context", rest.session_context_for_draft, a.CALLER),
        Route("POST", "/api/sessions/{id}/compact", rest.compact_session, a.CALLER, provider_call=True),
        Route("GET", "/api/sessions/{id}/export", rest.export_session, a.CALLER),
        Route("GET", "/api/usage", rest.usage, a.CALLER),
        Route("GET", "/api/models", rest.models, a.CALLER),
        Route("GET", "/api/deployments", rest.deployments, a.ADMIN),
        Route("GET", "/api/openapi.json", openapi, a.CALLER),
        # Client keys, budgets and limits (README.md#teams-and-budgets)
        Route("GET", "/api/clients", clients_api.list_clients, a.ADMIN),
        Route("POST", "/api/clients", clients_api.create_client, a.ADMIN),
        Route("GET", "/api/clients/{name}", clients_api.get_client, a.ADMIN),
        Route("PATCH", "/api/clients/{name}", clients_api.update_client, a.ADMIN),
        Route("DELETE", "/api/clients/{name}", clients_api.delete_client, a.ADMIN),
        Route("POST", "/api/clients/{name}/rotate", clients_api.rotate_client, a.ADMIN),
        # The drop-in provider APIs (README.md#use-it-from-your-tools)
        Route("POST", "/v1/messages", v1_anthropic.messages, a.CALLER, provider_call=True),
        Route("POST", "/v1/messages/count_tokens", v1_anthropic.count_tokens, a.CALLER, provider_call=True),
        Route("POST", "/v1/chat/completions", v1_openai.chat_completions, a.CALLER, provider_call=True),
        Route("POST", "/v1/responses", v1_responses.responses, a.CALLER, provider_call=True),
        Route("POST", "/v1/embeddings", v1_embeddings.embeddings, a.CALLER, provider_call=True),
        Route("GET", "/v1/models", v1_models.list_models, a.CALLER),
        Route("GET", "/v1/models/{id:.+}", v1_models.get_model, a.CALLER),  # ids hold a "/"
        # The web app (README.md#web-app)
        Route("GET", "/", site.index_handler, a.NONE),
        Route("GET", "/assets/{version}/{name:.+}", site.asset_handler, a.NONE),
    ]


def install(app: web.Application, config: Config, pm: pluggy.PluginManager) -> None:
    """Add every route: the table's, then the plugins'; and what the routes share (JSON errors, CORS)."""
    rest.install_errors_and_cors(app)
    bodies.install(app)
    calls = set()
    for route in table():
        if route.method == "GET":  # and HEAD, as aiohttp's add_get (uptime monitors probe /healthz with HEAD)
            added = app.router.add_get(route.path, route.handler)
        else:
            added = app.router.add_route(route.method, route.path, route.handler)
        if route.provider_call:
            calls.add(added)
    app[state.PROVIDER_CALL_ROUTES] = frozenset(calls)
    app.on_cleanup.append(close_http_client)  # the /v1 relays' HTTP client
    ours = set(app.router.routes())
    pm.hook.register_routes(app=app, config=config)
    app[security.PLUGIN_ROUTES] = frozenset(r for r in app.router.routes() if r not in ours)


# --- the OpenAPI document ------------------------------------------------------------------------


@functools.cache
def document() -> dict[str, Any]:
    """``agentspace/openapi.yaml``, read once, when first asked for (yaml is not imported before)."""
    import yaml

    text = (files("agentspace") / "openapi.yaml").read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc: dict[str, Any] = yaml.load(text, Loader=loader)
    return doc


def served_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, paths as the document writes them."""
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def served_document(app: web.Application) -> dict[str, Any]:
    """The document without the operations of plugin routes this gateway does not serve (``x-plugin``:
    ``/metrics`` when the metrics plugin is not loaded)."""
    doc = document()
    served = served_operations(app)
    paths: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        kept = {method: op for method, op in operations.items() if (method, path) in served or "x-plugin" not in op}
        if kept:
            paths[path] = kept
    return {**doc, "paths": paths}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(served_document(request.app))
