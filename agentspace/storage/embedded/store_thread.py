"""The one thread the stores do their file work on, so that storage never blocks the event loop.

One thread for every store, not a pool: work runs in the order it was submitted, so a store's writes reach
its files in the order its callers made them, and reads see every write submitted before them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ...errors import StorageError

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _thread() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentspace-store")
        return _executor


def _forget_in_child() -> None:
    global _executor
    _executor = None  # a forked child has no threads: it starts its own on first use


os.register_at_fork(after_in_child=_forget_in_child)


def submit(fn: Callable[..., T], /, *args: Any) -> Future[T]:
    """Queue ``fn`` on the store thread (after everything queued before) without waiting for it."""
    return _thread().submit(fn, *args)


# The data directory's last failure (disk full, read-only, I/O error), for ``/healthz`` (``write_problem``):
# noted by every failure of the stores' file work and of the ledger journal, cleared once a write goes through.
_failure: OSError | None = None
PROBE_NAME = ".write-probe"


def note_failure(e: OSError) -> None:
    global _failure
    _failure = e


def storage_error(e: OSError) -> StorageError:
    note_failure(e)
    return StorageError(f"The gateway could not use its data directory: {e.strerror or e}.")


def _probe(data_dir: Path) -> None:
    """Write a page into ``data_dir``, sync it and remove it; OSError when the disk refuses."""
    path = data_dir / PROBE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def write_problem(data_dir: Path) -> str | None:
    """None when the data directory takes writes, else why not (``/healthz``). While nothing failed since the
    last check, nothing is written; after a failure, a probe (a page written, synced and removed, on the store
    thread, behind the stores' writes) tells whether there is room again."""
    global _failure
    failure = _failure
    if failure is None:
        return None
    try:
        await on_store_thread(_probe, data_dir)
    except StorageError as e:
        return e.message
    if _failure is failure:  # not another failure noted while the probe ran
        _failure = None
    return None


async def on_store_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on the store thread and return its result.

    An OSError (disk full, file too large, I/O error) comes back as StorageError; the stores leave their
    state as it was before a write that failed, so the next write, or the same one again, can proceed.
    Shielded: a caller cancelled while the work runs (a client gone) does not stop a write half way.
    """
    import asyncio  # here: the CLI's store commands run without an event loop, and start faster without it

    future = asyncio.wrap_future(_thread().submit(functools.partial(fn, *args, **kwargs)))
    try:
        return await asyncio.shield(future)
    except OSError as e:
        raise storage_error(e) from e


async def read_in_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """Run a read-only ``fn`` on a thread of the default executor, not the store thread: a long read (a usage
    report over 100k records, a listing of 10k sessions) must not hold up the writes queued there. Safe
    without the store thread's order because a reader sees whole writes only (files written whole are replaced
    atomically; append-only logs are read up to their last complete line, ``append_log``), and a write is
    finished when its caller's await returns."""
    import asyncio

    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        raise storage_error(e) from e
