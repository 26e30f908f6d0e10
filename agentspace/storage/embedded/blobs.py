"""The bytes of the files sessions hold (images, PDFs), kept once by content hash (docs/attachments.md).

A message's file part stores its media type, name, size and SHA-256; the bytes live here. The file backend
keeps ``data_dir/blobs/<aa>/<sha256>`` (written atomically) and, for each session using a blob, an empty
marker ``data_dir/blobs/refs/<sha256>/<session id>``: deleting a session removes its markers, and a blob
left with none is deleted. The same image sent in two sessions is stored once.

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

    def put_sync(self, sha256: str, data: bytes, session_id: str) -> None:
        path = self._path(sha256)
        if not path.exists():
            make_dirs(path.parent)
            write_bytes_atomic(path, data)
        refs = self._refs(sha256)
        make_dirs(refs)
        if not (refs / session_id).exists():
            (refs / session_id).touch()
            fsync_dir(refs)

    def get_sync(self, sha256: str) -> bytes | None:
        try:
            return read_bytes(self._path(sha256))
        except ValueError:
            return None

    def release_sync(self, session_id: str) -> list[str]:
        deleted: list[str] = []
        refs_root = self.root / "refs"
        if not refs_root.is_dir():
            return deleted
        for refs in refs_root.iterdir():
            marker = refs / session_id
            if not marker.exists():
                continue
            marker.unlink()
            if not any(refs.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    self._path(refs.name).unlink()
                with contextlib.suppress(OSError):
                    refs.rmdir()
                deleted.append(refs.name)
        return deleted

    def hashes_sync(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for d in self.root.iterdir()
            if d.name != "refs" and d.is_dir()
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
