"""What an edit of a session's first message costs in the store: every later message set aside (``replaced``).

    python benchmarks/set_aside_bench.py [--postgres | --postgres-only] [--runs N]

Sessions of 1,200 and 12,000 later messages; the time of ``pipeline._set_aside`` (what an edit or a regenerate
awaits before its call), durable once it returns, on the embedded store and (``--postgres``) on a throwaway
PostgreSQL server (``tests/scale_servers.py``). The median of ``--runs`` runs, each on a session of its own;
seeding is setup, not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agentspace import pipeline
from agentspace.storage import SessionStore

LATER = (1_200, 12_000)


def messages(later: int) -> list[dict[str, Any]]:
    turns = [{"id": "u0", "role": "user", "content": "first"}]
    for n in range(later):
        role = "assistant" if n % 2 == 0 else "user"
        turns.append({"id": f"m{n}", "role": role, "content": f"message {n} " + "x" * 200})
    return turns


async def timed(sessions: Any, later: int, runs: int) -> float:
    gw: Any = SimpleNamespace(sessions=sessions)
    times = []
    for run in range(runs):
        session_id = f"s{later}-{run}"
        await sessions.create(model="m", session_id=session_id, messages=messages(later))
        got = await sessions.get(session_id)
        start = time.perf_counter()
        await pipeline._set_aside(gw, session_id, got["messages"][1:])
        times.append((time.perf_counter() - start) * 1000)
        assert (await sessions.get(session_id))["messageCount"] == 1
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", action="store_true", help="also on a throwaway PostgreSQL server")
    parser.add_argument("--postgres-only", action="store_true", help="only on a throwaway PostgreSQL server")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not args.postgres_only:
        await embedded(args.runs)
    if args.postgres or args.postgres_only:
        await postgres(args.runs)


async def embedded(runs: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        sessions = SessionStore(Path(root))
        try:
            for later in LATER:
                print(f"embedded, {later:>6,} set aside: {await timed(sessions, later, runs):8.1f} ms")
        finally:
            await sessions.aclose()


async def postgres(runs: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agentspace.storage.postgres import PostgresDatabase, PostgresSessionStore
    from tests.scale_servers import Postgres

    server = Postgres()  # started
    try:
        db = PostgresDatabase(server.dsn)
        await db.start()
        store = PostgresSessionStore(db)
        try:
            for later in LATER:
                print(f"postgres, {later:>6,} set aside: {await timed(store, later, runs):8.1f} ms")
        finally:
            await db.aclose()
    finally:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
