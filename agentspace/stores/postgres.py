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

from __future__ import annotations

import asyncio
import builtins
import contextlib
import importlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from ..types import UsageRecord, new_id, now_iso
from .sessions import (
    Listing,
    MessageNotFound,
    SessionExists,
    SessionNotFound,
    _is_valid,
    _stored,
    _title_from,
    validate_session_id,
)
from .usage import _COUNTS, _TOKEN_FIELDS, REPORTS, GroupKey, _merge, _totals, report_from_groups

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

# Any fixed 64-bit number: the advisory lock the migrations run under.
MIGRATION_LOCK = 0x61676E7473706163
# Records inserted per transaction at most.
BATCH_SIZE = 500

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE sessions (
            id text PRIMARY KEY,
            title text,
            model text,
            created_at text NOT NULL,
            last_activity_at text NOT NULL,
            message_count integer NOT NULL DEFAULT 0,
            client text
        );
        CREATE INDEX sessions_activity ON sessions (last_activity_at DESC, created_at DESC, id DESC);
        CREATE TABLE messages (
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq integer NOT NULL,
            id text NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (session_id, seq)
        );
        CREATE INDEX messages_id ON messages (session_id, id);
        CREATE TABLE usage_records (
            id text NOT NULL,
            ts timestamptz NOT NULL,
            model text NOT NULL,
            client text,
            session_id text,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            total_cost double precision NOT NULL,
            answered boolean NOT NULL,
            is_error boolean NOT NULL,
            estimated boolean NOT NULL,
            price_unknown boolean NOT NULL,
            record text NOT NULL,
            PRIMARY KEY (ts, id)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX usage_model ON usage_records (model, ts);
        CREATE INDEX usage_client ON usage_records (client, ts);
        CREATE INDEX usage_session ON usage_records (session_id, ts);
        """,
    ),
    (
        2,
        """
        CREATE TABLE clients (
            name text PRIMARY KEY,
            key_hash text NOT NULL UNIQUE,
            stored text NOT NULL
        );
        """,
    ),
    (
        3,
        # Usage rollups: the records' totals per (UTC day, model, client, session, endpoint), kept in the same
        # transaction as the inserts (``_INSERT``), so reports read groups instead of records. '' stands for
        # none (client, session, endpoint), as primary keys cannot hold NULL. Filled from what is stored.
        """
        CREATE TABLE usage_rollups (
            day date NOT NULL,
            model text NOT NULL,
            client text NOT NULL,
            session_id text NOT NULL,
            endpoint text NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            total_cost double precision NOT NULL,
            answered bigint NOT NULL,
            errors bigint NOT NULL,
            estimated bigint NOT NULL,
            price_unknown boolean NOT NULL,
            PRIMARY KEY (day, model, client, session_id, endpoint)
        );
        INSERT INTO usage_rollups
        SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), coalesce(session_id, ''),
               coalesce(record::json->>'endpoint', ''),
               sum(input_tokens), sum(output_tokens), sum(total_tokens), sum(cache_read_tokens),
               sum(cache_write_tokens), sum(reasoning_tokens), sum(total_cost), count(*) FILTER (WHERE answered),
               count(*) FILTER (WHERE is_error), count(*) FILTER (WHERE estimated), bool_or(price_unknown)
        FROM usage_records GROUP BY 1, 2, 3, 4, 5;
        """,
    ),
]

_TOKEN_COLUMNS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "totalTokens": "total_tokens",
    "cacheReadTokens": "cache_read_tokens",
    "cacheWriteTokens": "cache_write_tokens",
    "reasoningTokens": "reasoning_tokens",
}
assert tuple(_TOKEN_COLUMNS) == _TOKEN_FIELDS


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StorageError("The postgres storage backend needs asyncpg: pip install 'agentspace[scale]'.") from None
    return asyncpg


def _unreachable(e: BaseException) -> StorageError:
    detail = str(e) or type(e).__name__
    return StorageError(f"The gateway could not use its database: {detail}.")


def _db_errors() -> tuple[type[BaseException], ...]:
    asyncpg = _asyncpg()
    # InternalClientError: a connection broken mid-operation (the database went away) fails its release so.
    return (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _clean(text: str | None) -> str | None:
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
            asyncpg = _asyncpg()
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
            except _db_errors() as e:
                raise _unreachable(e) from e
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
        except _db_errors() as e:
            if isinstance(e, _asyncpg().IntegrityConstraintViolationError):
                raise
            raise _unreachable(e) from e

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


# --- sessions -----------------------------------------------------------------------------------


def _summary(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "model": row["model"],
        "createdAt": row["created_at"],
        "lastActivityAt": row["last_activity_at"],
        "messageCount": row["message_count"],
        "client": row["client"],
    }


async def _bump(conn: Any, session_id: str, title: str | None = None) -> None:
    """Set a session's last activity to now (and its title, when given); SessionNotFound when it is not there."""
    found = _is_valid(session_id) and await conn.fetchval(
        "UPDATE sessions SET title = coalesce($3, title), last_activity_at = $2 WHERE id = $1 RETURNING 1",
        session_id,
        now_iso(),
        title,
    )
    if not found:
        raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")


_SUMMARY_SQL = "SELECT id, title, model, created_at, last_activity_at, message_count, client FROM sessions"


class PostgresSessionStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session store is closed")

    async def create(
        self,
        *,
        model: str,
        session_id: str | None = None,
        title: str | None = None,
        client: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        sync: bool = True,  # a transaction is durable once committed: no write waits for a later sync
    ) -> dict[str, Any]:
        self._check_open()
        session_id = validate_session_id(session_id) if session_id is not None else new_id("s_")
        stored = [_stored(m) for m in messages]
        if title is None:
            title = next((t for m in stored if m.get("role") == "user" and (t := _title_from(m))), None)
        now = now_iso()
        asyncpg = _asyncpg()
        try:
            async with self.db.transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO sessions (id, title, model, created_at, last_activity_at, message_count, client) "
                    "VALUES ($1, $2, $3, $4, $4, $5, $6) "
                    "RETURNING id, title, model, created_at, last_activity_at, message_count, client",
                    session_id,
                    _clean(title),
                    _clean(model),
                    now,
                    len(stored),
                    _clean(client),
                )
                if stored:
                    await conn.executemany(
                        "INSERT INTO messages (session_id, seq, id, body) VALUES ($1, $2, $3, $4)",
                        [(session_id, n, str(m["id"]), json.dumps(m)) for n, m in enumerate(stored, 1)],
                    )
        except asyncpg.UniqueViolationError:
            raise SessionExists(f"session {session_id!r} already exists") from None
        return _summary(row)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        self._check_open()
        if not _is_valid(session_id):
            return None
        async with self.db.connection() as conn:
            row = await conn.fetchrow(_SUMMARY_SQL + " WHERE id = $1", session_id)
            if row is None:
                return None
            bodies = await conn.fetch("SELECT body FROM messages WHERE session_id = $1 ORDER BY seq", session_id)
        return {**_summary(row), "messages": [json.loads(r["body"]) for r in bodies]}

    async def exists(self, session_id: str) -> bool:
        self._check_open()
        if not _is_valid(session_id):
            return False
        async with self.db.connection() as conn:
            return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)", session_id))

    async def summaries(self) -> builtins.list[dict[str, Any]]:
        return (await self.listing()).sessions

    def awaiting_sync(self, session_id: str | None) -> Awaitable[None] | None:
        return None  # every write is committed before it returns

    async def listing(self) -> Listing:
        self._check_open()
        async with self.db.connection() as conn:
            rows = await conn.fetch(_SUMMARY_SQL + " ORDER BY last_activity_at DESC, created_at DESC, id DESC")
        return Listing(sessions=[_summary(r) for r in rows])

    async def append_message(self, session_id: str, message: dict[str, Any], *, sync: bool = True) -> None:
        self._check_open()
        message = _stored(message)
        if not _is_valid(session_id):
            raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
        title = _title_from(message) if message.get("role") == "user" else None
        async with self.db.transaction() as conn:
            # The row lock on the session orders concurrent appends.
            count = await conn.fetchval(
                "UPDATE sessions SET message_count = message_count + 1, last_activity_at = $2, "
                "title = CASE WHEN coalesce(title, '') = '' AND $3::text IS NOT NULL THEN $3 ELSE title END "
                "WHERE id = $1 RETURNING message_count",
                session_id,
                now_iso(),
                _clean(title),
            )
            if count is None:
                raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
            seq = await conn.fetchval(
                "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = $1", session_id
            )
            await conn.execute(
                "INSERT INTO messages (session_id, seq, id, body) VALUES ($1, $2, $3, $4)",
                session_id,
                seq,
                str(message["id"]),
                json.dumps(message),
            )

    async def update_message(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        self._check_open()
        changes = json.loads(json.dumps(changes))
        async with self.db.transaction() as conn:
            await _bump(conn, session_id)
            rows = await conn.fetch(
                "SELECT seq, body FROM messages WHERE session_id = $1 AND id = $2 FOR UPDATE", session_id, message_id
            )
            if not rows:
                raise MessageNotFound(f"message {str(message_id)[:40]!r} not found in session {session_id!r}")
            await conn.executemany(
                "UPDATE messages SET body = $3 WHERE session_id = $1 AND seq = $2",
                [(session_id, r["seq"], json.dumps({**json.loads(r["body"]), **changes})) for r in rows],
            )

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        self._check_open()
        if not _is_valid(session_id) or (limit is not None and limit <= 0):
            return []
        async with self.db.connection() as conn:
            if limit is None:
                rows = await conn.fetch("SELECT body FROM messages WHERE session_id = $1 ORDER BY seq", session_id)
            else:
                rows = await conn.fetch(
                    "SELECT body FROM (SELECT seq, body FROM messages WHERE session_id = $1 "
                    "ORDER BY seq DESC LIMIT $2) last ORDER BY seq",
                    session_id,
                    limit,
                )
        return [json.loads(r["body"]) for r in rows]

    async def set_title(self, session_id: str, title: str) -> None:
        self._check_open()
        async with self.db.connection() as conn:
            await _bump(conn, session_id, title)

    async def touch(self, session_id: str) -> None:
        self._check_open()
        async with self.db.connection() as conn:
            await _bump(conn, session_id)

    async def delete(self, session_id: str) -> bool:
        self._check_open()
        if not _is_valid(session_id):
            return False
        async with self.db.connection() as conn:
            return await conn.fetchval("DELETE FROM sessions WHERE id = $1 RETURNING 1", session_id) is not None

    async def copy_in(self, session: dict[str, Any]) -> bool:
        """Insert a stored session (summary and ``messages``) as it is, in one transaction; False when a
        session with its id exists already (then nothing changes)."""
        messages = session.get("messages") or []
        async with self.db.transaction() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO sessions (id, title, model, created_at, last_activity_at, message_count, client) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING 1",
                session["id"],
                _clean(session.get("title")),
                _clean(session.get("model")),
                session.get("createdAt") or now_iso(),
                session.get("lastActivityAt") or session.get("createdAt") or now_iso(),
                len(messages),
                _clean(session.get("client")),
            )
            if inserted is None:
                return False
            if messages:
                await conn.executemany(
                    "INSERT INTO messages (session_id, seq, id, body) VALUES ($1, $2, $3, $4)",
                    [(session["id"], n, str(m.get("id") or n), json.dumps(m)) for n, m in enumerate(messages, 1)],
                )
        return True

    async def flush(self) -> None:
        """Every write is committed when its call returns: nothing to wait for."""

    async def aclose(self) -> None:
        self._closed = True


# --- usage --------------------------------------------------------------------------------------


def parse_time(value: object) -> datetime:
    """A record's ``timestamp`` (``2026-12-03T14:08:47.123Z``) as an aware datetime."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime(1970, 1, 1, tzinfo=UTC)  # no readable time: counted, in the oldest period


def _month_start(when: datetime) -> datetime:
    return datetime(when.year, when.month, 1, tzinfo=UTC)


def _next_month(start: datetime) -> datetime:
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def _partition_name(start: datetime) -> str:
    return f"usage_records_{start.year:04d}_{start.month:02d}"


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        str(record.get("id") or new_id("u_")),
        parse_time(record.get("timestamp")),
        _clean(str(record.get("model") or "unknown")),
        _clean(record.get("client")),
        _clean(record.get("sessionId")),
        *(int(record.get(key) or 0) for key in _TOKEN_FIELDS),
        float(record.get("totalCost") or 0.0),
        record.get("answered") is not False,
        bool(record.get("error")) or record.get("finishReason") == "error",
        bool(record.get("estimated")),
        record.get("priceKnown") is False,
        json.dumps(record),
    )


_COLUMNS = ("id", "ts", "model", "client", "session_id", *_TOKEN_COLUMNS.values(), "total_cost", "answered",
            "is_error", "estimated", "price_unknown", "record")  # fmt: skip
_TYPES = ("text", "timestamptz", "text", "text", "text", *["bigint"] * 6, "float8", "bool", "bool", "bool", "bool",
          "text")  # fmt: skip
# One statement per batch: a column array per column (no per-row round trip, no named statement needed),
# the rows that were new counted, and their totals added to the rollups in the same statement (so in the
# same transaction: a report never sees a record without its rollup, or the other way round). The rollup
# rows are upserted in key order, so concurrent batches of replicas lock them in the same order.
_ROLLUP_SUMS = (
    "sum(input_tokens), sum(output_tokens), sum(total_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
    "sum(reasoning_tokens), sum(total_cost), count(*) FILTER (WHERE answered), count(*) FILTER (WHERE is_error), "
    "count(*) FILTER (WHERE estimated), bool_or(price_unknown)"
)
_ADDED = ("input_tokens", "output_tokens", "total_tokens", "cache_read_tokens", "cache_write_tokens",
          "reasoning_tokens", "total_cost", "answered", "errors", "estimated")  # fmt: skip
_INSERT = (
    f"WITH src AS (SELECT * FROM unnest({', '.join(f'${n}::{t}[]' for n, t in enumerate(_TYPES, 1))}, "
    f"${len(_TYPES) + 1}::text[]) AS t({', '.join(_COLUMNS)}, endpoint)), "
    f"new AS (INSERT INTO usage_records ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM src "
    "ON CONFLICT DO NOTHING RETURNING id, ts), "
    "added AS (INSERT INTO usage_rollups "
    "SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), coalesce(session_id, ''), endpoint, "
    f"{_ROLLUP_SUMS} FROM src JOIN new USING (id, ts) GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
    "ON CONFLICT (day, model, client, session_id, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = usage_rollups.{c} + EXCLUDED.{c}" for c in _ADDED)
    + ", price_unknown = usage_rollups.price_unknown OR EXCLUDED.price_unknown) "
    "SELECT count(*) FROM new"
)

_SUMS = (
    ", ".join(f"sum({column})::bigint" for column in _TOKEN_COLUMNS.values())
    + ", sum(total_cost), count(*) FILTER (WHERE answered), count(*) FILTER (WHERE is_error),"
    " count(*) FILTER (WHERE estimated), bool_or(price_unknown)"
)


# The rollup columns each report groups by (the labels are made as ``stores.usage`` makes them: records of
# the gateway token, client "ws"/"http" or none, are the admin's), and the same from the records.
_REPORT_COLUMNS: dict[str, dict[str, str]] = {
    "model": {"model": "model"},
    "day": {"day": "day"},
    "client": {"client": "client"},
    "session": {"session": "session_id"},
    "day-model": {"day": "day", "model": "model"},
    "deployment": {"deployment": "deployment"},  # not in the rollups: summed from the records
}
_RECORD_KEYS = {
    "day": "(ts AT TIME ZONE 'UTC')::date",
    "model": "model",
    "client": "coalesce(client, '')",
    "session": "coalesce(session_id, '')",
    "deployment": "coalesce(record::json->>'deployment', '')",
}
_ROLLUP_TOTALS = (
    "sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(total_tokens)::bigint, "
    "sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint, sum(reasoning_tokens)::bigint, "
    "sum(total_cost), sum(answered)::bigint, sum(errors)::bigint, sum(estimated)::bigint, bool_or(price_unknown)"
)


class PostgresUsageStore:
    def __init__(self, db: PostgresDatabase, batch_size: int = BATCH_SIZE) -> None:
        self.db = db
        self.batch_size = batch_size
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._partitions: set[str] = set()
        self._closed = False

    async def append(self, record: UsageRecord) -> None:
        await self.append_dicts([record.to_dict()])

    async def append_dicts(self, records: Sequence[dict[str, Any]]) -> None:
        """Queue records for the writer; return once they are committed (StorageError: none of the batch
        they were in is stored, the same call may be retried)."""
        if self._closed:
            raise RuntimeError("the usage store is closed")
        loop = asyncio.get_running_loop()
        futures = []
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            self._queue.append((record, future))
            futures.append(future)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_batches(), name="agentspace-usage-writer")
        # Shielded: a caller gone (a client disconnected) does not stop the batch half way.
        await asyncio.shield(asyncio.gather(*futures))

    async def _write_batches(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
            try:
                await self._insert([record for record, _ in batch])
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the failure
                error = e if isinstance(e, StorageError) else _unreachable(e)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _insert(self, records: Sequence[dict[str, Any]]) -> int:
        """Insert in one transaction; how many records were new (the others were stored already)."""
        rows = [_row(r) for r in records]
        if not rows:
            return 0
        await self._ensure_partitions({_month_start(row[1]) for row in rows})
        columns = [list(column) for column in zip(*rows, strict=True)]
        endpoints = [str(r.get("endpoint") or "") for r in records]
        async with self.db.transaction() as conn:
            return int(await conn.fetchval(_INSERT, *columns, endpoints))

    async def copy_in(self, records: Sequence[dict[str, Any]]) -> int:
        """Insert stored records (``to_dict()`` shape) at once, past the writer; how many were new."""
        return await self._insert(records)

    async def _ensure_partitions(self, months: set[datetime]) -> None:
        missing = [m for m in sorted(months) if _partition_name(m) not in self._partitions]
        if not missing:
            return
        async with self.db.transaction() as conn:
            # Serialised: replicas creating the same month at once would otherwise collide.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK + 1)
            for start in missing:
                name = _partition_name(start)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF usage_records "
                    f"FOR VALUES FROM ('{start.isoformat()}') TO ('{_next_month(start).isoformat()}')"
                )
        self._partitions.update(_partition_name(m) for m in missing)

    async def drop_usage_before(self, cutoff: datetime) -> list[str]:
        """Retention: drop every month that ends at or before ``cutoff`` (naive means UTC), whole; the
        names of the dropped partitions."""
        cutoff = cutoff.replace(tzinfo=UTC) if cutoff.tzinfo is None else cutoff.astimezone(UTC)
        dropped = []
        async with self.db.transaction() as conn:
            names = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_records'"
            )
            for (name,) in names:
                try:
                    year, month = int(name[-7:-3]), int(name[-2:])
                except ValueError:
                    continue
                end = _next_month(datetime(year, month, 1, tzinfo=UTC))
                if end <= cutoff:
                    await conn.execute(f"DROP TABLE {name}")
                    await conn.execute(
                        "DELETE FROM usage_rollups WHERE day >= $1 AND day < $2",
                        datetime(year, month, 1).date(),
                        end.date(),
                    )
                    dropped.append(name)
                    self._partitions.discard(name)
        return sorted(dropped)

    def _where(self, since: datetime | None, session_id: str | None, client: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if since is not None:
            args.append(since.replace(tzinfo=UTC) if since.tzinfo is None else since)
            clauses.append(f"ts >= ${len(args)}")
        if session_id is not None:
            args.append(session_id)
            clauses.append(f"session_id = ${len(args)}")
        if client is not None:
            args.append(client)
            clauses.append(f"client = ${len(args)}")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    async def areport(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """The report ``by`` names (``stores.usage.REPORTS``), summed by the database from the rollups; when
        ``since`` falls inside a day, that day's part from the records. Its time grows with the groups."""
        if by not in REPORTS:
            raise KeyError(by)
        columns = _REPORT_COLUMNS[by]
        since_utc = None if since is None else (since.replace(tzinfo=UTC) if since.tzinfo is None else since)
        clauses: list[str] = []
        args: list[Any] = []
        partial_day = None
        if since_utc is not None:
            day = since_utc.astimezone(UTC).date()
            midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if since_utc > midnight:  # the day since starts in: from the records
                partial_day = (since_utc, midnight + timedelta(days=1))
                day += timedelta(days=1)
            args.append(day)
            clauses.append(f"day >= ${len(args)}")
        for column, value in (("session_id", session_id), ("client", client)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        keys = ", ".join(columns.values())
        if by == "deployment":  # the deployments of model groups (routing.py) are read from the records
            partial_day = None
            where, record_args = self._where(since_utc, session_id, client)
            record_keys = _RECORD_KEYS["deployment"]
            queries = [(f"SELECT {record_keys}, {_SUMS} FROM usage_records{where} GROUP BY 1", record_args)]
        else:
            queries = [(f"SELECT {keys}, {_ROLLUP_TOTALS} FROM usage_rollups{where} GROUP BY {keys}", args)]
        if partial_day is not None:
            where, record_args = self._where(partial_day[0], session_id, client)
            record_args.append(partial_day[1])
            where += f" AND ts < ${len(record_args)}"
            record_keys = ", ".join(_RECORD_KEYS[c] for c in columns)
            queries.append(
                (f"SELECT {record_keys}, {_SUMS} FROM usage_records{where} GROUP BY {record_keys}", record_args)
            )
        groups: dict[GroupKey, dict[str, Any]] = {}
        async with self.db.connection() as conn:
            for query, query_args in queries:
                for row in await conn.fetch(query, *query_args):
                    named = dict(zip(columns, row, strict=False))
                    day_value = named.get("day")
                    key: GroupKey = (
                        "" if day_value is None else ("unknown" if str(day_value) == "1970-01-01" else str(day_value)),
                        named.get("model"),
                        named.get("client"),
                        named.get("session"),
                        None,
                        named.get("deployment") or None,
                    )
                    values = list(row)[len(columns) :]
                    totals = _totals()
                    for n, field in enumerate(_TOKEN_FIELDS):
                        totals[field] = int(values[n] or 0)
                    totals["totalCost"] = float(values[6] or 0.0)
                    for n, field in enumerate(_COUNTS):
                        totals[field] = int(values[7 + n] or 0)
                    if values[10]:
                        totals["priceKnown"] = False
                    _merge(groups, key, totals)
        return {**report_from_groups(by, groups), "damagedFiles": []}

    async def arecords(
        self, *, since: datetime | None = None, session_id: str | None = None, client: str | None = None
    ) -> list[dict[str, Any]]:
        where, args = self._where(since, session_id, client)
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"SELECT record FROM usage_records{where} ORDER BY ts, id", *args)
        return [json.loads(r[0]) for r in rows]

    async def count(self) -> int:
        async with self.db.connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM usage_records"))

    async def flush(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])

    async def aclose(self) -> None:
        if not self._closed:
            await self.flush()
            self._closed = True


# --- clients ------------------------------------------------------------------------------------


def _clients_feature() -> tuple[Any, Any]:
    """``agentspace.clients`` and ``agentspace.stores.clients`` (the clients feature, SPEC 11)."""
    return importlib.import_module("agentspace.clients"), importlib.import_module("agentspace.stores.clients")


class PostgresClientStore:
    """The clients (SPEC 11) in the database: the async API of ``stores.clients.ClientStore``, one row per
    client (its stored form as JSON; only the key's hash), shared by every replica."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self._touched: dict[str, float] = {}

    def _client(self, stored: str) -> Any:
        clients, _ = _clients_feature()
        return clients.Client.from_stored(json.loads(stored))

    async def get_by_key(self, key: str) -> Any:
        clients, _ = _clients_feature()
        return await self.get_by_hash(clients.hash_key(key))

    async def get_by_hash(self, key_hash: str) -> Any:
        async with self.db.connection() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE key_hash = $1", key_hash)
        if stored is None:
            return None
        client = self._client(stored)
        return client if client.key_matches_hash(key_hash) else None

    async def get(self, name: str) -> Any:
        async with self.db.connection() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE name = $1", name)
        return None if stored is None else self._client(stored)

    async def list(self) -> builtins.list[Any]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT stored FROM clients ORDER BY name")
        return [self._client(r[0]) for r in rows]

    async def add(self, client: Any) -> str:
        """Store a new client (``client.key_hash`` is replaced); its key, the only time it is shown."""
        clients, store = _clients_feature()
        key = clients.new_key()
        client.key_hash = clients.hash_key(key)
        async with self.db.connection() as conn:
            added = await conn.fetchval(
                "INSERT INTO clients (name, key_hash, stored) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING RETURNING 1",
                client.name,
                client.key_hash,
                json.dumps(client.to_stored()),
            )
        if added is None:
            raise store.ClientExists(client.name)
        return str(key)

    async def copy_in(self, client: Any) -> bool:
        """Insert a stored client as it is, key hash included (``storage migrate``: its key keeps working);
        False when a client of that name is there already (then nothing changes)."""
        async with self.db.connection() as conn:
            added = await conn.fetchval(
                "INSERT INTO clients (name, key_hash, stored) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1",
                client.name,
                client.key_hash,
                json.dumps(client.to_stored()),
            )
        return added is not None

    async def update(self, name: str, change: Any) -> Any:
        """Apply ``change(client)`` to the stored client, under a row lock (replicas may update at once)."""
        _, store = _clients_feature()
        async with self.db.transaction() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE name = $1 FOR UPDATE", name)
            if stored is None:
                raise store.ClientNotFound(name)
            client = self._client(stored)
            change(client)
            await conn.execute(
                "UPDATE clients SET key_hash = $2, stored = $3 WHERE name = $1",
                name,
                client.key_hash,
                json.dumps(client.to_stored()),
            )
        return client

    async def rotate(self, name: str) -> str:
        clients, _ = _clients_feature()
        key = clients.new_key()

        def change(client: Any) -> None:
            client.key_hash = clients.hash_key(key)

        await self.update(name, change)
        return str(key)

    async def remove(self, name: str) -> None:
        _, store = _clients_feature()
        async with self.db.connection() as conn:
            if await conn.fetchval("DELETE FROM clients WHERE name = $1 RETURNING 1", name) is None:
                raise store.ClientNotFound(name)

    def should_touch(self, name: str, monotonic_now: float) -> bool:
        """Whether last use is due to be written (at most once per the clients store's interval)."""
        _, store = _clients_feature()
        last = self._touched.get(name)
        if last is not None and monotonic_now - last < store.TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[name] = monotonic_now
        return True

    async def touch(self, name: str, when: datetime | None = None) -> None:
        _, store = _clients_feature()
        stamp = now_iso() if when is None else when.isoformat()

        def change(client: Any) -> None:
            client.last_used_at = stamp

        with contextlib.suppress(store.ClientNotFound):
            await self.update(name, change)
