"""The bytes of the files sessions hold (images, PDFs), kept once by content hash (docs/attachments.md).

A message's file part stores its media type, name, size and SHA-256; the bytes live here. The file backend
keeps ``data_dir/blobs/<aa>/<sha256>`` (written atomically) and, for each session using a blob, an empty
marker ``data_dir/blobs/refs/<sha256>/<session id>``, and the same the other way round,
``data_dir/blobs/by-session/<session id>/<sha256>``, so that deleting a session visits its own files only
(not every blob stored): it removes its markers, and a blob left with none is deleted. The same image sent
in two sessions is stored once.

The PostgreSQL backend keeps the same in two tables (``storage/postgres/blobs.py``).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..atomic import fsync_dir, make_dirs, read_bytes, write_bytes_atomic
from .store_thread import on_store_thread

SHA256 = re.compile(r"[0-9a-f]{64}")
_BY_SESSION = "by-session"


class FileBlobStore:
    """Blobs in the data directory; the CLI uses the ``*_sync`` methods."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir) / "blobs"

    def _path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def _refs(self, sha256: str) -> Path:
        return self.root / "refs" / sha256

    def _index(self, session_id: str) -> Path:
        return self.root / _BY_SESSION / session_id

    def put_sync(self, sha256: str, data: bytes, session_id: str) -> None:
        path = self._path(sha256)
        if not path.exists():
            make_dirs(path.parent)
            write_bytes_atomic(path, data)
        # The session's index first: a crash between the two leaves at worst a blob kept, never one lost.
        for folder, name in ((self._index(session_id), sha256), (self._refs(sha256), session_id)):
            make_dirs(folder)
            if not (folder / name).exists():
                (folder / name).touch()
                fsync_dir(folder)

    def get_sync(self, sha256: str) -> bytes | None:
        try:
            return read_bytes(self._path(sha256))
        except ValueError:
            return None

    def release_sync(self, session_id: str) -> list[str]:
        deleted: list[str] = []
        index = self._index(session_id)
        if not index.is_dir():
            return deleted
        for marker in index.iterdir():
            refs = self._refs(marker.name)
            with contextlib.suppress(FileNotFoundError):
                (refs / session_id).unlink()
            if refs.is_dir() and not any(refs.iterdir()):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    self._path(marker.name).unlink()
                with contextlib.suppress(OSError):
                    refs.rmdir()
                deleted.append(marker.name)
            marker.unlink()
        with contextlib.suppress(OSError):
            index.rmdir()
        return deleted

    def hashes_sync(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for d in self.root.iterdir()
            if d.name not in ("refs", _BY_SESSION) and d.is_dir()
            for p in d.iterdir()
            if SHA256.fullmatch(p.name)
        )

    def sessions_of_sync(self, sha256: str) -> list[str]:
        refs = self._refs(sha256)
        return sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []

    async def put(self, sha256: str, data: bytes, session_id: str) -> None:
        await on_store_thread(self.put_sync, sha256, data, session_id)

    async def get(self, sha256: str) -> bytes | None:
        return await on_store_thread(self.get_sync, sha256)

    async def release(self, session_id: str) -> list[str]:
        return await on_store_thread(self.release_sync, session_id)

    async def hashes(self) -> list[str]:
        return await on_store_thread(self.hashes_sync)

    async def sessions_of(self, sha256: str) -> list[str]:
        return await on_store_thread(self.sessions_of_sync, sha256)
