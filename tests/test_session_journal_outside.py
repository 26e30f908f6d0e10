"""The session journal tried from outside: a real ``agentspace serve`` killed with SIGKILL and restarted, and the
CLI; the sessions that exist only in the journal (created, their next write not made yet) are deleted, listed and
shown like any other."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import SessionStore
from agentspace.storage.embedded import sessions as sessions_module
from agentspace.storage.embedded.session_journal import JOURNAL_NAME
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.test_disk_full import disk, fill  # noqa: F401 - the tmpfs fixture
from tests.test_session_journal import first_turn_in_flight


def session_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "sessions").iterdir() if not p.name.startswith("."))


def run_cli(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env={"AGENTSPACE_HOME": str(data_dir)})


async def killed_during_a_first_turn(data_dir: Path, fake: fa.FakeAnthropic, content: str) -> str:
    """A chat that creates a session, SIGKILLed once its request reached the upstream: the session exists only in
    the journal (its answer, which would give it a file, never comes). Returns its id."""
    fake.default = fa.text_response("never finished").stall(60, after=2)
    server = GatewayProcess(data_dir, fake.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            session_id = await first_turn_in_flight(ws, fake, content)
            await server.kill()
            await ws.close()
    finally:
        await server.aclose()
    assert session_files(data_dir) == [] and (data_dir / "sessions" / JOURNAL_NAME).stat().st_size > 0
    return session_id


async def test_a_restarted_servers_first_request_deletes_a_session_left_in_the_journal(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    data_dir = tmp_path / "data"
    session_id = await killed_during_a_first_turn(data_dir, fake_anthropic, "delete me later")
    for round_ in range(2):  # the delete, then a restart that must not bring it back
        server = GatewayProcess(data_dir, fake_anthropic.url)
        try:
            await server.start()
            headers = {"Authorization": f"Bearer {server.token}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                if round_ == 0:
                    async with http.delete(f"{server.url}/api/sessions/{session_id}") as resp:
                        assert resp.status == 204, await resp.text()
                async with http.get(f"{server.url}/api/sessions/{session_id}") as resp:
                    assert resp.status == 404, await resp.text()
                async with http.get(f"{server.url}/api/sessions") as resp:
                    assert session_id not in {s["id"] for s in (await resp.json())["sessions"]}
            if round_ == 0:
                await server.kill()
        finally:
            await server.aclose()
    assert session_id not in run_cli(data_dir, "sessions", "list").output


async def test_the_cli_deletes_a_session_that_exists_only_in_the_journal(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Listed and shown by the CLI, so deletable by it: after a crash, a delete written to the journal, which the
    next server honours; while a server holds the session (its turn in flight), a refusal that says where to go."""
    fake_anthropic.default = fa.text_response("never finished").stall(60, after=2)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            session_id = await first_turn_in_flight(ws, fake_anthropic, "forget me")
            assert session_files(data_dir) == []
            refused = run_cli(data_dir, "sessions", "delete", session_id, "--yes")
            assert refused.exit_code != 0 and "DELETE /api/sessions/" in refused.output, refused.output
            assert session_id in run_cli(data_dir, "sessions", "list").output  # still there, as the server has it
            await server.kill()
            await ws.close()
    finally:
        await server.aclose()

    deleted = run_cli(data_dir, "sessions", "delete", session_id, "--yes")
    assert deleted.exit_code == 0 and f"Deleted session {session_id}" in deleted.output, deleted.output
    assert session_id not in run_cli(data_dir, "sessions", "list").output
    assert run_cli(data_dir, "sessions", "show", session_id).exit_code != 0

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        headers = {"Authorization": f"Bearer {restarted.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{restarted.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 404, await resp.text()
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                assert session_id not in {s["id"] for s in (await resp.json())["sessions"]}
    finally:
        await restarted.aclose()
    assert session_files(data_dir) == []


async def test_a_session_with_no_file_goes_with_the_sessions_folder_removed_from_outside(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """History cleared while a first turn is in flight: the session, which had no file yet, went with the journal
    (as a filed session goes with its file); the turn's end does not bring it back."""
    fake_anthropic.default = fa.text_response("partial answer").stall(60, after=2)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            ws = await http.ws_connect(server.ws_url)
            session_id = await first_turn_in_flight(ws, fake_anthropic, "cleared with the history")
            assert session_files(data_dir) == []
            for path in (data_dir / "sessions").iterdir():
                path.unlink()
            (data_dir / "sessions").rmdir()
            await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
            while (await ws.receive_json(timeout=30))["type"] not in ("chat.stream.end", "error"):
                pass
            await ws.close()
            async with http.get(f"{server.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 404, await resp.text()
            async with http.get(f"{server.url}/api/sessions") as resp:
                assert session_id not in {s["id"] for s in (await resp.json())["sessions"]}
    finally:
        await server.aclose()
    assert not (data_dir / "sessions" / f"{session_id}.jsonl").exists()


async def test_every_reader_finds_a_session_that_exists_only_in_the_journal(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A first turn in flight: its session has no file yet; the server's search, the CLI's search, export and
    doctor find it all the same."""
    fake_anthropic.default = fa.text_response("never finished").stall(60, after=2)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            ws = await http.ws_connect(server.ws_url)
            session_id = await first_turn_in_flight(ws, fake_anthropic, "a quokka in the journal")
            assert session_files(data_dir) == []
            async with http.get(f"{server.url}/api/sessions", params={"q": "quokka"}) as resp:
                assert [s["id"] for s in (await resp.json())["sessions"]] == [session_id]
            found = run_cli(data_dir, "sessions", "search", "quokka")
            assert found.exit_code == 0 and session_id in found.output, found.output
            exported = run_cli(data_dir, "sessions", "export", session_id)
            assert exported.exit_code == 0 and "a quokka in the journal" in exported.output, exported.output
            doctor = run_cli(data_dir, "doctor")
            assert "sessions: 1 readable, 0 damaged" in doctor.output, doctor.output
            await ws.close()
    finally:
        await server.aclose()


# argv: data dir, N. Creates sessions in concurrent bursts (a third of them written to again: filed), each reported
# once acknowledged, with a small journal; SIGKILLed right after the Nth time the journal was emptied.
CHECKPOINT_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from agentspace.storage import SessionStore
from agentspace.storage.embedded import sessions as sessions_module
from agentspace.storage.embedded import append_log, sessions as sessions_module

sessions_module.JOURNAL_BYTES = 4000
data_dir, die_at = Path(sys.argv[1]), int(sys.argv[2])
real, emptied = append_log.AppendLog.truncate, [0]

def truncate(self):
    real(self)
    emptied[0] += 1
    if emptied[0] == die_at:
        os.kill(os.getpid(), signal.SIGKILL)

append_log.AppendLog.truncate = truncate


async def one(store, sid):
    await store.create(model="m", session_id=sid, messages=[{"id": "u-" + sid, "role": "user", "content": "x" * 90}])
    print("c", sid, flush=True)
    if int(sid[1:]) % 3 == 0:
        await store.append_message(sid, {"id": "a-" + sid, "role": "assistant", "content": "y"})
        print("a", sid, flush=True)


async def main():
    store = SessionStore(data_dir)
    for burst in range(200):
        await asyncio.gather(*(one(store, f"s{burst * 8 + n}") for n in range(8)))


asyncio.run(main())
"""


@pytest.mark.parametrize("die_at", [1, 3])
async def test_sigkill_right_after_the_journal_was_emptied_loses_no_acknowledged_session(
    tmp_path: Path, die_at: int
) -> None:
    data_dir = tmp_path / "data"
    child = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_CHILD, str(data_dir), str(die_at)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    reported = [line.split() for line in child.stdout.splitlines()]
    created = {sid for kind, sid in reported if kind == "c"}
    answered = {sid for kind, sid in reported if kind == "a"}
    assert len(created) >= 8, child.stdout

    def check(listed: dict[str, int]) -> None:
        assert created <= set(listed), sorted(created - set(listed))
        for sid in created:
            assert listed[sid] >= (2 if sid in answered else 1), sid

    cli_listing = SessionStore(data_dir).listing_sync()  # a reader (the CLI) before any restart
    assert not cli_listing.damaged_files
    check({s["id"]: s["messageCount"] for s in cli_listing.sessions})
    reopened = SessionStore(data_dir)  # the next server
    try:
        check({s["id"]: s["messageCount"] for s in await reopened.summaries()})
        for sid in sorted(created)[:5]:
            assert [m["id"] for m in await reopened.messages(sid)][0] == f"u-{sid}"
    finally:
        await reopened.aclose()


async def test_a_full_disk_while_a_session_gets_its_file_loses_nothing_and_the_write_is_retried(
    disk: Path,  # noqa: F811 - the fixture
) -> None:
    big = "x" * 20_000  # more than a full tmpfs leaves at a file's end
    store = SessionStore(disk)
    try:
        await store.create(model="m", session_id="s1", messages=[{"id": "u1", "role": "user", "content": big}])
        filler = fill(disk)
        with pytest.raises(Exception, match="No space left") as refused:
            await store.append_message("s1", {"id": "a1", "role": "assistant", "content": big})
        assert type(refused.value).__name__ == "StorageError"
        got = await store.get("s1")
        assert got is not None and [m["id"] for m in got["messages"]] == ["u1"]
        read = SessionStore(disk).get_sync("s1")  # the CLI
        assert read is not None and [m["id"] for m in read["messages"]] == ["u1"]
        filler.unlink()
        await store.append_message("s1", {"id": "a1", "role": "assistant", "content": big})  # the same write again
    finally:
        await store.aclose()
    reopened = SessionStore(disk)
    try:
        assert [m["id"] for m in await reopened.messages("s1")] == ["u1", "a1"]
    finally:
        await reopened.aclose()


async def test_a_full_disk_between_a_sessions_file_and_its_write_keeps_the_journal_bounded(
    disk: Path,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's file written whole, the write after it refused (the disk full): the file is not durable yet,
    so the session stays cached with it until a write syncs it; the journal is emptied past its size as before."""
    monkeypatch.setattr(sessions_module, "OPEN_SESSIONS", 1)
    big = "x" * 20_000
    store = SessionStore(disk)
    try:
        await store.create(model="m", session_id="s1", messages=[{"id": "u1", "role": "user", "content": big}])
        # Smaller from here (set before, the journal would be emptied, and s1 filed, right after its create).
        monkeypatch.setattr(sessions_module, "JOURNAL_BYTES", 4000)
        room = disk / "room"
        room.write_bytes(b"\0" * 28_672)  # the session's file fits in it, its next write does not
        filler = fill(disk)
        room.unlink()
        with pytest.raises(Exception, match="No space left"):
            await store.append_message("s1", {"id": "a1", "role": "assistant", "content": big})
        assert (disk / "sessions" / "s1.jsonl").exists()  # written whole, never synced
        filler.unlink()
        for n in range(10):  # other sessions used meanwhile (the cache holds one)
            await store.create(model="m", session_id=f"t{n}", messages=[{"id": f"v{n}", "role": "user"}])
            await store.touch(f"t{n}")
        await store.append_message("s1", {"id": "a1", "role": "assistant", "content": "y"})  # the write retried
        for n in range(10, 40):  # past the journal's size many times over
            await store.create(model="m", session_id=f"t{n}", messages=[{"id": f"v{n}", "role": "user"}])
            assert (disk / "sessions" / ".journal.jsonl").stat().st_size < 4000 + 1000
    finally:
        await store.aclose()
    assert (disk / "sessions" / ".journal.jsonl").stat().st_size == 0
    reopened = SessionStore(disk)
    try:
        assert [m["id"] for m in await reopened.messages("s1")] == ["u1", "a1"]
        assert len(await reopened.summaries()) == 41
    finally:
        await reopened.aclose()


async def test_serve_killed_mid_burst_of_new_websocket_sessions_keeps_every_one_that_reached_the_upstream(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Twelve new chats at once over WebSockets; SIGKILL once some of their requests reached the upstream (the
    others may be anywhere). Every request the upstream got is a session the CLI shows, with its user message,
    before a restart and after it."""
    fake_anthropic.default = fa.text_response("never finished").stall(60, after=2)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            sockets = [await http.ws_connect(server.ws_url) for _ in range(12)]
            await asyncio.gather(
                *(
                    ws.send_json({"type": "chat.send", "id": "r", "content": f"burst-{n}"})
                    for n, ws in enumerate(sockets)
                )
            )
            for _ in range(3000):  # until some reached the upstream
                if len(fake_anthropic.requests) >= 4:
                    break
                await asyncio.sleep(0.01)
            await server.kill()
            for ws in sockets:
                await ws.close()
    finally:
        await server.aclose()
    reached = {
        text
        for r in fake_anthropic.requests
        for m in r.body["messages"]
        if m["role"] == "user"
        for text in ([m["content"]] if isinstance(m["content"], str) else [b.get("text") for b in m["content"]])
    }
    assert len(reached) >= 4, reached

    def user_messages(listing: Any) -> set[str]:
        found = set()
        for summary in listing:
            shown = run_cli(data_dir, "sessions", "show", summary["id"])
            assert shown.exit_code == 0, shown.output
            found |= {f"burst-{n}" for n in range(12) if f"burst-{n}\n" in shown.output + "\n"}
        return found

    listed = json.loads(run_cli(data_dir, "sessions", "list", "--json").output)
    assert reached <= user_messages(listed), (reached, listed)
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                ids = [s["id"] for s in (await resp.json())["sessions"]]
            contents = set()
            for sid in ids:
                async with http.get(f"{restarted.url}/api/sessions/{sid}") as resp:
                    contents |= {m["content"] for m in (await resp.json())["session"]["messages"]}
        assert reached <= contents
    finally:
        await restarted.aclose()


async def test_migrate_after_a_crash_copies_the_sessions_left_in_the_journal(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, pg_dsn: str
) -> None:
    from agentspace.storage.postgres import PostgresDatabase, PostgresSessionStore

    data_dir = tmp_path / "data"
    session_id = await killed_during_a_first_turn(data_dir, fake_anthropic, "carried over")
    migrated = await asyncio.to_thread(run_cli, data_dir, "storage", "migrate", "--to", pg_dsn)
    assert migrated.exit_code == 0 and "sessions: 1 copied" in migrated.output, migrated.output
    db = PostgresDatabase(pg_dsn)
    await db.start()
    try:
        copied = await PostgresSessionStore(db).get(session_id)
    finally:
        await db.aclose()
    assert copied is not None and [m["content"] for m in copied["messages"]] == ["carried over"]


async def test_an_unreadable_create_in_the_journal_is_named_and_kept_aside(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A journal damaged from outside in one create (a line that parses, entries that are no session's): readers
    name the journal, and the restarted server keeps it aside (not emptied away) while serving the good one."""
    data_dir = tmp_path / "data"
    session_id = await killed_during_a_first_turn(data_dir, fake_anthropic, "the good one")
    path = data_dir / "sessions" / JOURNAL_NAME
    with open(path, "ab") as f:
        f.write(json.dumps({"create": {"id": "s_damaged", "entries": [{"bogus": 1}]}}).encode() + b"\n")
    doctor = run_cli(data_dir, "doctor")
    assert "sessions: 1 readable, 1 damaged" in doctor.output and JOURNAL_NAME in doctor.output, doctor.output

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(f"{restarted.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                listing = await resp.json()
        assert [s["id"] for s in listing["sessions"]] == [session_id]
        [aside] = listing["damagedFiles"]
        assert Path(aside).name.startswith(f"{JOURNAL_NAME}.damaged-") and b"s_damaged" in Path(aside).read_bytes()
    finally:
        await restarted.aclose()


# argv: data dir. Creates 5,000 sessions one after the other with a small journal (emptied every few creates), each
# reported once acknowledged, then waits to be killed (so that the readers' work stays bounded on a slow machine).
BUSY_CHILD = """
import asyncio, sys
from pathlib import Path
from agentspace.storage import SessionStore
from agentspace.storage.embedded import sessions as sessions_module

sessions_module.JOURNAL_BYTES = 1000


async def main():
    store = SessionStore(Path(sys.argv[1]))
    for n in range(5000):
        await store.create(model="m", session_id=f"s{n}", messages=[{"id": f"u{n}", "role": "user", "content": "x"}])
        print(n, flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
"""


def test_a_reader_never_misses_a_session_while_the_journal_is_emptied(tmp_path: Path) -> None:
    """The CLI lists and reads while the server files the journal's sessions and empties it: every session
    acknowledged before the read began is found (files listed before the journal was emptied, the journal read
    after, must not miss the sessions filed in between)."""
    data_dir = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_CHILD, str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    acked = [-1]

    def follow() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            acked[0] = int(line)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        store = SessionStore(data_dir)
        checks, deadline = 0, time.monotonic() + 120
        while checks < 100 and child.poll() is None and time.monotonic() < deadline:
            last = acked[0]
            if last < 0:  # not started yet
                time.sleep(0.01)
                continue
            listed = {s["id"] for s in store.listing_sync().sessions}
            missing = [n for n in range(last + 1) if f"s{n}" not in listed]
            assert not missing, (last, missing)
            assert store.get_sync(f"s{last}") is not None, last
            checks += 1
        assert checks == 100, child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.wait()


async def test_the_search_index_never_misses_a_session_while_the_journal_is_emptied(tmp_path: Path) -> None:
    """The server's search (its index of the session files and the journal) while a writer files sessions and
    empties the journal: every session acknowledged before the search began is found."""
    from agentspace.storage.search import search_sessions

    data_dir = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_CHILD, str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    acked = [-1]

    def follow() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            acked[0] = int(line)

    threading.Thread(target=follow, daemon=True).start()
    try:
        store = SessionStore(data_dir)
        checks, deadline = 0, time.monotonic() + 120
        while checks < 40 and child.poll() is None and time.monotonic() < deadline:
            last = acked[0]
            if last < 0:  # not started yet
                await asyncio.sleep(0.01)
                continue
            found = {s["id"] for s in (await search_sessions(store, "x", limit=1_000_000)).sessions}
            missing = [n for n in range(last + 1) if f"s{n}" not in found]
            assert not missing, (last, missing)
            checks += 1
        assert checks == 40, child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.wait()
