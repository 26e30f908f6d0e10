"""UsageStore: usage records (``UsageRecord.to_dict()``) in bounded segment files, plus the reports.

Layout: ``data_dir/usage/<YYYY-MM-DD>/<NNNNN>.json``, one tinydb file (table ``records``) per segment.
The writer appends to the current segment and starts the next one when it holds ``segment_size``
records or the UTC day changes, so a write rewrites at most one segment however much is stored, and
only that segment is kept in memory. Readers parse the segments on disk; each one is replaced
atomically, so they never see a partial segment.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tinydb import TinyDB
from tinydb.table import Table

from ..types import UsageRecord
from .files import Worker, make_dirs, open_db, remove_stale_temp_files

_RECORDS = "records"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SEGMENT = re.compile(r"(\d+)\.json")
_TOKEN_FIELDS = ("inputTokens", "outputTokens", "totalTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens")


def _utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def segment_path(data_dir: Path, day: str, number: int) -> Path:
    return Path(data_dir) / "usage" / day / f"{number:05d}.json"


def write_segment(data_dir: Path, day: str, number: int, records: list[dict[str, Any]]) -> None:
    """Write a whole segment in the store's format at once (seeds benchmarks and tests)."""
    path = segment_path(data_dir, day, number)
    make_dirs(path.parent)
    open_db(path).table(_RECORDS).insert_multiple(records)


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
    def __init__(self, data_dir: Path, segment_size: int = 1000) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        self.dir = Path(data_dir) / "usage"
        self.segment_size = segment_size
        self._worker = Worker("usage")
        self._day: str | None = None
        self._number = 0
        self._segment: TinyDB | None = None

    async def append(self, record: UsageRecord) -> None:
        await self._worker.run(self._append, record.to_dict())

    def records(self, *, since: datetime | None = None, session_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored record, oldest segment first; ``since`` (naive means UTC) skips older day folders."""
        since_iso = None
        if since is not None:
            since_utc = since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since.astimezone(timezone.utc)
            since_iso = since_utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since_utc.microsecond // 1000:03d}Z"
        for day in _days(self.dir):
            if since_iso is not None and day < since_iso[:10]:
                continue
            for number in _segments(self.dir / day):
                # A segment deleted since the listing reads as empty.
                for record in open_db(segment_path(self.dir.parent, day, number)).table(_RECORDS, cache_size=0):
                    if since_iso is not None and record.get("timestamp", "") < since_iso:
                        continue
                    if session_id is not None and record.get("sessionId") != session_id:
                        continue
                    yield record

    async def arecords(self, *, since: datetime | None = None, session_id: str | None = None) -> list[dict[str, Any]]:
        """``records`` run on the worker thread, after the appends queued before it."""
        return await self._worker.run(lambda: list(self.records(since=since, session_id=session_id)))

    async def flush(self) -> None:
        await self._worker.flush()

    async def aclose(self) -> None:
        await self._worker.aclose(self._close_segment)

    # --- work done on the worker thread -------------------------------------------------------

    def _append(self, data: dict[str, Any]) -> None:
        self._current().insert(data)

    def _current(self) -> Table:
        day = _utc_day()
        if day != self._day:
            self._open_day(day)
        elif len(self._table()) >= self.segment_size:
            self._open_segment(day, self._number + 1)
        return self._table()

    def _table(self) -> Table:
        assert self._segment is not None
        return self._segment.table(_RECORDS, cache_size=0)

    def _open_day(self, day: str) -> None:
        """Continue the day's last segment (a restarted server) or start its first one."""
        folder = self.dir / day
        make_dirs(folder)
        remove_stale_temp_files(folder)
        segments = _segments(folder)
        number = segments[-1] if segments else 0
        self._open_segment(day, number)
        if len(self._table()) >= self.segment_size:
            self._open_segment(day, number + 1)

    def _open_segment(self, day: str, number: int) -> None:
        self._close_segment()
        self._day, self._number = day, number
        self._segment = open_db(segment_path(self.dir.parent, day, number))

    def _close_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


# --- reports ------------------------------------------------------------------------------------


def _totals() -> dict[str, Any]:
    return {**dict.fromkeys(_TOKEN_FIELDS, 0), "totalCost": 0.0, "requestCount": 0, "estimatedCount": 0}


def _add(totals: dict[str, Any], record: dict[str, Any]) -> None:
    for key in _TOKEN_FIELDS:
        totals[key] += record.get(key) or 0
    totals["totalCost"] += record.get("totalCost") or 0.0
    totals["requestCount"] += 1
    totals["estimatedCount"] += bool(record.get("estimated"))


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
    return _group(records, "perModel", lambda r: str(r.get("model") or "unknown"))


def usage_by_day(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day of the record's timestamp: ``perDay`` and ``grandTotal``."""
    return _group(records, "perDay", lambda r: str(r.get("timestamp") or "")[:10] or "unknown")
