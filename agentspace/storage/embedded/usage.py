"""UsageStore: usage records (``UsageRecord.to_dict()``) appended to bounded log segments, and the usage reports.

Layout: ``data_dir/usage/<YYYY-MM-DD>/<NNNNN>.jsonl``, one ``append_log`` file per segment, one record per
line. The writer appends each record (group commit: records stored together share one ``fdatasync``) and
starts the next segment when the current one holds ``segment_size`` records or the UTC day changes, so no
file grows without bound and a write costs one short line however much is stored. A segment deleted or moved
away from outside while it is written (history pruned or archived) is noticed at the next record, which goes
to the day's folder as it is then, not to a file no name leads to; one appended to or cut short from outside (a
line of junk, a truncation) is checked again first, as at a restart, so no record is written after the damage
(uncounted with it) or glued onto a cut line. Segments written by
earlier versions, ``<NNNNN>.json`` (a tinydb file, table ``records``), are read as they are; the writer
never appends to them.

A torn last line (a crash mid-write: never acknowledged) is cut off by the writer when it opens the segment
and ignored by readers (silently in the open segment, where a line being written looks the same; with a
warning in a closed one, once, when its rollup is made: no writer will cut it). A segment with a complete
line that does not parse, or that parses but is not a usage record (a key field that is not a string, a
summed one that is not a number: ``_check_records``), was damaged outside agentspace: the writer moves it aside
(``<NNNNN>.jsonl.damaged-<time>``, kept and logged) and goes on in a fresh file; readers skip damaged
segments and name them (``damagedFiles`` in the reports).

Reports read rollups (``usage/rollups/<YYYY-MM-DD>.json``): for every closed segment (every segment of an earlier
day, and those of today but the one being written), its records summed per (day, model, client, session,
endpoint), written once, off the hot path, by the first report that needs them (whole and atomically), and trusted
only while the segment has the size and modification time it had then (a segment changed in place, damaged or
edited, is read again). A day's closed segments' rollups (every segment of a past day, today's but the one being
written) are merged once more into ``<YYYY-MM-DD>.day.json``, and again without the session into
``<YYYY-MM-DD>.nosession.json``: a report that neither groups nor filters by session (by model, client, day,
endpoint; a budget's spend) reads the latter, so its time does not grow with the number of sessions either (one
call per session makes as many groups as records). A report sums the rollups and the open segment, whose lines a
process reads once, summed as they come (``_count_open``: each report reads only the lines appended since the one
before), so its time grows with the groups, not the records. A rollup file that does not parse, or whose groups are not a
rollup's (damaged from outside: it is written whole), is moved aside like any damaged store file and rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ...lru import LRU
from ...types import UsageRecord
from ..atomic import (
    StoreCorrupt,
    is_damaged_copy,
    make_dirs,
    move_aside,
    read_json,
    remove_stale_temp_files,
    warn_skipped,
    write_bytes_atomic,
    write_json_atomic,
)
from ..reports import (
    REPORTS,
    SUMMED,
    TOKEN_FIELDS,
    GroupKey,
    add_to,
    group_key,
    group_records,
    merge,
    owner,
    report_from_groups,
)
from . import append_log
from .append_log import AppendLog, encode_lines, parse_lines
from .store_thread import read_in_thread
from .tinydb_file import read_tables, write_tables

log = logging.getLogger("agentspace.storage")

_RECORDS = "records"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SEGMENT = re.compile(r"(\d+)\.jsonl?")
_LOG = ".jsonl"
ROLLUPS = "rollups"
NO_SESSION = "nosession"  # a day's closed segments merged without the session: ``rollups/<day>.nosession.json``
# 2: the deployment of a model group is part of the group key; 3: server-tool fees and uses are summed
_ROLLUP_VERSION = 3
_TAIL_CHUNK = 64 * 1024
# Records per segment: the most a writer reads when it opens the day's last segment, and the most a report
# scans that no rollup covers.
SEGMENT_SIZE = 10_000
# The days' merged rollups a store keeps parsed (two months of both kinds): a report over a month, and each
# client's spend over its period, read the same files again.
DAY_ROLLUPS_KEPT = 128
# Ids of the last records written kept for ``spend``: a record still being stored was written in its group
# commit's batch, far fewer records ago.
RECENT_IDS = 10_000


def _utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def segment_path(data_dir: Path, day: str, number: int, *, legacy: bool = False) -> Path:
    return Path(data_dir) / "usage" / day / f"{number:05d}.json{'' if legacy else 'l'}"


def write_segment(data_dir: Path, day: str, number: int, records: list[dict[str, Any]]) -> None:
    """Write a whole segment in the format of earlier versions (a tinydb file), for tests of old data."""
    path = segment_path(data_dir, day, number, legacy=True)
    make_dirs(path.parent)
    write_tables(path, {_RECORDS: {str(n): record for n, record in enumerate(records, 1)}})


def write_log_segment(data_dir: Path, day: str, number: int, records: list[dict[str, Any]]) -> None:
    """Write a whole segment in the store's format at once (seeds benchmarks and tests)."""
    path = segment_path(data_dir, day, number)
    make_dirs(path.parent)
    write_bytes_atomic(path, encode_lines(records))


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # no usage yet
        return []


def _days(usage_dir: Path) -> list[str]:
    return sorted(name for name in _listdir(usage_dir) if _DAY.fullmatch(name))


def _segment_files(names: Iterable[str]) -> list[tuple[int, str]]:
    """(number, file name) of the segments, in order (numerically: past 99999 the names grow a digit)."""
    return sorted((int(m.group(1)), m.group(0)) for m in map(_SEGMENT.fullmatch, names) if m)


def _segments(names: Iterable[str]) -> list[int]:
    return [number for number, _ in _segment_files(names)]


def read_segment(path: Path) -> list[dict[str, Any]]:
    """A segment's records ([] when it is gone). Raises StoreCorrupt."""
    if path.name.endswith(_LOG):
        entries = _read_log(path) or []
        if not all(isinstance(entry, dict) for entry in entries):
            raise StoreCorrupt(path, "not a usage segment (a line is not a record)")
    else:
        entries = list(((read_tables(path) or {}).get(_RECORDS) or {}).values())
    _check_records(entries, path)
    return entries


def _checked_segment(path: Path, entries: list[Any]) -> int:
    """The writer's check of the segment it continues: what readers would call damaged is moved aside, not
    appended to (every record written after it would go uncounted with it). Nothing unfinished: 0."""
    if not all(isinstance(entry, dict) for entry in entries):
        raise StoreCorrupt(path, "not a usage segment (a line is not a record)")
    _check_records(entries, path)
    return 0


# What every reader relies on (a report's groups and sums, a client's spend, a ``since``, the writer's and the
# ledger recovery's look-ups by id): the fields no writer writes in another type. A record that has one otherwise
# is JSON, but not a usage record: damage from outside.
_KEY_FIELDS = ("id", "timestamp", "model", "client", "sessionId", "endpoint", "deployment")
_NUMBER_FIELDS = (*TOKEN_FIELDS, "totalCost", "serverToolCost")


def _check_records(records: list[dict[str, Any]], path: Path) -> None:
    """Raises StoreCorrupt, naming the record and the field, when a record has a key field that is not a string
    or a summed field that is not a number: counted, it would stop every report (and every spend) that reads
    it, not only its own numbers. Cheap beside the parse: a dozen type checks a record."""
    for number, record in enumerate(records, 1):
        get = record.get
        for name in _KEY_FIELDS:
            value = get(name)
            if value is not None and value.__class__ is not str:
                raise StoreCorrupt(path, f"record {number} is not a usage record ({name}: {value!r:.40})")
        for name in _NUMBER_FIELDS:
            value = get(name)
            if value is not None and value.__class__ is not int and value.__class__ is not float:
                raise StoreCorrupt(path, f"record {number} is not a usage record ({name}: {value!r:.40})")


def _read_log(path: Path) -> list[Any] | None:
    """A log segment's entries, the torn tail ignored without a warning: to a reader, the line the writer is
    appending looks the same (the writer warns when it cuts a real one off)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    return parse_lines(raw, path)[0]


class UsageStore:
    def __init__(self, data_dir: Path, segment_size: int = SEGMENT_SIZE) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        self.dir = Path(data_dir) / "usage"
        self.segment_size = segment_size
        self._closed = False
        self._rollups_swept = False  # the temp files a killed writer left beside the rollups removed (once)
        self._commit = append_log.COMMIT
        # The segment being written: its day, number, log, record count and record ids.
        self._day: str | None = None
        self._number = 0
        self._log: AppendLog | None = None
        self._count = 0
        self._ids: set[str] = set()
        # The ids of the last records written, in order (``spend``: which records being stored it counts).
        self._recent: dict[str, None] = {}
        # The open segment's records summed so far, by the reports of this process (``_count_open``).
        self._open_tally: _OpenTally | None = None
        self._tally_lock = threading.Lock()
        # The days' merged rollups last read (``_read_day_rollup``); reports run on several threads.
        self._day_rollups: LRU[Path, _DayRollup] = LRU(DAY_ROLLUPS_KEPT)
        self._rollup_lock = threading.Lock()

    async def append(self, record: UsageRecord) -> None:
        """Store ``record`` durably. A record whose id is stored already (a retried write) changes nothing.
        Raises StorageError when the write failed; the store is then as it was."""
        if self._closed:
            raise RuntimeError("the usage store is closed")
        data = record.to_dict()

        def work() -> tuple[None, list[AppendLog]]:
            return None, self._append(data)

        await self._commit.run(work, on_failure=lambda: self._forget(data))

    def records_sync(
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
            for _, name in _segment_files(names):
                path = self.dir / day / name
                try:
                    records = read_segment(path)
                except StoreCorrupt as e:
                    warn_skipped(e)
                    if damaged is not None:
                        damaged.append(str(path))
                    continue
                yield from _matching(records, since_iso, session_id, client)

    def report_sync(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """The report ``by`` names (``REPORTS``) of the records (of one client when ``client`` is given), with
        ``damagedFiles``: the segments that could not be counted. Read from the rollups of closed segments
        and the records of the open ones (``groups``)."""
        if by not in REPORTS:
            raise KeyError(by)
        damaged: list[str] = []
        groups = self.groups_sync(
            since=since, session_id=session_id, client=client, damaged=damaged, sessions=by == "session"
        )
        return {**report_from_groups(by, groups), "damagedFiles": damaged}

    def groups_sync(
        self,
        *,
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
        damaged: list[str] | None = None,
        sessions: bool = True,
    ) -> dict[GroupKey, dict[str, Any]]:
        """The records' totals per (day, model, client, session, endpoint): what ``records`` would give, summed.
        Closed segments count through their rollups (built and saved here when missing or stale). ``sessions``
        False: the caller ignores the session of a group (closed segments may come as groups without one)."""
        since_iso = _iso(since)
        today = _utc_day()
        query = _Query(since_iso, session_id, client, sessions or session_id is not None)
        named = len(damaged) if damaged is not None else 0
        distrusted: set[str] = set()
        while True:
            groups: dict[GroupKey, dict[str, Any]] = {}
            day = ""
            try:
                for day in _days(self.dir):
                    if since_iso is not None and day < since_iso[:10]:
                        continue
                    self._count_day(day, day < today, query, groups, damaged, day not in distrusted)
                return groups
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                # A rollup that parses but whose groups are not what we write (edited, damaged in a way JSON
                # allows): moved aside, and the report made again with that day counted from its segments
                # (its rollups rebuilt). An error on a day counted without rollups is ours: raised.
                if not day or day in distrusted:
                    raise
                distrusted.add(day)
                self._set_aside_rollups(day, e)
                if damaged is not None:
                    del damaged[named:]

    def _count_day(
        self,
        day: str,
        past: bool,
        query: _Query,
        groups: dict[GroupKey, dict[str, Any]],
        damaged: list[str] | None,
        trusted: bool = True,
    ) -> None:
        """Add a day's matching records to ``groups``, and save its rollups if they changed (``trusted``: the
        rollups saved are read, else the day is counted from its segments alone)."""
        folder = self.dir / day
        names = _listdir(folder)
        if damaged is not None:
            damaged += [str(folder / name) for name in sorted(names) if is_damaged_copy(name)]
        files = _segment_files(names)
        # A rollup holds while its segment keeps the size and modification time it was made from: a segment
        # changed in place (damaged from outside, edited: the size kept) is read again, not counted as it was.
        sizes: dict[str, int] = {}
        mtimes: dict[str, int] = {}
        for _, name in files:
            try:
                st = (folder / name).stat()
            except FileNotFoundError:
                continue
            sizes[name], mtimes[name] = st.st_size, st.st_mtime_ns
        # Every segment of a past day is closed; today's are, but the last (being written).
        closed = {
            name
            for index, (_, name) in enumerate(files)
            if name in sizes and (past or index < len(files) - 1 or not name.endswith(_LOG))
        }
        closed_sizes = {name: sizes[name] for name in closed}
        closed_mtimes = {name: mtimes[name] for name in closed}
        merged = self._count_merged(day, closed_sizes, closed_mtimes, query, groups) if trusted and closed else "stale"
        if merged == "counted":
            for _, name in files:  # the open segment
                if name in sizes and name not in closed:
                    self._count_open(folder / name, day, query, groups, damaged)
            return
        known = self._read_rollup(day) if trusted else {}
        fresh: dict[str, Any] = {}
        for _, name in files:
            if name not in sizes:
                continue
            if name not in closed:
                self._count_open(folder / name, day, query, groups, damaged)
                continue
            stamp = {"size": sizes[name], "mtime": mtimes[name]}
            entry = known.get(name)
            if not (name in closed and isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items())):
                entry = None
            kept = _count_segment(folder / name, stamp, name in closed, entry, query, groups, damaged)
            if kept is not None:
                fresh[name] = kept
        if fresh != known:
            self._save(day, {"segments": fresh})
        if closed and merged == "stale":
            whole = _day_rollup({name: fresh[name] for name in closed if name in fresh}, closed_sizes, closed_mtimes)
            if whole is not None:
                self._save(f"{day}.day", {"day": {"merged": whole}})  # a table of one document (tinydb layout)
                self._save(f"{day}.{NO_SESSION}", {"day": {"merged": _without_sessions(whole)}})

    def _count_merged(
        self,
        day: str,
        sizes: dict[str, int],
        mtimes: dict[str, int],
        query: _Query,
        groups: dict[GroupKey, dict[str, Any]],
    ) -> Literal["counted", "current", "stale"]:
        """Count the day's closed segments through their groups merged once (a file of their own: a report's time
        grows with the groups, not with how many segments the day's records filled), without the sessions when
        the query needs none: "counted". Else "current" (the merged groups are the segments' but hold records
        before ``since``) or "stale" (made for other segments, or none yet: to be made again)."""
        if not query.sessions:
            bare = self._read_day_rollup(day, NO_SESSION)
            if bare is not None and _day_covers(bare.whole, sizes, mtimes, query.since_iso):
                _count_rollup(bare.whole, None, query.client, groups, bare.rows(query.client))
                return "counted"
        read = self._read_day_rollup(day)
        if read is None or not _day_covers(read.whole, sizes, mtimes, None):
            return "stale"
        whole = read.whole
        if not _day_covers(whole, sizes, mtimes, query.since_iso):
            return "current"
        _count_rollup(whole, query.session_id, query.client, groups, read.rows(query.client))
        if not query.sessions:  # made before the file without sessions was, or damaged since
            self._save(f"{day}.{NO_SESSION}", {"day": {"merged": _without_sessions(whole)}})
        return "counted"

    def _count_open(
        self, path: Path, day: str, query: _Query, groups: dict[GroupKey, dict[str, Any]], damaged: list[str] | None
    ) -> None:
        """Add the open segment's matching records to ``groups``. The records are summed as they are read, and a
        report reads only the lines appended since the one before (a budget's alerts report after every record
        of the client: parsing the whole open segment each time grew with the day's records, up to
        ``SEGMENT_SIZE``). The file is read whole again when it is not the one summed (replaced, moved aside),
        is shorter, changed without growing, or no longer has the last line summed where it was (the writer cut
        off a write whose sync failed, then appended more); a ``since`` later than the day's start, or a line that
        does not read, scans it as before."""
        with self._tally_lock:
            tally = self._open_tally
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if tally is None or not tally.continues(path, st):
                        tally = _OpenTally(path, st, day)
                    if st.st_size != tally.size or st.st_mtime_ns != tally.mtime:
                        f.seek(tally.offset - len(tally.tail))
                        raw = f.read()
                        if not raw.startswith(tally.tail):
                            tally = _OpenTally(path, st, day)
                            f.seek(0)
                            raw = f.read()
                        tally.add(raw, st)
            except FileNotFoundError:
                return  # gone since listed (history pruned): as a scan of it finds no record
            except StoreCorrupt:
                tally = None  # a scan of it names the damage
            self._open_tally = tally
            if tally is None or (query.since_iso is not None and query.since_iso > tally.start):
                _count_segment(path, {}, False, None, query, groups, damaged)
                return
            tally.count(query, groups)

    def _read_rollup(self, day: str) -> dict[str, Any]:
        """The day's rollups: ``{segment file name: entry}`` (a tinydb layout, table ``segments``)."""
        try:
            data = read_json(self.dir / ROLLUPS / f"{day}.json")
        except StoreCorrupt as e:
            _set_aside(e)
            return {}  # rebuilt from the segments
        except OSError:  # unreadable here (another user's, made by `sudo agentspace usage`): the segments are read
            return {}
        segments = data.get("segments") if isinstance(data, dict) else None
        if not isinstance(segments, dict):
            return {}
        return {
            name: entry
            for name, entry in segments.items()
            if isinstance(entry, dict) and entry.get("version") == _ROLLUP_VERSION
        }

    def _read_day_rollup(self, day: str, kind: str = "day") -> _DayRollup | None:
        """A day's closed segments' rollups merged (``<day>.day.json``, table ``day``, document ``merged``), or
        merged without the session (``kind`` NO_SESSION: ``<day>.nosession.json``). Kept parsed while the file is
        the same (its inode, size and modification time: a rollup is replaced whole, never changed in place): a
        client's spend reads the days of its period, and listing every client's spend (``clients list``, the first
        ``/api/clients``) parsed each day's groups of every client once per client."""
        path = self.dir / ROLLUPS / f"{day}.{kind}.json"
        try:
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._rollup_lock:
                known = self._day_rollups.get(path)
            if known is not None and known.stamp == stamp:
                return known
            data = read_json(path)
        except StoreCorrupt as e:
            _set_aside(e)
            return None  # rebuilt from the segments' rollups
        except OSError:  # none yet, or unreadable here (another user's): made again, or the segments read
            return None
        table = data.get("day") if isinstance(data, dict) else None
        whole = table.get("merged") if isinstance(table, dict) else None
        if not (isinstance(whole, dict) and whole.get("version") == _ROLLUP_VERSION):
            return None
        read = _DayRollup(stamp, whole)
        with self._rollup_lock:
            self._day_rollups[path] = read
        return read

    def _set_aside_rollups(self, day: str, error: Exception) -> None:
        """Move the day's rollup files aside (logged)."""
        for name in (f"{day}.json", f"{day}.day.json", f"{day}.{NO_SESSION}.json"):
            path = self.dir / ROLLUPS / name
            if path.exists():
                _set_aside(StoreCorrupt(path, f"not a usage rollup ({type(error).__name__}: {error})"))

    def _save(self, name: str, data: dict[str, Any]) -> None:
        """Save a rollup file (best effort: a reader without write access just scans again next time)."""
        with contextlib.suppress(OSError):
            make_dirs(self.dir / ROLLUPS)
            if not self._rollups_swept:  # a report killed mid-save (the CLI's too) leaves its temp file
                self._rollups_swept = True
                remove_stale_temp_files(self.dir / ROLLUPS)
            write_json_atomic(self.dir / ROLLUPS / f"{name}.json", data)

    async def report(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """``report`` run off the event loop (and off the store thread: writes do not wait for it)."""
        return await read_in_thread(lambda: self.report_sync(by=by, since=since, session_id=session_id, client=client))

    async def spend(
        self, *, client: str, since: datetime | None, posting: Callable[[], Mapping[str, str]]
    ) -> tuple[float, set[str]]:
        """The cost of ``client``'s records since ``since``, from the rollups, and which records of ``posting()``
        (id: timestamp, the records being stored) it counts. Summed on the store thread, where no record is
        written meanwhile, once a first pass off it has brought the rollups up to date (so the store thread
        reads only the open segments and the rollup files)."""
        from .store_thread import on_store_thread

        await read_in_thread(lambda: self.groups_sync(since=since, client=client, sessions=False))

        def snapshot() -> tuple[float, frozenset[str]]:
            groups = self.groups_sync(since=since, client=client, sessions=False)
            return sum(float(g["totalCost"]) for g in groups.values()), frozenset(self._recent)

        total, recent = await on_store_thread(snapshot)
        # A record still being stored now and written before the snapshot is one of the last ones written.
        return total, set(posting()) & recent

    async def records(
        self, *, since: datetime | None = None, session_id: str | None = None, client: str | None = None
    ) -> list[dict[str, Any]]:
        """``records`` run off the event loop (and off the store thread: writes do not wait for it)."""
        return await read_in_thread(lambda: list(self.records_sync(since=since, session_id=session_id, client=client)))

    async def flush(self) -> None:
        from .store_thread import on_store_thread

        await on_store_thread(lambda: None)

    async def aclose(self) -> None:
        if not self._closed:
            from .store_thread import on_store_thread

            await self.flush()
            await on_store_thread(self._close_log)
            self._closed = True

    # --- work done on the store thread --------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> list[AppendLog]:
        day = _utc_day()
        if day != self._day or self._log is None:
            self._open_day(day)
        elif self._log.is_replaced():
            log.warning(
                "%s was deleted, moved or replaced from outside the server; records go on in its folder", self._log.path
            )
            self._open_day(day)
        elif self._log.is_resized():  # read again as a restart does: damage moved aside, a cut line cut off
            log.warning("%s was changed from outside the server; checked again before the next record", self._log.path)
            self._open_day(day)
        elif self._count >= self.segment_size:
            self._start(day, self._number + 1)
        assert self._log is not None
        record_id = record.get("id")
        if record_id and record_id in self._ids:
            return []  # stored by an earlier try of this write
        self._log.write([record])
        # Only once written: a failed write leaves the segment as it was, and the same record can be retried.
        self._count += 1
        if record_id:
            self._ids.add(record_id)
            self._recent[record_id] = None
            if len(self._recent) > RECENT_IDS:
                del self._recent[next(iter(self._recent))]
        return [self._log]

    def _forget(self, record: dict[str, Any]) -> None:
        """The sync of a written record failed (the log cut it off again): it is not stored."""
        self._count -= 1
        self._ids.discard(record.get("id") or "")
        self._recent.pop(record.get("id") or "", None)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _open_day(self, day: str) -> None:
        """Continue the day's last segment (a restarted server) or start its first one."""
        self._close_log()
        folder = self.dir / day
        make_dirs(folder)
        remove_stale_temp_files(folder)
        files = _segment_files(_listdir(folder))
        if not files:
            self._start(day, 0)
            return
        number, name = files[-1]
        path = folder / name
        if not name.endswith(_LOG):  # an earlier version's segment: checked, never appended to
            try:
                read_tables(path)
            except StoreCorrupt as e:
                move_aside(e)
            self._start(day, number + 1)
            return
        log_ = AppendLog(path)
        try:
            entries = log_.open(unfinished=partial(_checked_segment, path))
        except StoreCorrupt as e:
            move_aside(e)  # its name is free again: the fresh segment takes it
            self._start(day, number)
            return
        if len(entries) >= self.segment_size:
            log_.close()
            self._start(day, number + 1)
            return
        self._day, self._number, self._log, self._count = day, number, log_, len(entries)
        self._ids = {r["id"] for r in entries if isinstance(r, dict) and r.get("id")}

    def _start(self, day: str, number: int) -> None:
        self._close_log()
        log_ = AppendLog(segment_path(self.dir.parent, day, number))
        log_.open(read=False)
        self._day, self._number, self._log, self._count, self._ids = day, number, log_, 0, set()


def _set_aside(damage: StoreCorrupt) -> None:
    """A rollup file that does not parse (written whole and atomically, so damaged from outside): moved aside,
    kept and logged, like every damaged store file, and rebuilt from its segments (best effort: a reader
    without write access just leaves it and reads the segments)."""
    with contextlib.suppress(OSError):
        move_aside(damage)


class _Query(NamedTuple):
    since_iso: str | None
    session_id: str | None
    client: str | None
    sessions: bool  # the groups' sessions matter to the caller


class _DayRollup:
    """A day's merged rollup as read (``whole``) and the file's stamp then; its rows by client, made at the
    first report of one client (a client's spend reads its own groups, not every client's)."""

    def __init__(self, stamp: tuple[int, ...], whole: dict[str, Any]) -> None:
        self.stamp, self.whole = stamp, whole
        self._owners: dict[str, list[Any]] | None = None

    def rows(self, client: str | None) -> list[Any] | None:
        """The rows of ``client``'s groups (None: every row). Raises as ``_count_rollup`` on groups that are not
        a rollup's."""
        if client is None:
            return None
        if self._owners is None:
            owners: dict[str, list[Any]] = {}
            for row in self.whole["groups"]:
                owners.setdefault(owner(row[2]), []).append(row)
            self._owners = owners
        return self._owners.get(client, [])


class _OpenTally:
    """An open segment's records read so far: the complete lines up to ``offset``, summed per group (with and
    without the session) when timed from the day's start on, kept whole when timed before it (written just
    after midnight); the file's inode, size and modification time when last read."""

    def __init__(self, path: Path, st: os.stat_result, day: str) -> None:
        self.path, self.inode = path, (st.st_dev, st.st_ino)
        self.start = f"{day}T00:00:00.000Z"
        self.offset = self.size = self.mtime = 0
        self.tail = b""  # the last line summed, which ends at ``offset``
        self.groups: dict[GroupKey, dict[str, Any]] = {}
        self.bare: dict[GroupKey, dict[str, Any]] = {}
        self.early: list[dict[str, Any]] = []

    def continues(self, path: Path, st: os.stat_result) -> bool:
        """Whether ``st`` is of the file summed, grown or as it was (appended to, as its writer does)."""
        return (
            path == self.path
            and (st.st_dev, st.st_ino) == self.inode
            and (st.st_size > self.size or (st.st_size == self.size and st.st_mtime_ns == self.mtime))
        )

    def add(self, raw: bytes, st: os.stat_result) -> None:
        """Sum the complete lines of ``raw`` (``tail``, then what follows ``offset``). Raises StoreCorrupt."""
        end = raw.rfind(b"\n") + 1  # past the last complete line
        records, _ = parse_lines(raw[len(self.tail) :], self.path)
        if not all(isinstance(record, dict) for record in records):
            raise StoreCorrupt(self.path, "not a usage segment (a line is not a record)")
        _check_records(records, self.path)
        for record in records:
            stamp = record.get("timestamp")
            if stamp.__class__ is not str or stamp < self.start:
                self.early.append(record)
                continue
            key = group_key(record)
            add_to(self.groups, record, key)
            add_to(self.bare, record, (*key[:3], None, *key[4:]))
        if end > len(self.tail):
            self.offset += end - len(self.tail)
            self.tail = raw[raw.rfind(b"\n", 0, end - 1) + 1 : end]
        self.size, self.mtime = st.st_size, st.st_mtime_ns

    def count(self, query: _Query, groups: dict[GroupKey, dict[str, Any]]) -> None:
        """Add the records matching ``query`` (whose ``since`` is not after ``start``) to ``groups``."""
        _, session_id, client, sessions = query
        for key, totals in (self.groups if sessions else self.bare).items():
            if (session_id is None or key[3] == session_id) and (client is None or owner(key[2]) == client):
                merge(groups, key, dict(totals))
        for record in _matching(self.early, query.since_iso, session_id, client):
            add_to(groups, record)


def _count_segment(
    path: Path,
    stamp: dict[str, int],
    closed: bool,
    entry: dict[str, Any] | None,
    query: _Query,
    groups: dict[GroupKey, dict[str, Any]],
    damaged: list[str] | None,
) -> dict[str, Any] | None:
    """Add a segment's matching records to ``groups``, through its rollup ``entry`` where that covers the query;
    the rollup entry to keep for the segment (None: none, it is still written to)."""
    since_iso, session_id, client, _ = query
    usable = entry is not None and (since_iso is None or (entry.get("first") or "") >= since_iso)
    if entry is not None and usable:
        if entry.get("damaged"):
            if damaged is not None:
                damaged.append(str(path))
            return entry
        _count_rollup(entry, session_id, client, groups)
        return entry
    try:
        records = read_segment(path)
    except StoreCorrupt as e:
        warn_skipped(e)
        if damaged is not None:
            damaged.append(str(path))
        return {"version": _ROLLUP_VERSION, **stamp, "damaged": True} if closed else None
    for record in _matching(records, since_iso, session_id, client):
        add_to(groups, record)
    if closed and entry is None:
        if path.name.endswith(_LOG):
            _warn_torn_tail(path)
        return _rollup_entry(records, stamp)
    return entry


def _warn_torn_tail(path: Path) -> None:
    """Warn of a closed segment's torn tail (read once, when its rollup is made): no writer appends to it any
    more, so it is not a line being written but what a crash left, never acknowledged and never counted."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_CHUNK))
        tail = f.read()
        torn = len(tail) - (tail.rfind(b"\n") + 1)
        if torn:
            append_log.warn_torn(path, torn, cut=False)


def _count_rollup(
    entry: dict[str, Any],
    session_id: str | None,
    client: str | None,
    groups: dict[GroupKey, dict[str, Any]],
    rows: list[Any] | None = None,
) -> None:
    """Add the entry's groups that match to ``groups`` (``rows``: those to look at, when known to be fewer)."""
    for row in entry["groups"] if rows is None else rows:  # none (edited from outside): KeyError, set aside
        key = tuple(row[:6])
        if (session_id is None or key[3] == session_id) and (client is None or owner(key[2]) == client):
            merge(groups, key, _totals_from_row(row[6]))


def _matching(
    records: Iterable[dict[str, Any]], since_iso: str | None, session_id: str | None, client: str | None
) -> Iterator[dict[str, Any]]:
    for record in records:
        if since_iso is not None and record.get("timestamp", "") < since_iso:
            continue
        if session_id is not None and record.get("sessionId") != session_id:
            continue
        if client is not None and owner(record.get("client")) != client:
            continue
        yield record


def _iso(since: datetime | None) -> str | None:
    """``since`` (naive means UTC) as our timestamps spell it, for string comparison."""
    if since is None:
        return None
    since_utc = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    return since_utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since_utc.microsecond // 1000:03d}Z"


def _totals_row(totals: dict[str, Any]) -> list[Any]:
    return [*(totals[field] for field in SUMMED), 0 if totals.get("priceKnown") is False else 1]


def _totals_from_row(row: list[Any]) -> dict[str, Any]:
    # Numbers only: a string or a null (a rollup edited or damaged in a way JSON allows) would otherwise be summed
    # into the report and stop it there, past the check that sets a damaged rollup aside (ValueError is caught).
    if not all(value.__class__ is int or value.__class__ is float for value in row):
        raise ValueError(f"a group's totals are not numbers: {row!r:.80}")
    totals = dict(zip(SUMMED, row, strict=False))
    if not row[len(SUMMED)]:
        totals["priceKnown"] = False
    return totals


def _day_rollup(segments: dict[str, Any], sizes: dict[str, int], mtimes: dict[str, int]) -> dict[str, Any] | None:
    """A day's closed segments' rollups merged into one list of groups, valid while its segments keep ``sizes`` and
    ``mtimes``;
    None while a segment has none (damaged: it is named at every report)."""
    if set(segments) != set(sizes) or any(not isinstance(e.get("groups"), list) for e in segments.values()):
        return None
    merged: dict[GroupKey, dict[str, Any]] = {}
    for entry in segments.values():
        for row in entry["groups"]:
            merge(merged, tuple(row[:6]), _totals_from_row(row[6]))
    firsts = [str(e["first"]) for e in segments.values() if e.get("first")]
    return {
        "version": _ROLLUP_VERSION,
        "sizes": sizes,
        "mtimes": mtimes,
        "first": min(firsts, default=None),
        "groups": [[*key, _totals_row(totals)] for key, totals in merged.items()],
    }


def _without_sessions(whole: dict[str, Any]) -> dict[str, Any]:
    """A day's merged rollup with its groups merged again without the session (None in its place)."""
    merged: dict[GroupKey, dict[str, Any]] = {}
    for row in whole["groups"]:
        day, model, client, _, endpoint, deployment = row[:6]
        merge(merged, (day, model, client, None, endpoint, deployment), _totals_from_row(row[6]))
    return {**whole, "groups": [[*key, _totals_row(totals)] for key, totals in merged.items()]}


def _day_covers(whole: dict[str, Any], sizes: dict[str, int], mtimes: dict[str, int], since_iso: str | None) -> bool:
    """Whether a day's merged rollup answers a report: its segments unchanged, none of its records before
    ``since``."""
    return (
        whole.get("sizes") == sizes
        and whole.get("mtimes") == mtimes
        and isinstance(whole.get("groups"), list)
        and (since_iso is None or (whole.get("first") or "") >= since_iso)
    )


def _rollup_entry(records: list[dict[str, Any]], stamp: dict[str, int]) -> dict[str, Any]:
    """A closed segment's rollup: its size and modification time (the rollup holds while the segment keeps
    them), its first timestamp (a report ``since`` a later time scans the segment instead) and its groups."""
    first = min((str(r.get("timestamp") or "") for r in records), default=None)
    groups = [[*key, _totals_row(totals)] for key, totals in group_records(records).items()]
    return {"version": _ROLLUP_VERSION, **stamp, "first": first, "groups": groups}
