"""The data-directory lock: one server per data directory.

An exclusive lock on ``data_dir/server.lock``, released by the operating system when the process dies, so a
crashed server never leaves a stale lock: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows. CLI readers
do not take it.

Beside it, ``data_dir/server-storage``: the backend of the last server on the data directory when that server
keeps its data elsewhere (PostgreSQL), so that the CLI does not answer from the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import make_dirs

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


class DataDirLocked(RuntimeError):
    """Another server holds the data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"another agentspace server (pid {pid})" if pid else "another agentspace server"
        super().__init__(f"{who} is already using {data_dir}; stop it or pass a different --data-dir")
        self.data_dir = data_dir
        self.pid = pid


def _try_lock(fd: int) -> bool:
    """Take the lock without waiting; False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # locks the file's first byte; the pid is written after it
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    return True


class DataDirLock:
    """The lock, taken on construction (DataDirLocked when another server has it), held until ``close()``.
    The file holds the owner's pid for that error message."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        make_dirs(self.data_dir)
        self.path = self.data_dir / "server.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            locked = _try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(self.data_dir, pid)
        _write_pid(fd, f"{os.getpid()}\n")
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is None:
            return
        _write_pid(self._fd, "")
        os.close(self._fd)  # closing the only descriptor releases the lock
        self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_pid(data_dir: Path) -> int | None:
    """The pid of the server holding the data directory's lock (0 when it wrote none), None when none holds it.
    Creates nothing and opens read-only: a command run by another user than the server's may ask."""
    if fcntl is None:  # Windows: a lock taken here would be the server's byte; not asked
        return None
    try:
        fd = os.open(Path(data_dir) / "server.lock", os.O_RDONLY)
    except OSError:  # no server ever ran here, or we may not read its lock
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


STORAGE_FILE = "server-storage"  # the backend of the data directory's last server when it keeps its data elsewhere


def write_server_storage(data_dir: str | os.PathLike[str], backend: str | None) -> None:
    """Note the backend of a server whose sessions, usage and clients are not in the data directory (None:
    they are), so that a CLI command run without that server's config is not answered from the files."""
    from ..vault import write_private_file  # not at the top: vault imports this package (storage.atomic)

    path = Path(data_dir) / STORAGE_FILE
    if backend is None:
        path.unlink(missing_ok=True)
    else:
        write_private_file(path, backend + "\n")


def read_server_storage(data_dir: str | os.PathLike[str]) -> str | None:
    try:
        return (Path(data_dir) / STORAGE_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


# On Windows the pid goes after the first byte, which msvcrt locks (other processes cannot read a locked byte).
_PID_AT = 0 if fcntl is not None else 1


def _write_pid(fd: int, text: str) -> None:
    os.ftruncate(fd, _PID_AT)
    os.lseek(fd, _PID_AT, os.SEEK_SET)
    os.write(fd, text.encode())


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, _PID_AT, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
