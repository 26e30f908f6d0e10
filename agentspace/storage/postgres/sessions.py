"""Sessions and their messages in the postgres database (documents kept as JSON text, exactly as given).

A session's ``message_count`` counts the messages its client sees: the answers set aside (``replaced``) are kept
and left out of it, as the embedded store's ``seenCount`` (migration 10 counted the sessions written before)."""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from ...types import new_id, now_iso
from ..errors import MessageNotFound, SessionExists, SessionNotFound
from ..shapes import Listing, is_valid_session_id, stored_message, title_from, validate_session_id
from .database import PostgresDatabase, clean_text, load_asyncpg

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def _seen(messages: Sequence[dict[str, Any]]) -> int:
    return sum(1 for m in messages if not m.get("replaced"))


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
    found = is_valid_session_id(session_id) and await conn.fetchval(
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
        stored = [stored_message(m) for m in messages]
        if title is None:
            title = next((t for m in stored if m.get("role") == "user" and (t := title_from(m))), None)
        now = now_iso()
        asyncpg = load_asyncpg()
        try:
            async with self.db.transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO sessions (id, title, model, created_at, last_activity_at, message_count, client) "
                    "VALUES ($1, $2, $3, $4, $4, $5, $6) "
                    "RETURNING id, title, model, created_at, last_activity_at, message_count, client",
                    session_id,
                    clean_text(title),
                    clean_text(model),
                    now,
                    _seen(stored),
                    clean_text(client),
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
        if not is_valid_session_id(session_id):
            return None
        async with self.db.connection() as conn:
            row = await conn.fetchrow(_SUMMARY_SQL + " WHERE id = $1", session_id)
            if row is None:
                return None
            bodies = await conn.fetch("SELECT body FROM messages WHERE session_id = $1 ORDER BY seq", session_id)
        return {**_summary(row), "messages": [json.loads(r["body"]) for r in bodies]}

    async def exists(self, session_id: str) -> bool:
        self._check_open()
        if not is_valid_session_id(session_id):
            return False
        async with self.db.connection() as conn:
            return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)", session_id))

    async def summaries(self) -> builtins.list[dict[str, Any]]:
        return (await self.listing()).sessions

    async def listing(self) -> Listing:
        self._check_open()
        async with self.db.connection() as conn:
            rows = await conn.fetch(_SUMMARY_SQL + " ORDER BY last_activity_at DESC, created_at DESC, id DESC")
        return Listing(sessions=[_summary(r) for r in rows])

    def awaiting_sync(self, session_id: str | None) -> Awaitable[None] | None:
        return None  # every write is committed before it returns

    async def append_message(self, session_id: str, message: dict[str, Any], *, sync: bool = True) -> None:
        self._check_open()
        message = stored_message(message)
        if not is_valid_session_id(session_id):
            raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
        title = title_from(message) if message.get("role") == "user" else None
        async with self.db.transaction() as conn:
            # The row lock on the session orders concurrent appends.
            count = await conn.fetchval(
                "UPDATE sessions SET message_count = message_count + $4, last_activity_at = $2, "
                "title = CASE WHEN coalesce(title, '') = '' AND $3::text IS NOT NULL THEN $3 ELSE title END "
                "WHERE id = $1 RETURNING message_count",
                session_id,
                now_iso(),
                clean_text(title),
                _seen([message]),
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
            before = [json.loads(r["body"]) for r in rows]
            after = [{**body, **changes} for body in before]
            await conn.executemany(
                "UPDATE messages SET body = $3 WHERE session_id = $1 AND seq = $2",
                [(session_id, r["seq"], json.dumps(body)) for r, body in zip(rows, after, strict=True)],
            )
            if _seen(after) != _seen(before):  # set aside (or back): the count follows
                await conn.execute(
                    "UPDATE sessions SET message_count = message_count + $2 WHERE id = $1",
                    session_id,
                    _seen(after) - _seen(before),
                )

    async def set_aside(self, session_id: str, message_ids: Sequence[str]) -> None:
        """The messages ``message_ids`` set aside (``replaced``) in one transaction, all or none: one statement
        reads them and one writes them all with the session's count, whatever their number."""
        self._check_open()
        ids = builtins.list(message_ids)
        async with self.db.transaction() as conn:
            await _bump(conn, session_id)  # the session's row first, as every write of its messages
            rows = await conn.fetch(
                "SELECT seq, id, body FROM messages WHERE session_id = $1 AND id = ANY($2::text[]) FOR UPDATE",
                session_id,
                ids,
            )
            if missing := set(ids) - {r["id"] for r in rows}:
                raise MessageNotFound(f"message {str(min(missing))[:40]!r} not found in session {session_id!r}")
            before = [json.loads(r["body"]) for r in rows]
            await conn.execute(
                "WITH given (seq, body) AS (SELECT * FROM unnest($2::integer[], $3::text[])), "
                "written AS (UPDATE messages SET body = given.body FROM given "
                "WHERE messages.session_id = $1 AND messages.seq = given.seq) "
                "UPDATE sessions SET message_count = message_count - $4 WHERE id = $1",
                session_id,
                [r["seq"] for r in rows],
                [json.dumps({**body, "replaced": True}) for body in before],
                _seen(before),  # the ones the client saw until now: the count follows
            )

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        self._check_open()
        if not is_valid_session_id(session_id) or (limit is not None and limit <= 0):
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
            await _bump(conn, session_id, clean_text(title))  # as on every other write: text refuses NUL

    async def touch(self, session_id: str) -> None:
        self._check_open()
        async with self.db.connection() as conn:
            await _bump(conn, session_id)

    async def delete(self, session_id: str) -> bool:
        self._check_open()
        if not is_valid_session_id(session_id):
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
                clean_text(session.get("title")),
                clean_text(session.get("model")),
                session.get("createdAt") or now_iso(),
                session.get("lastActivityAt") or session.get("createdAt") or now_iso(),
                _seen(messages),
                clean_text(session.get("client")),
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
