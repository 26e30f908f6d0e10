"""SessionStore: conversations, one tinydb file per session.

Layout under ``data_dir/sessions/``:

- ``<id>.json``: the session. Table ``session`` holds one document, the summary (plus ``client``);
  table ``messages``, last in the file, holds the messages in order. A new message is written in place
  after the last one (``AtomicJSONStorage.append``), so a turn's writes cost the same however long the
  session; the summary's ``messageCount`` and ``lastActivityAt`` then stay as they were in the file, and
  every reader works them out from the messages (``_brought_up_to_date``). Other changes (a title, an
  edited message) rewrite the file atomically, summary included.
- ``<id>.meta.json``: a copy of the summary, written after ``<id>.json``, so that ``list`` reads a
  few hundred bytes per session instead of every message. Only sessions whose file has outgrown
  ``SUMMARY_COPY_BYTES`` get one (then on every write): reading a smaller file costs ``list`` about as
  much as reading a copy, and a copy costs every write a second fsynced file. ``list`` reads the
  session file when the copy is missing or has an older mtime (a crash between the two writes). Within
  the same clock tick the copy can lag by the one write the crash interrupted, which was never
  acknowledged; the server rewrites the copy the next time it opens the session.

A write costs one session's file, whatever the number of sessions. The server's async methods cache
the sessions they touched (it is their only writer); the sync methods, for the CLI, read the files. A
message torn by a crash while it was added (or being added while a reader reads) is not there: readers
see the messages before it, and the server's next write of that session mends the file.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tinydb import TinyDB
from tinydb.table import Document, Table

from ..types import new_id, now_iso
from .files import (
    Worker,
    fsync_dir,
    make_dirs,
    open_db,
    next_doc_id,
    read_tables,
    remove_stale_temp_files,
    storage_of,
)

if TYPE_CHECKING:
    import asyncio

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
TITLE_LENGTH = 60
# Sessions whose files stay parsed in the server's memory; older ones are re-read on next use.
OPEN_SESSIONS = 256
# Session files up to this size have no summary copy: ``list`` parses them whole (a chat's first turns).
SUMMARY_COPY_BYTES = 4096

_SESSION = "session"
_MESSAGES = "messages"
_SUMMARY_KEYS = ("id", "title", "model", "createdAt", "lastActivityAt", "messageCount", "client")


class InvalidSessionId(ValueError):
    """A session id that is not 1-128 characters of A-Z a-z 0-9 _ - (it is used as a file name)."""


class SessionExists(ValueError):
    """``create`` with the id of an existing session."""


class SessionNotFound(LookupError):
    """A change to a session that does not exist (or whose id is invalid, so cannot exist)."""


class MessageNotFound(LookupError):
    """``update_message`` with an id no message of the session has."""


def validate_session_id(session_id: object) -> str:
    if isinstance(session_id, str) and SESSION_ID.fullmatch(session_id):
        return session_id
    raise InvalidSessionId(
        f"invalid session id {str(session_id)[:40]!r}: use 1-128 characters from A-Z, a-z, 0-9, '_' and '-'"
    )


def _is_valid(session_id: object) -> bool:
    return isinstance(session_id, str) and SESSION_ID.fullmatch(session_id) is not None


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc.get(key) for key in _SUMMARY_KEYS}


def _summary_doc(tables: dict[str, Any]) -> dict[str, Any] | None:
    return (tables.get(_SESSION) or {}).get("1")


def _brought_up_to_date(info: dict[str, Any], messages: dict[str, Any]) -> dict[str, Any]:
    """A session file's summary document with what messages appended in place since it was written changed.

    An append writes only the message (see ``SessionStore._append``): the stored ``messageCount`` and
    ``lastActivityAt`` may be older than the file's messages, which say what they are."""
    info = dict(info)
    info["messageCount"] = len(messages)
    if messages:
        last = next(reversed(messages.values()))
        stamp = last.get("completedAt") or last.get("createdAt")
        if isinstance(stamp, str) and stamp > (info.get("lastActivityAt") or ""):
            info["lastActivityAt"] = stamp
    return info


def _title_from(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        parts = message.get("parts") or []
        content = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
    title = " ".join(content.split())[:TITLE_LENGTH].rstrip()
    return title or None


def _sorted(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(summaries, key=lambda s: (s["lastActivityAt"] or "", s["createdAt"] or "", s["id"]), reverse=True)


def _detached(data: Any) -> Any:
    """A JSON-only deep copy: callers can't change the cache through it, and bad values fail here."""
    return json.loads(json.dumps(data))


def _stored(message: dict[str, Any]) -> dict[str, Any]:
    """A message as queued for storing: snapshot now (the caller may change its dict before the write runs),
    ``id`` and ``createdAt`` filled in when absent."""
    message = _detached(message)
    message.setdefault("id", new_id("msg_"))
    message.setdefault("createdAt", now_iso())
    return message


@dataclass
class _Open:
    """A session the server has parsed: its file and its summary copy."""

    db: TinyDB
    meta: TinyDB
    copied: bool  # whether the session has a summary copy, which every later write then updates

    def info(self) -> Table:
        return self.db.table(_SESSION, cache_size=0)

    def messages(self) -> Table:
        return self.db.table(_MESSAGES, cache_size=0)

    def info_doc(self) -> dict[str, Any]:
        doc = self.info().get(doc_id=1)
        assert doc is not None, "opened sessions have their summary document"
        return dict(doc)

    def close(self) -> None:
        self.db.close()
        self.meta.close()


class SessionStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "sessions"
        self._worker = Worker("sessions")
        # The sync methods may run next to the worker thread (same process): one lock for both.
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._prepared = False

    # --- async API (the server) ---------------------------------------------------------------

    async def create(
        self, *, model: str, session_id: str | None = None, title: str | None = None, client: str | None = None
    ) -> dict[str, Any]:
        """Create a session (a new id unless one is given) and return its summary."""
        return await self.create_soon(model=model, session_id=session_id, title=title, client=client)

    def create_soon(
        self,
        *,
        model: str,
        session_id: str | None = None,
        title: str | None = None,
        client: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        gate: "asyncio.Future[Any] | None" = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """``create`` queued now, without waiting for the write: later calls run after it, in order.

        ``messages`` are stored with the session in the same write (as ``append_message`` stores them): a
        new chat costs one write of the session file, not one per message. The write starts once ``gate``
        is done (see ``Worker``); reads queued meanwhile wait for it. Raises InvalidSessionId at once;
        SessionExists comes through the future.
        """
        session_id = validate_session_id(session_id) if session_id is not None else new_id("s_")
        return self._worker.submit(self._create, session_id, model, title, client, [_stored(m) for m in messages],
                                   gate=gate)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        """The summary plus ``messages``, or None."""
        if self._readable_now(session_id):
            return self._get(session_id)
        return await self._worker.run(self._get, session_id)

    async def exists(self, session_id: str) -> bool:
        if self._readable_now(session_id):
            return self._exists(session_id)
        return await self._worker.run(self._exists, session_id)

    async def list(self) -> list[dict[str, Any]]:
        """Every session's summary, most recent activity first."""
        return await self._worker.run(self.list_sync)

    async def append_message(self, session_id: str, message: dict[str, Any]) -> None:
        """Store a message (``id`` and ``createdAt`` are filled in when absent).

        Raises SessionNotFound.
        """
        await self.append_message_soon(session_id, message)

    def append_message_soon(
        self, session_id: str, message: dict[str, Any], gate: "asyncio.Future[Any] | None" = None
    ) -> asyncio.Future[None]:
        """``append_message`` queued now, without waiting for the write: later calls run after it, in order
        (the write itself starts once ``gate`` is done)."""
        return self._worker.submit(self._append, session_id, _stored(message), gate=gate)

    async def update_message(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a stored message. Raises SessionNotFound or MessageNotFound."""
        await self._worker.run(self._update, session_id, message_id, _detached(changes))

    async def set_title(self, session_id: str, title: str) -> None:
        """Rename a session. Raises SessionNotFound."""
        await self._worker.run(self._set_title, session_id, title)

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """The last ``limit`` messages (all when None), oldest first; [] for an unknown session."""
        if self._readable_now(session_id):
            return self._messages(session_id, limit)
        return await self._worker.run(self._messages, session_id, limit)

    async def touch(self, session_id: str) -> None:
        """Set lastActivityAt to now. Raises SessionNotFound."""
        await self._worker.run(self._touch, session_id)

    async def delete(self, session_id: str) -> bool:
        """Delete a session; False when there was none."""
        return await self._worker.run(self.delete_sync, session_id)

    async def flush(self) -> None:
        await self._worker.flush()

    async def aclose(self) -> None:
        await self._worker.aclose(self._close_all)

    def _readable_now(self, session_id: str) -> bool:
        """Whether a read may run right here on the event loop instead of a hop to the worker thread (a
        chat's first await): nothing queued could change the answer, and it needs no file parsed (the
        session is cached, or has no file)."""
        return self._worker.idle and (
            not _is_valid(session_id) or session_id in self._open or not os.path.exists(self._path(session_id))
        )

    # --- sync API (the CLI: no event loop, no cache) ------------------------------------------

    def get_sync(self, session_id: str) -> dict[str, Any] | None:
        if not _is_valid(session_id):
            return None
        data = read_tables(self._path(session_id))
        info = _summary_doc(data)
        if info is None:  # no such session, or deleted since it was listed
            return None
        messages = data.get(_MESSAGES) or {}
        return {**_summary(_brought_up_to_date(info, messages)), "messages": [dict(m) for m in messages.values()]}

    def list_sync(self) -> builtins.list[dict[str, Any]]:
        mtimes: dict[str, int] = {}
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if entry.name.endswith(".json"):
                        with contextlib.suppress(FileNotFoundError):  # deleted while we list
                            mtimes[entry.name] = entry.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        summaries = []
        for name, mtime in mtimes.items():
            session_id = name[: -len(".json")]
            if _is_valid(session_id):  # skips the "<id>.meta.json" copies
                # The copy is current unless it is older than the session file (a crash between the writes).
                meta_mtime = mtimes.get(f"{session_id}.meta.json")
                summary = self._read_summary(session_id, meta_mtime is not None and meta_mtime >= mtime)
                if summary is not None:
                    summaries.append(summary)
        return _sorted(summaries)

    def delete_sync(self, session_id: str) -> bool:
        if not _is_valid(session_id):
            return False
        with self._lock:
            self._forget(session_id)
            existed = True
            try:
                os.unlink(self._path(session_id))
            except FileNotFoundError:
                existed = False
            # The summary copy goes second: list ignores a copy without its session file.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._meta_path(session_id))
            if existed:
                fsync_dir(self.dir)
            return existed

    # --- work done on the worker thread -------------------------------------------------------

    def _path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def _meta_path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.meta.json"

    def _prepare(self) -> None:
        """Before the first write: the folder exists and a crashed writer's temp files are gone."""
        if not self._prepared:
            make_dirs(self.dir)
            remove_stale_temp_files(self.dir)
            self._prepared = True

    def _session(self, session_id: str) -> _Open | None:
        """The server's open handle on a session, or None when it does not exist."""
        if not _is_valid(session_id):
            return None
        opened = self._open.get(session_id)
        if opened is not None:
            # The CLI may have deleted it since we cached it; a stat is far cheaper than a parse.
            if os.path.exists(self._path(session_id)):
                self._open.move_to_end(session_id)
                return opened
            self._forget(session_id)
            return None
        if not os.path.exists(self._path(session_id)):  # one stat, not two files opened and parsed
            return None
        meta_db = open_db(self._meta_path(session_id))
        meta = meta_db.table(_SESSION, cache_size=0).get(doc_id=1)
        opened = _Open(open_db(self._path(session_id)), meta_db, copied=meta is not None)
        data = storage_of(opened.db).read() or {}
        stored = _summary_doc(data)
        if stored is None:
            return None
        info = _brought_up_to_date(stored, data.get(_MESSAGES) or {})
        stored.update(info)  # in memory only: the next whole write of the file stores it
        if opened.copied and meta != info:  # a crash between the two writes: bring the copy up to date
            self._prepare()
            self._write_meta(opened, dict(info))
        self._remember(session_id, opened)
        return opened

    def _remember(self, session_id: str, opened: _Open) -> None:
        self._open[session_id] = opened
        while len(self._open) > OPEN_SESSIONS:
            self._open.popitem(last=False)[1].close()

    def _forget(self, session_id: str) -> None:
        opened = self._open.pop(session_id, None)
        if opened is not None:
            opened.close()

    def _require(self, session_id: str) -> _Open:
        opened = self._session(session_id)
        if opened is None:
            raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
        return opened

    def _write_meta(self, opened: _Open, info: dict[str, Any]) -> None:
        with storage_of(opened.meta).transaction():
            opened.meta.table(_SESSION, cache_size=0).upsert(Document(info, doc_id=1))
        opened.copied = True

    def _after_write(self, opened: _Open, info: dict[str, Any]) -> None:
        """Update the summary copy after a write of the session file, if the session has or now needs one."""
        written = storage_of(opened.db).written_bytes
        if opened.copied or (written is not None and written > SUMMARY_COPY_BYTES):
            self._write_meta(opened, info)

    def _create(
        self, session_id: str, model: str, title: str | None, client: str | None, messages: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        with self._lock:
            if self._session(session_id) is not None:
                raise SessionExists(f"session {session_id!r} already exists")
            self._prepare()
            now = now_iso()
            if title is None:
                title = next((t for m in messages if m.get("role") == "user" and (t := _title_from(m))), None)
            info = {
                "id": session_id, "title": title, "model": model, "createdAt": now,
                "lastActivityAt": now, "messageCount": len(messages), "client": client,
            }
            opened = _Open(open_db(self._path(session_id)), open_db(self._meta_path(session_id)), copied=False)
            # The file in tinydb's layout, written at once: what the inserts would write, without their work
            # on the store thread (a new chat's first write; the thread holds the GIL while it runs Python).
            storage_of(opened.db).replace({
                _SESSION: {"1": info},
                _MESSAGES: {str(n): message for n, message in enumerate(messages, 1)},
            })
            self._after_write(opened, info)
            self._remember(session_id, opened)
            return _summary(info)

    def _exists(self, session_id: str) -> bool:
        with self._lock:
            return self._session(session_id) is not None

    def _get(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            opened = self._session(session_id)
            if opened is None:
                return None
            summary = _summary(opened.info_doc())
            return copy.deepcopy({**summary, "messages": [dict(m) for m in opened.messages().all()]})

    def _messages(self, session_id: str, limit: int | None) -> builtins.list[dict[str, Any]]:
        with self._lock:
            opened = self._session(session_id)
            if opened is None or (limit is not None and limit <= 0):
                return []
            docs = opened.messages().all()
            return copy.deepcopy([dict(m) for m in (docs if limit is None else docs[-limit:])])

    def _change(self, opened: _Open, apply: Callable[[dict[str, Any]], object]) -> None:
        """Run ``apply(info)`` and the summary update it implies as one write of the session file."""
        self._prepare()
        with storage_of(opened.db).transaction():
            info = opened.info_doc()
            apply(info)
            info["lastActivityAt"] = now_iso()
            info["messageCount"] = len(opened.messages())
            opened.info().update(info, doc_ids=[1])
        self._after_write(opened, info)

    def _append(self, session_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            opened = self._require(session_id)
            storage = storage_of(opened.db)
            data = storage.read()
            assert data is not None, "opened sessions have their file"
            doc_id = next_doc_id(data.get(_MESSAGES) or {})
            info = data[_SESSION]["1"]
            titled = not info.get("title") and message.get("role") == "user"
            self._prepare()
            # The message alone, written in place after the last one: a turn's writes cost the same however
            # long the session is. The summary's count and last activity change in memory; readers of the
            # file work them out from its messages (_brought_up_to_date), and the next whole write stores them.
            if not titled and storage.append(_MESSAGES, doc_id, message):
                info.update(_brought_up_to_date(info, data[_MESSAGES]))
                self._after_write(opened, dict(info))
                return

            def apply(info: dict[str, Any]) -> None:
                opened.messages().insert(Document(message, doc_id=doc_id))
                if titled:
                    info["title"] = _title_from(message)

            self._change(opened, apply)

    def _update(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        with self._lock:
            opened = self._require(session_id)
            table = opened.messages()
            doc_ids = [doc.doc_id for doc in table.all() if doc.get("id") == message_id]
            if not doc_ids:
                raise MessageNotFound(f"message {str(message_id)[:40]!r} not found in session {session_id!r}")
            self._change(opened, lambda info: table.update(changes, doc_ids=doc_ids))

    def _touch(self, session_id: str) -> None:
        with self._lock:
            self._change(self._require(session_id), lambda info: None)

    def _set_title(self, session_id: str, title: str) -> None:
        with self._lock:
            self._change(self._require(session_id), lambda info: info.update(title=title))

    def _read_summary(self, session_id: str, copy_is_current: bool) -> dict[str, Any] | None:
        """From the summary copy when it is current, else from the session file; None once deleted."""
        paths = [self._path(session_id)]
        if copy_is_current:
            paths.insert(0, self._meta_path(session_id))
        for path in paths:
            data = read_tables(path)
            info = _summary_doc(data)
            if info is not None:
                messages = data.get(_MESSAGES)  # a summary copy has none: it is written after every write
                return _summary(info if messages is None else _brought_up_to_date(info, messages))
        return None

    def _close_all(self) -> None:
        with self._lock:
            for opened in self._open.values():
                opened.close()
            self._open.clear()
