"""The built-in storage backends: registered through ``register_storage_backends`` like a plugin's
(``default_plugins/storage.py``), and opened by a CLI command without loading the plugins. Each is imported
only when asked for: a command on the embedded backend starts without asyncio (the postgres backend's)."""

from __future__ import annotations

import importlib

from .protocols import StorageBackend

# name -> (module, class)
_BUILTIN = {
    "tinydb": ("agentspace.storage.embedded", "EmbeddedBackend"),
    "postgres": ("agentspace.storage.postgres", "PostgresBackend"),
}


def builtin_backend(name: str) -> StorageBackend | None:
    """The built-in backend called ``name``, or None."""
    if name not in _BUILTIN:
        return None
    module, cls = _BUILTIN[name]
    backend: StorageBackend = getattr(importlib.import_module(module), cls)()
    return backend


def builtin_backends() -> list[StorageBackend]:
    return [backend for name in _BUILTIN if (backend := builtin_backend(name)) is not None]
