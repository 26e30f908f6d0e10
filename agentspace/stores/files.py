"""Crash-safe JSON files for tinydb, the thread the stores write on, and the data-directory lock.

A file is written whole, or has a document added in place. A whole write goes to a temp file in the target's
folder, which is fdatasynced, renamed over the target with ``os.replace`` (atomic on POSIX), and then the
folder is fsynced (by the store thread once per batch of writes, before any of them is acknowledged): a
reader, or a process killed at any point, sees the previous file or the new one, never a partial one. A kill
can leave a temp file behind; readers only open ``*.json`` names, and writers remove temp files of dead
processes. A document added in place (``append_in_place``: a session's message, a usage record) is written
over the file's closing ``}}`` and fdatasynced, so nothing before it changes: a reader, or a file torn by a
crash, has every document before it whole (``parse_tables``), and the next whole write mends the file.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import itertools
import json
import os
import queue
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from tinydb import TinyDB
from tinydb.storages import Storage

from ..types import compact_json

if TYPE_CHECKING:
    import asyncio  # at run time only where the event loop is used: the CLI's store commands start without it

# ".<target name>.<pid>.<number>.tmp": the pid tells a crashed writer's leftovers from a live one's.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")
_temp_numbers = itertools.count()
_pid = os.getpid()
# Folder descriptors kept open for fsync, per thread (see fsync_dir).
_open_dirs = threading.local()
DIR_FDS_KEPT = 8

T = TypeVar("T")


class StoreCorrupt(ValueError):
    """A store file that cannot be read (neither atomic writes nor torn appends produce one; a hand edit can)."""


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable.

    The calling thread keeps the folders' descriptors open (the last few): a write then costs one system
    call for its folder instead of three. Per thread, so that no thread closes a descriptor another uses.
    """
    kept: collections.OrderedDict[str, int] | None = getattr(_open_dirs, "fds", None)
    if kept is None:
        kept = _open_dirs.fds = collections.OrderedDict()
    key = str(path)
    fd = kept.get(key)
    if fd is None:
        fd = kept[key] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        if len(kept) > DIR_FDS_KEPT:
            os.close(kept.popitem(last=False)[1])
    else:
        kept.move_to_end(key)
    os.fsync(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents (0700), fsyncing each new entry's parent."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        fsync_dir(folder.parent)


def dump_json(data: Any) -> bytes:
    """The stores' JSON encoding (compact, UTF-8)."""
    return compact_json(data).encode("utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, durably and atomically. The folder must exist."""
    write_bytes_atomic(path, dump_json(data))


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload``, durably and atomically. The folder must exist.

    Plain ``os`` calls, one each: every system call of the store's thread is a round trip for the GIL
    with the event loop's thread, so a write makes as few as it can (no file object, no random name, the
    folder's descriptor kept open).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{_pid}.{next(_temp_numbers)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:  # left by a crashed process that had our pid: take the next number
            continue
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)  # the data and what reading it needs (its size); not its times
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folders = getattr(_batch, "folders", None)
    if folders is None:
        fsync_dir(path.parent)
    else:  # on the store thread: once for its whole batch, before any of it is acknowledged
        folders[str(path.parent)] = path.parent


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it does not exist (e.g. deleted since it was listed)."""
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise StoreCorrupt(f"{path}: not valid JSON ({e})") from None


def read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_tables(path: Path) -> dict[str, Any]:
    """A tinydb file's tables as a reader finds them (``parse_tables``); empty when there is no file."""
    raw = read_bytes(path)
    return {} if raw is None else parse_tables(raw, path)


def next_doc_id(docs: dict[str, Any]) -> int:
    """The id tinydb would give the next document of a table (its ids are the keys, as numbers)."""
    return max(map(int, docs), default=0) + 1


def append_in_place(fd: int, piece: bytes, end: int) -> None:
    """Write ``piece`` (ending with the file's closing ``}}``) over the last two bytes of a file ``end`` bytes
    long, and fdatasync. On failure the file is put back as it was, if it can be; the caller must then not
    assume it knows the file's end (a whole write mends it)."""
    offset = end - 2
    try:
        view = memoryview(piece)
        while view:
            view = view[os.pwrite(fd, view, offset + len(piece) - len(view)):]
        os.fdatasync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.pwrite(fd, b"}}", offset)
            os.ftruncate(fd, end)
        raise


def parse_tables(raw: bytes, path: Path) -> dict[str, Any]:
    """A tinydb file's tables, without the document an in-place write (``append_in_place``) was adding.

    What a torn write leaves (a crash): the file up to that document's start and part of it; the last table
    then holds the documents before it, whole. What a reader racing the write may read (a read in two
    system calls): the file as it was, then the write's bytes past the old end. Anything else that is not
    valid JSON is StoreCorrupt."""
    return _parse_tables(raw, path)[0]


def _parse_tables(raw: bytes, path: Path) -> tuple[dict[str, Any], bool]:
    """``parse_tables``, and whether the file was whole (valid JSON as it is)."""
    whole = True
    try:
        data = json.loads(raw)
    except ValueError:
        whole = False
        text = raw.decode("utf-8", "replace")
        try:
            data = _DECODER.raw_decode(text)[0]  # the file as it was, and what was being added after it
        except ValueError:
            data = _whole_documents(text, path)
    if not isinstance(data, dict):
        raise StoreCorrupt(f"{path}: not a tinydb file")
    return data, whole


_DECODER = json.JSONDecoder()
_DOC_ID = re.compile(r'"(\d+)":')


def _whole_documents(text: str, path: Path) -> dict[str, Any]:
    corrupt = StoreCorrupt(f"{path}: not valid JSON")
    if not text.startswith("{"):
        raise corrupt
    data: dict[str, Any] = {}
    pos = 1
    while True:  # the tables before the last one are whole
        try:
            name, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            raise corrupt from None
        if not isinstance(name, str) or not text.startswith(":{", pos):
            raise corrupt
        try:
            table, end = _DECODER.raw_decode(text, pos + 1)
        except ValueError:
            break  # the last table: its documents are read one by one below
        if not isinstance(table, dict):
            raise corrupt
        data[name] = table
        if end == len(text):  # the last table whole, all but the file's closing brace written
            return data
        if not text.startswith(",", end):
            raise corrupt
        pos = end + 1
    docs: dict[str, Any] = {}
    data[name] = docs
    pos += 2
    while (key := _DOC_ID.match(text, pos)) is not None:
        try:
            doc, end = _DECODER.raw_decode(text, key.end())
        except ValueError:
            break
        if not isinstance(doc, dict):
            break
        docs[key.group(1)] = doc
        if not text.startswith(",", end):
            pos = end
            break
        pos = end + 1
    # What follows must be part of one write: a whole document further on means damage mid-file.
    for later in _DOC_ID.finditer(text, pos + 1):
        try:
            found = _DECODER.raw_decode(text, later.end())[0]
        except ValueError:
            continue
        if isinstance(found, dict):
            raise StoreCorrupt(f"{path}: not valid JSON before document {later.group(1)}")
    return data


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temp files left by writers that no longer run (killed mid-write)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        match = _TEMP_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicJSONStorage(Storage):
    """tinydb storage over ``write_json_atomic``; keeps the data in memory after the first read.

    The server is the only writer of its files, so the cached copy stays valid and reads do not
    re-parse. ``transaction()`` groups several tinydb operations into one atomic write; ``append`` adds a
    document to the last table in place.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] | None = None
        self._in_transaction = False
        self._dirty = False
        self.written_bytes: int | None = None  # the file's size after this object's last write
        # The file's size, when it is known to end with its last table's "}}" (this object wrote it, or read it
        # whole): appends may go in place. None otherwise, e.g. a torn file, or after a failed append.
        self._end: int | None = None

    def read(self) -> dict[str, Any] | None:
        if self._data is None:
            raw = read_bytes(self.path)
            self._data = self._end = None
            if raw is not None:
                self._data, whole = _parse_tables(raw, self.path)
                if whole and raw.endswith(b"}}") and _ends_with_table(self._data):
                    self._end = len(raw)  # appends may go in place at once
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        if self._in_transaction:
            self._data, self._dirty = data, True
            return
        self._commit(data)

    def replace(self, data: dict[str, Any]) -> None:
        """Write ``data`` (tinydb's layout: ``{table: {doc id: document}}``) as the whole file, at once."""
        self._commit(data)

    def append(self, table: str, doc_id: int, doc: dict[str, Any]) -> bool:
        """Add ``doc`` as ``doc_id`` of ``table``, the file's last table, writing only it (in place, fdatasynced).

        False, with nothing done, when that cannot be done in place (the table is not last, or the file's end
        is not known): then write it whole. The document must be new."""
        data, end = self._data, self._end
        if data is None or end is None or not data or next(reversed(data)) != table:
            return False
        docs = data[table]
        piece = (b"," if docs else b"") + b'"%d":%s}}' % (doc_id, dump_json(doc))
        self._end = None  # unknown until the write succeeds
        fd = os.open(self.path, os.O_WRONLY)
        try:
            append_in_place(fd, piece, end)
        finally:
            os.close(fd)
        docs[str(doc_id)] = doc
        self._end = self.written_bytes = end + len(piece) - 2
        return True

    def _commit(self, data: dict[str, Any]) -> None:
        # tinydb changes the dict read() returned in place: if the write fails, forget it and
        # re-read the file, which still holds the last good state.
        self._data = self._end = None
        payload = dump_json(data)
        write_bytes_atomic(self.path, payload)
        self._data, self.written_bytes = data, len(payload)
        if _ends_with_table(data):  # then the payload ends with that table's "}}"
            self._end = len(payload)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Operations inside reach the file together, in one write, or (on an exception) not at all."""
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._data, self._dirty = None, False
            raise
        finally:
            self._in_transaction = False
        if self._dirty:
            self._dirty = False
            assert self._data is not None
            self._commit(self._data)

    def close(self) -> None:
        self._data = self._end = None


def _ends_with_table(data: dict[str, Any]) -> bool:
    return bool(data) and isinstance(data[next(reversed(data))], dict)


def open_db(path: Path) -> TinyDB:
    """A TinyDB over ``AtomicJSONStorage``. Opening creates nothing; the first write creates the file."""
    return TinyDB(path, storage=AtomicJSONStorage)


def storage_of(db: TinyDB) -> AtomicJSONStorage:
    storage = db.storage
    assert isinstance(storage, AtomicJSONStorage)
    return storage


class _Job:
    """One function to run on the store thread, and where its outcome goes."""

    __slots__ = ("call", "loop", "outcome", "result", "error")

    def __init__(self, call: Callable[[], Any], loop: asyncio.AbstractEventLoop, outcome: "asyncio.Future[Any]") -> None:
        self.call, self.loop, self.outcome = call, loop, outcome
        self.result: Any = None
        self.error: BaseException | None = None


class _StoreThread:
    """The process's one thread for the stores' file work.

    It runs jobs in the order they were queued, a batch at a time: whatever was queued while it was busy
    runs together, the folders the batch renamed files into are fsynced once for the whole batch (group
    commit: each write is still acknowledged only once durable), and the outcomes go back to their event
    loop in one wake-up instead of one per job.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        # A daemon: it never holds the only copy of anything; the stores flush and wait for it when they close.
        threading.Thread(target=self._run, name="agentspace-store", daemon=True).start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._run_batch(batch)

    @staticmethod
    def _run_batch(batch: list[_Job]) -> None:
        folders: dict[str, Path] = {}
        _batch.folders = folders  # write_bytes_atomic leaves the folders' fsyncs to the end of the batch
        try:
            for job in batch:
                try:
                    job.result = job.call()
                except BaseException as e:  # delivered to whoever awaits the job
                    job.error = e
        finally:
            _batch.folders = None
        try:
            for folder in folders.values():
                fsync_dir(folder)
        except OSError as e:  # nothing of the batch is known to be durable
            for job in batch:
                job.error = job.error or e
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, jobs)
            except RuntimeError:  # that loop has closed: nobody is waiting any more
                pass


def _deliver(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.outcome.done():
            continue
        if job.error is not None:
            job.outcome.set_exception(job.error)
        else:
            job.outcome.set_result(job.result)


# The folders renamed into by the batch the store thread is running (None outside a batch).
_batch = threading.local()
_store_thread_lock = threading.Lock()
_store_thread_instance: _StoreThread | None = None


def _store_thread() -> _StoreThread:
    """The store thread, started on first use (and again in a forked child, which has no threads)."""
    global _store_thread_instance
    with _store_thread_lock:
        if _store_thread_instance is None:
            _store_thread_instance = _StoreThread()
        return _store_thread_instance


def _after_fork_in_child() -> None:
    """A forked child has its own pid (temp names) and no threads (the store thread starts again)."""
    global _pid, _store_thread_instance
    _pid = os.getpid()
    _store_thread_instance = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Worker:
    """A store's queue onto the process's one store thread: the event loop never blocks, and a store's
    work runs in the order it was queued.

    One thread for every store, not one each: store threads compete with the event loop's thread for
    the GIL at each system call, and each extra thread adds to those round trips.

    Work can be queued behind a ``gate`` (a future): it, and everything the store queues after it, reaches
    the thread once the gate is done. The order and what readers see are as if it had run at once (a read
    queued meanwhile waits for it); only the moment the thread starts moves. The chat pipeline queues a
    turn's user message behind its first token (or 50 ms): a store thread running while the event loop
    builds and sends the request costs both of them GIL round trips and the CPU, and the first token its latency.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._closed = False
        self._pending = 0  # this store's work queued and not finished; counted on the event loop
        self._waiting: collections.deque[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.Future[Any] | None]] = collections.deque()
        self._blocked_on: asyncio.Future[Any] | None = None  # the closed gate _dispatch waits for

    @property
    def idle(self) -> bool:
        """Nothing queued or running: what the worker's functions touch stays unchanged until the next submit."""
        return self._pending == 0

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(
        self, fn: Callable[..., T], /, *args: Any, gate: "asyncio.Future[Any] | None" = None, **kwargs: Any
    ) -> asyncio.Future[T]:
        """Queue ``fn`` now, behind everything queued before (and behind ``gate``); the future is its outcome.

        For callers that must not wait for the write (the chat hot path) yet keep its order and outcome.
        """
        import asyncio

        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        self._pending += 1
        outcome.add_done_callback(self._finished)
        self._waiting.append((functools.partial(fn, *args, **kwargs), outcome, gate))
        self._dispatch()
        # Shielded: a caller cancelled mid-write (a client gone) must not drop a write still queued.
        return asyncio.shield(outcome)

    def _dispatch(self, _: object = None) -> None:
        """Hand the thread what is queued, up to the first gate still closed."""
        import asyncio

        waiting = self._waiting
        while waiting:
            call, outcome, gate = waiting[0]
            if gate is not None and not gate.done():
                if gate is not self._blocked_on:
                    self._blocked_on = gate
                    gate.add_done_callback(self._dispatch)
                return
            waiting.popleft()
            _store_thread().submit(_Job(call, asyncio.get_running_loop(), outcome))

    def _finished(self, _: "asyncio.Future[Any]") -> None:
        self._pending -= 1

    async def flush(self) -> None:
        """Return once everything queued before this call has run."""
        await self.run(lambda: None)

    async def aclose(self, finalize: Callable[[], None]) -> None:
        """Let queued work finish, run ``finalize`` on the store thread, and take no more work."""
        if self._closed:
            return
        await self.run(finalize)
        self._closed = True


class DataDirLocked(RuntimeError):
    """Another server holds the data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"another agentspace server (pid {pid})" if pid else "another agentspace server"
        super().__init__(f"{who} is already using {data_dir}; stop it or pass a different --data-dir")
        self.data_dir = data_dir
        self.pid = pid


class DataDirLock:
    """An exclusive lock on ``data_dir/server.lock``, taken on construction, held until ``close()``.

    ``flock`` is released by the kernel when the process dies, so a crashed server never leaves a
    stale lock. The file holds the owner's pid for the error message. CLI readers do not take it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        make_dirs(self.data_dir)
        self.path = self.data_dir / "server.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(self.data_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "DataDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
