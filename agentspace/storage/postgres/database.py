"""The connection every store of the postgres backend borrows from: one bounded asyncpg pool per process, the
migrations applied at start, the health check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ...errors import StorageError
from .migrations import MIGRATION_LOCK, MIGRATIONS

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)


def load_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StorageError("The postgres storage backend needs asyncpg: pip install 'agentspace[scale]'.") from None
    return asyncpg


def unreachable(e: BaseException) -> StorageError:
    detail = str(e) or type(e).__name__
    return StorageError(f"The gateway could not use its database: {detail}.")


def db_errors() -> tuple[type[BaseException], ...]:
    asyncpg = load_asyncpg()
    # InternalClientError: a connection broken mid-operation (the database went away) fails its release so.
    return (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def clean_text(text: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL.
    return text.replace("\x00", "") if isinstance(text, str) else text


class PostgresDatabase:
    """The pool, the migrations and the health check; the stores borrow connections from it."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        statement_cache_size: int = 100,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.statement_cache_size = statement_cache_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the pool and apply the migrations; StorageError when the database cannot be reached."""
        async with self._start_lock:
            if self._pool is not None:
                return
            asyncpg = load_asyncpg()
            try:
                pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,  # connections open on demand: a restarted database is reached again
                    max_size=self.pool_size,
                    statement_cache_size=self.statement_cache_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    max_inactive_connection_lifetime=60,
                )
            except db_errors() as e:
                raise unreachable(e) from e
            self._pool = pool
            try:
                await self._migrate()
            except BaseException:
                await pool.close()
                self._pool = None
                raise

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a database that cannot be used raises StorageError."""
        if self._pool is None:
            await self.start()
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                yield conn
        except db_errors() as e:
            if isinstance(e, load_asyncpg().IntegrityConstraintViolationError):
                raise
            raise unreachable(e) from e

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def _migrate(self) -> None:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS agentspace_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in await conn.fetch("SELECT version FROM agentspace_migrations")}
            for version, sql in MIGRATIONS:
                if version in applied:
                    continue
                log.info("applying database migration %d", version)
                await conn.execute(sql)
                await conn.execute("INSERT INTO agentspace_migrations (version) VALUES ($1)", version)

    async def schema_version(self) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM agentspace_migrations"))

    async def health(self) -> str | None:
        try:
            async with self.connection() as conn:
                await conn.fetchval("SELECT 1", timeout=self.connect_timeout)
        except StorageError as e:
            return str(e)
        return None

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:  # noqa: BLE001 - a database gone: drop the connections
                pool.terminate()
