"""The append-only log primitive (storage/embedded/append_log.py): its rules, on real files."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from agentspace.errors import StorageError
from agentspace.storage.atomic import StoreCorrupt
from agentspace.storage.embedded.append_log import COMMIT, AppendLog, read_entries, read_last_entry


def test_the_last_matching_entry_is_found_from_the_end_across_chunks(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "log.jsonl"
    entries: list[dict[str, Any]] = []
    for n in range(60):  # lines from a few bytes to past the 64 KB read chunk
        entries.append({"n": n, "mark": n % 7 == 0, "pad": "x" * rng.choice([0, 10, 5000, 70_000, 140_000])})
    raw = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
    ends = [i + 1 for i, byte in enumerate(raw) if byte == 0x0A]
    for count in range(0, len(entries) + 1, 3):
        end = ends[count - 1] if count else 0
        for torn in (b"", b'{"n": 999, "mark": true, "pad": "xx'):  # a torn tail is never an entry
            path.write_bytes(raw[:end] + torn)
            expected = next((e for e in reversed(entries[:count]) if e["mark"]), None)
            assert read_last_entry(path, lambda e: e["mark"]) == expected, (count, torn)
            assert read_entries(path) == entries[:count]
    assert read_last_entry(tmp_path / "missing.jsonl", lambda e: True) is None
    created = AppendLog(tmp_path / "new.jsonl")
    assert created.open() == []
    assert os.stat(tmp_path / "new.jsonl").st_mode & 0o777 == 0o600
    created.close()


def test_open_cuts_a_torn_tail_and_a_failed_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    log = AppendLog(path)
    assert log.open() == [{"a": 1}, {"a": 2}]
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    real = os.write

    def full(fd: int, data: Any) -> int:
        real(fd, bytes(data)[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        log.write([{"a": 3}])
    monkeypatch.setattr(os, "write", real)
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    log.write([{"a": 4}])
    log.sync()
    log.close()
    assert read_entries(path) == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_a_complete_line_that_is_not_json_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\nnot json\n{"a":3}\n')
    with pytest.raises(StoreCorrupt, match="line 2"):
        read_entries(path)
    with pytest.raises(StoreCorrupt):
        AppendLog(path).open()
    assert path.read_bytes() == b'{"a":1}\nnot json\n{"a":3}\n'  # left as found, for moving aside


async def test_group_commit_syncs_each_file_once_and_failures_stay_with_their_caller(tmp_path: Path) -> None:
    logs = [AppendLog(tmp_path / f"{n}.jsonl") for n in range(2)]
    for log in logs:
        log.open()

    def writer(n: int) -> Any:
        def work() -> tuple[int, list[AppendLog]]:
            if n == 5:
                raise ValueError("refused")
            if n == 6:
                raise OSError(5, "Input/output error")
            logs[n % 2].write([{"n": n}])
            return n, [logs[n % 2]]

        return work

    results = await asyncio.gather(*(COMMIT.run(writer(n)) for n in range(10)), return_exceptions=True)
    assert [r if isinstance(r, int) else type(r).__name__ for r in results] == [
        0, 1, 2, 3, 4, "ValueError", "StorageError", 7, 8, 9,
    ]  # fmt: skip
    assert isinstance(results[6], StorageError)
    for log in logs:
        assert log.synced == log.size
        log.close()
    assert [e["n"] for e in read_entries(tmp_path / "0.jsonl") or []] == [0, 2, 4, 8]
    assert [e["n"] for e in read_entries(tmp_path / "1.jsonl") or []] == [1, 3, 7, 9]


async def test_run_written_returns_once_written_and_its_sync_follows_in_the_same_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn's user message: the caller goes on once its line is written; the sync is what it awaits later."""
    log = AppendLog(tmp_path / "s.jsonl")
    log.open()
    disk = threading.Event()
    real = os.fdatasync

    def slow_disk(fd: int) -> None:
        disk.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_disk)

    def writer(n: int) -> Any:
        def work() -> tuple[int, list[AppendLog]]:
            log.write([{"n": n}])
            return n, [log]

        return work

    value, synced = await asyncio.wait_for(COMMIT.run_written(writer(1)), 5)
    assert value == 1 and log.synced < log.size  # written, not yet durable: the disk is still syncing
    sync = asyncio.ensure_future(synced)
    await asyncio.sleep(0.05)
    assert not sync.done()
    disk.set()
    await asyncio.wait_for(sync, 5)
    assert log.synced == log.size

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)
    value, synced = await COMMIT.run_written(writer(2))
    assert value == 2  # written; the sync fails after
    with pytest.raises(StorageError):
        await synced
    log.close()
    assert read_entries(tmp_path / "s.jsonl") == [{"n": 1}]  # the line never made durable was cut back
