"""The plugin manager: built-in plugins and installed ones, registered the same way.

``AGENTSPACE_LOAD_PLUGINS`` (comma-separated distribution or entry-point names) selects which installed
plugins load; set it to an empty string to load none. Built-ins always load, but for the optional ones
(``OPTIONAL_PLUGINS``: metrics, telemetry), which it selects like installed plugins.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from importlib.metadata import entry_points
from typing import Any

import click
import pluggy

from . import hookspecs

# Built-in plugins, in registration order. pluggy calls later registrations first, and the catch-all
# implementations are marked ``trylast``, so any installed plugin can take precedence.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "agentspace.default_plugins.sections",
    "agentspace.default_plugins.response_format",
    "agentspace.default_plugins.storage",
    "agentspace.default_plugins.alerts",
    "agentspace.providers.anthropic",
    "agentspace.providers.litellm",
)

# Built-in plugins that load like installed ones: always when AGENTSPACE_LOAD_PLUGINS is unset, else only
# when it names them (so an operator can leave them out). Name -> module.
OPTIONAL_PLUGINS: dict[str, str] = {
    "metrics": "agentspace.default_plugins.metrics",
    "telemetry": "agentspace.default_plugins.telemetry",
}

ENTRY_POINT_GROUP = "agentspace"


def _selected() -> set[str] | None:
    """The plugin names AGENTSPACE_LOAD_PLUGINS selects; None when it is unset (load every plugin)."""
    selected = os.environ.get("AGENTSPACE_LOAD_PLUGINS")
    return None if selected is None else {n.strip() for n in selected.split(",") if n.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    try:
        _load_selected(pm)
    except pluggy.PluginValidationError as e:  # a hook's parameters misspelt: name the plugin, no traceback
        name = pm.get_name(e.plugin) if pm.is_registered(e.plugin) else getattr(e.plugin, "__name__", e.plugin)
        message = f"plugin {name!r}: {e}"
        hook = re.search(r"for hook '(\w+)'", str(e))
        caller = getattr(pm.hook, hook.group(1), None) if hook else None
        if caller is not None and caller.spec is not None:  # what the parameters should have been
            message += f" (the parameters of {caller.name} are: {', '.join(caller.spec.argnames)})"
        raise PluginHookError(e.plugin, message) from None


def _load_selected(pm: pluggy.PluginManager) -> None:
    wanted = _selected()
    _check_unique_names(wanted)
    if wanted is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else None
        if ep.name in wanted or dist_name in wanted:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)


def _check_unique_names(wanted: set[str] | None) -> None:
    """Refuse two installed distributions declaring the same entry point name: pluggy would load the first
    one it meets and silently skip the other (a new plugin named like an installed one would do nothing)."""
    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.value
        if wanted is not None and ep.name not in wanted and dist not in wanted:
            continue
        other = seen.setdefault(ep.name, dist)
        if other != dist:
            raise PluginHookError(
                None,
                f"the installed packages {other!r} and {dist!r} both name a plugin {ep.name!r}, so only one "
                "of them would load: rename one in its [project.entry-points.agentspace], or uninstall one.",
            )


def create_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("agentspace")
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        wanted = _selected()
        for name, module_name in OPTIONAL_PLUGINS.items():
            if wanted is None or name in wanted:
                pm.register(importlib.import_module(module_name), name=module_name)
        _load_entry_points(pm)
    check_hooks(pm)
    return pm


class PluginHookError(pluggy.PluginValidationError, click.ClickException):
    """A plugin implements a hook agentspace does not have (a misspelt name): it would silently do nothing.
    The CLI prints the message and exits 1; tests may catch it as ``pluggy.PluginValidationError``."""

    def __init__(self, plugin: object, message: str) -> None:
        # The MRO chains both: PluginValidationError keeps the plugin, ClickException (after it) the message.
        pluggy.PluginValidationError.__init__(self, plugin, message)


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Refuse to start with a ``@hookimpl`` no hookspec declares, naming each plugin and hook (with the
    closest real hook name), like pluggy's ``check_pending`` but reporting all of them at once."""
    known = [name for name, caller in vars(pm.hook).items() if not name.startswith("_") and caller.has_spec()]
    problems: list[str] = []
    culprit: object = None
    for name, caller in vars(pm.hook).items():
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            culprit = impl.plugin
            plugin = pm.get_name(impl.plugin) or impl.plugin_name
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"plugin {plugin!r} implements unknown hook {name!r}{hint}")
    if problems:
        raise PluginHookError(
            culprit,
            "; ".join(problems) + ". The hooks are listed in docs/plugins.md; "
            "AGENTSPACE_LOAD_PLUGINS=name,... selects which installed plugins load.",
        )


_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _pm
    if _pm is None:
        _pm = create_plugin_manager()
    return _pm


def describe_plugins(pm: pluggy.PluginManager, *, include_builtins: bool = False) -> list[dict[str, Any]]:
    """What ``agentspace plugins`` prints: each plugin, its hooks, and its distribution's version."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        builtin = name in DEFAULT_PLUGINS or name in OPTIONAL_PLUGINS.values()
        if builtin and not include_builtins:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        info: dict[str, Any] = {"name": name, "hooks": hooks}
        dist = dists.get(id(plugin))
        if dist is not None:
            info["package"] = dist.project_name
            info["version"] = dist.version
        if builtin:
            info["builtin"] = True
        out.append(info)
    return sorted(out, key=lambda p: p["name"])
