"""Append-only JSON-lines files: durable appends, group commit, torn tails dropped, damage reported.

The high-rate stores (session messages, usage records) append instead of rewriting whole files
(``atomic.write_bytes_atomic`` stays for small files read and changed whole). The rules:

- An entry is one JSON value on one line (compact JSON, so never a raw newline inside), ending in ``\\n``.
  ``AppendLog.write`` appends the lines of its entries with one ``os.write`` on a file opened ``O_APPEND``
  (created 0600, its folder fsynced when the file is new).
- ``AppendLog.create`` makes a new file with its first write whole (a temp file renamed into place, no sync
  yet: a kill leaves the file complete or absent); its first ``sync`` makes the file and its folder durable,
  so a new file costs no more syncs than an append and shares the group commit with the writes beside it.
- An entry is durable once ``AppendLog.sync`` (``fdatasync``) returned; nothing may be acknowledged before.
  ``GroupCommit`` gives the writes queued together on the store thread one sync per file between them.
- After a crash the file may end in part of a line (a write that was never synced, so never acknowledged):
  everything after the last ``\\n`` is a *torn tail*. Readers ignore it with a warning; the writer cuts it
  off (``ftruncate``) with a warning when it opens the file, before appending. It is never read as data.
- A complete line that is not JSON was damaged from outside (a disk error, a hand edit): ``read_entries``
  raises ``StoreCorrupt`` and callers move the file aside as they do whole files (``atomic.move_aside``).
- A write that fails (disk full, file too large) is cut off again (``ftruncate`` to the size before it): the
  file is as it was, and the same write may be retried. A failed sync cuts off everything not yet synced.
- Files do not grow without bound: callers roll over to a new file by size (``AppendLog.size``) or by day
  (a new file name), and compact (if ever) by writing a new file whole off the hot path.

Usage by a store (all of it on the store thread, ``store_thread``)::

    log = AppendLog(path)              # nothing opened yet
    entries = log.open()               # the complete entries; a torn tail cut off (with a warning)
    log.write([entry, entry2])         # appended, not yet durable
    log.sync()                         # durable (or through GroupCommit, shared with the writes beside it)

and from the event loop, several writes sharing one sync per file::

    result = await COMMIT.run(work)    # work() runs on the store thread: it writes, returns (result, [logs])

``COMMIT`` is the process's one group commit, shared by every store: writes of different stores queued
together (a session's message and a journal entry written for the same turn) ride on the same batch, and
each file they touched is synced once; the files' syncs run side by side (threads), so that the file system
commits them together, and the folder of the new files among them is synced once for all of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..atomic import StoreCorrupt, dump_json, fsync_dir, open_temp

if TYPE_CHECKING:  # asyncio only where writes run: the CLI's reports start faster without it
    import asyncio

log = logging.getLogger("agentspace.storage")

T = TypeVar("T")

_TAIL_CHUNK = 64 * 1024


def encode_lines(entries: Iterable[Any]) -> bytes:
    """The entries as the log stores them: one compact JSON line each."""
    return b"".join(dump_json(entry) + b"\n" for entry in entries)


def parse_lines(raw: bytes, path: Path) -> tuple[list[Any], int]:
    """The complete lines' entries and the length of the torn tail (bytes after the last newline).

    Raises StoreCorrupt when a complete line is not JSON."""
    end = raw.rfind(b"\n") + 1
    if end:
        # One parse of the lines as one JSON array: half the time of a parse per line. Taken only when it finds
        # exactly one value per line; anything else (damage) is parsed line by line below, to name the line.
        try:
            entries: list[Any] = json.loads(b"[" + raw[: end - 1].replace(b"\n", b",") + b"]")
        except ValueError:
            pass
        else:
            if len(entries) == raw.count(b"\n", 0, end):
                return entries, len(raw) - end
    entries = []
    for number, line in enumerate(raw[:end].split(b"\n")[:-1], 1):
        try:
            entries.append(json.loads(line))
        except ValueError as e:  # UnicodeDecodeError included
            raise StoreCorrupt(path, f"line {number} is not valid JSON ({e})") from None
    return entries, len(raw) - end


def _line_ends(raw: bytes, count: int) -> list[int]:
    """Where each of the first ``count`` lines ends (just past its newline)."""
    ends: list[int] = []
    position = 0
    for _ in range(count):
        position = raw.index(b"\n", position) + 1
        ends.append(position)
    return ends


def warn_torn(path: Path, torn: int, *, cut: bool, live: bool = False) -> None:
    """A torn tail: a crash left it where no writer appends any more (the writer opening the file cuts it off, a
    closed segment's is ignored). ``live``: a reader of a file a writer may be appending to now (the CLI beside a
    running server), which cannot tell that writer's line in progress from a crash's, so its words allow both."""
    if live:
        log.warning("%s: %d byte(s) of an unfinished write ignored (being written now, or cut by a crash)", path, torn)
        return
    what = "cut off" if cut else "ignored"
    log.warning("%s: %d byte(s) of a write that never finished (a crash) %s; never acknowledged", path, torn, what)


def read_entries(path: Path) -> list[Any] | None:
    """A reader's view: the complete entries (a torn tail ignored, with a warning), or None when there is
    no file. Raises StoreCorrupt when a complete line is not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    entries, torn = parse_lines(raw, path)
    if torn:
        warn_torn(path, torn, cut=False, live=True)
    return entries


def read_last_entry(path: Path, accept: Callable[[Any], bool]) -> Any | None:
    """The last complete entry ``accept`` takes, read from the end of the file (a torn tail skipped), or None
    (no file, no such entry, or a line that is not JSON: the full read reports that). Reads backwards in
    chunks: its cost is the size of the entries after that one, not of the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        position = f.seek(0, os.SEEK_END)
        buffer = b""
        found_end = False
        while position > 0:
            step = min(_TAIL_CHUNK, position)
            position -= step
            f.seek(position)
            buffer = f.read(step) + buffer
            if not found_end:
                newline = buffer.rfind(b"\n")
                if newline < 0:
                    continue  # still inside the torn tail (or one long last line)
                buffer, found_end = buffer[:newline], True
            lines = buffer.split(b"\n")
            # The first line may be cut by the chunk's start unless the file starts there.
            for line in reversed(lines if position == 0 else lines[1:]):
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    return None
                if accept(entry):
                    return entry
            buffer = lines[0]
        return None


class AppendLog:
    """One append-only JSON-lines file, written by one writer (see the module's rules)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.size = 0  # bytes of complete lines written (what a reader finds once synced)
        self.synced = 0  # bytes known durable
        self.failures = 0  # syncs that failed (their lines cut off): a write made before one is not durable
        self._new = False  # created by ``create`` and not synced yet: the folder's entry is not durable either
        self._close_after_sync = False

    @classmethod
    def create(cls, path: Path, payload: bytes) -> AppendLog:
        """A new file holding ``payload`` (lines already encoded), open for appending; durable, with its entry in
        the folder, once ``sync`` returned. Written to a temp file renamed into place (over any file of that
        name: the caller checked there is none), so a process killed at any moment leaves it whole or absent.
        Raises OSError with nothing left behind."""
        tmp, fd = open_temp(path, os.O_RDWR | os.O_APPEND)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log_ = cls(path)
        log_._fd, log_.size, log_._new = fd, len(payload), True
        return log_

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(
        self, *, read: bool = True, create: bool = True, unfinished: Callable[[list[Any]], int] | None = None
    ) -> list[Any]:
        """Open for appending (creating the file, 0600, when missing) and return its complete entries (``[]``
        without ``read``). A torn tail is cut off with a warning.

        ``unfinished(entries)``, for a store whose writes span several lines, checks the entries (raising
        StoreCorrupt when they are damaged) and says how many of the last ones belong to a write that never
        finished: those are cut off too and not returned. Nothing is cut before it returned, so a damaged
        file is moved aside as it was found. Raises StoreCorrupt (the file is then not opened)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is open already")
        created = not self.path.exists()
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_BINARY", 0) | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            entries: list[Any] = []
            size = os.fstat(fd).st_size
            if read and size:
                with open(fd, "rb", closefd=False) as f:
                    raw = f.read()
                entries, torn = parse_lines(raw, self.path)
                drop = unfinished(entries) if unfinished is not None else 0
                keep = len(raw) - torn
                if drop:
                    entries = entries[:-drop]
                    keep = _line_ends(raw, len(entries))[-1] if entries else 0
                if keep < len(raw):
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
                    warn_torn(self.path, len(raw) - keep, cut=True)
                    size = keep
            elif size:  # not read: still no torn tail may stay in front of our lines
                size = self._cut_torn_tail(fd, size)
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.size, self.synced = fd, size, size
        return entries

    def _cut_torn_tail(self, fd: int, size: int) -> int:
        with open(fd, "rb", closefd=False) as f:
            start = max(0, size - _TAIL_CHUNK)
            while True:
                f.seek(start)
                chunk = f.read(size - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0 or start == 0:
                    good = start + newline + 1
                    break
                start = max(0, start - _TAIL_CHUNK)
        if good < size:
            os.ftruncate(fd, good)
            os.fsync(fd)
            warn_torn(self.path, size - good, cut=True)
        return good

    def write(self, entries: Sequence[Any]) -> int:
        """Append the entries (not durable until ``sync``); returns the bytes written. On OSError the file is
        cut back to its size before this write and the error raised."""
        return self.write_bytes(encode_lines(entries))

    def write_bytes(self, payload: bytes) -> int:
        """Append lines already encoded (each ending in a newline), as ``write``."""
        fd = self._require()
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size)
            raise
        self.size += len(payload)
        return len(payload)

    def is_replaced(self) -> bool:
        """Whether the file's name no longer leads to the file open here: deleted, moved away or replaced from
        outside (history pruned or archived while the server runs). Lines appended to it then would be durable
        in a file no reader finds: the writer opens the file by its name again instead. Two stats."""
        fd = self._require()
        try:
            named = os.stat(os.fspath(self.path))
        except FileNotFoundError:
            return True
        own = os.fstat(fd)
        return named.st_ino != own.st_ino or named.st_dev != own.st_dev

    def is_resized(self) -> bool:
        """Whether the file is not the size this writer made it: appended to or cut short from outside (a line
        of junk, a truncation). A line appended here then would follow the damage, or glue onto a cut line. One
        fstat (the writes go on the file directly: its size is ours, synced or not)."""
        return os.fstat(self._require()).st_size != self.size

    @property
    def is_new(self) -> bool:
        """Created by ``create`` and never synced: its entry in the folder is not durable yet."""
        return self._new

    def sync(self, *, folder: bool = True) -> None:
        """Make every written line durable. On OSError everything not yet durable is cut off and the error
        raised (a failed fdatasync leaves no way to know what reached the disk). ``folder=False``: a new file's
        folder is the caller's to sync (a group commit syncs a folder once for every new file in it)."""
        fd = self._require()
        try:
            if self.synced != self.size or self._new:
                try:
                    if self._new:  # a new file: its inode whole (fsync), then its name in the folder
                        os.fsync(fd)
                        if folder:
                            fsync_dir(self.path.parent)
                        self._new = False
                    else:
                        os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
                except BaseException:
                    self.failures += 1
                    self.rollback()
                    raise
                self.synced = self.size
        finally:
            if self._close_after_sync:
                self._close_now()

    def truncate(self) -> None:
        """Cut the file to nothing, durably (a log whose entries are all history: the session journal)."""
        fd = self._require()
        os.ftruncate(fd, 0)
        self.size = self.synced = 0  # (if the sync fails, what may come back after a crash is history anyway)
        os.fsync(fd)

    def rollback(self) -> None:
        """Cut off everything written since the last successful sync."""
        if self._fd is not None and self.size != self.synced:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.synced)
            self.size = self.synced

    def close(self) -> None:
        """Close the file; with lines still waiting for their sync (a store dropping the log from a cache while
        a group commit is under way), only once that sync ran."""
        if self._fd is not None and self.synced != self.size:
            self._close_after_sync = True
        else:
            self._close_now()

    def _close_now(self) -> None:
        self._close_after_sync = False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _require(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._fd


@dataclass
class _Batch:
    work: list[Callable[[], tuple[Any, Sequence[AppendLog]]]] = field(default_factory=list)
    started = False
    future: asyncio.Future[list[tuple[bool, Any]]] | None = None


class GroupCommit:
    """Group commit: writes queued while the store thread is busy run together, then share one sync per file.

    ``run(work)`` queues ``work`` for the store thread; ``work()`` does its writes (``AppendLog.write``) and
    returns its result and the logs it wrote. Once every queued work of the batch ran, each log written is
    synced once, and each caller gets its result, or its exception: its own, or the sync's of a log it wrote
    (then ``on_failure`` of that work, when given, may drop what it cached; else ``on_synced``, on the store thread
    before any caller hears, may write down what is durable now). OSError comes back as
    StorageError, as everything run on the store thread. ``run_written(work)`` returns as soon as the work ran,
    with the sync still to await (a turn's user message: its sync overlaps the call's preparation)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: _Batch | None = None

    async def run(
        self,
        work: Callable[[], tuple[T, Sequence[AppendLog]]],
        on_failure: Callable[[], None] | None = None,
        on_synced: Callable[[], None] | None = None,
    ) -> T:
        import asyncio

        batch, index = self._queue(work, on_failure, on_synced=on_synced)
        assert batch.future is not None
        return _outcome(await asyncio.shield(batch.future), index)

    async def run_written(
        self,
        work: Callable[[], tuple[T, Sequence[AppendLog]]],
        on_failure: Callable[[], None] | None = None,
        on_synced: Callable[[], None] | None = None,
    ) -> tuple[T, Awaitable[None]]:
        """``run`` that returns once ``work`` ran, with the sync still under way on the store thread: its result,
        and what to await for its lines to be durable. One job for both, so the sync starts as soon as the
        lines are written, not once the event loop has come back for it."""
        import asyncio

        loop = asyncio.get_running_loop()
        written: asyncio.Future[tuple[bool, Any]] = loop.create_future()

        def on_written(outcome: tuple[bool, Any]) -> None:
            loop.call_soon_threadsafe(_settle, written, outcome)

        batch, index = self._queue(work, on_failure, on_written, on_synced)
        assert batch.future is not None

        def batch_done(future: asyncio.Future[list[tuple[bool, Any]]]) -> None:
            # Settled already, unless the flush failed as a whole before the work ran: then its caller hears why.
            error = RuntimeError("the group commit was cancelled") if future.cancelled() else future.exception()
            _settle(written, (False, error) if error is not None else future.result()[index])

        batch.future.add_done_callback(batch_done)
        value: T = _outcome([await asyncio.shield(written)], 0)

        async def synced() -> None:
            assert batch.future is not None
            _outcome(await asyncio.shield(batch.future), index)

        return value, synced()

    def _queue(
        self,
        work: Callable[[], tuple[Any, Sequence[AppendLog]]],
        on_failure: Callable[[], None] | None,
        on_written: Callable[[tuple[bool, Any]], None] | None = None,
        on_synced: Callable[[], None] | None = None,
    ) -> tuple[_Batch, int]:
        import asyncio

        from .store_thread import submit

        def guarded() -> tuple[Any, Sequence[AppendLog]]:
            return work()

        guarded.on_failure = on_failure  # type: ignore[attr-defined]
        guarded.on_written = on_written  # type: ignore[attr-defined]
        guarded.on_synced = on_synced  # type: ignore[attr-defined]
        with self._lock:
            batch = self._open
            if batch is None or batch.started:
                batch = self._open = _Batch()
                batch.future = asyncio.wrap_future(submit(self._flush, batch))
            batch.work.append(guarded)
            return batch, len(batch.work) - 1

    def _flush(self, batch: _Batch) -> list[tuple[bool, Any]]:
        with self._lock:
            batch.started = True  # from here on, new writes start the next batch
            work = list(batch.work)
        outcomes, written = _run_all(work)
        for item, outcome in zip(work, outcomes, strict=True):
            on_written = getattr(item, "on_written", None)
            if on_written is not None:
                on_written(outcome)
        failed = _sync_all(list({id(log_): log_ for logs in written for log_ in logs}.values()))
        if failed:
            for n, logs in enumerate(written):
                error = next((failed[id(log_)] for log_ in logs if id(log_) in failed), None)
                if error is not None and outcomes[n][0]:
                    outcomes[n] = (False, error)
                    on_failure = getattr(work[n], "on_failure", None)
                    if on_failure is not None:
                        on_failure()
        for item, (ok, _) in zip(work, outcomes, strict=True):
            on_synced = getattr(item, "on_synced", None)
            if ok and on_synced is not None:
                on_synced()
        return outcomes


def _outcome(outcomes: list[tuple[bool, Any]], index: int) -> Any:
    """One work's result from its batch's outcomes, or its exception (OSError as StorageError)."""
    from .store_thread import storage_error

    ok, value = outcomes[index]
    if ok:
        return value
    if isinstance(value, OSError):
        raise storage_error(value) from value
    raise value


def _settle(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


def _run_all(
    work: list[Callable[[], tuple[Any, Sequence[AppendLog]]]],
) -> tuple[list[tuple[bool, Any]], list[Sequence[AppendLog]]]:
    """Each queued work's outcome (ok, value or exception) and the logs it wrote."""
    outcomes: list[tuple[bool, Any]] = []
    written: list[Sequence[AppendLog]] = []
    for item in work:
        try:
            value, logs = item()
        except Exception as e:  # the caller gets it; the others go on
            outcomes.append((False, e))
            written.append(())
            continue
        outcomes.append((True, value))
        written.append(logs)
    return outcomes, written


def _sync_all(logs: list[AppendLog]) -> dict[int, Exception]:
    """Sync each log once and each folder of new files once, all side by side; the failures by log id.

    A folder's sync need not wait for its new files' syncs: a new file is renamed into place before either
    (``AppendLog.create``), so a crash before both returned may leave it whole, torn or empty whatever the
    order, and a torn or empty file is a creation never acknowledged (its tail cut when read). Waiting together,
    the syncs share the file system's commits: a new session costs about one commit instead of two in a row
    (``python benchmarks/store_bench.py``)."""
    failed: dict[int, Exception] = {}
    folders: dict[Path, list[AppendLog]] = {}  # before the syncs: a sync makes a new file an old one
    for log_ in logs:
        if log_.is_new:
            folders.setdefault(log_.path.parent, []).append(log_)

    def sync(log_: AppendLog) -> None:
        try:
            log_.sync(folder=False)
        except Exception as e:  # noqa: BLE001 - the writes of that log fail, the others stand
            failed[id(log_)] = e

    def sync_folder(folder: Path) -> None:
        try:
            fsync_dir(folder)
        except Exception as e:  # noqa: BLE001 - the new files of that folder fail, the others stand
            for log_ in folders[folder]:
                log_.failures += 1
                failed[id(log_)] = e

    jobs: list[Callable[[], None]] = [partial(sync, log_) for log_ in logs]
    jobs += [partial(sync_folder, folder) for folder in folders]
    if len(jobs) > 1:  # side by side: the file system commits syncs that wait together at once
        list(_sync_threads().map(lambda job: job(), jobs))
    elif jobs:
        jobs[0]()
    return failed


# The process's group commit (see the module's docstring); a forked child starts with a fresh one.
COMMIT = GroupCommit()
_SYNC_THREADS = 8
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _sync_threads() -> ThreadPoolExecutor:
    """Threads for the syncs of one batch's files, which wait on the disk side by side."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="agentspace-sync")
        return _sync_pool


def _fresh_in_child() -> None:
    global COMMIT, _sync_pool
    COMMIT = GroupCommit()
    _sync_pool = None  # a forked child has no threads: it starts its own on first use


os.register_at_fork(after_in_child=_fresh_in_child)
