"""Usage records in the postgres database: append-only, partitioned by month, reports summed by the database."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ...errors import StorageError
from ...types import UsageRecord, new_id
from ..reports import (
    ADMIN_LEGACY_CLIENTS,
    COUNTS,
    REPORTS,
    TOKEN_FIELDS,
    GroupKey,
    empty_totals,
    merge,
    report_from_groups,
    server_tool_uses,
)
from .database import PostgresDatabase, clean_text, unreachable
from .migrations import MIGRATION_LOCK

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# Records inserted per transaction at most.
BATCH_SIZE = 500

_TOKEN_COLUMNS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "totalTokens": "total_tokens",
    "cacheReadTokens": "cache_read_tokens",
    "cacheWriteTokens": "cache_write_tokens",
    "reasoningTokens": "reasoning_tokens",
}
assert tuple(_TOKEN_COLUMNS) == TOKEN_FIELDS


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


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        str(record.get("id") or new_id("u_")),
        parse_time(record.get("timestamp")),
        clean_text(str(record.get("model") or "unknown")),
        clean_text(record.get("client")),
        clean_text(record.get("sessionId")),
        *(int(record.get(key) or 0) for key in TOKEN_FIELDS),
        float(record.get("totalCost") or 0.0),
        record.get("answered") is not False,
        bool(record.get("error")) or record.get("finishReason") == "error",
        bool(record.get("estimated")),
        record.get("priceKnown") is False,
        float(record.get("serverToolCost") or 0.0),
        server_tool_uses(record),
        json.dumps(record),
    )


_COLUMNS = ("id", "ts", "model", "client", "session_id", *_TOKEN_COLUMNS.values(), "total_cost", "answered",
            "is_error", "estimated", "price_unknown", "server_tool_cost", "server_tool_uses", "record")  # fmt: skip
_TYPES = ("text", "timestamptz", "text", "text", "text", *["bigint"] * 6, "float8", "bool", "bool", "bool", "bool",
          "float8", "bigint", "text")  # fmt: skip
# One statement per batch: a column array per column (no per-row round trip, no named statement needed),
# the rows that were new counted, and their totals added to the rollups in the same statement (so in the
# same transaction: a report never sees a record without its rollup, or the other way round): to
# ``usage_rollups``, and to ``usage_rollups_nosession``, the same without the session, which the reports that
# ask for no session read. The rollup rows are upserted in key order, table after table in the one plan every
# replica runs, so concurrent batches of replicas lock them in the same order.
_ROLLUP_SUMS = (
    "sum(input_tokens), sum(output_tokens), sum(total_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
    "sum(reasoning_tokens), sum(total_cost), count(*) FILTER (WHERE answered), count(*) FILTER (WHERE is_error), "
    "count(*) FILTER (WHERE estimated), bool_or(price_unknown), sum(server_tool_cost), sum(server_tool_uses), "
    "count(*)"
)
_ADDED = ("input_tokens", "output_tokens", "total_tokens", "cache_read_tokens", "cache_write_tokens",
          "reasoning_tokens", "total_cost", "answered", "errors", "estimated", "server_tool_cost",
          "server_tool_uses", "records")  # fmt: skip
# A record as reported whose call has a recovered estimate stored (``usage_recovered``, a small table, looked
# up by id) is held back: its ids are returned, and ``_insert`` puts it in the estimate's place.
_INSERT = (
    f"WITH src AS (SELECT * FROM unnest({', '.join(f'${n}::{t}[]' for n, t in enumerate(_TYPES, 1))}, "
    f"${len(_TYPES) + 1}::text[], ${len(_TYPES) + 2}::bool[]) AS t({', '.join(_COLUMNS)}, endpoint, recovered)), "
    "held AS (SELECT s.id FROM src s JOIN usage_recovered r ON r.id = s.id WHERE NOT s.recovered), "
    f"new AS (INSERT INTO usage_records ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM src "
    "WHERE id NOT IN (SELECT id FROM held) ON CONFLICT DO NOTHING RETURNING id, ts), "
    "added AS (INSERT INTO usage_rollups "
    "SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), coalesce(session_id, ''), endpoint, "
    f"{_ROLLUP_SUMS} FROM src JOIN new USING (id, ts) GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
    "ON CONFLICT (day, model, client, session_id, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = usage_rollups.{c} + EXCLUDED.{c}" for c in _ADDED)
    + ", price_unknown = usage_rollups.price_unknown OR EXCLUDED.price_unknown), "
    "merged AS (INSERT INTO usage_rollups_nosession "
    "SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), endpoint, "
    f"{_ROLLUP_SUMS} FROM src JOIN new USING (id, ts) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
    "ON CONFLICT (day, model, client, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = usage_rollups_nosession.{c} + EXCLUDED.{c}" for c in _ADDED)
    + ", price_unknown = usage_rollups_nosession.price_unknown OR EXCLUDED.price_unknown) "
    "SELECT (SELECT count(*) FROM new), ARRAY(SELECT id FROM held)"
)
# The estimates of ``$1`` (ids) out: their records, their marks and their share of both rollups (summed per rollup
# row first: an UPDATE ... FROM changes a row once, whatever number of rows it matches). A rollup row left with no
# record (its call's record is in another group: another day, model, ...) is deleted instead, as the embedded store's
# reports, which group the records, have no such group. Their clients and costs.


def _same_group(other: str, *keys: str) -> str:
    """A rollup row ``r`` and the group ``other`` share (day, model, client, endpoint) and ``keys``."""
    return " AND ".join(f"r.{k} = {other}.{k}" for k in ("day", "model", "client", "endpoint", *keys))


_UNPOST = (
    "WITH est AS (DELETE FROM usage_recovered WHERE id = ANY($1::text[]) RETURNING id, ts), "
    "gone AS (DELETE FROM usage_records u USING est WHERE u.id = est.id AND u.ts = est.ts RETURNING u.*), "
    "g AS (SELECT (ts AT TIME ZONE 'UTC')::date AS day, model, coalesce(client, '') AS client, "
    "coalesce(session_id, '') AS session_id, coalesce(record::jsonb->>'endpoint', '') AS endpoint, "
    + ", ".join(
        f"{e} AS {c}"
        for e, c in zip(_ROLLUP_SUMS.replace("bool_or(price_unknown), ", "").split(", "), _ADDED, strict=True)
    )
    + " FROM gone GROUP BY 1, 2, 3, 4, 5), "
    "rolled AS (UPDATE usage_rollups r SET "
    + ", ".join(f"{c} = r.{c} - g.{c}" for c in _ADDED)
    + f" FROM g WHERE {_same_group('g', 'session_id')} AND r.records <> g.records), "
    f"emptied AS (DELETE FROM usage_rollups r USING g WHERE {_same_group('g', 'session_id')} AND r.records = g.records), "
    "m AS (SELECT day, model, client, endpoint, "
    + ", ".join(f"sum({c}) AS {c}" for c in _ADDED)
    + " FROM g GROUP BY 1, 2, 3, 4), "
    "merged AS (UPDATE usage_rollups_nosession r SET "
    + ", ".join(f"{c} = r.{c} - m.{c}" for c in _ADDED)
    + f" FROM m WHERE {_same_group('m')} AND r.records <> m.records), "
    f"merged_emptied AS (DELETE FROM usage_rollups_nosession r USING m WHERE {_same_group('m')} "
    "AND r.records = m.records) "
    "SELECT client, total_cost FROM gone"
)

_SUMS = (
    ", ".join(f"sum({column})::bigint" for column in _TOKEN_COLUMNS.values())
    + ", sum(total_cost), count(*) FILTER (WHERE answered), count(*) FILTER (WHERE is_error),"
    " count(*) FILTER (WHERE estimated), bool_or(price_unknown), sum(server_tool_cost),"
    " sum(server_tool_uses)::bigint"
)


# The rollup columns each report groups by (the labels are made as ``storage.reports`` makes them: records of
# the gateway token, client "ws"/"http" or none, are the admin's), and the same from the records.
_REPORT_COLUMNS: dict[str, dict[str, str]] = {
    "model": {"model": "model"},
    "day": {"day": "day"},
    "client": {"client": "client"},
    "session": {"session": "session_id"},
    "day-model": {"day": "day", "model": "model"},
    "deployment": {"deployment": "deployment"},  # not in the rollups: summed from the records
    "endpoint": {"endpoint": "endpoint"},
}
_RECORD_KEYS = {
    "day": "(ts AT TIME ZONE 'UTC')::date",
    "model": "model",
    "client": "coalesce(client, '')",
    "session": "coalesce(session_id, '')",
    "deployment": "coalesce(record::json->>'deployment', '')",
    "endpoint": "coalesce(record::json->>'endpoint', '')",
}


def _client_clause(column: str, client: str, args: list[Any]) -> str:
    """The records of ``client``; of "admin", also those that name no client (``stores.usage.owner``)."""
    args.append([client, *ADMIN_LEGACY_CLIENTS] if client == "admin" else [client])
    return f"{column} = ANY(${len(args)}::text[])"


_ROLLUP_TOTALS = (
    "sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(total_tokens)::bigint, "
    "sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint, sum(reasoning_tokens)::bigint, "
    "sum(total_cost), sum(answered)::bigint, sum(errors)::bigint, sum(estimated)::bigint, bool_or(price_unknown), "
    "sum(server_tool_cost), sum(server_tool_uses)::bigint"
)


class PostgresUsageStore:
    def __init__(self, db: PostgresDatabase, batch_size: int = BATCH_SIZE) -> None:
        self.db = db
        self.batch_size = batch_size
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._partitions: set[str] = set()
        self._closed = False
        # Takes an estimate's cost out of its client's spend (``limits.Guard.unsettle``), set by the gateway.
        self.unsettle: Callable[[str | None, float], Awaitable[None]] | None = None

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
                error = e if isinstance(e, StorageError) else unreachable(e)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _insert(self, records: Sequence[dict[str, Any]]) -> int:
        """Insert in one transaction; how many records were new (the others were stored already). One record
        per call id, whatever its time: a recovered estimate of a call already recorded as reported is not
        stored, and a record as reported takes the place of its call's estimate. Either way the estimate's cost
        goes out of its client's spend again (``unsettle``), which the record's settling counts once."""
        rows = [_row(r) for r in records]
        if not rows:
            return 0
        # One row per key (id, time): a record twice in a batch (a data directory that holds it twice, migrated) is
        # stored once by the conflict clause, but every copy of it would be added to the rollups. (An estimate and
        # its call's record have one id, not one time: both go on, and the record takes the estimate's place.)
        firsts: dict[tuple[Any, ...], int] = {}
        for n, row in enumerate(rows):
            firsts.setdefault(row[:2], n)
        if len(firsts) < len(rows):
            records, rows = [records[n] for n in firsts.values()], [rows[n] for n in firsts.values()]
        await self._ensure_partitions({_month_start(row[1]) for row in rows})
        recovered = [bool(r.get("recovered")) for r in records]
        endpoints = [str(r.get("endpoint") or "") for r in records]
        unposted: list[tuple[str | None, float]] = []
        async with self.db.transaction() as conn:
            if any(recovered):
                rows, endpoints, recovered = await self._admit_estimates(conn, rows, endpoints, recovered, unposted)
            new, held = await conn.fetchrow(_INSERT, *_columns(rows), endpoints, recovered) if rows else (0, [])
            if held:  # rare: the records as reported of calls another replica recovered meanwhile
                unposted += [(r["client"], float(r["total_cost"])) for r in await conn.fetch(_UNPOST, held)]
                again = [n for n, row in enumerate(rows) if row[0] in set(held)]
                more, _ = await conn.fetchrow(
                    _INSERT,
                    *_columns([rows[n] for n in again]),
                    [endpoints[n] for n in again],
                    [recovered[n] for n in again],
                )
                new += more
        for client, cost in unposted:
            if self.unsettle is not None:
                await self.unsettle(client, cost)
        return int(new)

    async def _admit_estimates(
        self,
        conn: Any,
        rows: list[tuple[Any, ...]],
        endpoints: list[str],
        recovered: list[bool],
        unposted: list[tuple[str | None, float]],
    ) -> tuple[list[tuple[Any, ...]], list[str], list[bool]]:
        """The rows to insert, without the estimates of calls recorded already (as reported, or estimated by a
        recovery before); the others marked.
        Under a lock every insert waits for (it reads ``usage_recovered``), taken once the inserts running have
        committed: a record as reported is either seen here or sees the mark, never neither."""
        await conn.execute("LOCK TABLE usage_recovered IN ACCESS EXCLUSIVE MODE")
        estimates = [row for row, r in zip(rows, recovered, strict=True) if r]
        # A record is made at its call's end, after the estimate's time (the call's start, on the same clock).
        since = min(row[1] for row in estimates) - timedelta(minutes=5)
        ids = [row[0] for row in estimates]
        recorded = {
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM usage_recovered WHERE id = ANY($1::text[]) UNION "
                "SELECT id FROM usage_records WHERE id = ANY($1::text[]) AND ts >= $2",
                ids,
                since,
            )
        }
        keep = [n for n, row in enumerate(rows) if not (recovered[n] and row[0] in recorded)]
        unposted += [(rows[n][3], float(rows[n][11])) for n in range(len(rows)) if n not in set(keep)]
        await conn.execute(
            "INSERT INTO usage_recovered SELECT * FROM unnest($1::text[], $2::timestamptz[]) ON CONFLICT DO NOTHING",
            [rows[n][0] for n in keep if recovered[n]],
            [rows[n][1] for n in keep if recovered[n]],
        )
        return [rows[n] for n in keep], [endpoints[n] for n in keep], [recovered[n] for n in keep]

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
                    await conn.execute("DELETE FROM usage_recovered WHERE ts < $1", end)
                    for table in ("usage_rollups", "usage_rollups_nosession"):
                        await conn.execute(
                            f"DELETE FROM {table} WHERE day >= $1 AND day < $2",
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
            clauses.append(_client_clause("coalesce(client, '')", client, args))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    async def report(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """The report ``by`` names (``storage.reports.REPORTS``), summed by the database from the rollups; when
        ``since`` falls inside a day, that day's part from the records. Its time grows with the groups."""
        if by not in REPORTS:
            raise KeyError(by)
        columns, queries = self._report_queries(by, since, session_id, client)
        async with self.db.connection() as conn:
            groups = await _fetch_groups(conn, columns, queries)
        return {**report_from_groups(by, groups), "damagedFiles": []}

    async def spend(
        self, *, client: str, since: datetime | None, posting: Callable[[], Mapping[str, str]]
    ) -> tuple[float, set[str]]:
        """The cost of ``client``'s records since ``since``, from the rollups, and which records of ``posting()``
        (id: timestamp; taken just before the snapshot) it counts: both read in one snapshot."""
        columns, queries = self._report_queries("model", since, None, client)
        async with self.db.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            ids = dict(posting())  # the transaction's snapshot is taken by its first statement, just below
            found = await conn.fetch(
                "SELECT id FROM usage_records WHERE (ts, id) IN (SELECT * FROM unnest($1::timestamptz[], $2::text[]))",
                [parse_time(ts) for ts in ids.values()],
                list(ids),
            )
            groups = await _fetch_groups(conn, columns, queries)
        return sum(float(g["totalCost"]) for g in groups.values()), {str(r[0]) for r in found}

    def _report_queries(
        self, by: str, since: datetime | None, session_id: str | None, client: str | None
    ) -> tuple[dict[str, str], list[tuple[str, list[Any]]]]:
        """The report's columns and its queries: the rollups, and the records of a day ``since`` starts inside."""
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
        if session_id is not None:
            args.append(session_id)
            clauses.append(f"session_id = ${len(args)}")
        if client is not None:
            clauses.append(_client_clause("client", client, args))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        keys = ", ".join(columns.values())
        if by == "deployment":  # the deployments of model groups (routing.py) are read from the records
            partial_day = None
            where, record_args = self._where(since_utc, session_id, client)
            record_keys = _RECORD_KEYS["deployment"]
            queries = [(f"SELECT {record_keys}, {_SUMS} FROM usage_records{where} GROUP BY 1", record_args)]
        else:
            # Without a session asked for (grouped by or filtered on), the rollups merged without it: as many
            # rows as groups, however many sessions (a client may make each call a session of its own).
            table = "usage_rollups" if by == "session" or session_id is not None else "usage_rollups_nosession"
            queries = [(f"SELECT {keys}, {_ROLLUP_TOTALS} FROM {table}{where} GROUP BY {keys}", args)]
        if partial_day is not None:
            where, record_args = self._where(partial_day[0], session_id, client)
            record_args.append(partial_day[1])
            where += f" AND ts < ${len(record_args)}"
            record_keys = ", ".join(_RECORD_KEYS[c] for c in columns)
            queries.append(
                (f"SELECT {record_keys}, {_SUMS} FROM usage_records{where} GROUP BY {record_keys}", record_args)
            )
        return columns, queries

    async def records(
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


async def _fetch_groups(
    conn: Any, columns: dict[str, str], queries: list[tuple[str, list[Any]]]
) -> dict[GroupKey, dict[str, Any]]:
    """The group totals the report's queries give."""
    groups: dict[GroupKey, dict[str, Any]] = {}
    for query, query_args in queries:
        for row in await conn.fetch(query, *query_args):
            named = dict(zip(columns, row, strict=False))
            day_value = named.get("day")
            key: GroupKey = (
                "" if day_value is None else ("unknown" if str(day_value) == "1970-01-01" else str(day_value)),
                named.get("model"),
                named.get("client"),
                named.get("session"),
                named.get("endpoint") or None,
                named.get("deployment") or None,
            )
            values = list(row)[len(columns) :]
            totals = empty_totals()
            for n, field in enumerate(TOKEN_FIELDS):
                totals[field] = int(values[n] or 0)
            totals["totalCost"] = float(values[6] or 0.0)
            for n, field in enumerate(COUNTS):
                totals[field] = int(values[7 + n] or 0)
            if values[10]:
                totals["priceKnown"] = False
            totals["serverToolCost"] = float(values[11] or 0.0)
            totals["serverToolUses"] = int(values[12] or 0)
            merge(groups, key, totals)
    return groups
