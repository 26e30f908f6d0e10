"""What the ledgers hold of the calls still open: the local journals of a data directory and the shared rows of
a PostgreSQL database. A test that kills a server mid-call waits for the notes it relies on to be written
(within a second or so, later on a loaded machine) rather than sleeping a fixed time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agentspace.storage.ledger import read_journal


async def journal_entries(data_dir: Path) -> list[dict[str, Any]]:
    """The open entries of every journal in ``data_dir``, each with its notes."""

    def read() -> list[dict[str, Any]]:
        return [e for path in sorted((data_dir / "ledger").glob("journal-*.jsonl")) for e in read_journal(path)]

    return await asyncio.to_thread(read)


async def shared_entries(dsn: str) -> list[dict[str, Any]]:
    """The open entries of the shared ledger (``ledger_pending``), each with its notes."""
    from agentspace.storage.postgres.database import PostgresDatabase

    db = PostgresDatabase(dsn)
    try:
        async with db.connection() as conn:
            rows = await conn.fetch("SELECT entry FROM ledger_pending")
    finally:
        await db.aclose()
    return [r["entry"] if isinstance(r["entry"], dict) else json.loads(r["entry"]) for r in rows]


def reported_and_relayed(entry: dict[str, Any]) -> bool:
    """The upstream's reported usage and some relayed output are noted: a recovery bills what was reported."""
    return isinstance(entry.get("usage"), dict) and int(entry.get("relayedTokens") or 0) > 0


async def wait_for_notes(
    entries: Callable[[], Awaitable[list[dict[str, Any]]]],
    count: int,
    noted: Callable[[dict[str, Any]], bool] = reported_and_relayed,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Poll ``entries`` until ``count`` of them satisfy ``noted``; those entries."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [e for e in await entries() if noted(e)]
        if len(found) >= count:
            return found
        assert loop.time() < deadline, f"{len(found)} of {count} ledger entries noted: {await entries()}"
        await asyncio.sleep(0.1)
