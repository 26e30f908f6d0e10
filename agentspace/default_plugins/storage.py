"""The built-in storage backends, registered as any plugin's would be (``register_storage_backends``).

``tinydb``: files in the data directory, one server process (the data-directory lock); its usage records
are written by the ``tinydb_sink`` plugin. ``postgres``: one database (``[storage] dsn``) shared by any
number of replicas; needs the ``scale`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agentspace.errors import StorageError
from agentspace.hookspecs import hookimpl
from agentspace.stores.base import Storage, StorageBackend, UsageStoreSink

if TYPE_CHECKING:
    from agentspace.config import Config


class TinyDBBackend:
    name = "tinydb"

    def open(self, config: Config) -> Storage:
        from agentspace.stores.sessions import SessionStore
        from agentspace.stores.usage import UsageStore

        return Storage("tinydb", SessionStore(config.data_dir), UsageStore(config.data_dir))


class PostgresBackend:
    name = "postgres"

    def open(self, config: Config) -> Storage:
        from agentspace.stores.blobs_postgres import PostgresBlobStore
        from agentspace.stores.postgres import (
            PostgresClientStore,
            PostgresDatabase,
            PostgresSessionStore,
            PostgresUsageStore,
        )

        settings = config["storage"]
        if not settings.get("dsn"):
            raise StorageError('[storage] backend = "postgres" needs [storage] dsn = "postgresql://..."')
        db = PostgresDatabase(
            str(settings["dsn"]),
            pool_size=int(settings["pool_size"]),
            statement_cache_size=int(settings["statement_cache_size"]),
        )
        usage = PostgresUsageStore(db)
        return Storage(
            "postgres",
            PostgresSessionStore(db),
            usage,
            sink=UsageStoreSink(usage, "postgres"),
            clients=PostgresClientStore(db),
            blobs=PostgresBlobStore(db),
            uses_data_dir_lock=False,
            shared=True,
            database=db,
        )


@hookimpl
def register_storage_backends(register: Callable[[StorageBackend], None], config: Config) -> None:
    register(TinyDBBackend())
    register(PostgresBackend())


def open_storage(config: Config, pm: object | None = None) -> Storage:
    """The storage ``[storage] backend`` names, from the backends the plugins registered."""
    from agentspace.plugins import get_plugin_manager

    manager = pm or get_plugin_manager()
    backends: dict[str, StorageBackend] = {}
    manager.hook.register_storage_backends(  # type: ignore[attr-defined]
        register=lambda backend: backends.setdefault(backend.name, backend), config=config
    )
    name = str(config["storage"]["backend"])
    if name not in backends:
        known = ", ".join(sorted(backends)) or "none"
        raise StorageError(f"[storage] backend = {name!r} is not registered by any plugin (known: {known})")
    return backends[name].open(config)
