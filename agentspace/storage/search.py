"""Finding old conversations: a case-insensitive (case-folded) phrase search over session titles and message
text.

Works on any session store through its interface (``listing`` and ``get``), so every backend gets it. The
text of each session is kept in memory per store, case-folded, with the summary it was read at; a session
is read again only when its summary changed (a new message, a new title), so a search costs one listing
and a substring scan. The first search of a process reads every session once. The text kept is bounded
(``INDEX_BYTES``): sessions past it are read again by every search that reaches them, so a data directory of
many long sessions costs search time, not the server's memory.

On the embedded store (``SessionStore``, one ``<id>.jsonl`` log per session, appended on every write; an
``<id>.json`` of an earlier version until its first change; a new session in the session journal until its
next write) even the listing is skipped: a session is read again only when its file's (inode, size, mtime)
changed, so
a search costs one ``scandir`` and the substring scan (``benchmarks/search_bench.py``: 1,000 sessions).

A search names the session files it could not read, as a listing does (``Listing.damaged_files``): on the embedded
store the copies moved aside, the files that do not read as a session and an unreadable journal; a database has
none.
"""

from __future__ import annotations

import asyncio
import os
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SessionDamaged
from .atomic import is_damaged_copy
from .embedded.sessions import SessionStore
from .embedded.store_thread import read_in_thread
from .protocols import SessionStoreAPI
from .shapes import SESSION_ID, Listing

SNIPPET = 60  # characters of context either side of a match
# Case-folded text the index keeps in memory per store, at most (about the text's size in bytes for ASCII).
INDEX_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    """A session as the index keeps it: only the case-folded text (a snippet's case comes from the session,
    read again for the hits only), so the index costs about the sessions' text size in memory."""

    stamp: tuple[Any, ...]
    text: str | None  # what is searched: the title and every message's text, ``_fold``ed; None: not kept
    summary: dict[str, Any] | None = None  # the session's summary (kept for the file-stamp path)


# One index per store object, gone with the store.
_INDEXES: weakref.WeakKeyDictionary[Any, dict[str, _Entry]] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


def message_text(message: dict[str, Any]) -> str:
    """The searchable text of a stored message: its content, else its text and reasoning parts."""
    content = message.get("content")
    if isinstance(content, str) and content:
        return content
    parts = message.get("parts") or ()
    return "\n".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "text")


def _fold(text: str) -> str:
    """Text as it is searched: composed (NFC: an accent typed or pasted as a separate mark is the same letter)
    and case-folded (``casefold``, not ``lower``: "STRASSE" finds "Straße", "ΛΌΓΟΣ" finds "λόγος"). ASCII text
    (a flag of the string, no scan) has nothing to compose, and folds as it lower-cases."""
    return text.lower() if text.isascii() else unicodedata.normalize("NFC", text).casefold()


def _stamp(summary: dict[str, Any]) -> tuple[Any, ...]:
    return (summary.get("lastActivityAt"), summary.get("messageCount"), summary.get("title"))


def _document(session: dict[str, Any]) -> str:
    texts = [str(session.get("title") or "")]
    # Answers given again (``replaced``) are out of the session as its client sees it: not searched either.
    texts += [message_text(m) for m in session.get("messages", ()) if not m.get("replaced")]
    return "\n".join(texts)


def _snippet(lowered: str, original: str | None, at: int, length: int) -> str:
    """The text around a hit, in the session's own case where case-folding kept every offset."""
    composed = unicodedata.normalize("NFC", original) if original is not None else None
    source = composed if composed is not None and len(composed) == len(lowered) else lowered
    start, end = max(0, at - SNIPPET), min(len(source), at + length + SNIPPET)
    text = " ".join(source[start:end].split())
    return ("…" if start else "") + text + ("…" if end < len(source) else "")


def _file_stamps(directory: Path, damaged: list[str]) -> dict[str, tuple[int, int, int]]:
    """Each session file's (inode, size, mtime): a write appends to the log (or replaces an earlier version's
    file), which changes at least one. The copies moved aside are added to ``damaged``."""
    stamps: dict[str, tuple[int, int, int]] = {}
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return {}
    with entries:
        for entry in entries:
            name = entry.name
            if is_damaged_copy(name):
                damaged.append(str(directory / name))
                continue
            if name.startswith(".") or name.endswith(".meta.json"):
                continue  # temp files, legacy summary copies
            if name.endswith(".jsonl"):
                session_id = name[: -len(".jsonl")]
            elif name.endswith(".json"):
                session_id = name[: -len(".json")]  # an earlier version's file, until its first change
            else:
                continue
            if not SESSION_ID.fullmatch(session_id):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # deleted since listed
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            # Both files exist only between a conversion's write and its removal of the old one: either
            # changes the stamp, so the session is read again.
            stamps[session_id] = max(stamps.get(session_id, stamp), stamp)
    return stamps


def _held(index: dict[str, _Entry]) -> int:
    return sum(len(entry.text) for entry in index.values() if entry.text is not None)


def _read_changed(
    store: SessionStore, index: dict[str, _Entry], stamps: dict[str, tuple[Any, ...]], damaged: list[str]
) -> None:
    """The index brought up to ``stamps``: the sessions changed read again; a file that does not read as a
    session is added to ``damaged`` (read again by the next search, as it is not kept)."""
    for gone in set(index) - set(stamps):
        del index[gone]
    held = _held(index)
    for session_id, stamp in stamps.items():
        entry = index.get(session_id)
        if entry is not None and entry.stamp == stamp:
            continue
        if entry is not None and entry.text is not None:
            held -= len(entry.text)
        try:
            session = store.get_sync(session_id)
        except SessionDamaged:
            session = None
            damaged.append(str(_session_file(store.dir, session_id)))
        if session is None:
            index.pop(session_id, None)
            continue
        summary = {k: v for k, v in session.items() if k != "messages"}
        text: str | None = _fold(_document(session))
        if held + len(text or "") > INDEX_BYTES:
            text = None  # past the bound: read again by each search (_scan)
        held += len(text or "")
        index[session_id] = _Entry(stamp, text, summary)


def _session_file(directory: Path, session_id: str) -> Path:
    """The file a session is read from: its log, else an earlier version's file."""
    log = directory / f"{session_id}.jsonl"
    return log if log.exists() else directory / f"{session_id}.json"


async def _search_files(store: SessionStore, query: str, client: str | None, since: str | None, limit: int) -> Listing:
    index = _INDEXES.setdefault(store, {})
    damaged: list[str] = []

    def refresh() -> None:
        # A new session has no file until its next write (the session journal): stamped by its summary. The journal
        # is read first: a session filed (and its create marked or emptied away) between the two reads is in one.
        journaled = store.journaled_summaries(damaged)
        stamps: dict[str, tuple[Any, ...]] = dict(_file_stamps(store.dir, damaged))
        for session_id, summary in journaled.items():
            stamps.setdefault(session_id, ("journal", *_stamp(summary)))
        _read_changed(store, index, stamps, damaged)

    def refreshed_scan() -> _Search:
        refresh()
        return _scan(index, query, client, since, limit, _reader(store.get_sync))

    # One refresh at a time: the index is changed on a worker thread while the loop may start another search.
    lock = _LOCKS.setdefault(store, asyncio.Lock())
    async with lock:
        search = await read_in_thread(refreshed_scan)
    found = await read_in_thread(search.done, _reader(store.get_sync))
    return Listing(found, sorted(damaged))


def _reader(get: Callable[[str], dict[str, Any] | None]) -> Callable[[str], dict[str, Any] | None]:
    def read(session_id: str) -> dict[str, Any] | None:
        try:
            return get(session_id)
        except SessionDamaged:
            return None

    return read


def _scan(
    index: dict[str, _Entry],
    query: str,
    client: str | None,
    since: str | None,
    limit: int,
    read: Callable[[str], dict[str, Any] | None],
) -> _Search:
    search = _Search(index, query, client, limit, since)
    entries = [e for e in index.values() if e.summary is not None]
    entries.sort(key=lambda e: _recency(e.summary or {}), reverse=True)
    for entry in entries:
        summary = entry.summary or {}
        if search.mine(summary):
            if entry.text is None:  # not kept (the index is full): read for this search only
                session = read(str(summary["id"]))
                if session is not None:
                    original = _document(session)
                    search.match(summary, _Entry(entry.stamp, _fold(original)), original)
            else:
                search.match(summary, entry)
        if search.full:
            break
    search.seen = set(index)
    return search


def _recency(summary: dict[str, Any]) -> tuple[str, str, str]:
    return (summary.get("lastActivityAt") or "", summary.get("createdAt") or "", str(summary.get("id")))


async def search_sessions(
    store: SessionStoreAPI, query: str, *, client: str | None = None, since: str | None = None, limit: int = 50
) -> Listing:
    """Summaries of the sessions (of ``client`` only, when given, and created at ``since`` or later: not an
    earlier client's of the same name) whose title or messages contain ``query``, most recent activity first,
    each with ``match``: the text around the first hit; and the session files the search could not read."""
    if isinstance(store, SessionStore):
        return await _search_files(store, query, client, since, limit)
    index = _INDEXES.setdefault(store, {})
    search = _Search(index, query, client, limit, since)
    listing = await store.listing()
    for summary in listing.sessions:  # most recent activity first
        if search.wants(summary):
            search.add(summary, await store.get(str(summary["id"])))
        if search.full:
            break
    originals = {}
    for session_id in search.unread():  # hits matched from the index: their text in its own case
        originals[session_id] = await store.get(session_id)
    return Listing(search.done(originals.get), listing.damaged_files)


def search_sessions_sync(
    summaries: list[dict[str, Any]],
    get: Callable[[str], dict[str, Any] | None],
    query: str,
    *,
    client: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """``search_sessions`` for the CLI: the summaries listed, ``get`` reading one session."""
    search = _Search({}, query, client, limit)
    for summary in summaries:
        if search.wants(summary):
            search.add(summary, get(str(summary["id"])))
        if search.full:
            break
    return search.done(get)


class _Search:
    """One search over summaries in order, reading a session only when the index lacks its current text."""

    def __init__(
        self, index: dict[str, _Entry], query: str, client: str | None, limit: int, since: str | None = None
    ) -> None:
        self.index, self.client, self.limit, self.since = index, client, limit, since
        self.needle = _fold(query.strip())
        self.held = _held(index)  # text the index keeps, for its bound
        # Hits in order: (summary, case-folded text, offset, the original text when it was just read).
        self.hits: list[tuple[dict[str, Any], str, int, str | None]] = []
        self.seen: set[str] = set()

    @property
    def full(self) -> bool:
        return len(self.hits) >= self.limit

    def wants(self, summary: dict[str, Any]) -> bool:
        """Whether ``summary``'s session must be read (else it was matched from the index already)."""
        session_id = str(summary["id"])
        self.seen.add(session_id)
        if not self.mine(summary):
            return False
        entry = self.index.get(session_id)
        if entry is not None and entry.stamp == _stamp(summary):
            self.match(summary, entry)
            return False
        return True

    def mine(self, summary: dict[str, Any]) -> bool:
        """Whether the session is the searching client's (every session, for the admin)."""
        if self.client is None:
            return True
        if summary.get("client") != self.client:
            return False
        created = summary.get("createdAt")
        return not self.since or not isinstance(created, str) or created >= self.since

    def add(self, summary: dict[str, Any], session: dict[str, Any] | None) -> None:
        if session is None:
            return
        original = _document(session)
        entry = _Entry(_stamp(summary), _fold(original))
        old = self.index.pop(str(summary["id"]), None)
        self.held -= len(old.text or "") if old is not None else 0
        if self.held + len(entry.text or "") <= INDEX_BYTES:  # else read again by the next search that reaches it
            self.index[str(summary["id"])] = entry
            self.held += len(entry.text or "")
        self.match(summary, entry, original)

    def match(self, summary: dict[str, Any], entry: _Entry, original: str | None = None) -> None:
        text = entry.text or ""
        at = text.find(self.needle)
        if at >= 0:
            self.hits.append((summary, text, at, original))

    def unread(self) -> list[str]:
        """The hits whose original text was not read by this search."""
        return [str(summary["id"]) for summary, _, _, original in self.hits if original is None]

    def done(self, get: Callable[[str], dict[str, Any] | None]) -> list[dict[str, Any]]:
        """The results, each with its snippet (``get`` reads a hit's session for its original case)."""
        if not self.full:
            for gone in set(self.index) - self.seen:  # deleted sessions
                del self.index[gone]
        found = []
        for summary, lowered, at, original in self.hits:
            if original is None:
                session = get(str(summary["id"]))
                original = _document(session) if session is not None else None
            found.append({**summary, "match": _snippet(lowered, original, at, len(self.needle))})
        return found
