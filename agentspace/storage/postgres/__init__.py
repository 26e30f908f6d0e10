"""The PostgreSQL backend (SPEC 13): sessions, messages and usage records in one database that any number
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

from .clients import PostgresClientStore
from .database import PostgresDatabase
from .migrations import MIGRATIONS
from .sessions import PostgresSessionStore
from .usage import PostgresUsageStore

__all__ = ["MIGRATIONS", "PostgresClientStore", "PostgresDatabase", "PostgresSessionStore", "PostgresUsageStore"]
