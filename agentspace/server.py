"""The aiohttp application: routes, middleware, start-up and graceful shutdown.

``create_app`` builds the app (tests drive it with aiohttp's test client); ``run_server`` is what
``agentspace serve`` runs.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import sys
import weakref
from typing import AsyncIterator, Callable

import click
import pluggy
from aiohttp import web

from .config import Config
from .gateway import Gateway
from .gateway_token import TokenFile
from .logs import configure_logging
from .plugins import get_plugin_manager
from .security import AuthFailures, security_middleware
from .stores.files import DataDirLock
from .transports import rest, state, ui_stream, web_app, ws

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(config: Config, pm: pluggy.PluginManager | None = None) -> web.Application:
    pm = pm or get_plugin_manager()
    app = web.Application(
        client_max_size=int(config["server"]["max_body_bytes"]),
        middlewares=[security_middleware(config)],
    )
    app[state.TOKEN_FILE] = TokenFile(config.data_dir)
    app[state.AUTH_FAILURES] = AuthFailures()
    app[state.WEBSOCKETS] = weakref.WeakSet()
    app[state.SHUTTING_DOWN] = asyncio.Event()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/gateway", ws.gateway_handler)
    ui_stream.setup_routes(app)
    rest.setup_routes(app)
    web_app.setup_routes(app)
    app.cleanup_ctx.append(_gateway_context(config, pm))
    app.on_shutdown.append(_finish_streams)
    return app


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


def _gateway_context(config: Config, pm: pluggy.PluginManager):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        lock = DataDirLock(config.data_dir)  # refuses a second server on the same data before binding
        try:
            app[state.TOKEN_FILE].current()  # create the token on first start
            gw = Gateway.create(config, pm)
            app[state.GATEWAY] = gw
            for result in pm.hook.server_startup(app=app, config=config):
                await _maybe_await(result)
            # What start-up loaded lives as long as the server: out of the collector's sight, so that full
            # collections, which walk every tracked object, stay short (about 60 ms each before) while chats run.
            gc.freeze()
            yield
            for result in pm.hook.server_shutdown(app=app, config=config):
                await _maybe_await(result)
            await gw.aclose()
        finally:
            lock.close()

    return context


async def _finish_streams(app: web.Application) -> None:
    """Let running turns finish within the grace period, store the rest as aborted, close sockets.

    ``agentspace serve`` runs this itself before ``runner.cleanup()``: from aiohttp's pre-shutdown on,
    connections drop what clients send (pongs and chat.abort included). Other runners (tests, embedders)
    get it as an on_shutdown handler; it runs once.
    """
    if app[state.SHUTTING_DOWN].is_set():
        return
    app[state.SHUTTING_DOWN].set()  # open connections may not start new turns meanwhile
    gw = app[state.GATEWAY]
    turns = [t for t in gw.active.values() if t.task is not None]
    if turns:
        grace = float(gw.config["server"]["shutdown_grace_seconds"])
        log.info("waiting up to %.0fs for %d running stream(s)", grace, len(turns))
        _, pending = await asyncio.wait([t.task for t in turns if t.task], timeout=grace)
        for t in turns:
            if not t.done:
                t.abort("shutdown")
        if pending:
            await asyncio.wait(pending, timeout=10)
    connections = [*app[state.WEBSOCKETS]]
    await asyncio.gather(*(conn.shutdown() for conn in connections))


def run_server(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    configure_logging(config)
    name, factory = event_loop_factory(config["server"]["event_loop"])
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(config, host or config["server"]["host"], config["server"]["port"] if port is None else port))


def event_loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The ``[server] event_loop`` to run: its name and its factory (None: asyncio's own).

    uvloop's loop (libuv, in C) costs the gateway about 0.25 CPU-ms less per streamed chat than asyncio's
    (``benchmarks/ab.py``): "auto" takes it wherever it is installed."""
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise click.ClickException('[server] event_loop = "uvloop", but uvloop is not installed: pip install uvloop') from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


async def _serve(config: Config, host: str, port: int) -> None:
    app = create_app(config)
    grace = float(config["server"]["shutdown_grace_seconds"])
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=grace + 5, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname() if site._server and site._server.sockets else (host, port)  # type: ignore[union-attr,attr-defined]
        shown_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        url = f"http://{shown_host}:{bound[1]}"
        print(f"agentspace listening on {url}  (WebSocket: ws://{shown_host}:{bound[1]}/gateway)", flush=True)
        print("Clients need the gateway token: run `agentspace token`.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("agentspace shutting down", file=sys.stderr, flush=True)
        await site.stop()  # refuse new connections; open ones keep working through the grace period
        await _finish_streams(app)
    finally:
        await runner.cleanup()
