"""UsageStore: usage records (``UsageRecord.to_dict()``) in bounded segment files, and the usage reports.

Layout: ``data_dir/usage/<YYYY-MM-DD>/<NNNNN>.json``, one tinydb file (table ``records``) per segment. The
writer keeps the current segment in memory and writes it whole and atomically with each new record, and
starts the next segment when it holds ``segment_size`` records or the UTC day changes, so a write costs at
most one bounded file however much is stored.

A segment that does not parse was damaged outside agentspace: the writer moves it aside
(``<NNNNN>.json.damaged-<time>``, kept and logged) and goes on in a fresh file; readers skip damaged
segments and name them (``damagedFiles`` in the reports).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..types import UsageRecord
from .atomic import (
    StoreCorrupt,
    is_damaged_copy,
    make_dirs,
    move_aside,
    remove_stale_temp_files,
    warn_skipped,
)
from .store_thread import on_store_thread, read_in_thread
from .tinydb_file import next_doc_id, read_tables, write_tables

_RECORDS = "records"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SEGMENT = re.compile(r"(\d+)\.json")
# Records per segment: what one write of the current segment costs at most.
SEGMENT_SIZE = 250
_TOKEN_FIELDS = ("inputTokens", "outputTokens", "totalTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens")


def _utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def segment_path(data_dir: Path, day: str, number: int) -> Path:
    return Path(data_dir) / "usage" / day / f"{number:05d}.json"


def write_segment(data_dir: Path, day: str, number: int, records: list[dict[str, Any]]) -> None:
    """Write a whole segment in the store's format at once (seeds benchmarks and tests)."""
    path = segment_path(data_dir, day, number)
    make_dirs(path.parent)
    write_tables(path, {_RECORDS: {str(n): record for n, record in enumerate(records, 1)}})


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # no usage yet
        return []


def _days(usage_dir: Path) -> list[str]:
    return sorted(name for name in _listdir(usage_dir) if _DAY.fullmatch(name))


def _segments(names: Iterable[str]) -> list[int]:
    """Segment numbers in order (numerically: past 99999 the names grow a digit)."""
    return sorted(int(m.group(1)) for m in map(_SEGMENT.fullmatch, names) if m)


class UsageStore:
    def __init__(self, data_dir: Path, segment_size: int = SEGMENT_SIZE) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        self.dir = Path(data_dir) / "usage"
        self.segment_size = segment_size
        self._closed = False
        # The segment being written: its day, number and records (the file's ``records`` table).
        self._day: str | None = None
        self._number = 0
        self._records: dict[str, dict[str, Any]] = {}
        self._ids: set[str] = set()

    async def append(self, record: UsageRecord) -> None:
        """Store ``record`` durably. A record whose id is stored already (a retried write) changes nothing.
        Raises StorageError when the write failed; the store is then as it was."""
        if self._closed:
            raise RuntimeError("the usage store is closed")
        await on_store_thread(self._append, record.to_dict())

    def records(
        self,
        *,
        since: datetime | None = None,
        session_id: str | None = None,
        damaged: list[str] | None = None,
        client: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every stored record, oldest segment first; ``since`` (naive means UTC) skips older day folders.

        Damaged segments are skipped (a warning logged) and their paths, with the segments moved aside
        earlier, added to ``damaged`` when given."""
        since_iso = _iso(since)
        for day in _days(self.dir):
            if since_iso is not None and day < since_iso[:10]:
                continue
            names = _listdir(self.dir / day)
            if damaged is not None:
                damaged += [str(self.dir / day / name) for name in sorted(names) if is_damaged_copy(name)]
            for number in _segments(names):
                path = segment_path(self.dir.parent, day, number)
                try:
                    tables = read_tables(path)
                except StoreCorrupt as e:
                    warn_skipped(e)
                    if damaged is not None:
                        damaged.append(str(path))
                    continue
                for record in ((tables or {}).get(_RECORDS) or {}).values():  # none: deleted since listed
                    if since_iso is not None and record.get("timestamp", "") < since_iso:
                        continue
                    if session_id is not None and record.get("sessionId") != session_id:
                        continue
                    if client is not None and record.get("client") != client:
                        continue
                    yield record

    def report(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """``usage_report`` (``by="model"``), ``usage_by_day`` (``by="day"``) or ``usage_by_client``
        (``by="client"``) of the records (of one client when ``client`` is given), with ``damagedFiles``:
        the segments that could not be counted."""
        damaged: list[str] = []
        records = self.records(since=since, session_id=session_id, damaged=damaged, client=client)
        grouping = REPORTS[by]
        return {**grouping(records), "damagedFiles": damaged}

    async def areport(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """``report`` run off the event loop (and off the store thread: writes do not wait for it)."""
        return await read_in_thread(lambda: self.report(by=by, since=since, session_id=session_id, client=client))

    async def arecords(
        self, *, since: datetime | None = None, session_id: str | None = None, client: str | None = None
    ) -> list[dict[str, Any]]:
        """``records`` run off the event loop (and off the store thread: writes do not wait for it)."""
        return await read_in_thread(lambda: list(self.records(since=since, session_id=session_id, client=client)))

    async def flush(self) -> None:
        await on_store_thread(lambda: None)

    async def aclose(self) -> None:
        if not self._closed:
            await self.flush()
            self._closed = True

    # --- work done on the store thread --------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        day = _utc_day()
        if day != self._day:
            self._open_day(day)
        elif len(self._records) >= self.segment_size:
            self._start(day, self._number + 1, {})
        record_id = record.get("id")
        if record_id and record_id in self._ids:
            return  # stored by an earlier try of this write
        records = {**self._records, str(next_doc_id(self._records)): record}
        write_tables(segment_path(self.dir.parent, day, self._number), {_RECORDS: records})
        # Only once written: a failed write leaves the segment as it was, and the same record can be retried.
        self._records = records
        if record_id:
            self._ids.add(record_id)

    def _open_day(self, day: str) -> None:
        """Continue the day's last segment (a restarted server) or start its first one."""
        folder = self.dir / day
        make_dirs(folder)
        remove_stale_temp_files(folder)
        numbers = _segments(_listdir(folder))
        number = numbers[-1] if numbers else 0
        path = segment_path(self.dir.parent, day, number)
        try:
            records = (read_tables(path) or {}).get(_RECORDS) or {}
        except StoreCorrupt as e:
            move_aside(e)  # its name is free again: the fresh segment takes it
            records = {}
        if len(records) >= self.segment_size:
            number, records = number + 1, {}
        self._start(day, number, records)

    def _start(self, day: str, number: int, records: dict[str, dict[str, Any]]) -> None:
        self._day, self._number, self._records = day, number, records
        self._ids = {r["id"] for r in records.values() if r.get("id")}


def _iso(since: datetime | None) -> str | None:
    """``since`` (naive means UTC) as our timestamps spell it, for string comparison."""
    if since is None:
        return None
    since_utc = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    return since_utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since_utc.microsecond // 1000:03d}Z"


# --- reports ------------------------------------------------------------------------------------


_COUNTS = ("requestCount", "errorCount", "estimatedCount")


def _totals() -> dict[str, Any]:
    return {**dict.fromkeys(_TOKEN_FIELDS, 0), "totalCost": 0.0, **dict.fromkeys(_COUNTS, 0)}


def _is_error(record: dict[str, Any]) -> bool:
    # The finish reason too: records written before the ``error`` field have only that.
    return bool(record.get("error")) or record.get("finishReason") == "error"


def _add(totals: dict[str, Any], record: dict[str, Any]) -> None:
    """Count one record: a request when the upstream answered it, an error when it ended in one."""
    for key in _TOKEN_FIELDS:
        totals[key] += record.get(key) or 0
    totals["totalCost"] += record.get("totalCost") or 0.0
    totals["requestCount"] += record.get("answered") is not False
    totals["errorCount"] += _is_error(record)
    totals["estimatedCount"] += bool(record.get("estimated"))
    if record.get("priceKnown") is False:  # costed at the fallback price: the report says so
        totals["priceKnown"] = False


def _model_label(record: dict[str, Any]) -> str:
    return str(record.get("model") or "unknown")


def _day_label(record: dict[str, Any]) -> str:
    return str(record.get("timestamp") or "")[:10] or "unknown"


def _group(records: Iterable[dict[str, Any]], key: str, label: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        name = label(record)
        totals = groups.get(name)
        if totals is None:
            totals = groups[name] = _totals()
        _add(totals, record)
    grand = _totals()
    for totals in groups.values():
        for field in (*_TOKEN_FIELDS, "totalCost", *_COUNTS):
            grand[field] += totals[field]
    for totals in (*groups.values(), grand):
        totals["totalCost"] = round(totals["totalCost"], 10)  # float sums carry noise below a nano-dollar
    return {key: dict(sorted(groups.items())), "grandTotal": grand}


def usage_report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``usage.report`` shape (SPEC 3): ``perModel`` and ``grandTotal``, with extra token kinds,
    ``requestCount`` (calls the upstream answered), ``errorCount`` and ``priceKnown: false`` on a model
    priced by the fallback."""
    return _group(records, "perModel", _model_label)


def usage_by_day(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day of the record's timestamp: ``perDay`` and ``grandTotal``."""
    return _group(records, "perDay", _day_label)


def _client_label(record: dict[str, Any]) -> str:
    # Records from before clients existed (or of the gateway token) count under the admin.
    client = record.get("client")
    return str(client) if client and client not in ("ws", "http") else "admin"


def usage_by_client(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per client (SPEC 11): ``perClient`` and ``grandTotal``."""
    return _group(records, "perClient", _client_label)


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


def usage_by_deployment(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per deployment of a model group (``group/name``, agentspace/routing.py; ``"none"`` for calls
    to a model outside any group): ``perDeployment`` and ``grandTotal``."""
    return _group(records, "perDeployment", lambda record: str(record.get("deployment") or "none"))


# ``by`` of the usage reports (CLI, ``/api/usage``): the function that groups the records.
REPORTS: dict[str, Callable[[Iterable[dict[str, Any]]], dict[str, Any]]] = {
    "model": usage_report,
    "day": usage_by_day,
    "client": usage_by_client,
    "session": usage_by_session,
    "day-model": usage_by_day_and_model,
    "deployment": usage_by_deployment,
}
