"""What the Anthropic pass-through needs of the aiohttp app and of the client's request: the one upstream HTTP
client of a server (its connection pool, closed with the app), and a watch on the client going away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

# The upstream HTTP client of the pass-through: one connection pool per server, closed with the app.
HTTP_CLIENT = web.AppKey("v1_http_client", aiohttp.ClientSession)


def http_client(app: web.Application) -> aiohttp.ClientSession:
    client = app.get(HTTP_CLIENT)
    if client is None or client.closed:
        # No total timeout: a long answer streams as long as it keeps sending (each read has its own limit).
        client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=True)
        app[HTTP_CLIENT] = client
    return client


async def close_http_client(app: web.Application) -> None:
    client = app.get(HTTP_CLIENT)
    if client is not None:
        await client.close()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def answers_shutdown(request: web.Request) -> bool:
    """Called where a handler catches ``asyncio.CancelledError`` (its call recorded first): whether the server's
    shutdown stopped it, at the end of ``[server] shutdown_grace_seconds``, and so it answers its client (a 503,
    or its API's error end) instead of re-raising. A cancel while the client is still there is the server's (a
    client that leaves closes its transport first). If so, the task goes on: its cancel is taken back."""
    if client_gone(request):
        return False
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()
    return True


# How often a stream checks that its client is still there while the upstream sends nothing.
DISCONNECT_CHECK_SECONDS = 0.5


def watch_client(request: web.Request, on_gone: Callable[[], object]) -> Callable[[], None]:
    """Call ``on_gone`` once the client has gone, also while the upstream sends nothing (a write to a
    closed client fails, but only when there is something to write). Returns what stops watching."""
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle

    def check() -> None:
        nonlocal timer
        if client_gone(request):
            on_gone()
        else:
            timer = loop.call_later(DISCONNECT_CHECK_SECONDS, check)

    timer = loop.call_later(DISCONNECT_CHECK_SECONDS, check)
    return lambda: timer.cancel()
