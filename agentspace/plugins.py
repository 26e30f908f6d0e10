"""The plugin manager: built-in plugins and installed ones, registered the same way.

``AGENTSPACE_LOAD_PLUGINS`` (comma-separated distribution or entry-point names) selects which installed
plugins load; set it to an empty string to load none. Built-ins always load, but for the optional ones
(``OPTIONAL_PLUGINS``: metrics, telemetry), which it selects like installed plugins.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
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

log = logging.getLogger(__name__)


def _selected() -> set[str] | None:
    """The plugin names AGENTSPACE_LOAD_PLUGINS selects; None when it is unset (load every plugin)."""
    selected = os.environ.get("AGENTSPACE_LOAD_PLUGINS")
    return None if selected is None else {n.strip() for n in selected.split(",") if n.strip()}


def _dist_key(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): agentspace_memory is agentspace-memory."""
    return re.sub(r"[-_.]+", "-", name).lower()


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
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _load_one(pm, ep)
        return
    dists = {_dist_key(n) for n in wanted}
    matched = set(OPTIONAL_PLUGINS) & wanted
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else None
        if ep.name in wanted or (dist_name is not None and _dist_key(dist_name) in dists):
            matched |= {n for n in wanted if n == ep.name or (dist_name and _dist_key(n) == _dist_key(dist_name))}
            _load_one(pm, ep)
    for name in sorted(wanted - matched):  # a typo would load nothing, silently
        log.warning("AGENTSPACE_LOAD_PLUGINS names %r, which no installed plugin is (see: agentspace plugins)", name)


def _load_one(pm: pluggy.PluginManager, ep: EntryPoint) -> None:
    """Load one installed plugin; one that fails to import (a missing dependency, a syntax error, an entry point
    naming nothing) stops the start naming it, as a failing hook does, not with a bare traceback."""
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
    except pluggy.PluginValidationError:
        raise  # a misspelt hook parameter: named by _load_entry_points
    except Exception as e:
        dist = ep.dist.name if ep.dist is not None else ep.value
        log.error("plugin %r (%s) failed to load", ep.name, dist, exc_info=e)
        raise PluginError(
            f"plugin {ep.name!r} ({dist}) failed to load: {type(e).__name__}: {e} (the traceback is logged above; "
            "AGENTSPACE_LOAD_PLUGINS=name,... selects which installed plugins load)"
        ) from e


def _check_unique_names(wanted: set[str] | None) -> None:
    """Refuse two installed distributions declaring the same entry point name: pluggy would load the first
    one it meets and silently skip the other (a new plugin named like an installed one would do nothing)."""
    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.value
        if wanted is not None and ep.name not in wanted and _dist_key(dist) not in {_dist_key(n) for n in wanted}:
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


class PluginError(click.ClickException):
    """A plugin failed the start: one of its hooks raised, or registered what is not of the hook's kind. The
    message names the plugin (its entry point name) and the hook; the CLI prints it and exits 1."""


def _plugin_of(pm: pluggy.PluginManager, hook: str, error: BaseException) -> str | None:
    """The plugin whose implementation of ``hook`` is in ``error``'s traceback (pluggy does not say which
    implementation raised)."""
    caller = getattr(pm.hook, hook, None)
    if caller is None:
        return None
    codes = {
        getattr(i.function, "__code__", None): pm.get_name(i.plugin) or i.plugin_name for i in caller.get_hookimpls()
    }
    tb = error.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            return name
        tb = tb.tb_next
    return None


def plugin_error(pm: pluggy.PluginManager, hook: str, error: Exception) -> Exception:
    """What to raise for ``error`` from ``hook`` at start: a ``click.ClickException`` (a ``ConfigError``, a
    misspelt hook) as it is; any other exception as a ``PluginError`` naming the plugin, its traceback logged."""
    if isinstance(error, click.ClickException):
        return error
    name = _plugin_of(pm, hook, error)
    who = f"plugin {name!r}" if name is not None else "a plugin"
    log.error("%s failed in %s", who, hook, exc_info=error)
    return PluginError(
        f"{who} failed in {hook}: {type(error).__name__}: {error} (the traceback is logged above; "
        "AGENTSPACE_LOAD_PLUGINS=name,... selects which installed plugins load)"
    )


def _is_provider(thing: Any) -> bool:
    return isinstance(getattr(thing, "name", None), str) and all(
        callable(getattr(thing, m, None)) for m in ("claims", "stream")
    )


def _is_section(thing: Any) -> bool:
    return isinstance(getattr(thing, "name", None), str) and callable(getattr(thing, "build", None))


def _is_tool(thing: Any) -> bool:
    from .types import Tool

    return isinstance(thing, Tool)


def _plain_function(handler: Any) -> bool:
    """A function or method (or a partial of one) that is not ``async def``: what a tool handler must not be.
    Other callables (an object with an async ``__call__``) are taken on trust."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    return (inspect.isfunction(target) or inspect.ismethod(target)) and not inspect.iscoroutinefunction(target)


def _is_sink(thing: Any) -> bool:
    return callable(getattr(thing, "record", None))


def _is_backend(thing: Any) -> bool:
    return isinstance(getattr(thing, "name", None), str) and callable(getattr(thing, "open", None))


# What each ``register_<thing>`` hook takes, as said in an error, and the check (docs/plugins.md).
REGISTERS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "register_providers": ("a provider (name: str, claims(model), stream(request))", _is_provider),
    "register_context_sections": ("a context section (name: str, build(request))", _is_section),
    "register_tools": ("an agentspace.Tool", _is_tool),
    "register_usage_sinks": ("a usage sink (name: str, record(record))", _is_sink),
    "register_storage_backends": ("a storage backend (name: str, open(config))", _is_backend),
}


def checked(hook: str, register: Callable[[Any], object]) -> Callable[[Any], None]:
    """``register`` for ``hook``, refusing what is not of the hook's kind at once (it would fail later, in a
    chat, far from the plugin that registered it)."""
    what, ok = REGISTERS[hook]

    def add(thing: Any) -> None:
        if not ok(thing):
            shown = repr(thing)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise TypeError(f"registered {shown} ({type(thing).__name__}), which is not {what}")
        if hook == "register_usage_sinks":
            from .sinks import attribute_problem

            problem = attribute_problem(thing)
            if problem:
                raise ValueError(problem)
        if hook == "register_tools" and _plain_function(thing.handler):
            # The gateway awaits the handler: a plain one would run, and its result be lost for an error.
            raise ValueError(
                f"tool {thing.name!r}: its handler {getattr(thing.handler, '__name__', '?')} is a plain function, "
                "and the gateway awaits it; make it `async def` (blocking work: `await asyncio.to_thread(...)`)"
            )
        if hook == "register_context_sections":
            from .context import CORE_SECTIONS

            # Joined to the system prompt is the one a plugin may add to; the others' text would never be sent.
            if thing.name in CORE_SECTIONS and thing.name != "system_prompt":
                raise ValueError(
                    f"a section named {thing.name!r} is one the gateway builds itself, and a plugin's would never "
                    f"be sent; name it apart from {', '.join(n for n in CORE_SECTIONS if n != 'system_prompt')}"
                )
        register(thing)

    return add


def call_register(pm: pluggy.PluginManager, hook: str, register: Callable[[Any], object], **kwargs: Any) -> None:
    """Call a ``register_<thing>`` hook with a checked ``register``; a failure names the plugin."""
    try:
        getattr(pm.hook, hook)(register=checked(hook, register), **kwargs)
    except Exception as e:
        raise plugin_error(pm, hook, e) from e


def check_claims(providers: Sequence[Any]) -> None:
    """Refuse two installed providers that claim the same listed model: which one serves it would depend on
    the order the plugins loaded in, which is not defined. The built-in catch-alls (``agentspace.*``) are
    meant to be overridden and are left out."""
    installed = [p for p in providers if not type(p).__module__.startswith("agentspace.")]
    for owner in installed:
        listing = getattr(owner, "models", None)
        try:
            models = list(listing()) if callable(listing) else []
        except Exception:  # a broken ``models`` is reported where the lists are built
            continue
        for other in installed:
            if other is owner:
                continue
            for model in models:
                try:
                    claimed = other.claims(model)
                except Exception:
                    claimed = False
                if claimed:
                    raise PluginError(
                        f"providers {other.name!r} and {owner.name!r} both claim {model!r} (listed by "
                        f"{owner.name!r}): which one serves it would depend on the order plugins load in. "
                        "Make their claims apart, or load one of them (AGENTSPACE_LOAD_PLUGINS=name,...)"
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
