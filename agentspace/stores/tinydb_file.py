"""Store files in tinydb's layout, ``{table: {doc id: document}}``, read and written whole.

The stores keep their data as plain dicts in this layout and write a file whole and atomically on every
change (``atomic.write_bytes_atomic``), so the files stay readable with ``tinydb.TinyDB`` and a reader never
sees half a write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import StoreCorrupt, read_json, write_json_atomic

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
