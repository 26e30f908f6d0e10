"""The aiohttp application: routes, middleware, start-up and graceful shutdown.

``create_app`` builds the app (tests drive it with aiohttp's test client); ``run_server`` is what
``agentspace serve`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import shlex
import signal
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import click
import pluggy
from aiohttp import web

from . import pricing, security, tokens
from .catalog import deprecation_message, is_retired
from .config import Config, ConfigError
from .connections import ConnectionCap
from .default_plugins.storage import open_storage
from .gateway import assemble
from .gateway_token import (
    TOKEN_ENV,
    TokenFile,
    check_secrets,
    give_back_server_address,
    note_token_source,
    replace_server_address,
)
from .logs import configure_logging
from .plugins import check_hooks, get_plugin_manager, plugin_error
from .providers.base import is_builtin
from .registry import ModelNotFound, Registry
from .security import AuthFailures, Handler, security_middleware
from .sinks import CLOSE_SECONDS
from .storage.datadir_lock import DataDirLock, write_server_storage
from .storage.embedded.clients import ClientStore
from .transports import routes, state, ui_stream, ws
from .vault import register_configured_keys

log = logging.getLogger(__name__)


async def recover_calls(gw: Registry) -> None:
    from .calls import recovered_record
    from .storage.ledger import recover

    recovered = await recover(gw, recovered_record)
    if recovered:
        log.warning("posted %d usage records of calls a stopped process left unfinished (recovered: true)", recovered)


async def share_ledger(gw: Registry) -> None:
    from .calls import recovered_record
    from .storage.ledger import share

    await share(gw, recovered_record)


def create_app(config: Config, pm: pluggy.PluginManager | None = None) -> web.Application:
    pm = pm or get_plugin_manager()
    check_hooks(pm)  # plugins registered after the manager was made: a misspelt hook stops the start
    app = web.Application(
        client_max_size=int(config["server"]["max_body_bytes"]),
        middlewares=[security_middleware(config), _v1_calls],
        # Compressed request bodies are inflated by bodies.read_json, on a worker thread and up to the route's
        # limit; aiohttp would inflate them on the event loop as they arrive.
        handler_args={"auto_decompress": False},
    )
    check_secrets(config.data_dir)
    ClientStore(config.data_dir).list_sync()  # a clients file that cannot be trusted stops the start
    app[security.TOKEN_FILE] = TokenFile(config.data_dir)
    app[security.AUTH_FAILURES] = AuthFailures()
    app[state.WEBSOCKETS] = weakref.WeakSet()
    app[state.SHUTTING_DOWN] = asyncio.Event()
    app[state.V1_CALLS] = set()
    app[state.CREDENTIALS_CHANGED] = asyncio.Event()
    routes.install(app, config, pm)  # every route, the plugins' too (transports/routes.py)
    app.cleanup_ctx.append(_gateway_context(config, pm))
    app.on_shutdown.append(_finish_streams)
    return app


async def _shutdown_hooks(pm: pluggy.PluginManager, app: web.Application, config: Config) -> None:
    """Each plugin's ``server_shutdown``, in pluggy's order; one that raises is logged, naming it, and the others
    still run (pluggy would stop at the first exception). One that takes more than ``CLOSE_SECONDS`` is logged
    and left behind, as a sink's ``aclose``: a hanging hook must not keep the server from stopping."""
    given = {"app": app, "config": config}
    for impl in reversed(pm.hook.server_shutdown.get_hookimpls()):
        plugin = pm.get_name(impl.plugin) or impl.plugin_name
        try:
            hook = impl.function(*(given[arg] for arg in impl.argnames))
            await asyncio.wait_for(_maybe_await(hook), CLOSE_SECONDS)
        except TimeoutError:
            log.error("plugin %r took more than %.0fs in server_shutdown; left behind", plugin, CLOSE_SECONDS)
        except Exception:
            log.exception("plugin %r failed in server_shutdown", plugin)


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


def _gateway_context(config: Config, pm: pluggy.PluginManager) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        storage = open_storage(config, pm)
        # Refuses a second server on the same data before binding; a shared database needs no such lock.
        lock = DataDirLock(config.data_dir) if storage.uses_data_dir_lock else None
        try:
            app[security.TOKEN_FILE].current()  # create the token on first start
            await storage.start()
            with contextlib.suppress(OSError):  # for the CLI: where this data directory's server keeps its data
                write_server_storage(config.data_dir, None if storage.uses_data_dir_lock else storage.backend)
            with contextlib.suppress(OSError):  # and where its token comes from
                note_token_source(config.data_dir)
            gw = await assemble(
                config,
                pm,
                storage,
                shutting_down=app[state.SHUTTING_DOWN],  # no provider call is admitted once it is set
                on_credentials_changed=app[state.CREDENTIALS_CHANGED].set,  # another replica's rotation or removal
                stream_encoder=ui_stream.UIMessageStreamEncoder,  # what a resume on another replica relays
                gateway_token=app[security.TOKEN_FILE].current,  # a rotation refuses the old token's next call
            )
            await gw.recorder.start()  # the usage sinks' start and queues
            await recover_calls(gw)  # what a process that died mid-call left pending (docs/accounting.md)
            await share_ledger(gw)  # the postgres backend: pending entries shared, with leases
            check_default_model(gw)  # before anything binds: runs in runner.setup(), the site starts after
            if config.groups:
                from .routing import warn_missing_keys

                warn_missing_keys(config)  # a deployment's vault entry missing: said now, not at its first call
            app[state.REGISTRY] = gw
            tokens.load_in_background()
            watcher = asyncio.create_task(ws.watch_credentials(app), name="agentspace-credentials")
            try:
                for result in pm.hook.server_startup(app=app, config=config):
                    await _maybe_await(result)
            except Exception as e:  # named: the author sees which plugin stopped the start
                raise plugin_error(pm, "server_startup", e) from e
            # What start-up loaded lives as long as the server: out of the collector's sight, so that full
            # collections, which walk every tracked object, stay short (about 60 ms each before) while chats run.
            gc.freeze()
            yield
            watcher.cancel()
            await _shutdown_hooks(pm, app, config)
            await gw.aclose()  # also after a plugin's shutdown failed: the sinks drain, the stores close
        finally:
            if lock is not None:
                lock.close()

    return context


def check_group_models(gw: Registry) -> None:
    """Stop on a model group's deployment or fallback, or a ``[models] fallbacks`` model, that nothing serves
    (a typo), as on the default: else every call drawn to it fails. Checked once the plugins' providers are
    registered (a fallback may be a plugin's model)."""
    called: list[tuple[str, str]] = []
    for name, group in gw.config.groups.items():
        where = f'models.groups."{name}"'
        called += [(f"{where}.deployments[{i}].model", d.model) for i, d in enumerate(group.deployments)]
        called += [(f"{where}.fallbacks", m) for m in group.fallbacks]
    for model, chain in gw.config["models"]["fallbacks"].items():
        called += [(f'models.fallbacks."{model}"', m) for m in [model, *chain]]
    for key, model in called:
        if gw.router.group(model) is None:
            try:
                gw.provider_for(model)
            except ModelNotFound as e:
                raise ConfigError(gw.config.source, key, f"expected a model a provider serves: {e}") from None


def check_default_model(gw: Registry) -> None:
    """Stop on a ``[models] default`` or ``[chat] compact_model`` nothing serves (a config error: a compact model
    that fails would leave every compaction's turns out instead); warn when one is past its date."""
    check_group_models(gw)
    _check_model(gw, gw.default_model, "models.default")
    if gw.config["chat"]["compact_model"]:
        _check_model(gw, str(gw.config["chat"]["compact_model"]), "chat.compact_model")


def _check_model(gw: Registry, model: str, key: str) -> None:
    config = gw.config
    try:
        provider = gw.provider_for(model)
    except ModelNotFound as e:
        raise ConfigError(config.source, key, f"expected a model a provider serves: {e}") from None
    prefix, _, name = model.partition("/")
    settings = config.provider_settings(prefix)
    # The cost map lists every model of the big providers; a name it lacks is a typo, unless the model
    # goes to a custom endpoint (base_url) or the config declares it (pricing or the provider's models).
    declared = model in config.pricing or bool({model, name} & set(settings["models"])) or bool(settings["base_url"])
    if (
        is_builtin(provider)  # a plugin's provider serves what it claims, whatever the cost map lists
        and pricing.cost_entry(model) is None
        and pricing.known_models({prefix})
        and not declared
    ):
        raise ConfigError(
            config.source,
            key,
            f"expected a model litellm's cost map knows (see: agentspace models --all), got {model!r}; "
            f'for a model it does not list yet, add [pricing."{model}"]',
        )
    info = pricing.model_info(config, model)
    if is_retired(info.deprecation_date):
        section, _, option = key.partition(".")
        log.warning(
            "[%s] %s in %s: %s", section, option, config.source, deprecation_message(model, info.deprecation_date)
        )


@web.middleware
async def _v1_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Keep the task of each request that calls a provider outside a turn (a /v1 call, a session's compaction:
    the routes marked ``provider_call``) while it runs, for the shutdown to stop when its grace ends."""
    if request.match_info.route not in request.app[state.PROVIDER_CALL_ROUTES]:
        return await handler(request)
    task = asyncio.current_task()
    assert task is not None
    calls = request.app[state.V1_CALLS]
    calls.add(task)
    try:
        return await handler(request)
    finally:
        calls.discard(task)


def _calls_in_flight(gw: Registry) -> int:
    """Provider calls running (a /v1 call is no turn): their open ledger entries, closed once recorded; not
    the records kept in the spool for a store that refused them (replayed later, not awaited here)."""
    return sum(1 for entry in gw.ledger.open_entries() if "record" not in entry) if len(gw.ledger) else 0


async def _finish_streams(app: web.Application, stop_accepting: Callable[[], None] | None = None) -> None:
    """Let running turns and provider calls finish within the grace period, store the rest as aborted, close
    sockets. Meanwhile every new call is refused with SERVICE_UNAVAILABLE in its API's shape (the admission
    checks); ``stop_accepting`` (closing the listener) runs once the drain is over.

    ``agentspace serve`` runs this itself before ``runner.cleanup()``: from aiohttp's pre-shutdown on,
    connections drop what clients send (pongs and chat.abort included). Other runners (tests, embedders)
    get it as an on_shutdown handler; it runs once.
    """
    if app[state.SHUTTING_DOWN].is_set():
        return
    app[state.SHUTTING_DOWN].set()  # open connections may not start new turns meanwhile
    gw = app[state.REGISTRY]
    turns = [t for t in gw.locks.turns() if t.task is not None]
    grace = float(gw.config["server"]["shutdown_grace_seconds"])
    if turns or _calls_in_flight(gw):
        log.info("waiting up to %.0fs for %d running stream(s)", grace, len(turns) + _calls_in_flight(gw))
        deadline = time.monotonic() + grace
        tasks = [t.task for t in turns if t.task]
        pending = set(tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        while _calls_in_flight(gw) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in turns:
            if not t.done:
                t.abort("shutdown")
        # A /v1 call still running is stopped as its client leaving stops it (recorded as aborted), now: not
        # when aiohttp's shutdown cancels it, after the sinks and stores closed under it.
        calls = [task for task in app[state.V1_CALLS] if not task.done()]
        for task in calls:
            task.cancel()
        pending |= set(calls)
        if pending:
            await asyncio.wait(pending, timeout=10)
    if stop_accepting is not None:
        stop_accepting()
    connections = [*app[state.WEBSOCKETS]]
    await asyncio.gather(*(conn.shutdown() for conn in connections))


def run_server(config: Config, host: str | None = None, port: int | None = None, reuse_port: bool = False) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. ``reuse_port``: share the port with the
    other workers of ``agentspace serve --workers N`` (SO_REUSEPORT: the kernel spreads connections)."""
    configure_logging(config)
    register_configured_keys(config)
    name, factory = event_loop_factory(config["server"]["event_loop"])
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(
            _serve(
                config,
                host or config["server"]["host"],
                config["server"]["port"] if port is None else port,
                reuse_port,
            )
        )


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
            raise click.ClickException(
                '[server] event_loop = "uvloop", but uvloop is not installed: pip install uvloop'
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def _say(line: str) -> None:
    """A line on stdout in one write: the workers of ``serve --workers N`` share the supervisor's stdout, and
    ``print`` writes the text and its newline apart when stdout is unbuffered (PYTHONUNBUFFERED), so two
    workers' banners could interleave mid-line. One write of less than PIPE_BUF bytes to a pipe is atomic."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _serve(config: Config, host: str, port: int, reuse_port: bool = False) -> None:
    app = create_app(config)
    grace = float(config["server"]["shutdown_grace_seconds"])
    # keepalive_timeout is also how long a new connection may take to send its first request's headers
    # (aiohttp starts it when the connection opens): the header deadline, short enough that slow-header
    # clients cannot pile up. Kept-alive connections idle that long are closed too.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=grace + 5,
        access_log=None,
        keepalive_timeout=float(config["server"]["header_timeout_seconds"]),
    )
    await runner.setup()
    listener: asyncio.Server | None = None
    address: str | None = None
    address_before: str | None = None
    try:
        assert runner.server is not None
        # Our own listener instead of web.TCPSite, for a protocol factory that caps open connections.
        cap = ConnectionCap(runner.server, int(config["server"]["max_connections"]))
        listener = await asyncio.get_running_loop().create_server(
            cap, host, port, backlog=128, reuse_port=reuse_port or None
        )
        bound = listener.sockets[0].getsockname() if listener.sockets else (host, port)
        shown_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        url = f"http://{shown_host}:{bound[1]}"
        # Before the banner: whoever waits for it may stop the server at once, and gets a graceful shutdown.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # `agentspace chat` and `ask` dial the address this data directory's server last announced: written
        # before the banner, so that whoever waits for the banner finds it.
        address = f"ws://{shown_host}:{bound[1]}/gateway"
        with contextlib.suppress(OSError):
            address_before = replace_server_address(config.data_dir, address)
        _say(f"agentspace listening on {url}  (WebSocket: ws://{shown_host}:{bound[1]}/gateway)")
        if os.environ.get(TOKEN_ENV):
            _say(f"Clients need the gateway token: the value of {TOKEN_ENV}.")
        else:
            # With the config this server read, so that the token comes from this server's data directory.
            source = Path(config.source)
            with_config = f" --config {shlex.quote(str(source.resolve()))}" if source.is_file() else ""
            _say(f"Clients need the gateway token: run `agentspace token{with_config}`.")
        await stop.wait()
        print("agentspace shutting down", file=sys.stderr, flush=True)
        # New calls are refused in their API's shape (503) while running ones finish; then the listener closes.
        await _finish_streams(app, listener.close)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        if address is not None:
            with contextlib.suppress(OSError):
                give_back_server_address(config.data_dir, address, address_before)
