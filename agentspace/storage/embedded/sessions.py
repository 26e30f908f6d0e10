"""SessionStore: conversations, one append-only log per session.

``data_dir/sessions/<id>.jsonl`` is an ``append_log`` file. Its entries are ``{"message": {...}}`` (a message
added), ``{"update": {"id": ..., "changes": {...}}}`` (changes merged into the messages with that id),
``{"aside": {"ids": [...]}}`` (the messages with those ids set aside, ``replaced``: an edit or a regenerate) and
``{"session": {summary}}`` (id, title, model, createdAt, lastActivityAt, messageCount, seenCount, client). Every write
is one message, update or aside entry, or none, followed by the summary, which closes it: adding a message
appends two short lines whatever the session's size, and a listing reads only the last summary.

A new session is one append to the shared ``sessions/.journal.jsonl`` (``session_journal.py``: creating a file
costs several times an append), durable with the group commit like any write. Its own file is written whole at
its next write (``AppendLog.create``: temp file, rename; synced with that write), so a session file always starts
with a complete write; readers find a session that has no file yet in the journal. An empty session file, or one
holding part of its first write only (no summary), is a creation whose first sync never finished (the machine
stopped, or the sync failed): rebuilt from the journal when the journal still holds the session (at the server's
start), else never acknowledged, so the session does not exist (the writer removes an empty file, with a warning).

Reading replays the log up to its last summary. After a crash the log may end in a torn line or in the
entry of a write whose summary never made it: neither was acknowledged, so both are dropped (the writer
cuts them off, with a warning). A summary whose ``messageCount`` does not match the messages replayed, more
than one entry after the last summary, or no summary at all, is damage (truncation, lost lines), and so is a
summary whose fields are not of the types written (``_read_info``). A session's id is its file's name: a file
copied or renamed from outside is the session its name says.

A summary's ``messageCount`` counts every message the log holds (the check above); its ``seenCount`` those the
session's client sees, without the answers set aside (``replaced``), and is the ``messageCount`` a listing and
``get`` give. A summary written by an earlier version has no ``seenCount``: listed with its ``messageCount`` until
the session's next write (``get`` counts its messages).

Sessions written by earlier versions, ``<id>.json`` (a tinydb file: table ``session`` with the summary,
table ``messages``), are read as they are and converted to a log on their first change.

The server's async methods run on the store thread (``store_thread``); writes go through a group commit
(``append_log.GroupCommit``: writes queued together share one ``fdatasync``). The server keeps the sessions
it used recently parsed, with their logs open, in a bounded cache (``OPEN_SESSIONS``, ``OPEN_BYTES``) that
its own writes change, so the next turn's context and ``GET /api/sessions/{id}`` parse nothing, only stat the
file: a file deleted (the CLI), replaced (a copy restored) or appended to from outside since the server's last
read or write of it has another (inode, size, mtime), and is read again. The sync methods, for the CLI, read
the files.

The cached messages are handed out as they are, not copied: ``get`` and ``messages`` return a new list (and
``get`` a new summary dict) holding the cache's own message objects, so a read costs the same at 10 messages
and at 10,000 (a deep copy of a 4,000-message session took about as long as parsing it). What keeps the cache
right is that those objects cannot be changed: every message is frozen when it enters the cache (``_remember``
for a session read, created or rebuilt; ``_append``, ``_update`` and ``_set_aside`` for a write: ``shapes.frozen``), its
objects and arrays ``shapes.FrozenDict``/``FrozenList``, a ``dict`` and a ``list`` to every reader but raising
TypeError on any change. A caller that wants to change a message it read changes a copy (``{**message, ...}``,
or ``shapes.thawed``); the callers today (context assembly and the context policy, the pipeline, the service
layer and transports, ``attachments.with_urls``, export, compaction) only read, or build new dicts for what
they change. The cache changes only by the writes (each a new list, never one changed in place), its bound
and the stat that notices a file changed from outside are as before. The CLI's sync reads parse the file and
return plain (changeable) messages of their own.

A turn writes its user message with ``sync=False`` (``create``, ``append_message``): written at once (a disk
that refuses it refuses the turn; a new session's goes to the journal), its sync started at once in the
background; the call's pending ledger entry is synced beside it, and the request leaves once both are durable
(``awaiting_sync``, awaited by ``calls.ProviderCall.admit``): the syncs overlap each other and the turn's
context assembly, not one after the other.

A session file that does not parse was damaged outside agentspace: the server moves it aside
(``<id>.jsonl.damaged-<time>``, kept and logged) and that session answers SessionDamaged while that copy is
there (once it is removed, the id is free again); listings skip damaged files and name them.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import SessionDamaged
from ...types import new_id, now_iso
from ..atomic import (
    DAMAGED_MARK,
    StoreCorrupt,
    fsync_dir,
    is_damaged_copy,
    make_dirs,
    move_aside,
    read_bytes,
    remove_stale_temp_files,
    warn_skipped,
    write_bytes_atomic,
)
from ..errors import MessageNotFound, SessionExists, SessionNotFound
from ..shapes import (
    Listing,
    detached,
    frozen,
    is_valid_session_id,
    stored_message,
    title_from,
    validate_session_id,
)
from . import append_log
from .append_log import AppendLog, encode_lines, parse_lines, read_entries, read_last_entry
from .session_journal import JOURNAL_BYTES, JOURNAL_NAME, SessionJournal, outstanding_after_damage, read_outstanding
from .store_thread import on_store_thread, read_in_thread
from .tinydb_file import Tables, read_tables

if TYPE_CHECKING:  # asyncio only where writes run: the CLI's reports start faster without it
    import asyncio

log = logging.getLogger("agentspace.storage")

# Sessions the server keeps parsed in memory (at most this many, and this many bytes of their files);
# older ones are re-read on next use.
OPEN_SESSIONS = 256
OPEN_BYTES = 256 * 1024 * 1024

_SESSION = "session"
_MESSAGES = "messages"
_SUMMARY_KEYS = ("id", "title", "model", "createdAt", "lastActivityAt", "messageCount", "client")
_LOG = ".jsonl"
_LEGACY = ".json"
# Summary copies an earlier version kept next to the sessions; ignored, and deleted with their session.
_LEGACY_COPY = ".meta.json"


# The summary's fields every listing sorts and shows, as every writer writes them: text, or null.
_TEXT_KEYS = ("title", "model", "createdAt", "lastActivityAt", "client")


def _read_info(info: dict[str, Any], path: Path, suffix: str) -> dict[str, Any]:
    """A summary as read from ``path`` (``<id><suffix>``): its id is the file's name (a file copied or renamed
    from outside is the session its name says, one that can be opened and deleted by the id listed), and its
    fields have the types every writer gives them. Raises StoreCorrupt: a summary JSON allows but no writer
    makes (damaged, edited) would otherwise stop every listing that sorts or shows it."""
    for key in _TEXT_KEYS:
        value = info.get(key)
        if value is not None and value.__class__ is not str:
            raise StoreCorrupt(path, f"not a session summary ({key}: {value!r:.40})")
    for key in ("messageCount", "seenCount"):
        count = info.get(key)
        if count is not None and count.__class__ is not int:
            raise StoreCorrupt(path, f"not a session summary ({key}: {count!r:.40})")
    return {**info, "id": path.name[: -len(suffix)]}


def _summary(tables: Tables) -> dict[str, Any]:
    info = tables[_SESSION]["1"]
    return {**{key: info.get(key) for key in _SUMMARY_KEYS}, "messageCount": _seen(tables[_MESSAGES].values())}


def _seen(messages: Iterable[dict[str, Any]]) -> int:
    """How many of ``messages`` the session's client sees: the answers set aside (``replaced``) left out."""
    return sum(1 for m in messages if not m.get("replaced"))


def _checked(tables: Tables | None, path: Path) -> Tables | None:
    """``tables`` when they are a session's (summary document and messages table); StoreCorrupt if not."""
    if tables is None:
        return None
    if not isinstance(tables.get(_SESSION, {}).get("1"), dict) or not isinstance(tables.get(_MESSAGES), dict):
        raise StoreCorrupt(path, "not a session file (no summary document or no messages table)")
    tables[_SESSION]["1"] = _read_info(tables[_SESSION]["1"], path, _LEGACY)
    return tables


def _sorted(summaries: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
    return sorted(summaries, key=lambda s: (s["lastActivityAt"] or "", s["createdAt"] or "", s["id"]), reverse=True)


@dataclass
class _Session:
    """A session as the server keeps it: its summary (without the counts), its messages (frozen once cached:
    ``_remember``), how many of them its client sees (``_seen``, counted when not given), and the log appended to
    (None until the first write after it was read: a legacy file is converted then)."""

    info: dict[str, Any]
    messages: builtins.list[dict[str, Any]]
    log: AppendLog | None = None
    legacy: bool = False
    size: int = 0  # bytes on disk, for the cache's bound
    # The file's (inode, size, mtime) as our last read or write left it: another value means it was changed
    # from outside (replaced by a restored copy, appended to, cut short), and the cached copy is stale.
    stamp: tuple[int, int, int] | None = None
    # Created in the journal and not written to a file of its own yet (``_file``, at its next write).
    journaled: bool = False
    seen: int = -1

    def __post_init__(self) -> None:
        if self.seen < 0:
            self.seen = _seen(self.messages)

    def summary(self) -> dict[str, Any]:
        return {**{key: self.info.get(key) for key in _SUMMARY_KEYS}, "messageCount": self.seen}

    def written_summary(self) -> dict[str, Any]:
        """The summary as the log keeps it: ``messageCount`` the messages it holds (checked when it is read)."""
        return _written_summary(self.info, self.messages, self.seen)


def _written_summary(info: dict[str, Any], messages: Sequence[Any], seen: int) -> dict[str, Any]:
    return {**{key: info.get(key) for key in _SUMMARY_KEYS}, "messageCount": len(messages), "seenCount": seen}


def _legacy_session(tables: Tables) -> _Session:
    return _Session(dict(tables[_SESSION]["1"]), builtins.list(tables[_MESSAGES].values()), legacy=True)


def _replay(entries: builtins.list[Any], path: Path) -> tuple[_Session, int]:
    """A session log's entries replayed: the session as its last complete write left it, and how many entries
    follow that write (0 or 1: a write that never finished, dropped). Raises StoreCorrupt."""
    info: dict[str, Any] | None = None
    messages: builtins.list[dict[str, Any]] = []
    # Where each message id is: an update or an aside finds its messages at once, not by a pass over all of them
    # (a long session at its context window adds a mark every few turns: its replay took marks x messages).
    where: dict[str, builtins.list[int]] = {}
    pending: builtins.list[tuple[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise StoreCorrupt(path, "not a session log (an entry is not one of session/message/update)")
        [(kind, value)] = entry.items()
        if kind == "session":
            if not isinstance(value, dict):
                raise StoreCorrupt(path, "not a session log (a summary that is not an object)")
            for op, op_value in pending:
                _apply(messages, where, op, op_value, path)
            pending = []
            if value.get("messageCount") != len(messages):
                raise StoreCorrupt(path, "entries are missing (the message count does not match the messages)")
            info = value
        elif kind in ("message", "update", "aside"):
            pending.append((kind, value))
        else:
            raise StoreCorrupt(path, f"not a session log (unknown entry {kind!r})")
    if info is None:
        raise StoreCorrupt(path, "not a session log (no complete write: truncated or not a session)")
    if len(pending) > 1:  # a write appends one message, update or aside entry, then the summary
        raise StoreCorrupt(path, f"{len(pending)} entries after the last complete write (truncated)")
    counts = ("messageCount", "seenCount")
    info = {key: value for key, value in _read_info(info, path, _LOG).items() if key not in counts}
    return _Session(info, messages), len(pending)


def _apply(
    messages: builtins.list[dict[str, Any]], where: dict[str, builtins.list[int]], op: str, value: Any, path: Path
) -> None:
    """Replay one entry on ``messages``; ``where``: the positions of the messages by id, kept here."""
    if not isinstance(value, dict):
        raise StoreCorrupt(path, f"not a session log (a {op} that is not an object)")
    if op == "message":
        if isinstance(message_id := value.get("id"), str):
            where.setdefault(message_id, []).append(len(messages))
        messages.append(value)
        return
    if op == "aside":
        ids = value.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise StoreCorrupt(path, "not a session log (an aside entry without ids)")
        for n in {n for message_id in ids for n in where.get(message_id, ())}:
            if not messages[n].get("replaced"):
                messages[n] = {**messages[n], "replaced": True}
        return
    changes = value.get("changes")
    if not isinstance(changes, dict):
        raise StoreCorrupt(path, "not a session log (an update without changes)")
    message_id = value.get("id")
    found = where.get(message_id, ()) if isinstance(message_id, str) else range(len(messages))
    for n in found:
        if messages[n].get("id") == message_id:
            messages[n] = {**messages[n], **changes}


def _marked_aside(
    messages: Sequence[dict[str, Any]], ids: set[Any]
) -> tuple[builtins.list[dict[str, Any]], int, set[Any]]:
    """``messages`` with those whose id is in ``ids`` set aside (``replaced``), in one pass: how many of them
    were seen before (the client's count falls by that), and the ids found."""
    out: builtins.list[dict[str, Any]] = []
    newly, found = 0, set()
    for message in messages:
        message_id = message.get("id")
        if message_id in ids:
            found.add(message_id)
            if not message.get("replaced"):
                newly += 1
                message = {**message, "replaced": True}
        out.append(message)
    return out, newly, found


def _is_summary(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("session"), dict)


class SessionStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "sessions"
        # The sync methods may run next to the store thread (same process): one lock for both.
        self._lock = threading.RLock()
        self._open: OrderedDict[str, _Session] = OrderedDict()
        self._open_bytes = 0
        self._commit = append_log.COMMIT
        self._damaged_ids: set[str] | None = None  # sessions whose file was moved aside; listed on first need
        # The syncs of writes made with sync=False (session id -> the sync, started when the write returned).
        self._unsynced: dict[str, asyncio.Future[None]] = {}
        self._prepared = False
        self._closed = False
        # The server's journal of new sessions (session_journal.py), opened by the store's first use there.
        self._journal: SessionJournal | None = None

    # --- async API (the server) ---------------------------------------------------------------

    async def create(
        self,
        *,
        model: str,
        session_id: str | None = None,
        title: str | None = None,
        client: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        sync: bool = True,
    ) -> dict[str, Any]:
        """Create a session (a new id unless one is given) holding ``messages`` and return its summary; durable
        once returned, or with ``sync=False`` once ``awaiting_sync`` returned.

        Raises InvalidSessionId, SessionExists or SessionDamaged (the id's file was moved aside)."""
        session_id = validate_session_id(session_id) if session_id is not None else new_id("s_")
        summary: dict[str, Any] = await self._write(
            session_id, self._create, model, title, client, [stored_message(m) for m in messages], sync=sync
        )
        return summary

    async def get(self, session_id: str) -> dict[str, Any] | None:
        """The summary plus ``messages``, or None. Raises SessionDamaged."""
        if self._surely_absent(session_id):  # a new chat's client-chosen id: no trip to the store thread
            return None
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

    async def append_message(self, session_id: str, message: dict[str, Any], *, sync: bool = True) -> None:
        """Store a message (``id`` and ``createdAt`` are filled in when absent); durable once returned, or with
        ``sync=False`` once ``awaiting_sync`` returned. Raises SessionNotFound, SessionDamaged, or StorageError
        (then nothing was stored, and the same call can be retried)."""
        await self._write(session_id, self._append, stored_message(message), sync=sync)

    def awaiting_sync(self, session_id: str | None) -> Awaitable[None] | None:
        """The sync of the session's writes made with ``sync=False``, started when they were written: they are
        durable once it is awaited (StorageError when they cannot be). None when none waits for it."""
        sync = None if session_id is None else self._unsynced.pop(session_id, None)
        if sync is None or (sync.done() and not sync.cancelled() and sync.exception() is None):
            return None
        import asyncio  # here: the CLI, which reads sessions without writing, starts without asyncio

        return asyncio.shield(sync)

    async def update_message(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a stored message. Raises SessionNotFound or MessageNotFound."""
        await self._write(session_id, self._update, message_id, detached(changes))

    async def set_aside(self, session_id: str, message_ids: Sequence[str]) -> None:
        """Set the messages ``message_ids`` aside (``replaced``) in one write: one entry and one summary, all
        or none of them whatever stops it. Raises SessionNotFound or MessageNotFound (then none is)."""
        await self._write(session_id, self._set_aside, builtins.list(message_ids))

    async def set_title(self, session_id: str, title: str) -> None:
        """Rename a session. Raises SessionNotFound."""
        await self._write(session_id, self._set_title, title)

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """The last ``limit`` messages (all when None), oldest first; [] for an unknown session."""
        return await self._run(self._messages, session_id, limit)

    async def touch(self, session_id: str) -> None:
        """Set lastActivityAt to now. Raises SessionNotFound."""
        await self._write(session_id, self._touch)

    async def delete(self, session_id: str) -> bool:
        """Delete a session; False when there was none."""
        return await self._run(self._delete, session_id)

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

    async def _write(self, session_id: str, change: Callable[..., Any], /, *args: Any, sync: bool = True) -> Any:
        """Run ``change`` (which appends to the session's log and returns the log, or a result and the log) in
        the next group commit: it returns once its lines are durable. A failed sync drops the cached session:
        the next use reads what the disk has. ``sync=False``: returns once written; the sync starts at once,
        and ``awaiting_sync`` waits for it."""
        if self._closed:
            raise RuntimeError("the session store is closed")

        def written() -> tuple[Any, AppendLog]:
            with self._lock:
                done = change(session_id, *args)
                return done if isinstance(done, tuple) else (None, done)

        if sync:

            def work() -> tuple[Any, builtins.list[AppendLog]]:
                result, log_ = written()
                return result, [log_]

            result = await self._commit.run(
                work, on_failure=lambda: self._failed(session_id), on_synced=self._mark_filed
            )
            waiting = self._unsynced.get(session_id)
            if waiting is not None and waiting.done():
                self._unsynced.pop(session_id, None)  # a turn that made no call: nothing waits for it any more
            return result

        def work_written() -> tuple[Any, builtins.list[AppendLog]]:
            result, log_ = written()
            return result, [log_]

        # Written and synced in one job of the group commit: this returns once the lines are written, the sync
        # goes on without waiting for the event loop to come back.
        result, synced = await self._commit.run_written(
            work_written, on_failure=lambda: self._failed(session_id), on_synced=self._mark_filed
        )
        import asyncio  # here: the CLI, which reads sessions without writing, starts without asyncio

        background = asyncio.ensure_future(synced)
        background.add_done_callback(_retrieved)  # a failure nobody awaits (no call followed) is not an error
        self._unsynced[session_id] = background
        return result

    # --- sync API (the CLI: no event loop, no cache) ------------------------------------------

    def get_sync(self, session_id: str) -> dict[str, Any] | None:
        """The summary plus ``messages``, or None. Raises SessionDamaged (the file is left where it is)."""
        if not is_valid_session_id(session_id):
            return None
        try:
            # The journal only when there is no file (a search reads sessions one by one), then the file once more:
            # a session filed, and the journal emptied, between the first two reads is in the third.
            session = self._read(session_id)
            if session is None:
                try:
                    creates = read_outstanding(self.dir)
                except StoreCorrupt:  # listings name it
                    creates = {}
                if session_id in creates:
                    session = self._without_files({session_id: creates[session_id]}, files=False).get(session_id)
                else:
                    session = self._read(session_id)
        except StoreCorrupt as e:
            warn_skipped(e)
            raise SessionDamaged(session_id, moved=False) from None
        if session is None:
            if session_id in self._scan_damaged_ids():
                raise SessionDamaged(session_id)
            return None
        return {**session.summary(), "messages": session.messages}

    def summaries_sync(self) -> builtins.list[dict[str, Any]]:
        return self.listing_sync().sessions

    def listing_sync(self, *, whole: bool = False) -> Listing:
        """Every session's summary, read from the end of its log (so a listing does not grow with the
        sessions' sizes; ``whole``: every log read and checked whole, as ``agentspace doctor`` does); legacy
        files read whole. Damaged files skipped and named (a warning logged)."""
        # The journal before the folder: a session filed and the journal emptied between the two reads is in the
        # one or the other (the other way round, in neither).
        unreadable: builtins.list[StoreCorrupt] = []
        try:
            creates = read_outstanding(self.dir)
        except StoreCorrupt as e:
            unreadable.append(e)
            creates = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return Listing()
        listing = Listing()
        logs = {name[: -len(_LOG)] for name in names if name.endswith(_LOG)}
        for name in sorted(names):
            path = self.dir / name
            if is_damaged_copy(name):
                listing.damaged_files.append(str(path))
                continue
            if name.startswith("."):  # temp files
                continue
            try:
                if name.endswith(_LOG):
                    summary = self._log_summary(name[: -len(_LOG)], path, whole)
                elif name.endswith(_LEGACY):
                    session_id = name[: -len(_LEGACY)]
                    if name.endswith(_LEGACY_COPY) and is_valid_session_id(name[: -len(_LEGACY_COPY)]):
                        continue
                    if session_id in logs:  # converted; the writer removes the old file on next use
                        continue
                    if not is_valid_session_id(session_id):
                        raise StoreCorrupt(path, "not a session file (its name is not a session id)")
                    tables = _checked(read_tables(path), path)
                    summary = None if tables is None else _summary(tables)
                else:
                    continue
            except StoreCorrupt as e:
                warn_skipped(e)
                listing.damaged_files.append(str(path))
                continue
            if summary is not None:  # else deleted since listed
                listing.sessions.append(summary)
        listed = {summary["id"] for summary in listing.sessions}
        journaled = self._without_files(
            {sid: e for sid, e in creates.items() if sid not in listed}, unreadable, files=False
        )
        if unreadable:  # the journal, named once
            warn_skipped(unreadable[0])
            listing.damaged_files.append(str(self.dir / JOURNAL_NAME))
        listing.sessions += [session.summary() for session in journaled.values()]
        listing.sessions = _sorted(listing.sessions)
        return listing

    def journaled_summaries(self, damaged: builtins.list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The summaries of the sessions that have no file yet (in the session journal), by id; {} when the journal
        cannot be read. A journal that cannot be read, or a create in it, is named in ``damaged`` (as listings
        name it)."""
        unreadable: builtins.list[StoreCorrupt] = []
        try:
            sessions = self._without_files(read_outstanding(self.dir), unreadable)
        except StoreCorrupt as e:
            unreadable.append(e)
            sessions = {}
        if unreadable:  # the journal, named once (as by a listing)
            warn_skipped(unreadable[0])
            if damaged is not None:
                damaged.append(str(self.dir / JOURNAL_NAME))
        return {sid: session.summary() for sid, session in sessions.items()}

    def _without_files(
        self,
        creates: dict[str, builtins.list[Any]],
        unreadable: builtins.list[StoreCorrupt] | None = None,
        *,
        files: bool = True,
    ) -> dict[str, _Session]:
        """The sessions of the journal's unfiled creates whose files are missing, empty or torn in their first write
        (not written yet, or their first sync never finished: ``_holds_a_write``), replayed. A file holding a whole
        write wins: it may hold more since. A create that
        cannot be read (damaged from outside) is skipped: added to ``unreadable``, else warned about.
        ``files=False``: the caller looked for the files before it read the journal (a reader: a session filed in
        between is in the one or the other)."""
        found: dict[str, _Session] = {}
        for session_id, entries in creates.items():
            path = self._log_path(session_id)
            if not is_valid_session_id(session_id):
                continue
            if files and (_holds_a_write(path) or self._legacy_path(session_id).exists()):
                continue
            try:
                found[session_id] = _replay(entries, path)[0]
            except StoreCorrupt as e:
                if unreadable is None:
                    warn_skipped(e)
                else:
                    unreadable.append(StoreCorrupt(self.dir / JOURNAL_NAME, f"session {session_id!r}: {e}"))
        return found

    def _log_summary(self, session_id: str, path: Path, whole: bool = False) -> dict[str, Any] | None:
        if not is_valid_session_id(session_id):
            raise StoreCorrupt(path, "not a session file (its name is not a session id)")
        entry = None if whole else read_last_entry(path, _is_summary)
        if entry is None:  # none found from the end: read it whole to tell a deleted file from a damaged one
            session = self._read(session_id)
            return None if session is None else session.summary()
        info = _read_info(entry["session"], path, _LOG)
        seen = info.get("seenCount")  # None: written by an earlier version, which counted every message
        return {
            **{key: info.get(key) for key in _SUMMARY_KEYS},
            "messageCount": info.get("messageCount") if seen is None else seen,
        }

    def delete_sync(self, session_id: str) -> bool:
        if not is_valid_session_id(session_id):
            return False
        with self._lock:
            if self._journal is None and self._journal_holds(session_id):  # another process: the CLI
                return self._delete_journaled(session_id)
            cached = self._open.get(session_id)
            self._forget(session_id)
            self._unsynced.pop(session_id, None)
            existed = cached is not None and cached.journaled  # no file yet
            if self._journal is not None:  # the server: its journal must not bring the session back at a restart
                self._journal.deleted(session_id)
            if self._unlink(session_id):
                existed = True
            if existed:
                fsync_dir(self.dir)
            return existed

    def _unlink(self, session_id: str) -> bool:
        """Remove the session's files (the folder not synced); whether it had one."""
        existed = False
        for path in (self._log_path(session_id), self._legacy_path(session_id)):
            try:
                os.unlink(path)
                existed = True
            except FileNotFoundError:
                pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / f"{session_id}{_LEGACY_COPY}")
        return existed

    def _journal_holds(self, session_id: str) -> bool:
        """Whether the journal holds a create of the session that, on disk, is neither filed nor deleted: read, then
        synced, so that the filed marks read (the server appends them unsynced) are durable before the file goes. A
        session that only a mark lost in a crash or a power cut left unfiled would otherwise come back from its
        create at the next start, its file deleted. A damaged journal holds no session (listings name it)."""
        path = self.dir / JOURNAL_NAME
        try:
            held = session_id in read_outstanding(self.dir)
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except StoreCorrupt as e:
            warn_skipped(e)
            return False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return held

    def _delete_journaled(self, session_id: str) -> bool:
        """Another process's delete (the CLI) of a session whose create the journal holds unfiled (the server stopped
        before its next write, or before the mark that it was filed reached the disk): a delete appended to the
        journal, under the data directory's lock, then the file it may have removed. While a server runs it holds
        the session in memory and is the journal's only writer: DataDirLocked."""
        from ..datadir_lock import DataDirLock

        with DataDirLock(self.dir.parent):
            journal = SessionJournal(self.dir)
            try:
                held = session_id in journal.open()
                journal.deleted(session_id)  # synced: a server started next does not file it
            except StoreCorrupt as e:
                warn_skipped(e)
                held = False
            finally:
                journal.close()
        if self._unlink(session_id):
            fsync_dir(self.dir)
            return True
        return held

    # --- work done on the store thread --------------------------------------------------------

    def _delete(self, session_id: str) -> bool:
        """The server's delete: the journal opened first, so a session that a crash left in it (no file yet, filed
        at the journal's opening) is found, and its create cannot bring it back at the next use."""
        if is_valid_session_id(session_id):
            self._journal_ready()
        return self.delete_sync(session_id)

    def _log_path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}{_LOG}"

    def _legacy_path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}{_LEGACY}"

    def _read(self, session_id: str) -> _Session | None:
        """A reader's view of the session (log first, else a legacy file), or None. Raises StoreCorrupt."""
        path = self._log_path(session_id)
        entries = read_entries(path)
        if entries == [] and _is_empty(path):
            _warn_empty(path)
            return None
        if entries is not None:
            session, dropped = _replay(entries, path)
            if dropped:
                # A writer appending now looks the same to a reader as a crash (the writer warns of a crash's).
                log.warning("%s: the last write is unfinished (being written now, or cut by a crash); ignored", path)
            return session
        legacy = self._legacy_path(session_id)
        tables = _checked(read_tables(legacy), legacy)
        return None if tables is None else _legacy_session(tables)

    def _surely_absent(self, session_id: str) -> bool:
        """No such session, known on the caller's thread from two stats: not cached, no file in either form,
        and none moved aside (once the store thread has listed those). A write queued for a new id has not made
        its file yet either, but no caller asks for an id before the create that made it returned."""
        if session_id in self._open or self._damaged_ids is None or session_id in self._damaged_ids:
            return False
        if self._journal is None:  # the journal may hold it: filed at the store's first use
            return False
        if not is_valid_session_id(session_id):
            return False
        return not os.path.exists(self._log_path(session_id)) and not os.path.exists(self._legacy_path(session_id))

    def _scan_damaged_ids(self) -> set[str]:
        """Ids whose file was moved aside (``<id>.jsonl.damaged-<time>``, ``<id>.json.damaged-<time>``)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {
            name.split(f"{suffix}{DAMAGED_MARK}")[0]
            for name in names
            for suffix in (_LOG, _LEGACY)
            if f"{suffix}{DAMAGED_MARK}" in name
        }

    def _is_damaged(self, session_id: str) -> bool:
        if self._damaged_ids is None or session_id in self._damaged_ids:
            # Listed again for a damaged id: its moved-aside copy may have been removed since (the id is free).
            self._damaged_ids = self._scan_damaged_ids()
        return session_id in self._damaged_ids

    def _prepare(self) -> None:
        """Before the first write: the folder exists and a crashed writer's temp files are gone. Before every
        later one, the folder is there still (one stat): removed from outside (history cleared while the server
        runs), it is made again, or no session could be created until a restart."""
        if not self._prepared:
            make_dirs(self.dir)
            remove_stale_temp_files(self.dir)
            self._prepared = True
        elif not self.dir.is_dir():
            make_dirs(self.dir)

    def _session(self, session_id: str) -> _Session | None:
        """The session (the cached copy: never change it but through a write), or None when it does not exist.

        A session not cached is read and its log opened for appending (a torn tail or an unfinished write
        cut off); a damaged file is moved aside and raises SessionDamaged."""
        if not is_valid_session_id(session_id):
            return None
        self._journal_ready()
        session = self._open.get(session_id)
        if session is not None and session.journaled:  # no file to check yet: the journal's (two stats)
            assert self._journal is not None
            if not self._journal.log.is_replaced():
                self._open.move_to_end(session_id)
                return session
            self._reopen_journal()  # the folder was cleared from outside: the sessions with no file went with it
            session = None
        if session is not None:
            # The CLI may have deleted it since we cached it, or a file may have been put in its place: a stat is
            # far cheaper than a parse, and a changed file is read again.
            path = self._legacy_path(session_id) if session.legacy else self._log_path(session_id)
            stamp = _file_stamp(path)
            if stamp is not None and stamp == session.stamp:
                self._open.move_to_end(session_id)
                return session
            self._forget(session_id)
            if stamp is None:
                return None
            log.warning("%s was changed from outside the server; read again", path)
        try:
            session = self._load(session_id)
        except StoreCorrupt as e:
            move_aside(e)
            if self._damaged_ids is not None:
                self._damaged_ids.add(session_id)
            raise SessionDamaged(session_id) from None
        if session is None:
            if self._is_damaged(session_id):
                raise SessionDamaged(session_id)
            return None
        self._remember(session_id, session)
        return session

    def _load(self, session_id: str) -> _Session | None:
        path = self._log_path(session_id)
        if _is_empty(path):
            _warn_empty(path, removed=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if path.exists():
            self._prepare()
            log_ = AppendLog(path)
            replayed: list[_Session] = []

            def unfinished(entries: builtins.list[Any]) -> int:
                session, dropped = _replay(entries, path)
                replayed.append(session)
                return dropped

            try:
                log_.open(create=False, unfinished=unfinished)
            except FileNotFoundError:  # deleted since (the CLI)
                return None
            session = replayed[0]
            with contextlib.suppress(FileNotFoundError):  # a conversion that crashed before removing it
                os.unlink(self._legacy_path(session_id))
            session.log, session.size, session.stamp = log_, log_.size, _file_stamp(path)
            return session
        legacy = self._legacy_path(session_id)
        tables = _checked(read_tables(legacy), legacy)
        if tables is None:
            return None
        session = _legacy_session(tables)
        session.stamp = _file_stamp(legacy)
        session.size = session.stamp[1] if session.stamp is not None else 0
        return session

    def _remember(self, session_id: str, session: _Session) -> None:
        """Cache ``session``, its messages frozen (the cache hands them out as they are: see the module's doc)."""
        session.messages = [frozen(message) for message in session.messages]
        old = self._open.pop(session_id, None)
        if old is not None:
            self._open_bytes -= old.size
        self._open[session_id] = session
        self._open_bytes += session.size
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used sessions past the cache's bounds (the most recent one stays, and so do the
        sessions that have no file yet, or a file never synced: the journal bounds them; a file whose write failed
        is synced by the session's next write through the same log, which marks it filed)."""
        while len(self._open) > 1 and (len(self._open) > OPEN_SESSIONS or self._open_bytes > OPEN_BYTES):
            newest = next(reversed(self._open))
            victim = next((sid for sid, s in self._open.items() if not _unfiled(s)), newest)
            if victim == newest:
                return
            evicted = self._open.pop(victim)
            self._open_bytes -= evicted.size
            if evicted.log is not None:
                evicted.log.close()

    def _forget(self, session_id: str) -> None:
        with self._lock:
            session = self._open.pop(session_id, None)
            if session is not None:
                self._open_bytes -= session.size
                if session.log is not None:
                    session.log.close()

    def _failed(self, session_id: str) -> None:
        """A write's sync failed (its lines were cut off): the cached session goes, and the next use reads the
        disk. A session whose file's first sync failed is rebuilt from its create in the journal, which is
        durable; a create whose journal sync failed never existed."""
        with self._lock:
            session = self._open.get(session_id)
            self._forget(session_id)
            journal = self._journal
            if journal is None or session is None:
                return
            entries = journal.outstanding.get(session_id)
            if session.journaled:
                journal.outstanding.pop(session_id, None)
            elif entries is not None and session.log is not None and session.log.is_new:
                journal.not_filed(session_id)
                path = self._log_path(session_id)
                if _is_empty(path):  # its lines cut off: nothing to keep
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                rebuilt = _replay(entries, self._log_path(session_id))[0]
                rebuilt.journaled, rebuilt.size = True, session.size
                self._remember(session_id, rebuilt)

    def _require(self, session_id: str) -> _Session:
        session = self._session(session_id)
        if session is None:
            raise SessionNotFound(f"session {str(session_id)[:40]!r} not found")
        return session

    def _log_for(self, session_id: str, session: _Session) -> AppendLog:
        """The session's log, open for appending; a legacy session converted first (its log written whole,
        then the old file removed: a crash between leaves both, and the log wins)."""
        if session.log is not None:
            return session.log
        self._prepare()
        if session.journaled:
            return self._file(session_id, session)
        path = self._log_path(session_id)
        if session.legacy:
            payload = _log_bytes(session)
            write_bytes_atomic(path, payload)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._legacy_path(session_id))
            fsync_dir(self.dir)
            session.legacy = False
            self._open_bytes += len(payload) - session.size
            session.size = len(payload)
        log_ = AppendLog(path)
        log_.open(read=False)
        session.log = log_
        return log_

    def _append_entries(
        self,
        session_id: str,
        session: _Session,
        entry: dict[str, Any] | None,
        info: dict[str, Any],
        messages: builtins.list[dict[str, Any]],
        seen: int,
    ) -> AppendLog:
        """Append one write (``entry``, then the summary that closes it); the cache changes only once the
        lines are written (a failed write leaves the store as it was, ready for the next one)."""
        log_ = self._log_for(session_id, session)
        summary = _written_summary(info, messages, seen)
        try:
            written = log_.write([entry, {"session": summary}] if entry is not None else [{"session": summary}])
        except OSError:  # cut back by the log: our own change, not one from outside (the cache and its log stay)
            session.stamp = _file_stamp(log_.path)
            raise
        session.info, session.messages, session.seen = info, messages, seen
        self._open_bytes += written
        session.size += written
        session.stamp = _file_stamp(log_.path)
        self._evict()
        return log_

    def _create(
        self, session_id: str, model: str, title: str | None, client: str | None, messages: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Any], AppendLog]:
        with self._lock:
            if self._session(session_id) is not None:
                raise SessionExists(f"session {session_id!r} already exists")
            now = now_iso()
            if title is None:
                title = next((t for m in messages if m.get("role") == "user" and (t := title_from(m))), None)
            info = {
                "id": session_id,
                "title": title,
                "model": model,
                "createdAt": now,
                "lastActivityAt": now,
                "client": client,
            }
            session = _Session(info, builtins.list(messages), journaled=True)
            # One append to the journal (durable with the group commit); the session's own file is written whole at
            # its next write (``_file``), so a session file always starts with one complete write.
            self._prepare()
            journal = self._journal_ready()
            if journal.log.is_replaced():  # the folder was cleared from outside: a new journal, in the new folder
                self._reopen_journal()
                journal = self._journal_ready()
            elif journal.size > JOURNAL_BYTES:
                self._checkpoint()
            before = journal.size
            log_ = journal.created(session_id, _log_entries(session))
            session.size = journal.size - before
            self._remember(session_id, session)
            return session.summary(), log_

    def _file(self, session_id: str, session: _Session) -> AppendLog:
        """Write the file of a session that the journal holds, whole (synced by the write that needed it)."""
        assert self._journal is not None
        path = self._log_path(session_id)
        session.log = AppendLog.create(path, _log_bytes(session))
        session.journaled, session.stamp = False, _file_stamp(path)
        self._journal.filing(session_id, session.log)
        return session.log

    def _mark_filed(self) -> None:
        """After a batch's syncs: the sessions whose files are durable now are marked filed in the journal."""
        if self._journal is not None:
            with self._lock:
                self._journal.mark_filed()
                if self._journal.size > JOURNAL_BYTES:  # (a long imported history): readers read it whole
                    self._checkpoint()

    def _journal_ready(self) -> SessionJournal:
        """The journal, opened at the store's first use; creates a crash left unfiled get their files first."""
        if self._journal is None:
            self._prepare()
            journal = SessionJournal(self.dir)
            unreadable: builtins.list[StoreCorrupt] = []
            try:
                left = journal.open()
            except StoreCorrupt as e:  # damaged from outside: kept aside (below) once what it surely holds is filed
                unreadable.append(e)
                left = outstanding_after_damage(self.dir)
            try:
                unfiled = self._without_files(left, unreadable)
                for session_id, session in unfiled.items():
                    log_ = AppendLog.create(self._log_path(session_id), _log_bytes(session))
                    try:
                        log_.sync(folder=False)
                    finally:
                        log_.close()
                if unfiled:
                    fsync_dir(self.dir)
                    log.warning(
                        "%d session(s) created before the server stopped were written from %s",
                        len(unfiled),
                        journal.log.path,
                    )
                if unreadable:  # damaged from outside: kept aside for a person to look at, not emptied away
                    journal.close()
                    move_aside(unreadable[0])
                    journal = SessionJournal(self.dir)
                    journal.open()
                elif journal.size:
                    journal.empty()
            except BaseException:  # tried again at the next use
                journal.close()
                raise
            self._journal = journal
        return self._journal

    def _checkpoint(self) -> None:
        """Empty the journal: every session it holds without a file gets one, synced, first. Put off while a file
        written in the batch under way is not synced yet (the journal is all that holds that session until then).
        A failure leaves the journal as it was (tried again at the next create)."""
        journal = self._journal
        assert journal is not None
        if journal.log.is_replaced():  # the folder was cleared from outside: nothing to file
            self._reopen_journal()
            return
        if any(log_.is_new for log_ in journal.filed_logs()):
            return
        lazies = [(sid, session) for sid, session in self._open.items() if session.journaled]
        try:
            for session_id, session in lazies:
                log_ = self._file(session_id, session)
                try:
                    log_.sync(folder=False)
                except OSError:
                    session.log, session.journaled = None, True  # held by the journal still
                    log_.close()
                    raise
            if lazies:
                fsync_dir(self.dir)
            journal.empty()
        except OSError as e:
            log.warning("emptying the session journal %s failed (%s); it stays", journal.log.path, e)

    def _reopen_journal(self) -> None:
        """A new journal: the old one was removed from outside (the sessions folder cleared while the server runs),
        and with it the sessions that had no file yet, as a session whose file is removed is gone."""
        assert self._journal is not None
        old, self._journal = self._journal, None
        old.close()
        for session_id in [sid for sid, session in self._open.items() if session.journaled]:
            self._forget(session_id)
        self._journal_ready()

    def _exists(self, session_id: str) -> bool:
        with self._lock:
            return self._session(session_id) is not None

    def _get(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            session = self._session(session_id)
            if session is None:
                return None
            return {**session.summary(), "messages": builtins.list(session.messages)}  # frozen: shared, not copied

    def _messages(self, session_id: str, limit: int | None) -> builtins.list[dict[str, Any]]:
        with self._lock:
            session = self._session(session_id)
            if session is None or (limit is not None and limit <= 0):
                return []
            docs = session.messages
            return builtins.list(docs) if limit is None else docs[-limit:]  # frozen: shared, not copied

    def _append(self, session_id: str, message: dict[str, Any]) -> AppendLog:
        session = self._require(session_id)
        message = frozen(message)
        info = dict(session.info)
        if not info.get("title") and message.get("role") == "user":
            info["title"] = title_from(message)
        info["lastActivityAt"] = now_iso()
        seen = session.seen + (not message.get("replaced"))
        return self._append_entries(session_id, session, {"message": message}, info, [*session.messages, message], seen)

    def _update(self, session_id: str, message_id: str, changes: dict[str, Any]) -> AppendLog:
        session = self._require(session_id)
        messages = builtins.list(session.messages)
        found = False
        seen = session.seen
        for n, message in enumerate(messages):
            if message.get("id") == message_id:
                messages[n] = frozen({**message, **changes})
                seen += bool(message.get("replaced")) - bool(messages[n].get("replaced"))
                found = True
        if not found:
            raise MessageNotFound(f"message {str(message_id)[:40]!r} not found in session {session_id!r}")
        info = {**session.info, "lastActivityAt": now_iso()}
        entry = {"update": {"id": message_id, "changes": changes}}
        return self._append_entries(session_id, session, entry, info, messages, seen)

    def _set_aside(self, session_id: str, message_ids: builtins.list[str]) -> AppendLog:
        session = self._require(session_id)
        # One pass over the messages, however many are set aside (one ``_update`` each copied the list each time).
        messages, newly, found = _marked_aside(session.messages, set(message_ids))
        if missing := [message_id for message_id in message_ids if message_id not in found]:
            raise MessageNotFound(f"message {str(missing[0])[:40]!r} not found in session {session_id!r}")
        messages = [frozen(m) for m in messages]  # the ones set aside are new; the others are kept (frozen already)
        info = {**session.info, "lastActivityAt": now_iso()}
        entry = {"aside": {"ids": message_ids}}
        return self._append_entries(session_id, session, entry, info, messages, session.seen - newly)

    def _touch(self, session_id: str) -> AppendLog:
        session = self._require(session_id)
        info = {**session.info, "lastActivityAt": now_iso()}
        return self._append_entries(session_id, session, None, info, session.messages, session.seen)

    def _set_title(self, session_id: str, title: str) -> AppendLog:
        session = self._require(session_id)
        info = {**session.info, "title": title, "lastActivityAt": now_iso()}
        return self._append_entries(session_id, session, None, info, session.messages, session.seen)

    def _close_all(self) -> None:
        with self._lock:
            if self._journal is not None:  # the server stops: every session gets its file, the journal is emptied
                self._checkpoint()
                self._journal.close()
                self._journal = None
            for session in self._open.values():
                if session.log is not None:
                    session.log.close()
            self._open.clear()
            self._open_bytes = 0


def _unfiled(session: _Session) -> bool:
    """No file yet, or one never synced: the journal holds the session still."""
    return session.journaled or (session.log is not None and session.log.is_new)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """The file's (inode, size, mtime), or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _holds_a_write(path: Path) -> bool:
    """Whether a session file holds a whole write (a summary closes each): one that the machine stopped in its first
    write, before its first sync, holds none (empty, or part of its lines) and was never acknowledged. A file with a
    line that is not JSON counts as holding one: its damage is reported as any other's."""
    raw = read_bytes(path)
    if not raw:
        return False
    try:
        entries, _ = parse_lines(raw, path)
    except StoreCorrupt:
        return True
    return any(_is_summary(entry) for entry in entries)


def _is_empty(path: Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return False


def _warn_empty(path: Path, removed: bool = False) -> None:
    what = "removed" if removed else "ignored"
    log.warning("%s: an empty session file (its creation never became durable: never acknowledged) %s", path, what)


def _log_entries(session: _Session) -> builtins.list[Any]:
    """A whole session log's entries: its messages, then the summary that closes the write."""
    return [*({"message": m} for m in session.messages), {"session": session.written_summary()}]


def _log_bytes(session: _Session) -> bytes:
    return encode_lines(_log_entries(session))
