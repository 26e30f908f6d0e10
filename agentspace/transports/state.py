"""Typed application state shared by the transports (aiohttp ``AppKey``s instead of globals)."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from aiohttp import web

from ..gateway import Gateway
from ..gateway_token import TokenFile
from ..security import AuthFailures
from ..service import Service

GATEWAY = web.AppKey("gateway", Gateway)
TOKEN_FILE = web.AppKey("token_file", TokenFile)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)
WEBSOCKETS = web.AppKey[weakref.WeakSet[Any]]("websockets")  # the open ws.Connection objects
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)  # set when shutdown begins: no new turns


def service(app: web.Application) -> Service:
    """The service layer over the app's gateway (cheap: a transport makes one per request or connection)."""
    return Service(app[GATEWAY], app[SHUTTING_DOWN])
