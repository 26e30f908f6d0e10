"""The PostgreSQL backend (docs/deploy.md): sessions, messages and usage records in one database that any number
of replicas share. Needs the ``scale`` extra (asyncpg).

- Connections: one bounded asyncpg pool per process (``[storage] pool_size``). An unreachable database
  raises StorageError with a clear message (``/healthz`` answers 503); nothing here relies on session
  state, so PgBouncer in transaction mode works (set ``statement_cache_size = 0`` there: no named prepared
  statements survive a transaction).
- Migrations: ``MIGRATIONS`` are versioned and applied at start, in one transaction holding an advisory
  lock, so replicas starting together apply each exactly once.
- Usage records are append-only, keyed by (timestamp, id): a record's id and timestamp never change, so a
  retried batch inserts nothing twice (``ON CONFLICT DO NOTHING``). ``append`` queues the record for the
  writer, which inserts what is queued in one transaction; each caller returns when its batch committed,
  or gets the StorageError of the batch (nothing of it was stored: the retry is safe).
- The usage table is partitioned by month of the record's time; reports aggregate in SQL over indexed
  columns (time, model, client, session); retention drops whole months (``drop_usage_before``).
- Session and message documents are kept as JSON text, exactly as given (jsonb would reorder keys and
  refuses ``\\u0000``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import StorageError
from ..protocols import Storage, UsageStoreSink
from .blobs import PostgresBlobStore
from .clients import PostgresClientStore
from .database import PostgresDatabase
from .ledger import PostgresLedger
from .migrations import MIGRATIONS
from .sessions import PostgresSessionStore
from .usage import PostgresUsageStore

if TYPE_CHECKING:
    from ...config import Config

__all__ = [
    "MIGRATIONS",
    "PostgresBackend",
    "PostgresBlobStore",
    "PostgresClientStore",
    "PostgresDatabase",
    "PostgresLedger",
    "PostgresSessionStore",
    "PostgresUsageStore",
]


class PostgresBackend:
    name = "postgres"

    def open(self, config: Config) -> Storage:
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
            self.name,
            PostgresSessionStore(db),
            usage,
            sink=UsageStoreSink(usage, self.name),
            clients=PostgresClientStore(db),
            blobs=PostgresBlobStore(db),
            uses_data_dir_lock=False,
            shared=True,
            database=db,
            shared_ledger=lambda replica: PostgresLedger(db, replica, float(settings["lease_seconds"])),
        )
