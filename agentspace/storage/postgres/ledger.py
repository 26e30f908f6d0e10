"""The ledger's pending entries in PostgreSQL, shared by the replicas (docs/accounting.md).

With ``[storage] backend = "postgres"`` every pending entry is also a row of ``ledger_pending``, written
before the call goes upstream (a database that cannot take it refuses the call), with a lease
(``[storage] lease_seconds``, 20 by default): the replica that owns the call renews it every quarter lease
while it runs. A replica that dies leaves rows whose lease lapses; every replica looks for such rows every
quarter lease (after the database was out of reach, not before a whole lease has passed: meanwhile every
live replica renewed its own), claims them (one replica each: ``FOR UPDATE SKIP LOCKED``), posts each call
from what was noted (``calls.recovered_record``) and deletes the row. Usage records are inserted once per id,
so a recovery that runs twice posts nothing twice; a live replica that was only cut off for longer than a
lease posts its calls' records later, and each takes its estimate's place (``storage/postgres/usage.py``,
``usage_recovered``).

Notes and closings are batched: one statement per kind per flush, at most a second after they happen.

A replica killed while the database was down may have spooled records (``storage/ledger.py``) of calls whose
rows another replica then recovered with estimates. When it starts again, it posts those spooled records, and
the usage store puts each, as the upstream reported it, in its estimate's place (the estimate's record and its
share of the rollups taken out, in the same transaction).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .database import PostgresDatabase
from .usage import parse_time

if TYPE_CHECKING:
    from ..shapes import LedgerEntry

log = logging.getLogger(__name__)

LEASE_SECONDS = 20.0  # the default of [storage] lease_seconds
FLUSH_SECONDS = 1.0
LOCK_KEY = 0x61670001  # the advisory lock taken while the table is created
_CREATE = """
CREATE TABLE IF NOT EXISTS ledger_pending (
    id text PRIMARY KEY,
    replica text NOT NULL,
    lease_until timestamptz NOT NULL,
    entry jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_pending_lease ON ledger_pending (lease_until);
"""


class PostgresLedger:
    def __init__(self, db: PostgresDatabase, replica: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self.db = db
        self.replica = replica
        self.lease_seconds = float(lease_seconds)
        self.renew_seconds = self.lease_seconds / 4  # renewed and scanned for lapsed rows this often
        self._notes: dict[str, dict[str, Any]] = {}
        self._closed: set[str] = set()
        self._flush_at: asyncio.TimerHandle | None = None
        self._flush_due = 0.0
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # flushes running (kept referenced)
        self._lock = asyncio.Lock()

    async def start(self, recover: Callable[[dict[str, Any]], Awaitable[bool]]) -> None:
        """Create the table (once, whoever comes first) and start renewing, flushing and recovering."""
        async with self.db.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            await conn.execute(_CREATE)
        self._task = asyncio.get_running_loop().create_task(self._run(recover), name="agentspace-ledger-leases")

    async def pending(self, entry: LedgerEntry) -> None:
        """The pending row, committed once awaited; StorageError when the database cannot take it."""
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO ledger_pending (id, replica, lease_until, entry) "
                "VALUES ($1, $2, now() + make_interval(secs => $3), $4::jsonb) ON CONFLICT (id) DO NOTHING",
                entry["id"],
                self.replica,
                self.lease_seconds,
                json.dumps(entry),
            )

    def note(self, entry_id: str, fields: dict[str, Any], soon: bool = True) -> None:
        """Reported usage goes with the next flush, soon (a replica may die any moment after it); the output
        relayed within a second."""
        self._notes.setdefault(entry_id, {}).update(fields)
        self._schedule(0.0 if soon else FLUSH_SECONDS)

    def closed(self, entry_id: str) -> None:
        self._notes.pop(entry_id, None)
        self._closed.add(entry_id)
        self._schedule()

    def _schedule(self, delay: float = FLUSH_SECONDS) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._flush_at is not None:
            if self._flush_due <= due:
                return
            self._flush_at.cancel()
        self._flush_at, self._flush_due = loop.call_later(delay, self._start_flush), due

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_once())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_once(self) -> None:
        async with self._lock:  # one flush at a time: notes stay in order
            await self.flush()

    async def flush(self) -> None:
        self._flush_at = None
        notes, self._notes = self._notes, {}
        closed, self._closed = self._closed, set()
        try:
            async with self.db.connection() as conn:
                if notes:
                    await conn.executemany(
                        "UPDATE ledger_pending SET entry = entry || $2::jsonb WHERE id = $1",
                        [(k, json.dumps(v)) for k, v in notes.items()],
                    )
                if closed:
                    await conn.execute("DELETE FROM ledger_pending WHERE id = ANY($1::text[])", list(closed))
        except Exception as e:  # the database away: try again with the next flush
            log.warning("the shared ledger could not be updated (%r); retrying", e)
            for k, v in notes.items():
                if k not in self._closed:
                    self._notes.setdefault(k, {}).update(v)
            self._closed |= closed
            self._schedule()

    async def _run(self, recover: Callable[[dict[str, Any]], Awaitable[bool]]) -> None:
        renew_due = scan_due = 0.0
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            try:
                if now >= renew_due:
                    renew_due = now + self.renew_seconds
                    async with self.db.connection() as conn:
                        await conn.execute(
                            "UPDATE ledger_pending SET lease_until = now() + make_interval(secs => $2) "
                            "WHERE replica = $1",
                            self.replica,
                            self.lease_seconds,
                        )
                if now >= scan_due:
                    scan_due = now + self.renew_seconds
                    await self._recover_lapsed(recover)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("the shared ledger's leases could not be renewed or scanned: %r", e)
                # The database away: no replica could renew, so leases lapse without their replica being
                # dead. Claim nothing until a whole lease after it is back: the live ones renew first.
                scan_due = loop.time() + self.lease_seconds
            await asyncio.sleep(self.renew_seconds)

    async def _recover_lapsed(self, recover: Callable[[dict[str, Any]], Awaitable[bool]]) -> int:
        """Claim the rows of dead replicas (lease lapsed), post each call, delete its row."""
        async with self.db.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE ledger_pending SET replica = $1, lease_until = now() + make_interval(secs => $2) "
                "WHERE id IN (SELECT id FROM ledger_pending WHERE lease_until < now() "
                "ORDER BY lease_until LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id, entry",
                self.replica,
                self.lease_seconds,
            )
        if not rows:
            return 0
        entries = {
            row["id"]: json.loads(row["entry"]) if isinstance(row["entry"], str) else row["entry"] for row in rows
        }
        # A call's record is stamped at or after its start (on the same clock): the months before are not read.
        since = min(parse_time(entry.get("time")) for entry in entries.values()) - timedelta(minutes=5)
        async with self.db.connection() as conn:  # posted already: the owner died before its row was deleted
            stored = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM usage_records WHERE id = ANY($1::text[]) AND ts >= $2", list(entries), since
                )
            }
        done = [row["id"] for row in rows if row["id"] in stored]
        for row in rows:
            if row["id"] in stored:
                continue
            entry = entries[row["id"]]
            try:
                if await recover(entry):
                    done.append(row["id"])
            except Exception:
                log.exception("recovering call %s from the shared ledger failed", row["id"])
        if done:
            async with self.db.connection() as conn:
                await conn.execute("DELETE FROM ledger_pending WHERE id = ANY($1::text[])", done)
        return len(done)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._flush_at is not None:
            self._flush_at.cancel()
        if self._notes or self._closed:
            await self.flush()
