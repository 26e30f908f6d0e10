"""Typed application state shared by the transports (aiohttp ``AppKey``s instead of globals)."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from aiohttp import web

from ..config import Config
from ..registry import Registry
from ..service import Service

# The gateway token and the failed-auth table are keys of their owner, ``security``.
REGISTRY = web.AppKey("registry", Registry)
WEBSOCKETS = web.AppKey[weakref.WeakSet[Any]]("websockets")  # the open ws.Connection objects
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)  # set when shutdown begins: no new turns
# The tasks of the requests running on a route that calls a provider outside a turn (``routes.Route.provider_call``:
# the /v1 calls, a session's compaction), and of a WebSocket's ``session.compact``: stopped when the shutdown's
# grace ends, as the turns are.
V1_CALLS = web.AppKey[set["asyncio.Task[Any]"]]("v1_calls")
PROVIDER_CALL_ROUTES = web.AppKey("provider_call_routes", frozenset)
# Set when a key or the gateway token was rotated or removed: open sockets are checked at once.
CREDENTIALS_CHANGED = web.AppKey("credentials_changed", asyncio.Event)


def config(app: web.Application) -> Config:
    """The gateway's settings (what the transports read before a request reaches the service)."""
    return app[REGISTRY].config


def service(app: web.Application, caller: str = "admin", credential: str | None = None) -> Service:
    """The service layer over the app's registry for ``caller`` ("admin" or a client's name; cheap: a
    transport makes one per request or connection); ``credential``: the SHA-256 of the caller's client key."""
    return Service(app[REGISTRY], app[SHUTTING_DOWN], caller, credential)
