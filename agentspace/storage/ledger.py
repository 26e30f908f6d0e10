"""The ledger's write-ahead journal (docs/accounting.md): a pending entry for every provider call, durable
before the request leaves, so that a process that dies mid-call leaves what it owes behind.

One append-only file per server process, ``<data dir>/ledger/journal-<pid>-<random>.jsonl`` (0600), held
with an exclusive ``flock`` while the process lives; one JSON line per event:

- ``pending``: id, time, client, session, model, endpoint, reservation, input tokens counted here, the
  model's rates (a recovery prices the call at them) and a gateway call's purpose. Written and ``fdatasync``ed
  before the call goes upstream; concurrent calls share one sync (group commit).
- ``note``: what the upstream reported so far (``usage``), whether it answered, the output relayed
  (``relayedTokens``), the input counted here when no budget counted it before the call (``inputTokens``),
  the model a model group's attempt went to (``model``, ``deployment``, ``rates``). Written with the next
  batch, without a sync of its own: a killed process's writes are in the kernel already.
- ``spooled``: the call's whole usage record, when the store of record refused it (the database
  unreachable, the disk full): synced before the client sees the end of its answer, kept until a retry
  stores it, and posted as it is at the next start -- the replica's local spool.
- ``closed``: the call's usage record is in the store of record (or the call was voided before it was sent).

At start-up, every journal no live process holds (its lock is free) is read back: each entry still pending
whose record is not in the usage store is posted from what was noted (``calls.recovered_record``), then the
journal is deleted (moved aside when lines of it were damaged from outside, after posting what it still shows).
A journal grown past ``ROTATE_BYTES`` is rewritten with the entries still open; a write the disk refused is
cut back, so that the next line is not glued to a torn one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

try:
    import fcntl
except ImportError:  # Windows: journals are not shared by processes there (no `serve --workers`)
    fcntl = None  # type: ignore[assignment]

from .atomic import StoreCorrupt, fsync_dir, make_dirs, move_aside
from .embedded.store_thread import note_failure

if TYPE_CHECKING:
    from ..limits import Guard
    from ..recording import Recorder
    from .protocols import SharedLedger, Storage, UsageStoreAPI
    from .shapes import LedgerEntry

log = logging.getLogger(__name__)

ROTATE_BYTES = 4 * 1024 * 1024
# What a note writes of its entry (all of it each time: the last note of an entry is the one that counts); and
# the other fields noted of it (the input counted after the call left, the deployment a model group chose).
NOTED = ("usage", "answered", "relayedTokens")
NOTE_DELAY_SECONDS = 1.0  # how long a note of the output relayed may wait for the next batch


async def _nothing() -> None:
    return None


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Ledger:
    """The journal of this process; a no-op without a data directory (a registry built by hand)."""

    def __init__(self, data_dir: Path | None, shared: SharedLedger | None = None) -> None:
        self.dir = None if data_dir is None else Path(data_dir) / "ledger"
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._open: dict[str, dict[str, Any]] = {}  # id -> the pending entry with its notes
        self._lines: list[bytes] = []  # waiting for the next write
        self._dirty: set[str] = set()  # ids with notes not written yet
        self._extra: dict[str, set[str]] = {}  # id -> the fields noted beyond NOTED
        self._waiters: list[asyncio.Future[None]] = []  # pending entries waiting for their sync
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # With a shared backend (postgres): the pending entries shared with the other replicas, under leases
        # (started by ``share``).
        self.shared = shared

    def __len__(self) -> int:
        return len(self._open)

    def open_entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._open.values()]

    # --- the events ---

    def pending(self, entry: LedgerEntry) -> Awaitable[None]:
        """Write ahead: its write starts now, and it is durable once the result is awaited. Raises StorageError
        / OSError when the disk refuses."""
        if self.dir is None:
            return _nothing()
        self._open[entry["id"]] = dict(entry)
        self._lines.append(_line({"event": "pending", **entry}))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        return self._durable(entry, waiter)

    async def _durable(self, entry: LedgerEntry, waiter: asyncio.Future[None]) -> None:
        try:
            if self.shared is not None:  # the shared row and the local line, written at the same time
                try:
                    await self.shared.pending(entry)
                except BaseException:
                    await asyncio.shield(waiter)
                    self.closed(entry["id"], void=True)
                    raise
            await asyncio.shield(waiter)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
                self._open.pop(entry["id"], None)  # not written: nothing to close
            raise

    async def spool(self, entry_id: str, record: dict[str, Any]) -> None:
        """Keep a record the store of record refused, durably (synced once awaited), until it is stored."""
        entry = self._open.get(entry_id)
        if entry is None or self.dir is None:
            return
        entry["record"] = record
        self._lines.append(_line({"event": "spooled", "id": entry_id, "record": record}))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        await asyncio.shield(waiter)

    def note(self, entry_id: str, *, soon: bool = True, **fields: Any) -> None:
        """What the call showed so far; written with the next batch (``soon``) or within a second."""
        entry = self._open.get(entry_id)
        if entry is None:
            return
        entry.update(fields)
        extra = fields.keys() - NOTED
        if extra:
            self._extra.setdefault(entry_id, set()).update(extra)
        self._dirty.add(entry_id)
        self._schedule(0.0 if soon else NOTE_DELAY_SECONDS)
        if self.shared is not None:
            self.shared.note(entry_id, fields, soon)

    def closed(self, entry_id: str, *, void: bool = False) -> None:
        """The call is settled: its record is stored (or it was voided before it was sent)."""
        if self._open.pop(entry_id, None) is None:
            return
        self._dirty.discard(entry_id)
        self._extra.pop(entry_id, None)
        self._lines.append(_line({"event": "closed", "id": entry_id, "void": void}))
        # A void goes out now (a refusal answers at once): a process killed just after would otherwise leave
        # a call that never went upstream pending, and the next start would post a record for it.
        self._schedule(0.0 if void else NOTE_DELAY_SECONDS)
        if self.shared is not None:
            self.shared.closed(entry_id)

    # --- writing ---

    def _schedule(self, delay: float) -> None:
        if delay <= 0:
            self._kick()
        elif self._timer is None and (self._flusher is None or self._flusher.done()):
            self._timer = asyncio.get_running_loop().call_later(delay, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flusher is None or self._flusher.done():
            # The first write starts now, not on the loop's next turn: a pending entry waits for its sync.
            self._flusher = asyncio.get_running_loop().create_task(self._flush(self._start()), name="agentspace-ledger")

    def _start(self) -> tuple[asyncio.Future[None], list[asyncio.Future[None]]] | None:
        """Take the lines and notes waiting and start writing them; None when there are none."""
        if not (self._lines or self._dirty):
            return None
        loop = asyncio.get_running_loop()
        lines, self._lines = self._lines, []
        for entry_id in self._dirty:
            entry = self._open.get(entry_id)
            if entry is not None:
                keys = NOTED + tuple(self._extra.get(entry_id, ()))
                note: dict[str, Any] = {k: entry[k] for k in keys if k in entry}
                lines.append(_line({"event": "note", "id": entry_id, **note}))
        self._dirty.clear()
        waiters, self._waiters = self._waiters, []
        rotate = self._rotation() if self._size > ROTATE_BYTES else None
        if waiters or rotate is not None or self._fd is None:
            # A sync (or a new file): on a thread, not the store thread -- a pending entry does not wait behind
            # store writes.
            return loop.run_in_executor(None, self._write, b"".join(lines), bool(waiters), rotate), waiters
        # Notes and closings: a few hundred bytes into the page cache, cheaper than a thread hop.
        done = loop.create_future()
        try:
            self._write(b"".join(lines), False, None)
            done.set_result(None)
        except Exception as e:
            done.set_exception(e)
        return done, waiters

    async def _flush(self, started: tuple[asyncio.Future[None], list[asyncio.Future[None]]] | None) -> None:
        while started is not None:
            future, waiters = started
            try:
                await future
            except Exception as e:
                if isinstance(e, OSError):
                    note_failure(e)  # the data directory refuses writes: /healthz says so
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(e)
                if not waiters:
                    log.warning("the ledger journal could not be written: %r", e)
            else:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            started = self._start()

    def _rotation(self) -> bytes:
        """The open entries with what was noted and spooled, as the first lines of a fresh journal."""
        return b"".join(_line({"event": "pending", **entry}) for entry in self._open.values())

    def _new_file(self) -> tuple[Path, int]:
        """A new journal, locked, its name durable in its folder (an ``fdatasync`` of its lines does not make the
        name durable: after a power cut the journal, and the entries synced in it, could be gone)."""
        assert self.dir is not None
        make_dirs(self.dir)  # a new folder's own name synced in its parent
        name = f"journal-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
        # Created under another name and locked before it takes its own: a replica starting meanwhile (serve
        # --workers) would otherwise find it unlocked, take it for a dead process's and remove it.
        creating = self.dir / f".{name}.creating"
        fd = os.open(creating, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process lives
            os.rename(creating, self.dir / name)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            creating.unlink(missing_ok=True)
            (self.dir / name).unlink(missing_ok=True)
            raise
        return self.dir / name, fd

    def _write(self, data: bytes, sync: bool, rotate: bytes | None) -> None:
        if rotate is not None and self._fd is not None:
            self._rotate(rotate + data)
            return
        if self._fd is None:
            self.path, self._fd = self._new_file()
            self._size = 0
        try:
            _append(self._fd, data, sync)
        except BaseException:
            # Cut back what part of the batch reached the file (a full disk takes what fits): the next line
            # would be glued to the torn one, and the call it writes ahead lost to the recovery.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def _rotate(self, data: bytes) -> None:
        """A fresh journal: the open entries first, then this batch. The old one goes once the new one is
        synced; a new one that cannot be written is removed and the old one kept."""
        path, fd = self._new_file()
        try:
            _append(fd, data, True)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        old_fd, old_path = self._fd, self.path
        self._fd, self.path, self._size = fd, path, len(data)
        if old_path is not None:
            old_path.unlink(missing_ok=True)  # under its lock still: no other process recovers it meanwhile
        if old_fd is not None:
            os.close(old_fd)

    async def aclose(self) -> None:
        """At shutdown, after the calls: write what is left; a journal with nothing open is removed."""
        if self.shared is not None:
            try:
                await self.shared.aclose()
            except Exception:
                log.exception("closing the shared ledger failed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines or self._dirty:
            self._kick()
        if self._flusher is not None:
            try:
                await self._flusher
            except Exception:
                log.exception("the ledger journal could not be written at shutdown")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if not self._open and self.path is not None:
                self.path.unlink(missing_ok=True)


def _append(fd: int, data: bytes, sync: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if sync:
        (getattr(os, "fdatasync", None) or os.fsync)(fd)


# --- recovery -----------------------------------------------------------------------------------


def read_journal(path: Path, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """The entries of a journal still pending at its end, each with its notes; a torn last line is skipped.
    A complete line that is no event was damaged from outside: skipped, its number added to ``damaged``."""
    entries: dict[str, dict[str, Any]] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                # The last line, cut by the crash: written after the last sync, so no call went out on it. Never
                # read, even when what is left of it parses (a crash may stop a write just before its newline).
                log.warning("%s: %d byte(s) of a write that never finished (a crash) ignored", path, len(raw))
                break
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if not isinstance(event, dict):  # damage
                if damaged is not None:
                    damaged.append(number)
                continue
            kind, entry_id = event.pop("event", None), event.get("id")
            if not isinstance(entry_id, str):
                if damaged is not None:
                    damaged.append(number)
                continue
            if kind == "pending":
                entries[entry_id] = event
            elif kind in ("note", "spooled") and entry_id in entries:
                entries[entry_id].update(event)
            elif kind == "closed":
                entries.pop(entry_id, None)
    return list(entries.values())


def _claim_dead(directory: Path, own: Path | None) -> list[tuple[Path, int]]:
    """The journals whose process is gone, each locked now by this one (so two replicas on one data directory
    do not recover the same journal)."""
    _sweep_unnamed(directory)
    dead = []
    for path in sorted(directory.glob("journal-*.jsonl")):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its process is alive
                continue
        dead.append((path, fd))
    return dead


# A journal is under its ``.creating`` name for the microseconds between its creation and its lock and rename.
UNNAMED_AGE_SECONDS = 60


def _sweep_unnamed(directory: Path) -> None:
    """Remove the journals a process killed before it named them left (empty: nothing is written to one before
    its rename). Only old ones: a younger one may be another process's, not locked yet."""
    now = time.time()
    for path in directory.glob(".journal-*.jsonl.creating"):
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > UNNAMED_AGE_SECONDS:
                path.unlink()


def _since(entries: list[dict[str, Any]]) -> datetime | None:
    times = []
    for entry in entries:
        try:
            times.append(datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00")))
        except (KeyError, ValueError):
            return None
    return min(times) - timedelta(minutes=5) if times else None


class Gateway(Protocol):
    """What recovery needs of the gateway (``registry.Registry``)."""

    @property
    def ledger(self) -> Ledger: ...

    @property
    def usage(self) -> UsageStoreAPI: ...

    @property
    def storage(self) -> Storage: ...

    @property
    def recorder(self) -> Recorder: ...

    @property
    def guard(self) -> Guard: ...


G = TypeVar("G", bound=Gateway)


def _replaces_an_estimate(gw: G, entry: dict[str, Any], stored: dict[Any, dict[str, Any]]) -> bool:
    """Whether the spooled record of ``entry`` goes in place of the estimate another replica posted for it
    (it recovered the call from the shared ledger while this replica was dead and the database down): posted,
    the shared store puts it in the estimate's place and takes the estimate's cost out of the client's spend
    (``storage/postgres/usage.py``, ``usage_recovered``)."""
    if gw.ledger.shared is None or not isinstance(entry.get("record"), dict):
        return False
    return bool(stored[entry["id"]].get("recovered")) and not entry["record"].get("recovered")


async def recover(gw: G, make_record: Callable[[G, dict[str, Any]], Any]) -> int:
    """Post every call a dead process left pending (``make_record``: ``calls.recovered_record``); returns
    how many. A journal is deleted once each of its entries is in the usage store."""
    ledger = gw.ledger
    if ledger.dir is None or not ledger.dir.is_dir():
        return 0
    loop = asyncio.get_running_loop()
    claimed = await loop.run_in_executor(None, _claim_dead, ledger.dir, ledger.path)
    posted = 0
    for path, fd in claimed:
        try:
            damaged: list[int] = []
            entries = await loop.run_in_executor(None, read_journal, path, damaged)
            stored: dict[Any, dict[str, Any]] = {}
            since = _since(entries)
            if entries:
                stored = {r.get("id"): r for r in await gw.usage.records(since=since)}
            complete = True
            for entry in entries:
                if entry.get("id") in stored and not _replaces_an_estimate(gw, entry, stored):
                    continue  # recorded; the process died before it wrote `closed`
                try:
                    record = make_record(gw, entry)
                except (KeyError, TypeError, ValueError) as e:  # an entry damaged from outside: the others go on
                    log.error("the ledger journal %s holds an entry that cannot be posted (%r): %s", path, e, entry)
                    damaged.append(0)
                    continue
                # A spooled record was settled in the client's counters when its call ended (in Redis, shared
                # by the replicas, that spend is still counted): posted now, it is not counted again.
                spooled = isinstance(entry.get("record"), dict)
                if await gw.recorder.record(record, settle=not spooled) is not None:
                    complete = False  # kept for a retry; the journal stays for the next start
                    continue
                posted += 1
                log.warning(
                    "recovered the usage of call %s (%s, client %s) left pending by a process that stopped",
                    record.id,
                    record.model,
                    record.client,
                )
            if complete and damaged:
                # Posted what could be read; the journal is kept for inspection, not read again.
                await loop.run_in_executor(
                    None, move_aside, StoreCorrupt(path, f"{len(damaged)} damaged line(s) or entries skipped")
                )
            elif complete:
                path.unlink(missing_ok=True)
        except Exception:
            log.exception("recovering the ledger journal %s failed; it is kept", path.name)
        finally:
            os.close(fd)
    return posted


async def share(gw: G, make_record: Callable[[G, dict[str, Any]], Any]) -> None:
    """With a backend whose replicas share a ledger (``Storage.shared_ledger``: postgres, given to the ledger
    when the gateway was assembled): start sharing the pending entries with the other replicas, under leases,
    and recovering the calls of replicas that died."""
    shared = gw.ledger.shared
    if shared is None:
        return

    async def recover_entry(entry: dict[str, Any]) -> bool:
        record = make_record(gw, entry)
        if await gw.recorder.record(record) is not None:
            return False
        log.warning(
            "recovered the usage of call %s (%s, client %s) left pending by a replica that stopped",
            record.id,
            record.model,
            record.client,
        )
        return True

    await shared.start(recover_entry)
