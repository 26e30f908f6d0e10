"""ClientStore: the clients in ``clients.json`` in the data directory (0600, written whole and
atomically). Only key hashes are stored. The file is a tinydb database (``tinydb_file``): table ``clients``,
one document per client keyed by its name; changes go through ``tinydb.TinyDB`` with an atomic storage.

A running server sees changes made by the CLI (or another process) without a restart: every lookup checks
the file (one ``stat``: inode, times, size, mode, owner) and re-reads it when it changed (what the store wrote
itself is kept as written, not read back, while the file is the one it wrote). A file that is not
the clients table (not JSON, or JSON of another shape: it is written whole, so damaged from outside) is moved
aside (``clients.json.damaged-<time>``, logged; ``agentspace doctor`` names it) and admits no client. One client
whose document cannot be read (a field of the wrong type: ``Client.from_stored``) is refused alone, named by
``agentspace doctor``, and removed like any other (``agentspace clients remove``); its name is its key in the table.

The API a storage backend implements, async, for the server: ``get_by_key``, ``get_by_hash``, ``get``,
``list``, ``add``, ``update``, ``rotate``, ``remove``, ``touch`` (and ``should_touch``, in memory); the CLI
uses the sync ``*_sync`` forms.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from tinydb.table import Document, Table

from ...clients import Client, hash_key, new_key
from ...private_files import PrivateFileError, read_private_file
from ...types import now_iso
from ..atomic import StoreCorrupt, make_dirs, move_aside, remove_stale_temp_files
from ..errors import ClientExists, ClientNotFound
from ..shapes import TOUCH_INTERVAL_SECONDS
from .store_thread import on_store_thread
from .tinydb_file import AtomicStorage, NamedTinyDB

try:
    import fcntl
except ImportError:  # Windows: writers in one process only are ordered
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FILE_NAME = "clients.json"
TABLE = "clients"
# The file says who may call the gateway: read only from a regular file of ours that others cannot write.
FIX = "Check it, or move it away and add the clients again (agentspace clients add)."


def _readable(name: str, stored: Any) -> Client | None:
    """The client of a stored document, or None when it cannot be read (refused alone) or there is none."""
    if stored is None:
        return None
    try:
        # Its name is the table's key for it, as every change finds it (a name edited inside: the key wins).
        return Client.from_stored({**stored, "name": name})
    except (KeyError, TypeError, ValueError):
        return None


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the file is replaced, written, or has its owner or mode changed."""
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode, st.st_uid)


class ClientStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()  # the loop's reads and the store thread's writes
        self._stamp: tuple[int, ...] | None = None
        self._clients: dict[str, Client] = {}
        self._by_hash: dict[str, Client] = {}
        self._touched: dict[str, float] = {}
        self._stored: set[str] = set()  # the names in the file, those that cannot be read included
        self._data: dict[str, Any] = {}  # the file as last read or written
        self._swept = False  # the temp files a killed writer left beside the file removed (at the first write)

    # --- reads (cheap, sync: a stat, and a read only when the file changed) --------------------

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None or self._clients:
                self._load({})
            self._stamp = None
            return
        stamp = _stamp(st)
        if stamp == self._stamp:
            return
        self._load({})  # a file refused below leaves no client in memory (fail closed)
        text = read_private_file(self.path, FIX)
        try:
            data = json.loads(text) if text else {}
        except ValueError as e:
            move_aside(StoreCorrupt(self.path, f"not valid JSON ({e})"))
            data = {}
        if not isinstance(data, dict) or not isinstance(data.get(TABLE, {}), dict):
            # JSON, but not the clients table (another file put in its place, an edit gone wrong): damage, set
            # aside as a file that does not parse is, not a crash at every lookup.
            move_aside(StoreCorrupt(self.path, f'not a clients table ({{"{TABLE}": {{name: client}}}})'))
            data = {}
        self._load(data)
        self._stamp = stamp

    def _load(self, data: dict[str, Any]) -> None:
        self._data = data
        self._stored = set(data.get(TABLE) or {})
        readable = ((name, _readable(name, stored)) for name, stored in (data.get(TABLE) or {}).items())
        self._clients = {name: client for name, client in readable if client is not None}
        self._by_hash = {c.key_hash: c for c in self._clients.values()}

    def get_by_hash_sync(self, key_hash: str) -> Client | None:
        with self._lock:
            self._refresh()
            client = self._by_hash.get(key_hash)
        return client if client is not None and client.key_matches_hash(key_hash) else None

    def get_sync(self, name: str) -> Client | None:
        with self._lock:
            self._refresh()
            return self._clients.get(name)

    def list_sync(self) -> list[Client]:
        with self._lock:
            self._refresh()
            return sorted(self._clients.values(), key=lambda c: c.name)

    # --- writes (sync; the async forms run them on the store thread) ---------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Held around every read-modify-write: this process's lock, and a lock file shared with the other
        processes (the CLI next to the server), so that no write puts back what another just changed (a
        server noting a last use must not revive a key the CLI has just rotated)."""
        make_dirs(self.path.parent)
        fd = os.open(self.path.with_name("." + FILE_NAME + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waited for before the in-process lock: readers do not wait
            with self._lock:
                if not self._swept:
                    self._swept = True
                    remove_stale_temp_files(self.path.parent)
                yield
        finally:
            os.close(fd)  # releases the lock

    def _change(self, name: str, change: Callable[[Table], object]) -> None:
        """Apply ``change`` to the clients table through tinydb, on the file as last read (checked by ``_refresh``
        under the write lock), and keep what was written as read: a change costs one write of the file, and the
        next lookup a ``stat``, not a parse of every client (a last use noted once a minute per client key made
        each lookup after it parse the whole file). Trusted only while the file is the one written
        (``write_bytes_atomic``'s stat): one another program put in place meanwhile is read at the next lookup,
        so a key revoked by hand is refused."""
        docs = self._data.get(TABLE) or {}
        # tinydb changes the documents it reads in place: copies, so a failed write leaves the clients as read.
        tables = {**self._data, TABLE: {n: dict(d) if isinstance(d, dict) else d for n, d in docs.items()}}
        self._stamp = None  # read again unless the write below is known to be the file
        db = NamedTinyDB(self.path, storage=partial(AtomicStorage, reader=lambda _: tables))
        change(db.table(TABLE))
        written = db.storage.written  # type: ignore[attr-defined]
        self._data, self._stored = tables, set(tables[TABLE])
        self._clients.pop(name, None)
        if (client := _readable(name, tables[TABLE].get(name))) is not None:
            self._clients[name] = client
        self._by_hash = {c.key_hash: c for c in self._clients.values()}
        self._stamp = None if written is None else _stamp(written)

    def add_sync(self, client: Client) -> str:
        """Store a new client (``client.key_hash`` is replaced); returns its key, the only time it is shown."""
        with self._writing():
            self._refresh()
            # A stored client that cannot be read (damaged from outside) is not replaced: removed first, on purpose.
            if client.name in self._clients or client.name in self._stored:
                raise ClientExists(client.name)
            key = new_key()
            client.key_hash = hash_key(key)
            document = Document(client.to_stored(), doc_id=client.name)  # type: ignore[arg-type]
            self._change(client.name, lambda table: table.insert(document))
            return key

    def update_sync(self, name: str, change: Any) -> Client:
        """Apply ``change(client)`` to a copy of the client and store it."""
        with self._writing():
            self._refresh()
            current = self._clients.get(name)
            if current is None:
                raise ClientNotFound(name)
            client = Client.from_stored(current.to_stored())
            change(client)
            stored = client.to_stored()

            def replace(document: MutableMapping[str, Any]) -> None:
                document.clear()
                document.update(stored)

            self._change(name, lambda table: table.update(replace, doc_ids=[name]))  # type: ignore[list-item]
            return client

    def rotate_sync(self, name: str) -> str:
        """A new key for ``name``; the old one is refused from now on. Returns the new key."""
        key = new_key()

        def change(client: Client) -> None:
            client.key_hash = hash_key(key)

        self.update_sync(name, change)
        return key

    def remove_sync(self, name: str) -> None:
        with self._writing():
            self._refresh()
            # One that cannot be read (damaged from outside) is removed too: the way to add it again.
            if name not in self._clients and name not in self._stored:
                raise ClientNotFound(name)
            self._change(name, lambda table: table.remove(doc_ids=[name]))  # type: ignore[list-item]

    def touch_sync(self, name: str, when: str) -> None:
        def change(client: Client) -> None:
            client.last_used_at = when

        try:
            self.update_sync(name, change)
        except ClientNotFound:
            pass

    # --- async API (the server) ----------------------------------------------------------------
    # Reads run on the loop: a stat, and a read of a small file only when it changed.

    # A file that cannot be trusted (another user's, writable by others, a symbolic link) admits no client.

    async def get_by_key(self, key: str) -> Client | None:
        """The client whose key this is (the hash compared in constant time), or None."""
        return await self.get_by_hash(hash_key(key))

    async def get_by_hash(self, key_hash: str) -> Client | None:
        try:
            return self.get_by_hash_sync(key_hash)
        except PrivateFileError as e:
            log.error("client keys refused: %s", e)
            return None

    async def get(self, name: str) -> Client | None:
        try:
            return self.get_sync(name)
        except PrivateFileError as e:
            log.error("client keys refused: %s", e)
            return None

    async def list(self) -> list[Client]:
        return self.list_sync()

    async def add(self, client: Client) -> str:
        return await on_store_thread(self.add_sync, client)

    async def update(self, name: str, change: Any) -> Client:
        return await on_store_thread(self.update_sync, name, change)

    async def rotate(self, name: str) -> str:
        return await on_store_thread(self.rotate_sync, name)

    async def remove(self, name: str) -> None:
        await on_store_thread(self.remove_sync, name)

    def should_touch(self, key: str, monotonic_now: float) -> bool:
        """Whether last use is due to be written (at most once a minute per ``key``: a client key's hash, so that a
        rotated key or a client added again under a removed one's name has its first use written at once)."""
        last = self._touched.get(key)
        if last is not None and monotonic_now - last < TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[key] = monotonic_now
        return True

    async def touch(self, name: str, when: datetime | None = None) -> None:
        await on_store_thread(self.touch_sync, name, now_iso() if when is None else when.isoformat())
