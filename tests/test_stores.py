"""The tinydb stores: sessions, usage segments, reports, one usage store per server, atomic files and the data-dir lock."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from tinydb import TinyDB

from agentspace.errors import SessionDamaged, StorageError
from agentspace.sinks import delivery, sink_name
from agentspace.storage import (
    DataDirLock,
    DataDirLocked,
    InvalidSessionId,
    MessageNotFound,
    SessionExists,
    SessionNotFound,
    SessionStore,
    StoreCorrupt,
    UsageStore,
    usage_by_day,
    usage_report,
)
from agentspace.storage.atomic import remove_stale_temp_files, write_json_atomic
from agentspace.storage.embedded import store_thread
from agentspace.storage.embedded import usage as usage_module
from agentspace.storage.embedded.tinydb_file import read_tables
from agentspace.storage.embedded.usage import write_segment
from agentspace.storage.protocols import UsageStoreSink
from agentspace.transports import state as STATE
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso

SUMMARY_KEYS = {"id", "title", "model", "createdAt", "lastActivityAt", "messageCount", "client"}
BAD_IDS = ["", "../etc", "a/b", "a.b", "..", "x" * 129, "ünï", "a b", "a\x00b"]


def usage_record(
    n: int,
    *,
    model: str = "anthropic/claude-sonnet-4-5",
    session_id: str | None = "s1",
    timestamp: str | None = None,
    estimated: bool = False,
) -> UsageRecord:
    return UsageRecord(
        id=f"u{n}",
        timestamp=timestamp or now_iso(),
        model=model,
        provider=model.split("/")[0],
        session_id=session_id,
        client="test",
        usage=TokenUsage(10, 5, 2, 1, 3, estimated),
        cost=Cost(0.001, 0.002),
        latency_ms=12.5,
        finish_reason="stop",
    )


async def tick() -> None:
    """Timestamps have millisecond precision: make the next one later."""
    await asyncio.sleep(0.003)


@pytest.fixture
async def sessions(tmp_path: Path):
    store = SessionStore(tmp_path)
    yield store
    await store.aclose()


@pytest.fixture
async def usage(tmp_path: Path):
    store = UsageStore(tmp_path, segment_size=4)
    yield store
    await store.aclose()


# --- sessions -----------------------------------------------------------------------------------


async def test_create_returns_summary(sessions: SessionStore) -> None:
    summary = await sessions.create(model="m1", client="cli")
    assert set(summary) == SUMMARY_KEYS
    assert summary["model"] == "m1" and summary["client"] == "cli"
    assert summary["messageCount"] == 0 and summary["title"] is None
    assert summary["createdAt"] == summary["lastActivityAt"]
    assert await sessions.exists(summary["id"])


async def test_create_with_id_and_title(sessions: SessionStore, tmp_path: Path) -> None:
    summary = await sessions.create(model="m", session_id="chat_1-A", title="Planning")
    assert summary["id"] == "chat_1-A" and summary["title"] == "Planning"
    # Created in the session journal: its own file is written at its next write.
    assert not (tmp_path / "sessions" / "chat_1-A.jsonl").exists()
    assert (SessionStore(tmp_path).get_sync("chat_1-A") or {})["title"] == "Planning"  # readers see it at once
    with pytest.raises(SessionExists):
        await sessions.create(model="m", session_id="chat_1-A")
    await sessions.set_title("chat_1-A", "Plans")
    assert (tmp_path / "sessions" / "chat_1-A.jsonl").is_file()
    assert (SessionStore(tmp_path).get_sync("chat_1-A") or {})["title"] == "Plans"


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_session_ids_are_rejected(sessions: SessionStore, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidSessionId):
        await sessions.create(model="m", session_id=bad)
    assert await sessions.get(bad) is None
    assert await sessions.exists(bad) is False
    assert await sessions.messages(bad) == []
    assert await sessions.delete(bad) is False
    assert sessions.get_sync(bad) is None and sessions.delete_sync(bad) is False
    with pytest.raises(SessionNotFound):
        await sessions.append_message(bad, {"role": "user", "content": "x"})
    with pytest.raises(SessionNotFound):
        await sessions.touch(bad)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


async def test_unknown_session(sessions: SessionStore) -> None:
    assert await sessions.get("nope") is None
    assert await sessions.exists("nope") is False
    assert await sessions.messages("nope") == []
    assert await sessions.delete("nope") is False
    assert await sessions.summaries() == []
    for call in (
        sessions.append_message("nope", {"role": "user", "content": "x"}),
        sessions.update_message("nope", "m1", {"content": "y"}),
        sessions.touch("nope"),
    ):
        with pytest.raises(SessionNotFound):
            await call


async def test_append_message_updates_summary(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    created = (await sessions.get(sid))["lastActivityAt"]
    await tick()
    await sessions.append_message(sid, {"role": "user", "content": "  Hello\n  there,   " + "word " * 30})
    got = await sessions.get(sid)
    assert got["messageCount"] == 1
    assert got["lastActivityAt"] > created
    assert got["title"] == ("Hello there, " + "word " * 30)[:60].rstrip()
    assert len(got["title"]) <= 60
    message = got["messages"][0]
    assert message["id"] and message["createdAt"] and message["role"] == "user"

    await sessions.append_message(sid, {"id": "a1", "role": "user", "content": "second question"})
    assert (await sessions.get(sid))["title"] == got["title"]  # only the first user message names it


async def test_writes_without_sync_are_visible_and_synced_by_awaiting_sync(
    sessions: SessionStore, tmp_path: Path
) -> None:
    # A turn's user message (pipeline.start_turn): written at once, durable once awaiting_sync was awaited.
    assert sessions.awaiting_sync(None) is None and sessions.awaiting_sync("nothing-written") is None
    sid = (await sessions.create(model="m", messages=[{"id": "u1", "role": "user", "content": "hi"}], sync=False))["id"]
    path = tmp_path / "sessions" / f"{sid}.jsonl"
    assert [m["id"] for m in SessionStore(tmp_path).get_sync(sid)["messages"]] == ["u1"]  # on disk (not synced)
    waiting = sessions.awaiting_sync(sid)
    assert waiting is not None
    await waiting
    assert sessions.awaiting_sync(sid) is None  # nothing left to sync
    await sessions.append_message(sid, {"id": "u2", "role": "user", "content": "again"}, sync=False)
    assert [m["id"] for m in (await sessions.get(sid))["messages"]] == ["u1", "u2"]
    size = path.stat().st_size
    await sessions.append_message(sid, {"id": "a2", "role": "assistant", "content": "yes"})  # synced: both durable
    assert path.stat().st_size > size
    waiting = sessions.awaiting_sync(sid)  # the sync of u2, started when it was written: done, or about to be
    if waiting is not None:
        await waiting
    assert sessions.awaiting_sync(sid) is None


async def test_title_comes_from_first_user_message_and_keeps_given_titles(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    await sessions.append_message(sid, {"role": "assistant", "content": "Welcome"})
    assert (await sessions.get(sid))["title"] is None
    await sessions.append_message(
        sid, {"role": "user", "content": "", "parts": [{"type": "text", "text": "From parts"}]}
    )
    assert (await sessions.get(sid))["title"] == "From parts"

    named = (await sessions.create(model="m", title="Mine"))["id"]
    await sessions.append_message(named, {"role": "user", "content": "question"})
    assert (await sessions.get(named))["title"] == "Mine"


async def test_stored_messages_are_detached_from_callers(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    message: dict[str, Any] = {"id": "m1", "role": "user", "content": "hi", "parts": [{"type": "text", "text": "hi"}]}
    await sessions.append_message(sid, message)
    message["parts"].append({"type": "text", "text": "changed by the caller"})
    got = await sessions.get(sid)
    # What a read returns is the cache's own (not a copy: a read costs the same at any size), frozen: a change
    # is refused at every depth, and the next read is as stored.
    with pytest.raises(TypeError):
        got["messages"][0]["parts"].clear()
    with pytest.raises(TypeError):
        (await sessions.messages(sid))[0]["parts"][0]["text"] = "changed"
    with pytest.raises(TypeError):
        got["messages"][0]["role"] = "assistant"
    got["messages"].clear()  # the list itself is the caller's
    assert (await sessions.messages(sid))[0]["parts"] == [{"type": "text", "text": "hi"}]
    assert (await sessions.get(sid))["messages"][0]["role"] == "user"
    with pytest.raises(TypeError):
        await sessions.append_message(sid, {"role": "user", "content": object()})
    assert len(await sessions.messages(sid)) == 1


async def test_update_message(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    await sessions.append_message(sid, {"id": "u1", "role": "user", "content": "q"})
    await sessions.append_message(sid, {"id": "a1", "role": "assistant", "content": ""})
    before = (await sessions.get(sid))["lastActivityAt"]
    await tick()
    await sessions.update_message(sid, "a1", {"content": "answer", "finishReason": "stop", "usage": {"totalTokens": 9}})
    got = await sessions.get(sid)
    assert got["messages"][1] == {
        "id": "a1",
        "role": "assistant",
        "content": "answer",
        "finishReason": "stop",
        "usage": {"totalTokens": 9},
        "createdAt": got["messages"][1]["createdAt"],
    }
    assert got["messages"][0]["content"] == "q"
    assert got["messageCount"] == 2 and got["lastActivityAt"] > before
    with pytest.raises(MessageNotFound):
        await sessions.update_message(sid, "missing", {"content": "x"})


async def test_messages_history_limit(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    for i in range(5):
        await sessions.append_message(
            sid, {"id": f"m{i}", "role": "user" if i % 2 == 0 else "assistant", "content": str(i)}
        )
    ids = lambda msgs: [m["id"] for m in msgs]  # noqa: E731
    assert ids(await sessions.messages(sid)) == ["m0", "m1", "m2", "m3", "m4"]
    assert ids(await sessions.messages(sid, limit=2)) == ["m3", "m4"]
    assert ids(await sessions.messages(sid, limit=50)) == ["m0", "m1", "m2", "m3", "m4"]
    assert await sessions.messages(sid, limit=0) == []


async def test_list_is_most_recent_first(sessions: SessionStore) -> None:
    first = (await sessions.create(model="m"))["id"]
    await tick()
    second = (await sessions.create(model="m"))["id"]
    await tick()
    third = (await sessions.create(model="m"))["id"]
    assert [s["id"] for s in await sessions.summaries()] == [third, second, first]
    await tick()
    await sessions.append_message(first, {"role": "user", "content": "bump"})
    await tick()
    await sessions.touch(second)
    listed = await sessions.summaries()
    assert [s["id"] for s in listed] == [second, first, third]
    assert all(set(s) == SUMMARY_KEYS for s in listed)
    assert listed[1]["messageCount"] == 1 and listed[1]["title"] == "bump"


async def test_delete(sessions: SessionStore, tmp_path: Path) -> None:
    sid = (await sessions.create(model="m"))["id"]
    keep = (await sessions.create(model="m"))["id"]
    unfiled = (await sessions.create(model="m"))["id"]  # in the journal only
    await sessions.append_message(sid, {"role": "user", "content": "x"})
    await sessions.append_message(keep, {"role": "user", "content": "y"})
    assert await sessions.delete(sid) is True
    assert await sessions.delete(sid) is False
    assert await sessions.delete(unfiled) is True
    assert await sessions.delete(unfiled) is False
    assert await sessions.get(sid) is None and not await sessions.exists(sid)
    assert await sessions.get(unfiled) is None
    assert [s["id"] for s in await sessions.summaries()] == [keep]
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == [".journal.jsonl", f"{keep}.jsonl"]
    # Nor does a restart bring either back.
    await sessions.aclose()
    reopened = SessionStore(tmp_path)
    try:
        assert [s["id"] for s in await reopened.summaries()] == [keep]
    finally:
        await reopened.aclose()


async def test_sync_methods_read_what_the_server_wrote(sessions: SessionStore, tmp_path: Path) -> None:
    sid = (await sessions.create(model="m", title="t"))["id"]
    await sessions.append_message(sid, {"id": "m1", "role": "user", "content": "hello"})
    cli = SessionStore(tmp_path)  # another process in real life: nothing shared with the server's store
    assert cli.get_sync(sid) == await sessions.get(sid)
    assert cli.summaries_sync() == await sessions.summaries()
    assert cli.get_sync("nope") is None
    assert cli.delete_sync(sid) is True and cli.delete_sync(sid) is False
    # The server notices the deletion although it had the session cached, and does not resurrect it.
    assert await sessions.exists(sid) is False
    with pytest.raises(SessionNotFound):
        await sessions.append_message(sid, {"role": "user", "content": "again"})
    assert cli.summaries_sync() == [] and not (tmp_path / "sessions" / f"{sid}.jsonl").exists()


async def test_sessions_survive_reopen(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    sid = (await store.create(model="m"))["id"]
    await store.append_message(sid, {"id": "m1", "role": "user", "content": "persisted"})
    expected = await store.get(sid)
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await store.get(sid)

    reopened = SessionStore(tmp_path)
    try:
        assert await reopened.get(sid) == expected
        assert await reopened.summaries() == [{k: v for k, v in expected.items() if k != "messages"}]
    finally:
        await reopened.aclose()


async def test_a_cancelled_caller_does_not_drop_its_write(sessions: SessionStore) -> None:
    sid = (await sessions.create(model="m"))["id"]
    task = asyncio.create_task(sessions.append_message(sid, {"id": "m1", "role": "user", "content": "x"}))
    await asyncio.sleep(0)  # the write is queued on the worker
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sessions.flush()
    assert [m["id"] for m in await sessions.messages(sid)] == ["m1"]


@pytest.mark.parametrize("titled", [False, True])
async def test_a_failed_write_leaves_the_last_good_state(
    sessions: SessionStore, monkeypatch: pytest.MonkeyPatch, titled: bool
) -> None:
    sid = (await sessions.create(model="m"))["id"]
    kept = []
    if titled:
        await sessions.append_message(sid, {"id": "m1", "role": "user", "content": "kept"})
        kept = ["m1"]
    path = sessions.dir / f"{sid}.jsonl"
    before = path.read_bytes() if titled else None  # untitled: the failed write is the one that writes the file

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:  # the sync fails: the lines written are cut off again
        patched.setattr(os, "fsync", disk_full)
        patched.setattr(os, "fdatasync", disk_full)
        with pytest.raises(StorageError, match="No space"):
            await sessions.append_message(sid, {"id": "m2", "role": "user", "content": "lost"})
    assert (path.read_bytes() if path.exists() else None) == before  # the file as it was
    got = await sessions.get(sid)  # and what the server holds in memory did not take the failed write either
    assert [m["id"] for m in got["messages"]] == kept and got["messageCount"] == len(kept)
    await sessions.append_message(sid, {"id": "m3", "role": "user", "content": "next"})
    assert [m["id"] for m in await sessions.messages(sid)] == [*kept, "m3"]
    assert [m["id"] for m in SessionStore(sessions.dir.parent).get_sync(sid)["messages"]] == [*kept, "m3"]
    assert not [p for p in sessions.dir.iterdir() if p.name.endswith(".tmp")]


async def test_writes_queued_together_run_in_order_and_fail_alone(tmp_path: Path) -> None:
    # Both stores' work started at once runs on the one store thread in the order it was started, and a
    # failure is its own.
    sessions, usage = SessionStore(tmp_path), UsageStore(tmp_path)
    try:
        created = asyncio.ensure_future(
            sessions.create(model="m", session_id="s1", messages=[{"role": "user", "content": "0"}])
        )
        appends = [
            asyncio.ensure_future(sessions.append_message("s1", {"role": "assistant", "content": str(n)}))
            for n in range(1, 21)
        ]
        missing = asyncio.ensure_future(sessions.append_message("nope", {"role": "user", "content": "lost"}))
        records = [asyncio.ensure_future(usage.append(usage_record(n))) for n in range(20)]
        await created
        await asyncio.gather(*appends, *records)
        with pytest.raises(SessionNotFound):
            await missing
        stored = SessionStore(tmp_path).get_sync("s1")
        assert stored is not None and [m["content"] for m in stored["messages"]] == [str(n) for n in range(21)]
        assert [r["id"] for r in UsageStore(tmp_path).records_sync()] == [f"u{n}" for n in range(20)]
    finally:
        await sessions.aclose()
        await usage.aclose()


async def test_a_message_is_appended_not_rewritten(sessions: SessionStore, tmp_path: Path) -> None:
    sid = (await sessions.create(model="m"))["id"]
    await sessions.append_message(sid, {"id": "u1", "role": "user", "content": "Hi"})  # writes the session's file
    path = sessions.dir / f"{sid}.jsonl"
    inode, before = path.stat().st_ino, path.read_bytes()
    await tick()
    await sessions.append_message(sid, {"id": "a1", "role": "assistant", "content": "Hello", "completedAt": now_iso()})
    after = path.read_bytes()
    assert path.stat().st_ino == inode and after.startswith(before)  # the same file, only grown
    added = [json.loads(line) for line in after[len(before) :].splitlines()]
    assert [list(entry) for entry in added] == [["message"], ["session"]]  # the message, the summary closing it
    stored = added[-1]["session"]
    served = await sessions.get(sid)
    [listed] = SessionStore(tmp_path).summaries_sync()
    assert stored["messageCount"] == served["messageCount"] == listed["messageCount"] == 2
    assert stored["lastActivityAt"] == served["lastActivityAt"] == listed["lastActivityAt"] > served["createdAt"]


async def test_a_write_touches_only_its_own_session_file(sessions: SessionStore) -> None:
    ids = [(await sessions.create(model="m"))["id"] for _ in range(3)]
    for sid in ids:  # each session's file written
        await sessions.touch(sid)
    before = {p.name: p.stat().st_mtime_ns for p in sessions.dir.iterdir()}
    await asyncio.sleep(0.02)  # coarse file clocks
    await sessions.append_message(ids[1], {"role": "user", "content": "x"})
    changed = {p.name for p in sessions.dir.iterdir() if p.stat().st_mtime_ns != before.get(p.name)}
    assert changed == {f"{ids[1]}.jsonl"}


async def test_a_session_of_an_earlier_version_is_read_and_converted_on_its_first_change(
    sessions: SessionStore, tmp_path: Path
) -> None:
    legacy = sessions.dir / "s_old.json"
    sessions.dir.mkdir(parents=True)
    db = TinyDB(legacy)  # the earlier layout: a tinydb file, summary document and messages table
    summary = {"id": "s_old", "title": "Old", "model": "m", "createdAt": "2026-01-01T00:00:00.000Z"}
    db.table("session").insert({**summary, "lastActivityAt": summary["createdAt"], "messageCount": 1, "client": None})
    db.table("messages").insert({"id": "u1", "role": "user", "content": "from before"})
    db.close()
    assert [s["id"] for s in SessionStore(tmp_path).summaries_sync()] == ["s_old"]
    assert [m["id"] for m in (await sessions.get("s_old"))["messages"]] == ["u1"]
    await sessions.append_message("s_old", {"id": "a1", "role": "assistant", "content": "still here"})
    assert not legacy.exists() and (sessions.dir / "s_old.jsonl").is_file()
    reread = SessionStore(tmp_path).get_sync("s_old")
    assert reread is not None and [m["id"] for m in reread["messages"]] == ["u1", "a1"]
    assert reread["title"] == "Old" and reread["messageCount"] == 2


async def test_a_session_log_of_an_earlier_version_counts_its_shown_messages_from_its_next_write(
    sessions: SessionStore, tmp_path: Path
) -> None:
    """An earlier version's summary lines counted every message and have no ``seenCount``: the log reads as it is
    (no damage), listed with that count until its next write; read whole, its answers set aside are not counted."""
    sessions.dir.mkdir(parents=True)
    summary = {"id": "s_old", "title": "Old", "model": "m", "createdAt": "2026-01-01T00:00:00.000Z", "client": None}
    messages = [
        {"id": "u1", "role": "user", "content": "q"},
        {"id": "a0", "role": "assistant", "content": "set aside"},
        {"id": "a1", "role": "assistant", "content": "again"},
    ]
    lines = [*({"message": m} for m in messages), {"session": {**summary, "messageCount": 3}}]
    lines += [{"update": {"id": "a0", "changes": {"replaced": True}}}, {"session": {**summary, "messageCount": 3}}]
    (sessions.dir / "s_old.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert SessionStore(tmp_path).summaries_sync()[0]["messageCount"] == 3
    assert (SessionStore(tmp_path).get_sync("s_old") or {})["messageCount"] == 2
    await sessions.touch("s_old")
    assert SessionStore(tmp_path).summaries_sync()[0]["messageCount"] == 2


async def test_an_unfinished_write_is_dropped_with_a_warning_never_read_as_data(
    sessions: SessionStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sid = (await sessions.create(model="m", messages=[{"id": "u1", "role": "user", "content": "Hi"}]))["id"]
    await sessions.append_message(sid, {"id": "a1", "role": "assistant", "content": "Hello"})
    await sessions.aclose()
    path = tmp_path / "sessions" / f"{sid}.jsonl"
    good = path.read_bytes()
    # What a crash leaves: a message line written whole, its summary cut in the middle.
    message = b'{"message":{"id":"u2","role":"user","content":"never acknowledged"}}\n'
    path.write_bytes(good + message + b'{"session":{"id":')
    assert [m["id"] for m in SessionStore(tmp_path).get_sync(sid)["messages"]] == ["u1", "a1"]
    [listed] = SessionStore(tmp_path).summaries_sync()
    assert listed["messageCount"] == 2
    writer = SessionStore(tmp_path)
    try:
        await writer.append_message(sid, {"id": "u3", "role": "user", "content": "after the crash"})
    finally:
        await writer.aclose()
    assert path.read_bytes().startswith(good) and b"never acknowledged" not in path.read_bytes()
    assert [m["id"] for m in SessionStore(tmp_path).get_sync(sid)["messages"]] == ["u1", "a1", "u3"]
    assert any("never finished" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_lines_lost_inside_a_session_log_are_damage_not_a_shorter_session(
    sessions: SessionStore, tmp_path: Path
) -> None:
    sid = (await sessions.create(model="m"))["id"]
    for n in range(3):
        await sessions.append_message(sid, {"id": f"m{n}", "role": "user", "content": f"message {n}"})
    await sessions.aclose()
    path = tmp_path / "sessions" / f"{sid}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))  # the first message's line gone, its summary kept
    with pytest.raises(SessionDamaged):
        SessionStore(tmp_path).get_sync(sid)
    # A listing reads summaries from the logs' ends; agentspace doctor reads them whole and names it.
    assert SessionStore(tmp_path).listing_sync(whole=True).damaged_files == [str(path)]


async def test_writes_queued_together_share_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    store = SessionStore(tmp_path)
    try:
        sid = (await store.create(model="m"))["id"]
        await store.touch(sid)  # its file written (a new file's first sync is an fsync)
        monkeypatch.setattr(os, "fdatasync", counting)
        # The store thread busy (as while it syncs an earlier batch): the 20 writes queued meanwhile make one
        # batch, with one sync. Held by an event, not by timing, so a loaded machine cannot split the batch.
        busy = threading.Event()
        store_thread.submit(busy.wait, 30)
        writes = asyncio.gather(
            *(store.append_message(sid, {"id": f"m{n}", "role": "user", "content": str(n)}) for n in range(20))
        )
        await asyncio.sleep(0.2)
        busy.set()
        await writes
        assert [m["id"] for m in await store.messages(sid)] == [f"m{n}" for n in range(20)]
        assert len(syncs) == 1
    finally:
        await store.aclose()


async def test_recent_sessions_are_served_from_the_cache_the_writer_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentspace.storage.embedded import sessions as sessions_module

    store = SessionStore(tmp_path)
    try:
        ids = [(await store.create(model="m"))["id"] for _ in range(3)]
        for sid in ids:
            await store.append_message(sid, {"id": "m1", "role": "user", "content": "x" * 1000})
        # Damage behind the store's back that leaves the file's inode, size and mtime as they were: the cached
        # sessions are not parsed again (the next turn's context and GET /api/sessions/{id} cost no parse, only a
        # stat), and the writer's own changes are in the cache. (A change that shows in the stat is read again:
        # tests/test_sessions_outside.py.)
        path = tmp_path / "sessions" / f"{ids[0]}.jsonl"
        before = path.stat()
        with open(path, "r+b") as f:
            f.write(b"garbage\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        await store.append_message(ids[0], {"id": "m2", "role": "assistant", "content": "y"})
        assert [m["id"] for m in (await store.get(ids[0]))["messages"]] == ["m1", "m2"]
        with pytest.raises(SessionDamaged):
            SessionStore(tmp_path).get_sync(ids[0])  # what a fresh read finds
        # Bounded: past the bytes it may hold, the least recent sessions are dropped and read again on use.
        monkeypatch.setattr(sessions_module, "OPEN_BYTES", 2500)
        await store.append_message(ids[1], {"role": "user", "content": "z"})
        await store.append_message(ids[2], {"role": "user", "content": "z"})
        assert ids[0] not in store._open and len(store._open) <= 2
        with pytest.raises(SessionDamaged):
            await store.get(ids[0])
    finally:
        await store.aclose()


async def test_a_session_dropped_from_the_cache_mid_commit_keeps_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentspace.storage.embedded import sessions as sessions_module

    monkeypatch.setattr(sessions_module, "OPEN_SESSIONS", 1)  # each write to another session evicts the last
    store = SessionStore(tmp_path)
    try:
        ids = [(await store.create(model="m"))["id"] for _ in range(5)]
        await asyncio.gather(
            *(
                store.append_message(sid, {"id": f"m{n}", "role": "user", "content": "x"})
                for n in range(3)
                for sid in ids
            )
        )
    finally:
        await store.aclose()
    for sid in ids:
        assert [m["id"] for m in SessionStore(tmp_path).get_sync(sid)["messages"]] == ["m0", "m1", "m2"]


# --- usage --------------------------------------------------------------------------------------


def segment_files(data_dir: Path) -> list[str]:
    """The usage segments (earlier versions' ``.json`` and the log's ``.jsonl``), not the rollups."""
    usage = data_dir / "usage"
    return sorted(
        str(p.relative_to(usage))
        for p in usage.rglob("*.json*")
        if p.parent.name != "rollups" and ".damaged-" not in p.name
    )


def log_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_usage_append_and_records(usage: UsageStore) -> None:
    await usage.append(usage_record(1))
    await usage.append(usage_record(2, session_id="s2"))
    records = list(usage.records_sync())
    assert [r["id"] for r in records] == ["u1", "u2"]
    assert records[0] == usage_record(1, timestamp=records[0]["timestamp"]).to_dict()
    assert [r["id"] for r in usage.records_sync(session_id="s2")] == ["u2"]
    assert [r["id"] for r in await usage.records(session_id="s1")] == ["u1"]


async def test_usage_records_when_nothing_is_stored(tmp_path: Path) -> None:
    store = UsageStore(tmp_path)
    assert list(store.records_sync()) == [] and await store.records() == []
    await store.aclose()
    assert not (tmp_path / "usage").exists()


async def test_usage_segment_rollover(usage: UsageStore, tmp_path: Path) -> None:
    day = usage_module._utc_day()
    for i in range(10):
        await usage.append(usage_record(i))
    assert segment_files(tmp_path) == [f"{day}/00000.jsonl", f"{day}/00001.jsonl", f"{day}/00002.jsonl"]
    sizes = [len(log_records(tmp_path / "usage" / f)) for f in segment_files(tmp_path)]
    assert sizes == [4, 4, 2]
    assert [r["id"] for r in usage.records_sync()] == [f"u{i}" for i in range(10)]


async def test_usage_continues_the_last_segment_after_a_restart(tmp_path: Path) -> None:
    day = usage_module._utc_day()
    first = UsageStore(tmp_path, segment_size=4)
    for i in range(6):
        await first.append(usage_record(i))
    await first.aclose()
    second = UsageStore(tmp_path, segment_size=4)
    for i in range(6, 9):
        await second.append(usage_record(i))
    await second.aclose()
    assert segment_files(tmp_path) == [f"{day}/00000.jsonl", f"{day}/00001.jsonl", f"{day}/00002.jsonl"]
    assert [r["id"] for r in second.records_sync()] == [f"u{i}" for i in range(9)]


async def test_usage_starts_a_new_folder_when_the_utc_day_changes(
    usage: UsageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2030-01-01")
    await usage.append(usage_record(1, timestamp="2030-01-01T23:59:59.999Z"))
    await usage.append(usage_record(2, timestamp="2030-01-01T23:59:59.999Z"))
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2030-01-02")
    await usage.append(usage_record(3, timestamp="2030-01-02T00:00:00.001Z"))
    assert segment_files(tmp_path) == ["2030-01-01/00000.jsonl", "2030-01-02/00000.jsonl"]
    since = datetime(2030, 1, 2, tzinfo=UTC)
    assert [r["id"] for r in usage.records_sync(since=since)] == ["u3"]
    assert [r["id"] for r in usage.records_sync(since=since.replace(tzinfo=None))] == ["u3"]  # naive is UTC


async def test_usage_since_skips_older_day_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_segment(tmp_path, "2020-01-01", 0, [usage_record(1, timestamp="2020-01-01T10:00:00.000Z").to_dict()])
    (tmp_path / "usage" / "2020-01-01" / "00000.json").write_text("not json")  # would fail if it were read
    write_segment(
        tmp_path,
        "2020-01-05",
        0,
        [
            usage_record(2, timestamp="2020-01-05T08:00:00.000Z").to_dict(),
            usage_record(3, timestamp="2020-01-05T18:00:00.000Z").to_dict(),
        ],
    )
    store = UsageStore(tmp_path)
    since = datetime(2020, 1, 5, 12, tzinfo=timezone(timedelta(hours=2)))  # 10:00 UTC
    assert [r["id"] for r in store.records_sync(since=since)] == ["u3"]
    damaged: list[str] = []
    assert [r["id"] for r in store.records_sync(damaged=damaged)] == ["u2", "u3"]  # the damaged segment is skipped
    assert damaged == [str(tmp_path / "usage" / "2020-01-01" / "00000.json")]
    await store.aclose()


async def test_usage_append_writes_only_a_new_segment_after_old_ones(tmp_path: Path) -> None:
    day = usage_module._utc_day()
    for n in range(3):
        write_segment(tmp_path, day, n, [usage_record(n * 10 + i).to_dict() for i in range(5)])
    before = {f: (tmp_path / "usage" / f).stat().st_mtime_ns for f in segment_files(tmp_path)}
    await asyncio.sleep(0.02)
    store = UsageStore(tmp_path, segment_size=5)
    await store.append(usage_record(99))
    await store.aclose()
    after = {f: (tmp_path / "usage" / f).stat().st_mtime_ns for f in segment_files(tmp_path)}
    # Earlier versions' segments are read, never appended to: the record starts the next segment, a log.
    assert {f for f in after if after[f] != before.get(f)} == {f"{day}/00003.jsonl"}
    assert [r["id"] for r in UsageStore(tmp_path).records_sync()] == [
        f"u{n * 10 + i}" for n in range(3) for i in range(5)
    ] + ["u99"]


async def test_usage_append_that_fails_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = UsageStore(tmp_path)
    await store.append(usage_record(0))
    await store.append(usage_record(1))
    [segment] = segment_files(tmp_path)
    path = tmp_path / "usage" / segment
    before = path.read_bytes()
    real_write, calls = os.write, []

    def disk_full(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) == 1:  # half the line reaches the segment, then the disk is full
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(StorageError, match="No space"):
        await store.append(usage_record(2))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert path.read_bytes() == before
    await store.append(usage_record(3))
    await store.aclose()
    assert [r["id"] for r in UsageStore(tmp_path).records_sync()] == ["u0", "u1", "u3"]
    assert [r["id"] for r in log_records(path)] == ["u0", "u1", "u3"]  # whole lines only


async def test_usage_store_closes(usage: UsageStore) -> None:
    await usage.append(usage_record(1))
    await usage.flush()
    await usage.aclose()
    with pytest.raises(RuntimeError):
        await usage.append(usage_record(2))
    assert [r["id"] for r in usage.records_sync()] == ["u1"]  # sync reads need no worker
    with pytest.raises(ValueError):
        UsageStore(usage.dir.parent, segment_size=0)


# --- reports ------------------------------------------------------------------------------------


def test_usage_report() -> None:
    records = [
        usage_record(1, model="anthropic/a", timestamp="2025-03-01T10:00:00.000Z").to_dict(),
        usage_record(2, model="anthropic/a", timestamp="2025-03-02T10:00:00.000Z", estimated=True).to_dict(),
        usage_record(3, model="openai/b", timestamp="2025-03-02T11:00:00.000Z").to_dict(),
    ]
    per_model = {
        "inputTokens": 20,
        "outputTokens": 10,
        "totalTokens": 36,
        "cacheReadTokens": 4,
        "cacheWriteTokens": 2,
        "reasoningTokens": 6,
        "totalCost": 0.006,
        "serverToolCost": 0.0,
        "serverToolUses": 0,
        "requestCount": 2,
        "errorCount": 0,
        "estimatedCount": 1,
    }
    report = usage_report(records)
    assert list(report["perModel"]) == ["anthropic/a", "openai/b"]
    assert report["perModel"]["anthropic/a"] == per_model
    assert report["perModel"]["openai/b"]["requestCount"] == 1
    grand = report["grandTotal"]
    assert (grand["totalCost"], grand["totalTokens"], grand["requestCount"]) == (0.009, 54, 3)
    assert json.loads(json.dumps(report)) == report

    by_day = usage_by_day(records)
    assert list(by_day["perDay"]) == ["2025-03-01", "2025-03-02"]
    assert by_day["perDay"]["2025-03-02"]["requestCount"] == 2
    assert by_day["perDay"]["2025-03-02"]["totalCost"] == 0.006
    assert by_day["grandTotal"] == grand

    empty = usage_report([])
    assert empty["perModel"] == {} and empty["grandTotal"]["requestCount"] == 0


# --- one usage store per process ---------------------------------------------------------------


async def test_the_server_keeps_one_usage_store_whose_sink_records_into_it(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    """The embedded backend's sink of record writes into the store the reports and the guard read: the
    server opens one UsageStore for its data directory, not one for the sink and another for the reports."""
    gw = client.server.app[STATE.REGISTRY]
    response = await client.post(
        "/api/chat",
        json={"id": "s_one", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]},
        headers=auth_headers,
    )
    assert response.status == 200
    await response.read()
    [sink] = [s for s in gw.recorder.sinks if delivery(s) == "record"]
    assert isinstance(sink, UsageStoreSink) and sink.store is gw.usage and sink_name(sink) == "tinydb"
    gc.unfreeze()  # the server froze what start-up made (server.py): in the collector's sight again
    opened = [o for o in gc.get_objects() if isinstance(o, UsageStore) and o.dir == gw.usage.dir]
    assert opened == [gw.usage]
    [record] = await gw.usage.records(session_id="s_one")
    usage = await (await client.get("/api/usage", headers=auth_headers)).json()
    assert usage["grandTotal"]["requestCount"] == 1 and record["sessionId"] == "s_one"


# --- files --------------------------------------------------------------------------------------


def test_atomic_write_and_corrupt_files(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    target = folder / "a.json"
    write_json_atomic(target, {"x": "ü"})
    assert json.loads(target.read_text("utf-8")) == {"x": "ü"}
    assert os.listdir(folder) == ["a.json"]  # no temp file left
    assert target.stat().st_mode & 0o777 == 0o600
    target.write_text('{"_default": {"1": ')
    with pytest.raises(StoreCorrupt, match="a.json"):
        read_tables(target)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".a.json.{dead.pid}.17.tmp"
    live = folder / f".a.json.{os.getpid()}.17.tmp"
    for path in (stale, live):
        path.write_text("{")
    (folder / "a.json").write_text("{}")
    remove_stale_temp_files(folder)
    assert sorted(os.listdir(folder)) == sorted(["a.json", live.name])


# --- the data-directory lock --------------------------------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
from agentspace.storage import DataDirLock
lock = DataDirLock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
lock.close()
"""


def test_data_dir_lock_refuses_a_second_server(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirLocked) as err:
            DataDirLock(tmp_path)
        assert err.value.pid == holder.pid
        assert str(err.value) == (
            f"another agentspace server (pid {holder.pid}) is already using {tmp_path}; "
            "stop it or pass a different --data-dir"
        )
    finally:
        holder.communicate("", timeout=10)
    with DataDirLock(tmp_path) as lock:  # free once the holder is gone
        assert (tmp_path / "server.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirLocked):
            DataDirLock(tmp_path)  # the same process, a second open: refused as well
    DataDirLock(tmp_path).close()
    lock.close()  # idempotent


def test_data_dir_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
    holder.kill()
    holder.wait(timeout=10)
    DataDirLock(tmp_path / "nested" / "data").close()  # creates missing folders
    DataDirLock(tmp_path).close()


# --- readers while the server writes ------------------------------------------------------------


async def test_readers_always_see_consistent_data(tmp_path: Path) -> None:
    writer_sessions, writer_usage = SessionStore(tmp_path), UsageStore(tmp_path, segment_size=7)
    acknowledged = {"usage": 0}
    stop = threading.Event()
    errors: list[BaseException] = []
    passes = {"n": 0}

    def reader() -> None:
        cli_sessions, cli_usage = SessionStore(tmp_path), UsageStore(tmp_path)
        last_usage = 0
        try:
            while not stop.is_set():
                floor = acknowledged["usage"]
                ids = [r["id"] for r in cli_usage.records_sync()]
                assert len(ids) == len(set(ids)) and len(ids) >= floor >= 0 and len(ids) >= last_usage
                last_usage = len(ids)
                for summary in cli_sessions.summaries_sync():
                    full = cli_sessions.get_sync(summary["id"])
                    if full is None:
                        continue  # deleted between list and get
                    n = len(full["messages"])
                    assert full["messageCount"] == n >= summary["messageCount"]
                    assert [m["id"] for m in full["messages"]] == [f"{summary['id']}-{i}" for i in range(n)]
                passes["n"] += 1
        except BaseException as e:  # reported by the test below
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        live = [(await writer_sessions.create(model="m", session_id=f"s{i}"))["id"] for i in range(3)]
        counts = dict.fromkeys(live, 0)
        for step in range(120):
            sid = live[step % len(live)]
            await writer_sessions.append_message(
                sid, {"id": f"{sid}-{counts[sid]}", "role": "user", "content": "x" * 200}
            )
            counts[sid] += 1
            await writer_usage.append(usage_record(step))
            acknowledged["usage"] += 1
            if step % 40 == 39:  # readers must cope with sessions vanishing
                await writer_sessions.delete(live[0])
                live[0] = (await writer_sessions.create(model="m", session_id=f"n{step}"))["id"]
                counts[live[0]] = 0
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        await writer_sessions.aclose()
        await writer_usage.aclose()
    assert not errors, errors[0]
    assert passes["n"] >= 5


# --- clients: a tinydb database -------------------------------------------------------------------


async def test_the_clients_file_is_a_tinydb_database_changed_through_tinydb(tmp_path: Path) -> None:
    from agentspace.clients import Client
    from agentspace.storage.embedded.clients import ClientStore
    from agentspace.storage.embedded.tinydb_file import NamedTinyDB

    store = ClientStore(tmp_path)
    key = await store.add(Client("alice", "", now_iso(), rpm=10))
    await store.add(Client("bob", "", now_iso()))
    await store.update("alice", lambda c: setattr(c, "rpm", None))  # a field cleared: the document is replaced
    await store.remove("bob")
    db = NamedTinyDB(tmp_path / "clients.json")  # tinydb itself reads what the store wrote
    [alice] = db.table("clients").all()
    assert alice.doc_id == "alice" and alice["rpm"] is None
    db.close()
    assert (tmp_path / "clients.json").stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written whole and atomically
    found = await ClientStore(tmp_path).get_by_key(key)
    assert found is not None and found.name == "alice"
