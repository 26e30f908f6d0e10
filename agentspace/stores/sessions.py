"""SessionStore: conversations, one file per session.

``data_dir/sessions/<id>.json`` is a tinydb file (``tinydb_file``): table ``session`` holds one document,
the summary (id, title, model, createdAt, lastActivityAt, messageCount, client); table ``messages`` holds
the messages in order. Every change writes the session's file whole and atomically, so a reader (the CLI,
while the server writes) and a crash see the file before the change or after it, never between.

The server's async methods run on the store thread (``store_thread``) and keep the sessions they touched
parsed (the server is their only writer); the sync methods, for the CLI, read the files.

A session file that does not parse was damaged outside agentspace: the server moves it aside
(``<id>.json.damaged-<time>``, kept and logged) and that session answers SessionDamaged from then on;
listings skip damaged files and name them.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SessionDamaged
from ..types import new_id, now_iso
from .atomic import (
    StoreCorrupt,
    fsync_dir,
    is_damaged_copy,
    make_dirs,
    move_aside,
    remove_stale_temp_files,
    warn_skipped,
)
from .store_thread import on_store_thread, read_in_thread
from .tinydb_file import Tables, next_doc_id, read_tables, write_tables

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
TITLE_LENGTH = 60
# Sessions the server keeps parsed in memory; older ones are re-read on next use.
OPEN_SESSIONS = 256

_SESSION = "session"
_MESSAGES = "messages"
_SUMMARY_KEYS = ("id", "title", "model", "createdAt", "lastActivityAt", "messageCount", "client")
# Summary copies an earlier version kept next to the sessions; ignored, and deleted with their session.
_LEGACY_COPY = ".meta.json"


class InvalidSessionId(ValueError):
    """A session id that is not 1-128 characters of A-Z a-z 0-9 _ - (it is used as a file name)."""


class SessionExists(ValueError):
    """``create`` with the id of an existing session."""


class SessionNotFound(LookupError):
    """A change to a session that does not exist (or whose id is invalid, so cannot exist)."""


class MessageNotFound(LookupError):
    """``update_message`` with an id no message of the session has."""


@dataclass
class Listing:
    """Every readable session's summary, most recent activity first, and the files in ``sessions/`` that
    are damaged (moved aside, or not readable as a session)."""

    sessions: builtins.list[dict[str, Any]] = field(default_factory=list)
    damaged_files: builtins.list[str] = field(default_factory=list)


def validate_session_id(session_id: object) -> str:
    if isinstance(session_id, str) and SESSION_ID.fullmatch(session_id):
        return session_id
    raise InvalidSessionId(
        f"invalid session id {str(session_id)[:40]!r}: use 1-128 characters from A-Z, a-z, 0-9, '_' and '-'"
    )


def _is_valid(session_id: object) -> bool:
    return isinstance(session_id, str) and SESSION_ID.fullmatch(session_id) is not None


def _summary(tables: Tables) -> dict[str, Any]:
    info = tables[_SESSION]["1"]
    return {key: info.get(key) for key in _SUMMARY_KEYS}


def _checked(tables: Tables | None, path: Path) -> Tables | None:
    """``tables`` when they are a session's (summary document and messages table); StoreCorrupt if not."""
    if tables is None:
        return None
    if not isinstance(tables.get(_SESSION, {}).get("1"), dict) or not isinstance(tables.get(_MESSAGES), dict):
        raise StoreCorrupt(path, "not a session file (no summary document or no messages table)")
    return tables


def _title_from(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        parts = message.get("parts") or []
        content = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
    title = " ".join(content.split())[:TITLE_LENGTH].rstrip()
    return title or None


def _sorted(summaries: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
    return sorted(summaries, key=lambda s: (s["lastActivityAt"] or "", s["createdAt"] or "", s["id"]), reverse=True)


def _detached(data: Any) -> Any:
    """A JSON-only deep copy: callers can't change the cache through it, and bad values fail here."""
    return json.loads(json.dumps(data))


def _stored(message: dict[str, Any]) -> dict[str, Any]:
    """A message as it is stored: a snapshot, ``id`` and ``createdAt`` filled in when absent."""
    message = _detached(message)
    message.setdefault("id", new_id("msg_"))
    message.setdefault("createdAt", now_iso())
    return message


class SessionStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "sessions"
        # The sync methods may run next to the store thread (same process): one lock for both.
        self._lock = threading.RLock()
        self._open: OrderedDict[str, Tables] = OrderedDict()
        self._damaged_ids: set[str] | None = None  # sessions whose file was moved aside; listed on first need
        self._prepared = False
        self._closed = False

    # --- async API (the server) ---------------------------------------------------------------

    async def create(
        self,
        *,
        model: str,
        session_id: str | None = None,
        title: str | None = None,
        client: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Create a session (a new id unless one is given) holding ``messages`` and return its summary.

        Raises InvalidSessionId, SessionExists or SessionDamaged (the id's file was moved aside)."""
        session_id = validate_session_id(session_id) if session_id is not None else new_id("s_")
        return await self._run(self._create, session_id, model, title, client, [_stored(m) for m in messages])

    async def get(self, session_id: str) -> dict[str, Any] | None:
        """The summary plus ``messages``, or None. Raises SessionDamaged."""
        return await self._run(self._get, session_id)

    async def exists(self, session_id: str) -> bool:
        return await self._run(self._exists, session_id)

    async def summaries(self) -> builtins.list[dict[str, Any]]:
        """Every readable session's summary, most recent activity first (``listing`` also names damaged files)."""
        return (await self.listing()).sessions

    async def listing(self) -> Listing:
        """``listing_sync`` off the event loop (and off the store thread: writes do not wait for it)."""
        if self._closed:
            raise RuntimeError("the session store is closed")
        return await read_in_thread(self.listing_sync)

    async def append_message(self, session_id: str, message: dict[str, Any]) -> None:
        """Store a message (``id`` and ``createdAt`` are filled in when absent). Raises SessionNotFound,
        SessionDamaged, or StorageError (then nothing was stored, and the same call can be retried)."""
        await self._run(self._append, session_id, _stored(message))

    async def update_message(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a stored message. Raises SessionNotFound or MessageNotFound."""
        await self._run(self._update, session_id, message_id, _detached(changes))

    async def set_title(self, session_id: str, title: str) -> None:
        """Rename a session. Raises SessionNotFound."""
        await self._run(self._set_title, session_id, title)

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """The last ``limit`` messages (all when None), oldest first; [] for an unknown session."""
        return await self._run(self._messages, session_id, limit)

    async def touch(self, session_id: str) -> None:
        """Set lastActivityAt to now. Raises SessionNotFound."""
        await self._run(self._touch, session_id)

    async def delete(self, session_id: str) -> bool:
        """Delete a session; False when there was none."""
        return await self._run(self.delete_sync, session_id)

    async def flush(self) -> None:
        """Return once every write started before this call has finished."""
        await self._run(lambda: None)

    async def aclose(self) -> None:
        if not self._closed:
            await self._run(self._close_all)
            self._closed = True

    async def _run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the session store is closed")
        return await on_store_thread(fn, *args)

    # --- sync API (the CLI: no event loop, no cache) ------------------------------------------

    def get_sync(self, session_id: str) -> dict[str, Any] | None:
        """The summary plus ``messages``, or None. Raises SessionDamaged (the file is left where it is)."""
        if not _is_valid(session_id):
            return None
        path = self._path(session_id)
        try:
            tables = _checked(read_tables(path), path)
        except StoreCorrupt as e:
            warn_skipped(e)
            raise SessionDamaged(session_id) from None
        if tables is None:
            if session_id in self._scan_damaged_ids():
                raise SessionDamaged(session_id)
            return None
        return {**_summary(tables), "messages": builtins.list(tables[_MESSAGES].values())}

    def summaries_sync(self) -> builtins.list[dict[str, Any]]:
        return self.listing_sync().sessions

    def listing_sync(self) -> Listing:
        """Every session file read; the damaged ones skipped and named (a warning logged for each)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return Listing()
        listing = Listing()
        for name in sorted(names):
            path = self.dir / name
            if is_damaged_copy(name):
                listing.damaged_files.append(str(path))
                continue
            if not name.endswith(".json") or name.startswith("."):  # temp files start with "."
                continue
            session_id = name[: -len(".json")]
            if name.endswith(_LEGACY_COPY) and _is_valid(name[: -len(_LEGACY_COPY)]):
                continue
            try:
                if not _is_valid(session_id):
                    raise StoreCorrupt(path, "not a session file (its name is not a session id)")
                tables = _checked(read_tables(path), path)
            except StoreCorrupt as e:
                warn_skipped(e)
                listing.damaged_files.append(str(path))
                continue
            if tables is not None:  # else deleted since listed
                listing.sessions.append(_summary(tables))
        listing.sessions = _sorted(listing.sessions)
        return listing

    def delete_sync(self, session_id: str) -> bool:
        if not _is_valid(session_id):
            return False
        with self._lock:
            self._open.pop(session_id, None)
            existed = True
            try:
                os.unlink(self._path(session_id))
            except FileNotFoundError:
                existed = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{session_id}{_LEGACY_COPY}")
            if existed:
                fsync_dir(self.dir)
            return existed

    # --- work done on the store thread --------------------------------------------------------

    def _path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def _scan_damaged_ids(self) -> set[str]:
        """Ids whose file was moved aside (``<id>.json.damaged-<time>``)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {name.split(".json.damaged-")[0] for name in names if ".json.damaged-" in name}

    def _is_damaged(self, session_id: str) -> bool:
        if self._damaged_ids is None:
            self._damaged_ids = self._scan_damaged_ids()
        return session_id in self._damaged_ids

    def _prepare(self) -> None:
        """Before the first write: the folder exists and a crashed writer's temp files are gone."""
        if not self._prepared:
            make_dirs(self.dir)
            remove_stale_temp_files(self.dir)
            self._prepared = True

    def _session(self, session_id: str) -> Tables | None:
        """The session's tables (the cached copy: never change it in place), or None when it does not exist.

        A damaged file is moved aside and raises SessionDamaged."""
        if not _is_valid(session_id):
            return None
        path = self._path(session_id)
        tables = self._open.get(session_id)
        if tables is not None:
            # The CLI may have deleted it since we cached it; a stat is far cheaper than a parse.
            if os.path.exists(path):
                self._open.move_to_end(session_id)
                return tables
            del self._open[session_id]
            return None
        try:
            tables = _checked(read_tables(path), path)
        except StoreCorrupt as e:
            move_aside(e)
            if self._damaged_ids is not None:
                self._damaged_ids.add(session_id)
            raise SessionDamaged(session_id) from None
        if tables is None:
            if self._is_damaged(session_id):
                raise SessionDamaged(session_id)
            return None
        self._remember(session_id, tables)
        return tables

    def _remember(self, session_id: str, tables: Tables) -> None:
        self._open[session_id] = tables
        self._open.move_to_end(session_id)
        while len(self._open) > OPEN_SESSIONS:
            self._open.popitem(last=False)

    def _require(self, session_id: str) -> Tables:
        tables = self._session(session_id)
        if tables is None:
            raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
        return tables

    def _write(self, session_id: str, info: dict[str, Any], messages: dict[str, dict[str, Any]]) -> None:
        """Write the session whole; the cache changes only once the write succeeded (a failed write leaves
        the store as it was, ready for the next one)."""
        self._prepare()
        info = {**info, "messageCount": len(messages)}
        tables: Tables = {_SESSION: {"1": info}, _MESSAGES: messages}
        write_tables(self._path(session_id), tables)
        self._remember(session_id, tables)

    def _create(
        self, session_id: str, model: str, title: str | None, client: str | None, messages: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        with self._lock:
            if self._session(session_id) is not None:
                raise SessionExists(f"session {session_id!r} already exists")
            now = now_iso()
            if title is None:
                title = next((t for m in messages if m.get("role") == "user" and (t := _title_from(m))), None)
            info = {
                "id": session_id,
                "title": title,
                "model": model,
                "createdAt": now,
                "lastActivityAt": now,
                "client": client,
            }
            self._write(session_id, info, {str(n): message for n, message in enumerate(messages, 1)})
            return _summary(self._open[session_id])

    def _exists(self, session_id: str) -> bool:
        with self._lock:
            return self._session(session_id) is not None

    def _get(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            tables = self._session(session_id)
            if tables is None:
                return None
            return copy.deepcopy({**_summary(tables), "messages": builtins.list(tables[_MESSAGES].values())})

    def _messages(self, session_id: str, limit: int | None) -> builtins.list[dict[str, Any]]:
        with self._lock:
            tables = self._session(session_id)
            if tables is None or (limit is not None and limit <= 0):
                return []
            docs = builtins.list(tables[_MESSAGES].values())
            return copy.deepcopy(docs if limit is None else docs[-limit:])

    def _append(self, session_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            tables = self._require(session_id)
            messages = tables[_MESSAGES]
            info = dict(tables[_SESSION]["1"])
            if not info.get("title") and message.get("role") == "user":
                info["title"] = _title_from(message)
            info["lastActivityAt"] = now_iso()
            self._write(session_id, info, {**messages, str(next_doc_id(messages)): message})

    def _update(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        with self._lock:
            tables = self._require(session_id)
            messages = dict(tables[_MESSAGES])
            doc_ids = [doc_id for doc_id, m in messages.items() if m.get("id") == message_id]
            if not doc_ids:
                raise MessageNotFound(f"message {str(message_id)[:40]!r} not found in session {session_id!r}")
            for doc_id in doc_ids:
                messages[doc_id] = {**messages[doc_id], **changes}
            self._write(session_id, {**tables[_SESSION]["1"], "lastActivityAt": now_iso()}, messages)

    def _touch(self, session_id: str) -> None:
        with self._lock:
            tables = self._require(session_id)
            self._write(session_id, {**tables[_SESSION]["1"], "lastActivityAt": now_iso()}, tables[_MESSAGES])

    def _set_title(self, session_id: str, title: str) -> None:
        with self._lock:
            tables = self._require(session_id)
            self._write(
                session_id, {**tables[_SESSION]["1"], "title": title, "lastActivityAt": now_iso()}, tables[_MESSAGES]
            )

    def _close_all(self) -> None:
        with self._lock:
            self._open.clear()
