"""Every extension point of agentspace (docs/plugins.md), in one place.

Plugins implement these with ``@agentspace.hookimpl``. Hooks named ``register_<thing>`` receive a
``register`` callback and call it once per thing they provide, so one plugin can add several.
Built-in plugins implement the same hooks; see ``agentspace.plugins.DEFAULT_PLUGINS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click
    from aiohttp import web

    from .config import Config
    from .observe import CallInfo, TurnInfo
    from .providers.base import Provider
    from .sinks import UsageSink
    from .storage.protocols import StorageBackend
    from .types import ContextSectionBuilder, Tool, UsageRecord

hookspec = pluggy.HookspecMarker("agentspace")
hookimpl = pluggy.HookimplMarker("agentspace")


@hookspec
def register_providers(register: Callable[[Provider], None], config: Config) -> None:
    """Register model providers. For a model id, the first provider whose ``claims(id)`` is true serves it.

    :param register: call with each ``Provider`` instance.
    :param config: the loaded configuration (``config.plugin_settings(name)`` for your own table).
    """


@hookspec
def register_context_sections(register: Callable[[ContextSectionBuilder], None], config: Config) -> None:
    """Register context sections (memory, skills, ...) that are added to the system prompt of every call.

    :param register: call with objects that have ``name`` and ``build(request) -> str`` (sync or async).
    :param config: the loaded configuration.
    """


@hookspec
def register_tools(register: Callable[[Tool], None], config: Config) -> None:
    """Register tools the model may call in the agent loop.

    :param register: call with each ``agentspace.Tool`` (name, description, JSON-schema input, async handler).
    :param config: the loaded configuration.
    """


@hookspec(firstresult=True)
def formatting_prompt(config: Config, model: str) -> str | None:
    """Return the response formatting prompt appended to every call (the ``response_format`` section).

    Stops at first non-None result; the built-in one runs last, so any plugin can replace it.
    Return ``""`` to send no formatting prompt.

    :param config: the loaded configuration.
    :param model: the model id the call goes to.
    """


@hookspec
def register_usage_sinks(register: Callable[[UsageSink], None], config: Config) -> None:
    """Register usage sinks. Every usage record (one per provider call) is sent to every sink.

    Each sink gets the records from a queue of its own, after the turn's end was sent; an exception from
    ``record`` makes the gateway retry the record with backoff (``agentspace.DropRecord``: never). A sink may
    define ``async start()`` (server start) and ``async aclose()`` (shutdown, after its queue drained).
    Delivery is at-least-once while the process lives (docs/plugins.md, "Delivery").

    :param register: call with objects that have ``name`` and ``async record(record: UsageRecord)``.
    :param config: the loaded configuration.
    """


@hookspec
def register_storage_backends(register: Callable[[StorageBackend], None], config: Config) -> None:
    """Register storage backends; ``[storage] backend`` chooses one by its ``name``.

    :param register: call with objects that have ``name`` and ``open(config) -> agentspace.storage.protocols.Storage``
        (a session store and a usage store speaking the protocols of ``agentspace.storage.protocols``).
    :param config: the loaded configuration.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``agentspace`` CLI.

    :param cli: the top-level click group; use ``@cli.command()`` on your functions.
    """


@hookspec
def register_routes(app: web.Application, config: Config) -> None:
    """Add HTTP routes to the server (``app.router.add_get(...)``), before it starts.

    Every route needs the gateway token, checked by the server before your handler runs (``/metrics`` is
    open when ``[metrics] public = true``). Reach the running gateway in a handler through
    ``request.app``.

    :param app: the aiohttp application, routes not yet frozen.
    :param config: the loaded configuration.
    """


@hookspec
def server_startup(app: web.Application, config: Config) -> Awaitable[None] | None:
    """Called once when ``agentspace serve`` has started, before it accepts connections.

    May return an awaitable, which is awaited. Use it to open clients or start background tasks.

    :param app: the aiohttp application (add routes only before startup; use it to store state).
    :param config: the loaded configuration.
    """


@hookspec
def server_shutdown(app: web.Application, config: Config) -> Awaitable[None] | None:
    """Called once when the server shuts down, after streams ended and before stores close.

    May return an awaitable, which is awaited.

    :param app: the aiohttp application.
    :param config: the loaded configuration.
    """


@hookspec
def turn_started(turn: TurnInfo) -> None:
    """A chat turn (WebSocket or ``/api/chat``) started; its provider calls follow (``provider_call_started``).

    Called on the event loop before the first provider call: keep it fast (no I/O). Use ``turn.state`` for
    what you keep until ``turn_finished`` (e.g. a tracing span).

    :param turn: an ``agentspace.observe.TurnInfo`` (session, model, client, endpoint, the answer's id).
    """


@hookspec
def turn_finished(turn: TurnInfo, finish_reason: str, error: str | None) -> None:
    """A chat turn ended, after its answer and usage records were stored. Called once per ``turn_started``.

    :param turn: the ``TurnInfo`` given to ``turn_started``.
    :param finish_reason: ``stop``, ``length``, ``tool-calls``, ``aborted``, ``error``, ...
    :param error: the error code when the turn ended in an error, else None.
    """


@hookspec
def provider_call_started(call: CallInfo) -> None:
    """A provider call starts: a step of a turn (``call.turn`` set) or a ``/v1`` request.

    Called when the call's first attempt goes upstream; retries and fallbacks belong to the call. Called on
    the event loop: keep it fast (no I/O).

    :param call: an ``agentspace.observe.CallInfo`` (requested model, session, client, endpoint; the prompt
        in ``system``/``messages`` for the turns' calls).
    """


@hookspec
def provider_call_finished(call: CallInfo, record: UsageRecord) -> None:
    """A provider call ended with its one usage record (the record is also sent to every usage sink).

    Called once per ``provider_call_started``, however the call ended (answer, error, abort).

    :param call: the ``CallInfo`` given to ``provider_call_started``; ``answer`` holds the answer's text when
        the gateway saw it.
    :param record: the call's ``UsageRecord`` (model that answered, tokens, cost, error, attempts, ttft).
    """


@hookspec
def store_written(store: str, seconds: float) -> None:
    """A write the server waited for reached its store: the usage records of the store of record and the
    metrics sink (``usage:<sink name>``; queued sinks are not waited for) and the answers of turns
    (``sessions``). ``seconds`` is how long the caller waited, queueing included.

    Called on the event loop after every such write, failed ones too: keep it fast (no I/O).

    :param store: which store: ``sessions`` or ``usage:<sink name>``.
    :param seconds: the time the write took, as its caller saw it.
    """


@hookspec
def budget_threshold(
    client: str,
    threshold: float,
    spend_usd: float,
    budget_usd: float,
    period: str,
    period_start: str | None,
    period_end: str | None,
    config: Config,
) -> Awaitable[None] | None:
    """A client's spend in its budget period reached ``threshold`` (a fraction of its budget, from
    ``[alerts] thresholds``). Called once per client, threshold, budget and period across every replica, right after
    the usage record that reached it was written; may be ``async`` (it runs apart from the turn).

    :param client: the client's name.
    :param threshold: the fraction reached, e.g. 0.8 or 1.0.
    :param spend_usd: the period's spend when it was reached.
    :param budget_usd: the client's budget for the period.
    :param period: ``day``, ``week``, ``month`` or ``total``.
    :param period_start: ISO start of the period (None for ``total``).
    :param period_end: ISO end of the period (None for ``total``).
    :param config: the loaded configuration (``[alerts]``).
    """
