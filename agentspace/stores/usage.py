"""UsageStore: usage records (``UsageRecord.to_dict()``) in bounded segment files, plus the reports.

Layout: ``data_dir/usage/<YYYY-MM-DD>/<NNNNN>.json``, one tinydb file (table ``records``) per segment.
The writer appends to the current segment in place (one record written and fdatasynced, see
``_Segment``) and starts the next one when it holds ``segment_size`` records or the UTC day changes, so
an append costs the same however much is stored. Readers parse the segments on disk and see whole
records only: a record being appended, or torn by a crash, is not there yet (``files.parse_tables``).

When the writer closes a segment (full, or a new UTC day) it writes ``<NNNNN>.totals`` next to it: the
segment's sums per model, day and pricing, stamped with the segment file's size and mtime. ``totals``
(the CLI's report) reads those instead of the records, and parses only the segments without a current
one (the open segment, one closed by a crash, one changed since): 100k records report in milliseconds.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..types import UsageRecord
from .files import (
    AtomicJSONStorage,
    StoreCorrupt,
    Worker,
    make_dirs,
    open_db,
    next_doc_id,
    read_tables,
    read_json,
    remove_stale_temp_files,
    write_json_atomic,
)

if TYPE_CHECKING:
    import asyncio

_RECORDS = "records"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SEGMENT = re.compile(r"(\d+)\.json")
# Records per segment. Reports read one ``.totals`` per closed segment and parse the open one whole; a
# writer re-reads its segment when it starts.
SEGMENT_SIZE = 250
_TOKEN_FIELDS = ("inputTokens", "outputTokens", "totalTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens")


def _utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def segment_path(data_dir: Path, day: str, number: int) -> Path:
    return Path(data_dir) / "usage" / day / f"{number:05d}.json"


def totals_path(segment: Path) -> Path:
    # Not "*.json": the folder's JSON files are its segments.
    return segment.with_suffix(".totals")


def write_segment(data_dir: Path, day: str, number: int, records: list[dict[str, Any]]) -> None:
    """Write a whole, closed segment (and its totals) in the store's format at once (seeds benchmarks and tests)."""
    path = segment_path(data_dir, day, number)
    make_dirs(path.parent)
    open_db(path).table(_RECORDS).insert_multiple(records)
    rollup = _Rollup()
    for record in records:
        rollup.add(record)
    rollup.write(path)


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # no usage yet
        return []


def _days(usage_dir: Path) -> list[str]:
    return sorted(name for name in _listdir(usage_dir) if _DAY.fullmatch(name))


def _segments(folder: Path) -> list[int]:
    """Segment numbers in order (numerically: past 99999 the names grow a digit)."""
    return sorted(int(m.group(1)) for m in map(_SEGMENT.fullmatch, _listdir(folder)) if m)


class UsageStore:
    def __init__(self, data_dir: Path, segment_size: int = SEGMENT_SIZE) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        self.dir = Path(data_dir) / "usage"
        self.segment_size = segment_size
        self._worker = Worker("usage")
        self._day: str | None = None
        self._number = 0
        self._segment: _Segment | None = None

    async def append(self, record: UsageRecord) -> None:
        await self.append_soon(record)

    def append_soon(self, record: UsageRecord) -> "asyncio.Future[None]":
        """``append`` queued now, without waiting for the write: later work of the store thread runs after it."""
        return self._worker.submit(self._append, record.to_dict())

    def records(self, *, since: datetime | None = None, session_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored record, oldest segment first; ``since`` (naive means UTC) skips older day folders."""
        since_iso = _iso(since)
        for path in self._segment_paths(since_iso):
            yield from _read_records(path, since_iso, session_id)

    def totals(self, *, since: datetime | None = None, session_id: str | None = None) -> list[dict[str, Any]]:
        """What ``records`` would yield, summed: rows with a record's ``model``, ``timestamp`` (the day only)
        and ``priceKnown``, its token and cost fields summed, ``requestCount`` and ``estimatedCount``. The
        reports (``usage_report``, ``usage_by_day``) take these rows as they take records."""
        since_iso = _iso(since)
        rows: list[dict[str, Any]] = []
        for path in self._segment_paths(since_iso):
            rollup = None if session_id is not None else _Rollup.read(path, since_iso)
            if rollup is None:
                rollup = _Rollup()
                for record in _read_records(path, since_iso, session_id):
                    rollup.add(record)
            rows += rollup.rows()
        return rows

    def _segment_paths(self, since_iso: str | None) -> Iterator[Path]:
        for day in _days(self.dir):
            if since_iso is not None and day < since_iso[:10]:
                continue
            for number in _segments(self.dir / day):
                yield segment_path(self.dir.parent, day, number)

    async def arecords(self, *, since: datetime | None = None, session_id: str | None = None) -> list[dict[str, Any]]:
        """``records`` run on the worker thread, after the appends queued before it."""
        return await self._worker.run(lambda: list(self.records(since=since, session_id=session_id)))

    async def flush(self) -> None:
        await self._worker.flush()

    async def aclose(self) -> None:
        await self._worker.aclose(self._close_segment)

    # --- work done on the worker thread -------------------------------------------------------

    def _append(self, data: dict[str, Any]) -> None:
        self._current().append(data)

    def _current(self) -> _Segment:
        day = _utc_day()
        if day != self._day:
            self._open_day(day)
        else:
            assert self._segment is not None
            if self._segment.count >= self.segment_size:
                self._open_segment(day, self._number + 1, closing=True)
        assert self._segment is not None
        return self._segment

    def _open_day(self, day: str) -> None:
        """Continue the day's last segment (a restarted server) or start its first one."""
        folder = self.dir / day
        make_dirs(folder)
        remove_stale_temp_files(folder)
        segments = _segments(folder)
        number = segments[-1] if segments else 0
        self._open_segment(day, number, closing=True)  # the previous day's segment is done with
        assert self._segment is not None
        if self._segment.count >= self.segment_size:
            self._open_segment(day, number + 1, closing=True)

    def _open_segment(self, day: str, number: int, *, closing: bool) -> None:
        """Make ``number`` the current segment; ``closing``: the previous one gets no more records."""
        previous = self._segment
        if previous is not None:
            previous.close()
            if closing and previous.count:
                previous.rollup.write(previous.path)
        self._day, self._number = day, number
        self._segment = _Segment(segment_path(self.dir.parent, day, number))

    def _close_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


class _Segment:
    """The segment being written: a tinydb file whose ``records`` table is appended to in place.

    ``AtomicJSONStorage.append`` writes one record over the file's closing ``}}`` and fdatasyncs it (no temp
    file, rename or folder fsync, and the records before it are not rewritten). A segment's first record, or
    the first after a torn or failed append, writes the file whole and atomically instead, which mends it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._storage = AtomicJSONStorage(path)
        self.rollup = _Rollup()
        for record in self._records().values():
            self.rollup.add(record)

    def _data(self) -> dict[str, Any]:
        return self._storage.read() or {}  # kept in memory by the storage; re-read after a failed write

    def _records(self) -> dict[str, Any]:
        return self._data().get(_RECORDS) or {}

    @property
    def count(self) -> int:
        return len(self._records())

    def append(self, record: dict[str, Any]) -> None:
        records = self._records()
        doc_id = next_doc_id(records)
        if not self._storage.append(_RECORDS, doc_id, record):
            data = {**self._data(), _RECORDS: {**records, str(doc_id): record}}
            data[_RECORDS] = data.pop(_RECORDS)  # the records table last, so that the next append goes in place
            self._storage.replace(data)
        self.rollup.add(record)

    def close(self) -> None:
        self._storage.close()


class _Rollup:
    """Sums of records per (model, day, unpriced), and their time range: what a ``.totals`` file holds."""

    __slots__ = ("groups", "first")

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, bool], dict[str, Any]] = {}
        self.first: str | None = None  # the earliest timestamp

    def add(self, record: dict[str, Any]) -> None:
        timestamp = str(record.get("timestamp") or "")
        key = (_model_label(record), _day_label(record), record.get("priceKnown") is False)
        totals = self.groups.get(key)
        if totals is None:
            totals = self.groups[key] = _totals()
        _add(totals, record)
        if self.first is None or timestamp < self.first:
            self.first = timestamp

    def rows(self) -> list[dict[str, Any]]:
        return [
            {**totals, "model": model, "timestamp": day, **({"priceKnown": False} if unpriced else {})}
            for (model, day, unpriced), totals in self.groups.items()
        ]

    def write(self, segment: Path) -> None:
        """Save next to ``segment``, stamped with its current size and mtime (what makes it valid)."""
        stat = segment.stat()
        write_json_atomic(totals_path(segment), {
            "segment": {"size": stat.st_size, "mtimeNs": stat.st_mtime_ns}, "first": self.first, "rows": self.rows(),
        })

    @classmethod
    def read(cls, segment: Path, since_iso: str | None) -> "_Rollup | None":
        """The segment's saved totals when they still describe it and cover ``since``; else None."""
        try:
            saved = read_json(totals_path(segment))
            stat = segment.stat()
        except (StoreCorrupt, FileNotFoundError):
            return None
        if not isinstance(saved, dict) or saved.get("segment") != {"size": stat.st_size, "mtimeNs": stat.st_mtime_ns}:
            return None
        if since_iso is not None and (saved.get("first") or "") < since_iso:
            return None  # some records are older than ``since``: only the records can tell which
        rollup = cls()
        for row in saved["rows"]:
            rollup.groups[(row["model"], row["timestamp"], row.get("priceKnown") is False)] = row
        return rollup


def _iso(since: datetime | None) -> str | None:
    """``since`` (naive means UTC) as our timestamps spell it, for string comparison."""
    if since is None:
        return None
    since_utc = since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since.astimezone(timezone.utc)
    return since_utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since_utc.microsecond // 1000:03d}Z"


def _read_records(path: Path, since_iso: str | None, session_id: str | None) -> Iterator[dict[str, Any]]:
    records = read_tables(path).get(_RECORDS) or {}  # none when deleted since the listing
    for record in records.values():
        if since_iso is not None and record.get("timestamp", "") < since_iso:
            continue
        if session_id is not None and record.get("sessionId") != session_id:
            continue
        yield record


# --- reports ------------------------------------------------------------------------------------


def _totals() -> dict[str, Any]:
    return {**dict.fromkeys(_TOKEN_FIELDS, 0), "totalCost": 0.0, "requestCount": 0, "estimatedCount": 0}


def _add(totals: dict[str, Any], record: dict[str, Any]) -> None:
    """Add a record, or a row of ``UsageStore.totals`` (which has counts instead of one ``estimated``)."""
    for key in _TOKEN_FIELDS:
        totals[key] += record.get(key) or 0
    totals["totalCost"] += record.get("totalCost") or 0.0
    count = record.get("requestCount")
    if count is None:
        totals["requestCount"] += 1
        totals["estimatedCount"] += bool(record.get("estimated"))
    else:
        totals["requestCount"] += count
        totals["estimatedCount"] += record["estimatedCount"]


def _model_label(record: dict[str, Any]) -> str:
    return str(record.get("model") or "unknown")


def _day_label(record: dict[str, Any]) -> str:
    return str(record.get("timestamp") or "")[:10] or "unknown"


def _group(records: Iterable[dict[str, Any]], key: str, label: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    grand = _totals()
    for record in records:
        name = label(record)
        totals = groups.get(name)
        if totals is None:
            totals = groups[name] = _totals()
        _add(totals, record)
        _add(grand, record)
    for totals in (*groups.values(), grand):
        totals["totalCost"] = round(totals["totalCost"], 10)  # float sums carry noise below a nano-dollar
    return {key: dict(sorted(groups.items())), "grandTotal": grand}


def usage_report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``usage.report`` shape (SPEC 3): ``perModel`` and ``grandTotal``, with extra token kinds."""
    return _group(records, "perModel", _model_label)


def usage_by_day(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day of the record's timestamp: ``perDay`` and ``grandTotal``."""
    return _group(records, "perDay", _day_label)


def usage_by_session(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per session id (``"none"`` for calls outside a session): ``perSession`` and ``grandTotal``."""
    return _group(records, "perSession", lambda record: str(record.get("sessionId") or "none"))


def usage_by_day_and_model(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day and, within it, per model (the web app's stacked chart): ``perDay`` maps a day to
    ``{MODEL: totals}``; ``grandTotal`` as in the other reports."""
    grouped = _group(records, "perDay", lambda record: f"{_day_label(record)} {_model_label(record)}")
    per_day: dict[str, dict[str, Any]] = {}
    for key, totals in grouped["perDay"].items():
        day, _, model = key.partition(" ")
        per_day.setdefault(day, {})[model] = totals
    return {"perDay": per_day, "grandTotal": grouped["grandTotal"]}
