"""Helpers for testing agentspace plugins: a config, a plugin manager, what a hook registered (docs/plugins.md).

They call the real code the gateway runs (``parse_config``, pluggy with the real hookspecs, the built-in
plugins), so a plugin tested with them behaves the same under ``agentspace serve``::

    import agentspace_clock
    from agentspace.testing import make_config, registered

    def test_registers_current_time(tmp_path):
        [tool] = registered("register_tools", make_config(tmp_path), agentspace_clock)
        assert tool.name == "current_time"

Nothing here reads or writes the user's own data directory or loads other installed plugins.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from aiohttp.test_utils import TestClient, TestServer

from . import hookspecs
from .config import Config, ConfigError, parse_config
from .gateway_token import load_or_create_token
from .plugins import ENTRY_POINT_GROUP, REGISTERS, check_hooks, checked, create_plugin_manager, describe_plugins
from .server import create_app

__all__ = [
    "InstalledPlugin",
    "gateway_client",
    "installed_plugin",
    "make_config",
    "plugin_manager",
    "registered",
]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_config(tmp_path: Path, toml: str = "", **tables: Any) -> Config:
    """A validated ``Config``, as a file ``agentspace.toml`` in ``tmp_path`` would give it.

    ``toml`` is the file's text; keyword arguments are tables merged over it
    (``plugins={"memory": {"folder": "notes"}}``). The data dir is ``tmp_path / "data"`` unless
    ``[storage] data_dir`` is given, and exists; relative paths resolve against ``tmp_path``. Bad settings raise
    the ``ConfigError`` a user would see, naming ``tmp_path / "agentspace.toml"``.
    """
    source = str(tmp_path / "agentspace.toml")  # named in errors; the file itself is not written
    try:
        raw = tomllib.loads(toml)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "(syntax)", f"not valid TOML: {e}") from None
    raw = _merge({"storage": {"data_dir": str(tmp_path / "data")}}, _merge(raw, tables))
    config = parse_config(raw, source, tmp_path)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as `agentspace serve` creates it
    return config


def _plugin_name(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


@contextmanager
def plugin_manager(*plugins: object, builtins: bool = True) -> Iterator[pluggy.PluginManager]:
    """A plugin manager with ``plugins`` registered (modules or objects with ``@hookimpl`` methods).

    With ``builtins`` (the default) the built-in plugins are registered first, as under
    ``agentspace serve``; installed plugins are never loaded. A ``@hookimpl`` whose name or parameters
    match no hook raises ``pluggy.PluginValidationError``. ``plugins`` are unregistered on exit.
    """
    if builtins:
        pm = create_plugin_manager(load_entry_points=False)
    else:
        pm = pluggy.PluginManager("agentspace")
        pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        name = _plugin_name(plugin)
        if pm.has_plugin(name):  # two instances of one plugin class, each registering its own things
            name = f"{name}-{id(plugin)}"
        pm.register(plugin, name=name)  # pluggy rejects a hook's unknown parameters here
    # A misspelt hook name would otherwise be ignored silently, and the plugin would do nothing.
    check_hooks(pm)
    try:
        yield pm
    finally:
        for plugin in plugins:
            pm.unregister(plugin)


def registered(hook: str, config: Config, *plugins: object) -> list[Any]:
    """What ``plugins`` register through a ``register_<thing>`` hook, called as the gateway calls it.

    Only ``plugins`` are asked, not the built-ins: ``registered("register_providers", config, my_plugin)``
    is the list of ``my_plugin``'s providers. An exception the hook raises (a ``ConfigError`` for bad
    settings) propagates.
    """
    with plugin_manager(*plugins, builtins=False) as pm:
        things: list[Any] = []
        if hook in REGISTERS:  # as the gateway checks them: what is not of the hook's kind is refused
            getattr(pm.hook, hook)(register=checked(hook, things.append), config=config)
        else:
            getattr(pm.hook, hook)(register=things.append, config=config)
        return things


@dataclass
class InstalledPlugin:
    """A plugin loaded through its entry point: the object, what ``agentspace plugins`` lists for it,
    and the plugin manager it was loaded into (built-ins registered first, as under ``agentspace serve``)."""

    plugin: object
    info: dict[str, Any]
    pm: pluggy.PluginManager


def installed_plugin(name: str) -> InstalledPlugin:
    """Load the installed plugin whose entry point (group ``agentspace``) is ``name``, and only it.

    Proves the package's ``[project.entry-points.agentspace]`` works; raises ``LookupError`` when no
    installed distribution declares that entry point.
    """
    pm = create_plugin_manager(load_entry_points=False)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    plugin = pm.get_plugin(name)
    if plugin is None:
        raise LookupError(
            f"no installed plugin has the entry point {name!r} in group {ENTRY_POINT_GROUP!r}: "
            "install the package (pip install -e .) in the environment the tests run in"
        )
    [info] = [p for p in describe_plugins(pm) if p["name"] == name]
    return InstalledPlugin(plugin, info, pm)


@asynccontextmanager
async def gateway_client(config: Config, *plugins: object) -> AsyncIterator[TestClient]:
    """The real gateway, as ``agentspace serve`` runs it, with the built-ins and ``plugins``, on 127.0.0.1.

    Yields an aiohttp ``TestClient`` whose requests and WebSockets carry the gateway token:
    ``await client.ws_connect("/gateway")``, ``await client.post("/api/chat", json=...)``. The server
    runs every startup and shutdown hook, and stops on exit.
    """
    with plugin_manager(*plugins) as pm:
        token = load_or_create_token(config.data_dir)
        server = TestServer(create_app(config, pm), host="127.0.0.1")
        client = TestClient(server, headers={"Authorization": f"Bearer {token}"})
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()
