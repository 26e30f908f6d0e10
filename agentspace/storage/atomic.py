"""Whole-file writes that are atomic and durable, the reads that go with them, and damaged files moved aside.

The one writer for every file agentspace keeps (stores, vault, gateway token): the bytes go to a temp file in
the target's folder (created 0600), which is fsynced and renamed over the target with ``os.replace`` (atomic
on POSIX and Windows), then the folder is fsynced. A reader, or a process killed at any moment, sees the old
file or the new one, never part of one. A kill can leave a temp file behind: readers only open the target
names, and writers remove the temp files of processes that no longer run (``remove_stale_temp_files``).

Since no write can leave a file half written, a file that does not parse was damaged from outside (a disk
error, a hand edit, a truncation): the writer moves it aside (``move_aside``), keeping it for a person to
look at, and readers skip it and say so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ..types import compact_json

log = logging.getLogger("agentspace.storage")

# ".<target name>.<pid>.<number>.tmp": the pid tells a crashed writer's leftovers from a live one's.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")
_temp_numbers = itertools.count()
# "<name>.damaged-<UTC time>": what move_aside makes of a damaged file.
DAMAGED_MARK = ".damaged-"


class StoreCorrupt(ValueError):
    """A store file that cannot be read as what it should be (damaged outside agentspace)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where folders cannot be opened: Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_json_atomic(path: Path, data: Any) -> os.stat_result | None:
    """Replace ``path`` with ``data`` as JSON, durably and atomically (``write_bytes_atomic``). The folder must
    exist."""
    return write_bytes_atomic(path, dump_json(data))


def write_bytes_atomic(path: Path, payload: bytes) -> os.stat_result | None:
    """Replace ``path`` with ``payload`` (mode 0600), durably and atomically. The folder must exist. Returns the
    ``stat`` of ``path`` once done when it is still the file written (its inode, size and modification time),
    else None (another program put a file in its place meanwhile).

    Raises OSError (disk full, I/O error, ...) with ``path`` unchanged and no temp file left."""
    tmp, fd = open_temp(path, os.O_WRONLY)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            own = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return None
    same = (named.st_dev, named.st_ino, named.st_size, named.st_mtime_ns) == (
        own.st_dev,
        own.st_ino,
        own.st_size,
        own.st_mtime_ns,
    )
    return named if same else None


def open_temp(path: Path, flags: int) -> tuple[Path, int]:
    """A new temp file (0600) beside ``path``, named so that ``remove_stale_temp_files`` knows its writer, and
    its descriptor opened with ``flags``."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_temp_numbers)}.tmp")
        try:
            return tmp, os.open(tmp, flags | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except FileExistsError:  # left by a crashed process that had our pid: take the next number
            continue


def read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist (e.g. deleted since it was listed)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it does not exist. Raises StoreCorrupt when it is not JSON."""
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise StoreCorrupt(path, f"not valid JSON ({e})") from None


def move_aside(damage: StoreCorrupt) -> Path | None:
    """Rename a damaged file to ``<name>.damaged-<UTC time>`` next to it (kept, never deleted) and log it once.

    Returns the new path, or None when the file was gone already."""
    path = damage.path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in itertools.count():
        target = path.with_name(f"{path.name}{DAMAGED_MARK}{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            break
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    log.error("damaged store file moved aside to %s (%s); writing continues in a fresh file", target, damage)
    return target


_warned: set[Path] = set()


def warn_skipped(damage: StoreCorrupt) -> None:
    """Log, once per file and process, that a reader skipped a damaged file (reports are polled)."""
    if damage.path not in _warned:
        _warned.add(damage.path)
        log.warning("skipped a damaged store file (kept as it is; run: agentspace doctor): %s", damage)


def is_damaged_copy(name: str) -> bool:
    return DAMAGED_MARK in name


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
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume alive, leave the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
