"""A writer killed with SIGKILL mid-write loses nothing it reported as written, and the stores reopen cleanly.

A child process appends usage records and session messages in a loop and prints a line after each
write returned. The test kills it (at a random moment, and at chosen points inside a write), then checks
every reported write is on disk, every file parses, and a new writer picks up where the child stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agentspace.stores import SessionStore, UsageStore
from agentspace.stores.tinydb_file import read_tables
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso

SESSION = "crash"

# argv: data dir, run tag, and the system call to die in, as "replace:N" (the Nth os.replace: a fully written
# and fsynced temp file never renamed, the worst moment of an atomic write), or "-" to run until killed.
CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from agentspace.stores import SessionStore, UsageStore
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso

data_dir, tag, die_in = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if die_in != "-":
    name, die_at = die_in.split(":")
    real, calls = getattr(os, name), [0]

    def dying(*args):
        calls[0] += 1
        if calls[0] == int(die_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    setattr(os, name, dying)


async def main():
    sessions, usage = SessionStore(data_dir), UsageStore(data_dir, segment_size=5)
    if not await sessions.exists("crash"):
        await sessions.create(model="m", session_id="crash")
    print("ready", flush=True)
    i = 0
    while True:
        rid = f"{tag}-{i}"
        await usage.append(UsageRecord(rid, now_iso(), "m", "p", "crash", None, TokenUsage(1, 1), Cost(), 1.0, "stop"))
        print("u", rid, flush=True)
        await sessions.append_message("crash", {"id": rid, "role": "user", "content": "x" * 300})
        print("m", rid, flush=True)
        i += 1


asyncio.run(main())
"""


def run_child(data_dir: Path, tag: str, *, die_in: str = "-", kill_after: int = 0) -> tuple[list[str], list[str]]:
    """Run the writer until it dies (``die_in``) or has reported ``kill_after`` writes; return what it reported."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), tag, die_in],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stuck = threading.Event()
    watchdog = threading.Timer(30, lambda: (stuck.set(), child.kill()))  # fail rather than hang
    watchdog.start()
    try:
        assert child.stdout is not None
        lines: list[str] = []
        while not kill_after or len(lines) < kill_after + 1:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        if kill_after:
            child.send_signal(signal.SIGKILL)
        lines += child.stdout.read().splitlines()  # reported between our last read and the kill
        child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:  # the test failed before killing it
            child.kill()
            child.wait()
    assert not stuck.is_set(), "the writer stopped making progress"
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    usage = [line.split()[1] for line in lines if line.startswith("u ")]
    messages = [line.split()[1] for line in lines if line.startswith("m ")]
    return usage, messages


def check_store(data_dir: Path, usage_ids: list[str], message_ids: list[str]) -> None:
    """What a reader finds after the crash: every file parses, and every reported write is there."""
    for path in data_dir.rglob("*.json"):  # every file whole: writes are atomic
        read_tables(path)
    stored_usage = [r["id"] for r in UsageStore(data_dir).records()]
    assert len(stored_usage) == len(set(stored_usage))
    assert set(usage_ids) <= set(stored_usage)
    session = SessionStore(data_dir).get_sync(SESSION)
    assert session is not None
    stored_messages = [m["id"] for m in session["messages"]]
    assert session["messageCount"] == len(stored_messages)
    assert stored_messages[: len(message_ids)] == message_ids  # in order, at most one unreported write after
    assert len(stored_messages) - len(message_ids) <= 1
    [summary] = SessionStore(data_dir).summaries_sync()
    assert len(message_ids) <= summary["messageCount"] <= len(stored_messages)


def temp_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.name.endswith(".tmp")]


async def reopen_and_write(data_dir: Path, usage_ids: list[str], message_ids: list[str]) -> None:
    """A new writer opens cleanly, removes the dead writer's temp files and keeps appending."""
    sessions, usage = SessionStore(data_dir), UsageStore(data_dir, segment_size=5)
    try:
        before = len(list(usage.records()))
        await usage.append(UsageRecord("after", now_iso(), "m", "p", SESSION, None, TokenUsage(), Cost(), 1.0, "stop"))
        await sessions.append_message(SESSION, {"id": "after", "role": "user", "content": "after the crash"})
        assert len(await usage.arecords()) == before + 1
        messages = [m["id"] for m in await sessions.messages(SESSION)]
        assert messages[-1] == "after" and messages[: len(message_ids)] == message_ids
    finally:
        await sessions.aclose()
        await usage.aclose()
    assert temp_files(data_dir) == []
    check_store(data_dir, usage_ids + ["after"], messages)


async def test_sigkill_at_random_moments_loses_no_reported_write(tmp_path: Path) -> None:
    reported_usage: list[str] = []
    reported_messages: list[str] = []
    for run, writes in enumerate((30, 47, 61)):  # the child keeps writing while we read: the kill lands anywhere
        usage_ids, message_ids = run_child(tmp_path, f"r{run}", kill_after=writes)
        assert len(usage_ids) + len(message_ids) >= writes
        reported_usage += usage_ids
        check_store(tmp_path, reported_usage, reported_messages + message_ids)
        # The next run starts where the store is, including a message the last run wrote but never reported.
        reported_messages = [m["id"] for m in SessionStore(tmp_path).get_sync(SESSION)["messages"]]
    await reopen_and_write(tmp_path, reported_usage, reported_messages)


# The child's writes, each one os.replace: 1 creates the session; then loop k (from 1) writes its usage
# segment (2k) and its message (2k + 1). Segments hold 5 records: loop 6 starts the second segment (12).
@pytest.mark.parametrize(
    ("die_in", "unreported"),
    [
        ("replace:2", "usage, first segment"),
        ("replace:3", "message"),
        ("replace:4", "usage"),
        ("replace:5", "message"),
        ("replace:12", "usage, new segment"),
        ("replace:13", "message"),
    ],
)
async def test_sigkill_inside_a_write(tmp_path: Path, die_in: str, unreported: str) -> None:
    usage_ids, message_ids = run_child(tmp_path, "d", die_in=die_in)
    assert temp_files(tmp_path), "the child should have died with a temp file written"
    check_store(tmp_path, usage_ids, message_ids)
    stored_usage = [r["id"] for r in UsageStore(tmp_path).records()]
    stored_messages = [m["id"] for m in SessionStore(tmp_path).get_sync(SESSION)["messages"]]
    assert stored_usage == usage_ids  # the record being written when the child died is not there
    assert stored_messages == message_ids
    await reopen_and_write(tmp_path, usage_ids, stored_messages)
