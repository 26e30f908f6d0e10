"""Every extension point of agentspace (SPEC section 8), in one place.

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
    from .providers.base import Provider
    from .sinks import UsageSink
    from .stores.base import StorageBackend
    from .types import ContextSectionBuilder, Tool

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

    :param register: call with objects that have ``name`` and ``async record(record: UsageRecord)``.
    :param config: the loaded configuration.
    """


@hookspec
def register_storage_backends(register: Callable[[StorageBackend], None], config: Config) -> None:
    """Register storage backends; ``[storage] backend`` chooses one by its ``name``.

    :param register: call with objects that have ``name`` and ``open(config) -> agentspace.stores.base.Storage``
        (a session store and a usage store speaking the protocols of ``agentspace.stores.base``).
    :param config: the loaded configuration.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``agentspace`` CLI.

    :param cli: the top-level click group; use ``@cli.command()`` on your functions.
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
