"""The clients in the postgres database, shared by every replica."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from ...clients import Client, hash_key, new_key
from ...types import now_iso
from ..errors import ClientExists, ClientNotFound
from ..shapes import TOUCH_INTERVAL_SECONDS
from .database import PostgresDatabase

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class PostgresClientStore:
    """The clients (README.md#teams-and-budgets) in the database: the async API of ``storage.embedded.clients.ClientStore``, one row per
    client (its stored form as JSON; only the key's hash), shared by every replica."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self._touched: dict[str, float] = {}

    def _client(self, stored: str) -> Client:
        return Client.from_stored(json.loads(stored))

    async def get_by_key(self, key: str) -> Client | None:
        return await self.get_by_hash(hash_key(key))

    async def get_by_hash(self, key_hash: str) -> Client | None:
        async with self.db.connection() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE key_hash = $1", key_hash)
        if stored is None:
            return None
        client = self._client(stored)
        return client if client.key_matches_hash(key_hash) else None

    async def get(self, name: str) -> Client | None:
        async with self.db.connection() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE name = $1", name)
        return None if stored is None else self._client(stored)

    async def list(self) -> builtins.list[Client]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT stored FROM clients ORDER BY name")
        return [self._client(r[0]) for r in rows]

    async def add(self, client: Client) -> str:
        """Store a new client (``client.key_hash`` is replaced); its key, the only time it is shown."""
        key = new_key()
        client.key_hash = hash_key(key)
        async with self.db.connection() as conn:
            added = await conn.fetchval(
                "INSERT INTO clients (name, key_hash, stored) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING RETURNING 1",
                client.name,
                client.key_hash,
                json.dumps(client.to_stored()),
            )
        if added is None:
            raise ClientExists(client.name)
        return str(key)

    async def copy_in(self, client: Client) -> bool:
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

    async def update(self, name: str, change: Callable[[Client], None]) -> Client:
        """Apply ``change(client)`` to the stored client, under a row lock (replicas may update at once)."""
        async with self.db.transaction() as conn:
            stored = await conn.fetchval("SELECT stored FROM clients WHERE name = $1 FOR UPDATE", name)
            if stored is None:
                raise ClientNotFound(name)
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
        key = new_key()

        def change(client: Client) -> None:
            client.key_hash = hash_key(key)

        await self.update(name, change)
        return str(key)

    async def remove(self, name: str) -> None:
        async with self.db.connection() as conn:
            if await conn.fetchval("DELETE FROM clients WHERE name = $1 RETURNING 1", name) is None:
                raise ClientNotFound(name)

    def should_touch(self, key: str, monotonic_now: float) -> bool:
        """Whether last use is due to be written (at most once a minute per ``key``: a client key's hash, so that a
        rotated key or a client added again under a removed one's name has its first use written at once)."""
        last = self._touched.get(key)
        if last is not None and monotonic_now - last < TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[key] = monotonic_now
        return True

    async def touch(self, name: str, when: datetime | None = None) -> None:
        stamp = now_iso() if when is None else when.isoformat()

        def change(client: Client) -> None:
            client.last_used_at = stamp

        with contextlib.suppress(ClientNotFound):
            await self.update(name, change)
