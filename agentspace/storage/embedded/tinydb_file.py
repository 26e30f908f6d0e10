"""Small documents read and changed as a whole: files in tinydb's layout, ``{table: {doc id: document}}``.

``AtomicStorage`` is a ``tinydb`` storage that writes the file whole and atomically on every change
(``atomic.write_json_atomic``: temp file, fsync, rename, folder fsync), so a reader never sees half a write;
``NamedTable`` keys documents by a name (a client's) instead of tinydb's numbers. The clients table goes
through ``tinydb.TinyDB`` with both (``embedded/clients.py``). High-rate data does not: session messages and
usage records are appended to logs (``append_log``); ``read_tables`` reads the session and usage files of
earlier versions, which used this layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from ..atomic import StoreCorrupt, read_json, write_json_atomic

Tables = dict[str, dict[str, dict[str, Any]]]


def read_tables(path: Path) -> Tables | None:
    """The file's tables, or None when there is no file. Raises StoreCorrupt when it is not a tinydb file."""
    data = read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict) or not all(
        isinstance(table, dict) and all(isinstance(doc, dict) for doc in table.values()) for table in data.values()
    ):
        raise StoreCorrupt(path, "not a tinydb file ({table: {id: document}})")
    return data


def write_tables(path: Path, tables: Tables) -> None:
    """Replace the file with ``tables``, durably and atomically."""
    write_json_atomic(path, tables)


def next_doc_id(docs: dict[str, Any]) -> int:
    """The id tinydb would give the next document of a table (its ids are the keys, as numbers)."""
    return max(map(int, docs), default=0) + 1


class AtomicStorage(Storage):
    """A tinydb storage: ``read`` gives the file's tables (None when there is no file; ``reader`` may check
    the file first, e.g. its owner and mode), ``write`` replaces the file whole and atomically."""

    def __init__(self, path: Path, reader: Callable[[Path], Any] | None = None) -> None:
        self.path = Path(path)
        self.reader = reader or read_json
        self.written: os.stat_result | None = None  # the file's stat after the last write, while it is that file

    def read(self) -> dict[str, dict[str, Any]] | None:
        data = self.reader(self.path)
        if data is not None and not isinstance(data, dict):
            raise StoreCorrupt(self.path, "not a tinydb file ({table: {id: document}})")
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self.written = write_json_atomic(self.path, data)


class NamedTable(Table):
    """A tinydb table whose documents are keyed by a name (``Document(value, doc_id=name)``)."""

    document_id_class = str  # type: ignore[assignment]

    def _get_next_id(self) -> Any:
        raise ValueError("documents of a named table are inserted with their name as doc_id")


class NamedTinyDB(TinyDB):
    table_class = NamedTable
