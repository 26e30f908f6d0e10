"""A writer killed with SIGKILL mid-write loses nothing it reported as written, and the stores reopen cleanly.

A child process appends usage records and session messages in a loop and prints a line after each
write returned. The test kills it (at a random moment, and at chosen points inside a write), then checks
every reported write is on disk, every file parses, and a new writer picks up where the child stopped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import SessionStore, UsageStore
from agentspace.storage.embedded.append_log import parse_lines
from agentspace.storage.embedded.tinydb_file import read_tables
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa

SESSION = "crash"

# argv: data dir, run tag, and where to die, or "-" to run until killed: "write:N" (the Nth os.write writes all
# but its last 10 bytes: a record's line torn, or a message's line whole and the summary closing its write
# torn), "halfwrite:N" (half of it), "fdatasync:N" (the lines written whole, never synced).
CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from agentspace.storage import SessionStore, UsageStore
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso

data_dir, tag, die_in = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if die_in != "-":
    how, die_at = die_in.split(":")
    name = "write" if how.endswith("write") else how
    real, calls = getattr(os, name), [0]

    def dying(*args):
        calls[0] += 1
        if calls[0] == int(die_at):
            if name == "write":
                fd, data = args
                real(fd, bytes(data)[: len(data) // 2 if how == "halfwrite" else len(data) - 10])
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
    for path in data_dir.rglob("*.json"):  # every whole file whole: those writes are atomic
        read_tables(path)
    for path in data_dir.rglob("*.jsonl"):  # every complete line of a log parses (a torn tail is not a line)
        parse_lines(path.read_bytes(), path)
    stored_usage = [r["id"] for r in UsageStore(data_dir).records_sync()]
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
        before = len(list(usage.records_sync()))
        await usage.append(UsageRecord("after", now_iso(), "m", "p", SESSION, None, TokenUsage(), Cost(), 1.0, "stop"))
        await sessions.append_message(SESSION, {"id": "after", "role": "user", "content": "after the crash"})
        assert len(await usage.records()) == before + 1
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


def torn_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*.jsonl") if p.stat().st_size and not p.read_bytes().endswith(b"\n")]


# The child's writes, each one os.write: 1 creates the session (in the session journal); then loop 1 appends its
# usage record (2), writes the session's own file whole (3, a temp file renamed into place), appends its message
# with the summary closing it (4) and, once that is synced, marks the session filed in the journal (5); loop k from
# 2 appends its usage record (2k + 2) and its message (2k + 3). Segments hold 5 records: loop 6 starts the second
# segment (14). Each append's fdatasync: the create 1, loop k's usage 2k, loop k's message 2k + 1 from loop 2 on
# (loop 1's is the new file's fsync).
@pytest.mark.parametrize(
    ("die_in", "unreported"),
    [
        ("write:2", "usage, first segment, line torn"),
        ("write:4", "message written whole, its summary torn"),
        ("halfwrite:4", "message torn"),
        ("write:6", "usage"),
        ("halfwrite:7", "message"),
        ("write:14", "usage, new segment"),
        ("write:15", "message"),
    ],
)
async def test_sigkill_inside_a_write(tmp_path: Path, die_in: str, unreported: str) -> None:
    usage_ids, message_ids = run_child(tmp_path, "d", die_in=die_in)
    assert torn_files(tmp_path), "the child should have died with a line half written"
    check_store(tmp_path, usage_ids, message_ids)
    stored_usage = [r["id"] for r in UsageStore(tmp_path).records_sync()]
    stored_messages = [m["id"] for m in SessionStore(tmp_path).get_sync(SESSION)["messages"]]
    assert stored_usage == usage_ids  # the record being written when the child died is not there
    assert stored_messages == message_ids
    await reopen_and_write(tmp_path, usage_ids, stored_messages)
    assert torn_files(tmp_path) == []  # the new writer cut the torn tail off before appending


@pytest.mark.parametrize("die_in", ["fdatasync:1", "fdatasync:2", "fdatasync:12", "fdatasync:13"])
async def test_sigkill_between_a_write_and_its_sync(tmp_path: Path, die_in: str) -> None:
    # The lines are whole in the page cache (a process kill keeps them): never reported, and at most that
    # one write more than reported is found.
    usage_ids, message_ids = run_child(tmp_path, "d", die_in=die_in)
    check_store(tmp_path, usage_ids, message_ids)
    stored_usage = [r["id"] for r in UsageStore(tmp_path).records_sync()]
    assert stored_usage[: len(usage_ids)] == usage_ids and len(stored_usage) - len(usage_ids) <= 1
    stored_messages = [m["id"] for m in SessionStore(tmp_path).get_sync(SESSION)["messages"]]
    await reopen_and_write(tmp_path, usage_ids, stored_messages)


# A turn's way of writing (pipeline.start_turn): the session created, then its user message appended, each with
# sync=False, then both made durable by awaiting_sync (beside the call's ledger entry in the server). argv: data
# dir and where to die, as CHILD. The create is one append to the session journal (synced by "fdatasync:1"); the
# append that follows writes the session's own file whole ("replace:1": before it is renamed into place; "fsync:2":
# its first sync, which covers the message appended after it too; "fsync:3": its folder's). "fsync:1" is the sync
# of the folder of the journal, made by the store's first use.
WRITE_AHEAD_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from agentspace.storage import SessionStore

data_dir, die_in = Path(sys.argv[1]), sys.argv[2]
how, die_at = die_in.split(":")
name = "write" if how.endswith("write") else how
real, calls = getattr(os, name), [0]


def dying(*args):
    calls[0] += 1
    if calls[0] == int(die_at):
        if name == "write":
            fd, data = args
            real(fd, bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)


async def main():
    sessions = SessionStore(data_dir)
    setattr(os, name, dying)
    await sessions.create(model="m", session_id="crash", messages=[{"id": "m1", "role": "user"}], sync=False)
    print("created", flush=True)
    await sessions.append_message("crash", {"id": "m2", "role": "user"}, sync=False)
    print("written", flush=True)
    await sessions.awaiting_sync("crash")
    print("synced", flush=True)


asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("die_in", "created"),
    [
        ("fsync:1", False),  # the journal made, nothing in it yet
        ("halfwrite:1", False),  # the create half written in the journal
        ("fdatasync:1", True),  # the create written whole, its sync never ran
        ("replace:1", True),  # the session's own file written whole, not yet renamed into place
        ("fsync:2", True),  # renamed, its first sync (started right after the write) never ran
        ("fsync:3", True),  # the file synced, its folder not
    ],
)
async def test_sigkill_between_a_new_session_and_its_first_sync(tmp_path: Path, die_in: str, created: bool) -> None:
    (tmp_path / "sessions").mkdir()  # so that the syncs counted are the new file's and its folder's
    child = subprocess.run(
        [sys.executable, "-c", WRITE_AHEAD_CHILD, str(tmp_path), die_in], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    reported = child.stdout.split()
    # Killed before the create is written whole, the caller never heard of the session. After it, the sync follows
    # the write in the same store job (``GroupCommit.run_written``): the kill may come before or after the caller
    # hears "created", and either way the session is on disk, whole, in the journal or in its own file.
    assert "synced" not in reported
    if not created:
        assert "created" not in reported
    # The session is whole, with every write reported (the page cache keeps them; the message written while
    # the sync ran may be there unreported), or absent: never a torn or damaged file.
    for path in tmp_path.rglob("*.jsonl"):
        parse_lines(path.read_bytes(), path)
    session = SessionStore(tmp_path).get_sync(SESSION)
    if created:
        assert session is not None
        stored = [m["id"] for m in session["messages"]]
        assert stored == ["m1", "m2"] if "written" in reported else stored in (["m1"], ["m1", "m2"])
    else:
        assert session is None and SessionStore(tmp_path).summaries_sync() == []
    assert SessionStore(tmp_path).listing_sync().damaged_files == []
    # A new writer removes the dead one's temp file and goes on: the session created anew when it was lost.
    sessions = SessionStore(tmp_path)
    try:
        if session is None:
            await sessions.create(model="m", session_id=SESSION)
        await sessions.append_message(SESSION, {"id": "after", "role": "user"})
        assert [m["id"] for m in await sessions.messages(SESSION)][-1] == "after"
    finally:
        await sessions.aclose()
    assert temp_files(tmp_path) == []


# An edit's set-aside (``SessionStore.set_aside``): the session created and filed, then its later messages set aside in
# one write (one os.write of the aside entry and the summary closing it, then its fdatasync). argv: data dir and where
# to die, as CHILD.
SET_ASIDE_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from agentspace.storage import SessionStore

data_dir, die_in = Path(sys.argv[1]), sys.argv[2]
how, die_at = die_in.split(":")
name = "write" if how.endswith("write") else how
real = getattr(os, name)


def dying(*args):
    if name == "write":
        fd, data = args
        real(fd, bytes(data)[: len(data) // 2 if how == "halfwrite" else len(data) - 10])
    os.kill(os.getpid(), signal.SIGKILL)


async def main():
    sessions = SessionStore(data_dir)
    messages = [{"id": f"m{n}", "role": "user" if n % 2 == 0 else "assistant"} for n in range(200)]
    await sessions.create(model="m", session_id="crash", messages=messages)
    await sessions.touch("crash")  # its own file written, the journal emptied
    await sessions.aclose()
    sessions = SessionStore(data_dir)
    await sessions.get("crash")
    setattr(os, name, dying)
    await sessions.set_aside("crash", [f"m{n}" for n in range(1, 200)])
    print("set aside", flush=True)


asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("die_in", "aside"),
    [
        ("halfwrite:1", False),  # the aside entry torn
        ("write:1", False),  # the entry written whole, the summary closing it torn
        ("fdatasync:1", True),  # both written whole, never synced (a process kill keeps them)
    ],
)
async def test_sigkill_inside_a_set_aside_sets_none_or_all_aside(tmp_path: Path, die_in: str, aside: bool) -> None:
    child = subprocess.run(
        [sys.executable, "-c", SET_ASIDE_CHILD, str(tmp_path), die_in], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "set aside" not in child.stdout
    assert bool(torn_files(tmp_path)) is not aside
    session = SessionStore(tmp_path).get_sync(SESSION)
    assert session is not None and len(session["messages"]) == 200
    seen = [m["id"] for m in session["messages"] if not m.get("replaced")]
    assert seen == (["m0"] if aside else [f"m{n}" for n in range(200)])
    assert session["messageCount"] == (1 if aside else 200)
    assert SessionStore(tmp_path).listing_sync().damaged_files == []
    sessions = SessionStore(tmp_path)  # a new writer cuts the torn tail off and goes on
    try:
        await sessions.set_aside(SESSION, ["m1", "m2"])
        await sessions.append_message(SESSION, {"id": "after", "role": "user"})
        got = await sessions.get(SESSION)
        assert got is not None and got["messageCount"] == (2 if aside else 199)
    finally:
        await sessions.aclose()
    assert torn_files(tmp_path) == []
    assert (SessionStore(tmp_path).get_sync(SESSION) or {})["messageCount"] == (2 if aside else 199)


async def test_an_empty_session_file_is_a_creation_never_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a machine stopped between a new session's rename and its sync can leave (the name durable, the lines
    # not), or a failed first sync (its lines cut off): the session was never acknowledged, so it does not exist.
    folder = tmp_path / "sessions"
    folder.mkdir()
    (folder / f"{SESSION}.jsonl").write_bytes(b"")
    assert SessionStore(tmp_path).get_sync(SESSION) is None
    listing = SessionStore(tmp_path).listing_sync()
    assert listing.sessions == [] and listing.damaged_files == []
    sessions = SessionStore(tmp_path)
    try:
        assert await sessions.get(SESSION) is None
        assert "never became durable" in caplog.text
        assert not (folder / f"{SESSION}.jsonl").exists()  # the writer removed it
        await sessions.create(model="m", session_id=SESSION)
        assert (await sessions.get(SESSION) or {})["messageCount"] == 0
    finally:
        await sessions.aclose()


async def test_sigkill_of_serve_mid_burst_keeps_every_acknowledged_answer(tmp_path: Path, fake_anthropic: Any) -> None:
    """A real `serve` killed with SIGKILL while 30 /api/chat turns run. After a restart: every answer whose end a
    client saw is stored with its usage record as the upstream reported it; every call the upstream saw has
    exactly one record (recovered ones included); every session reads whole; the CLI's reports and doctor agree.
    """
    fake_anthropic.default = fa.text_response("word " * 20, chunks=10, usage={"input_tokens": 321}).with_delay(0.15)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    bodies: dict[str, bytes] = {}
    try:
        url = await server.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}) as http:

            async def one(n: int) -> None:
                await asyncio.sleep(n * 0.05)
                body = {
                    "id": f"b{n}",
                    "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "q"}]}],
                }
                bodies[f"b{n}"] = b""
                try:
                    async with http.post(f"{url}/api/chat", json=body) as resp:
                        async for chunk in resp.content.iter_any():
                            bodies[f"b{n}"] += chunk
                except aiohttp.ClientError:
                    pass  # the server died mid-answer

            # A first answer, alone: a fresh process's first calls wait for the SDK's import (seconds on a loaded
            # machine), and a burst sent meanwhile would start, and end, all at once.
            await one(-1)
            assert b'"type":"finish"' in bodies.pop("b-1")
            turns = asyncio.gather(*(one(n) for n in range(30)))
            # Killed once a few answers have ended, while the others run.
            for _ in range(1500):
                if sum(b'"type":"finish"' in raw for raw in bodies.values()) >= 5:
                    break
                await asyncio.sleep(0.02)
            await server.kill()
            await turns
    finally:
        await server.aclose()
    finished = {sid for sid, raw in bodies.items() if b'"type":"finish"' in raw} | {"b-1"}
    assert 1 < len(finished) < 31, len(finished)  # the kill landed mid-burst

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        calls = len(fake_anthropic.requests)
        for _ in range(100):  # calls left pending by the killed process are posted at start
            if len(list(UsageStore(data_dir).records_sync())) >= calls:
                break
            await asyncio.sleep(0.1)
    finally:
        await restarted.aclose()
    records = list(UsageStore(data_dir).records_sync())
    assert calls > len(finished)  # the kill cut calls the upstream had answered in part
    assert len(records) == calls and len({r["id"] for r in records}) == calls  # one record per call
    assert any(r["recovered"] for r in records)  # posted at the restart, from the ledger
    assert all(r["inputTokens"] == 321 for r in records)  # as reported at message_start, recovered or not
    sessions = SessionStore(data_dir)
    for sid in finished:
        session = sessions.get_sync(sid)
        assert session is not None and [m["role"] for m in session["messages"]] == ["user", "assistant"], sid
        assert session["messages"][1]["content"] == "word " * 20
        (record,) = [r for r in records if r["sessionId"] == sid]
        assert record["recovered"] is False and record["outputTokens"] > 0
    listing = sessions.listing_sync(whole=True)
    assert listing.damaged_files == [] and {s["id"] for s in listing.sessions} >= finished

    env = {"AGENTSPACE_HOME": str(data_dir)}
    report = CliRunner().invoke(cli, ["usage", "--by-session", "--json"], env=env)
    assert report.exit_code == 0, report.output
    per_session = json.loads(report.stdout)["perSession"]
    assert sum(t["inputTokens"] for t in per_session.values()) == 321 * calls
    assert all(per_session[sid]["requestCount"] == 1 for sid in finished)
    doctor = CliRunner().invoke(cli, ["doctor"], env=env)
    assert doctor.exit_code == 0 and "0 damaged" in doctor.output, doctor.output
