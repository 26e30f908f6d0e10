"""New sessions' first writes, appended to one shared file before each session gets a file of its own.

Creating a file costs far more than appending to one: a new inode and a new folder entry, both synced (on the
disk we measured, 0.47 ms against 0.18 ms for an append and its ``fdatasync``, ``python benchmarks/store_bench.py``;
with pauses between, as between chats, ``open(O_CREAT)`` alone took 0.1-0.4 ms). A chat that starts a
conversation waits for its session to be durable before its request leaves, so the session store writes a new
session to this journal instead, and writes the session's own file at the session's next write (the answer),
whose sync the end of the turn waits for anyway.

``sessions/.journal.jsonl`` is an ``append_log`` file (a torn tail cut off, damage reported) of entries:

- ``{"create": {"id": ..., "entries": [...]}}``: a session created, with the entries its file starts with
  (``sessions.py``'s log format). Durable once the journal is synced: the session exists from then on.
- ``{"filed": id}``: the session's file was written and synced; its create entry is history. Appended right
  after that sync (not synced itself): it keeps a session deleted from outside (``agentspace sessions delete``)
  after it was filed from coming back in readers' views and at the next start.
- ``{"delete": id}``: the server deleted the session (synced before the delete returns), or the CLI did, under
  the data directory's lock, while no server runs (a running server holds the session in memory: the CLI refuses).
  Both write one for every session whose create the journal holds, filed or not (the server: marked filed since the
  journal was last emptied; the CLI: found unfiled on disk, whether its file is there or not): the mark of a
  session filed just before a crash or a power cut may never have reached the disk.

While a server runs, its ``SessionStore`` is the only writer. At its first use it files every create the journal
holds that was neither filed nor deleted and whose file is missing or empty (a crash), then empties the journal
(or, when a create cannot be read, moves it aside). A journal with a line damaged from outside is moved aside too,
once the creates after its last damaged line are filed (``outstanding_after_damage``): one before it may have lost
its filed or delete mark there, so it is left to a person rather than brought back. It empties it again, filing
what is left first, when the journal passes ``JOURNAL_BYTES`` and when the server stops.
Readers (the CLI, listings) read the journal too, so a session is visible from the moment it exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import StoreCorrupt, read_bytes
from .append_log import AppendLog, parse_lines

log = logging.getLogger("agentspace.storage")

JOURNAL_NAME = ".journal.jsonl"  # a dot name: listings and the search index skip it
# The journal is emptied once it passes this size: readers read it whole, and the sessions it holds unfiled stay
# in memory until then.
JOURNAL_BYTES = 256 * 1024


def outstanding(entries: Sequence[Any], path: Path) -> dict[str, list[Any]]:
    """The creates neither filed nor deleted since, by session id, in the journal's order (a later create of the
    same id replaces an earlier one). Raises StoreCorrupt for an entry that is none of the three."""
    found: dict[str, list[Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise StoreCorrupt(path, "not a session journal (an entry is not one of create/filed/delete)")
        [(kind, value)] = entry.items()
        if kind == "create" and isinstance(value, dict) and isinstance(value.get("entries"), list):
            found.pop(str(value.get("id")), None)  # keeps the journal's order for a re-created id
            found[str(value.get("id"))] = value["entries"]
        elif kind in ("filed", "delete") and isinstance(value, str):
            found.pop(value, None)
        else:
            raise StoreCorrupt(path, f"not a session journal (a {kind!r} entry that cannot be read)")
    return found


def read_outstanding(folder: Path) -> dict[str, list[Any]]:
    """A reader's view: the journal's unfiled creates; {} without a journal. A torn tail is ignored without a
    warning: while the server runs, a reader may find its latest append half written. Raises StoreCorrupt."""
    path = folder / JOURNAL_NAME
    raw = read_bytes(path)
    return {} if raw is None else outstanding(parse_lines(raw, path)[0], path)


def outstanding_after_damage(folder: Path) -> dict[str, list[Any]]:
    """The unfiled creates of a journal damaged from outside that come after its last damaged line, the others
    left to a person (the journal is kept aside). A create's marks (filed, delete) follow it, so those of a create
    after the damage are all there; one before it may have lost its mark there, and filed from its create, a
    session deleted since would come back."""
    path = folder / JOURNAL_NAME
    raw = read_bytes(path) or b""
    entries: list[Any] = []
    for line in raw[: raw.rfind(b"\n") + 1].split(b"\n")[:-1]:
        try:
            entry = json.loads(line)
            outstanding([entry], path)
        except (ValueError, StoreCorrupt):  # (UnicodeDecodeError included)
            entries = []  # damaged: only what follows it is read
            continue
        entries.append(entry)
    return outstanding(entries, path)


class SessionJournal:
    """The server's journal: appends creates, filed marks and deletes, and is emptied once every session it
    holds has a synced file of its own (see the module's docstring). Used on the store thread only."""

    def __init__(self, folder: Path) -> None:
        self.log = AppendLog(folder / JOURNAL_NAME)
        # Unfiled creates (id -> the entries the session's file starts with): a session whose file's first sync
        # failed is rebuilt from them; a delete of one of them is written down.
        self.outstanding: dict[str, list[Any]] = {}
        self._filing: dict[str, AppendLog] = {}  # files written, marked filed once their first sync is done
        # Sessions marked filed since the journal was last emptied: the mark is not synced, so their delete is
        # written down too (a power cut could keep the create and lose the mark, bringing the session back).
        self._marked: set[str] = set()

    def open(self) -> dict[str, list[Any]]:
        """Open for appending (a torn tail cut off) and return the unfiled creates. Raises StoreCorrupt."""
        self.outstanding = outstanding(self.log.open(), self.log.path)
        return dict(self.outstanding)

    @property
    def size(self) -> int:
        return self.log.size

    def created(self, session_id: str, entries: list[Any]) -> AppendLog:
        """Append a create; durable once the log returned is synced."""
        self.log.write([{"create": {"id": session_id, "entries": entries}}])
        self.outstanding[session_id] = entries
        return self.log

    def filing(self, session_id: str, log_: AppendLog) -> None:
        """The session's file was written (``log_``, not synced yet): ``mark_filed`` marks it once it is synced."""
        self._filing[session_id] = log_

    def mark_filed(self) -> None:
        """Mark filed (unsynced: a mark lost in a crash only leaves a create whose file exists) the sessions whose
        files were synced since they were written. Never before: a mark durable before its file would let a crash
        lose the session."""
        done = [sid for sid, log_ in self._filing.items() if not log_.is_new]
        if not done:
            return
        try:
            self.log.write([{"filed": sid} for sid in done])
        except OSError as e:  # kept for the next time (a full disk: the marks only serve a delete from outside)
            log.warning("marking sessions filed in %s failed: %s", self.log.path, e)
            return
        for sid in done:
            del self._filing[sid]
            self.outstanding.pop(sid, None)
            self._marked.add(sid)

    def filed_logs(self) -> list[AppendLog]:
        return list(self._filing.values())

    def not_filed(self, session_id: str) -> None:
        """The session's file was not made durable after all (its first sync failed): no filed mark."""
        self._filing.pop(session_id, None)

    def deleted(self, session_id: str) -> None:
        """Write down (durably) the delete of a session whose create the journal holds, filed or not; nothing
        otherwise."""
        self._filing.pop(session_id, None)
        marked = session_id in self._marked
        self._marked.discard(session_id)
        if self.outstanding.pop(session_id, None) is not None or marked:
            self.log.write([{"delete": session_id}])
            self.log.sync()

    def empty(self) -> None:
        """Cut the journal to nothing (durably): every session it held has a synced file of its own."""
        self.log.truncate()
        self.outstanding.clear()
        self._filing.clear()
        self._marked.clear()

    def close(self) -> None:
        self.log.close()
