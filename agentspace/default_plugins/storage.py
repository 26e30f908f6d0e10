"""The built-in storage backends, registered as any plugin's would be (``register_storage_backends``).

``tinydb`` (``agentspace.storage.embedded``): files in the data directory, one server process (the
data-directory lock). ``postgres`` (``agentspace.storage.postgres``): one database (``[storage] dsn``) shared
by any number of replicas; needs the ``scale`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agentspace.errors import StorageError
from agentspace.hookspecs import hookimpl
from agentspace.storage.protocols import Storage, StorageBackend

if TYPE_CHECKING:
    from agentspace.config import Config


@hookimpl
def register_storage_backends(register: Callable[[StorageBackend], None], config: Config) -> None:
    from agentspace.storage.backends import builtin_backends

    for backend in builtin_backends():
        register(backend)


def open_storage(config: Config, pm: object | None = None) -> Storage:
    """The storage ``[storage] backend`` names, from the backends the plugins registered."""
    import pluggy

    from agentspace.plugins import call_register, get_plugin_manager

    manager = pm if isinstance(pm, pluggy.PluginManager) else get_plugin_manager()
    backends: dict[str, StorageBackend] = {}
    call_register(
        manager, "register_storage_backends", lambda backend: backends.setdefault(backend.name, backend), config=config
    )
    name = str(config["storage"]["backend"])
    if name not in backends:
        known = ", ".join(sorted(backends)) or "none"
        raise StorageError(f"[storage] backend = {name!r} is not registered by any plugin (known: {known})")
    return backends[name].open(config)
