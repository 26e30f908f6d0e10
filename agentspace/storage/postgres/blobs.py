"""The blob store of the postgres backend: ``blobs`` (bytes by SHA-256) and ``blob_refs`` (the sessions using
each), created by migration 5 (``storage/postgres/migrations.py``). The same contract as
``storage.embedded.blobs.FileBlobStore``."""

from __future__ import annotations

from typing import Any


class PostgresBlobStore:
    def __init__(self, db: Any) -> None:
        self.db = db  # storage.postgres.database.PostgresDatabase

    async def put(self, sha256: str, data: bytes, session_id: str) -> None:
        async with self.db.transaction() as conn:
            # DO UPDATE (not NOTHING) locks the row: a release deleting it waits for this reference.
            await conn.execute(
                "INSERT INTO blobs (sha256, size, data) VALUES ($1, $2, $3) "
                "ON CONFLICT (sha256) DO UPDATE SET size = EXCLUDED.size",
                sha256,
                len(data),
                data,
            )
            await conn.execute(
                "INSERT INTO blob_refs (sha256, session_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", sha256, session_id
            )

    async def get(self, sha256: str) -> bytes | None:
        async with self.db.connection() as conn:
            data = await conn.fetchval("SELECT data FROM blobs WHERE sha256 = $1", sha256)
        return bytes(data) if data is not None else None

    async def release(self, session_id: str) -> list[str]:
        async with self.db.transaction() as conn:
            rows = await conn.fetch("DELETE FROM blob_refs WHERE session_id = $1 RETURNING sha256", session_id)
            hashes = [r["sha256"] for r in rows]
            if not hashes:
                return []
            # Locked first: a put of the same blob for another session commits before the check below, which
            # then sees its reference (each statement reads what was committed before it began).
            await conn.execute("SELECT 1 FROM blobs WHERE sha256 = ANY($1::text[]) FOR UPDATE", hashes)
            gone = await conn.fetch(
                "DELETE FROM blobs b WHERE sha256 = ANY($1::text[]) "
                "AND NOT EXISTS (SELECT 1 FROM blob_refs r WHERE r.sha256 = b.sha256) RETURNING sha256",
                hashes,
            )
        return sorted(r["sha256"] for r in gone)

    async def hashes(self) -> list[str]:
        async with self.db.connection() as conn:
            return [r["sha256"] for r in await conn.fetch("SELECT sha256 FROM blobs ORDER BY sha256")]

    async def sessions_of(self, sha256: str) -> list[str]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT session_id FROM blob_refs WHERE sha256 = $1 ORDER BY session_id", sha256)
        return [r["session_id"] for r in rows]
