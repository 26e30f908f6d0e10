"""The session journal: a new session is one append to ``sessions/.journal.jsonl`` and gets its own file at its
next write; nothing acknowledged is lost, and nothing deleted comes back, whatever stops the server."""

from __future__ import annotations

import asyncio
import json
import os
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


def journal(data_dir: Path) -> list[Any]:
    path = data_dir / "sessions" / JOURNAL_NAME
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def session_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "sessions").iterdir() if not p.name.startswith("."))


async def first_turn_in_flight(ws: aiohttp.ClientWebSocketResponse, fake: fa.FakeAnthropic, content: str) -> str:
    """A chat that creates a session, until its request reached the upstream (which stalls: the answer that would
    give the session its file does not come). Returns the session's id."""
    await ws.send_json({"type": "chat.send", "id": "r1", "content": content})
    created = await ws.receive_json(timeout=30)
    assert created["type"] == "session.created", created
    for _ in range(1500):
        if fake.requests:
            break
        await asyncio.sleep(0.02)
    assert fake.requests
    return str(created["sessionId"])


async def test_a_new_session_is_one_append_and_gets_its_file_at_its_next_write(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    await store.create(model="m", session_id="s1", messages=[{"id": "u1", "role": "user", "content": "hi"}])
    assert session_files(tmp_path) == []
    [entry] = journal(tmp_path)
    assert entry["create"]["id"] == "s1"
    # A reader (the CLI, another process) finds it in the journal.
    found = SessionStore(tmp_path).get_sync("s1")
    assert found is not None and [m["id"] for m in found["messages"]] == ["u1"]
    assert [s["id"] for s in SessionStore(tmp_path).summaries_sync()] == ["s1"]

    await store.append_message("s1", {"id": "a1", "role": "assistant", "content": "hello"})
    assert session_files(tmp_path) == ["s1.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "sessions" / "s1.jsonl").read_bytes().splitlines()]
    assert [list(line) for line in lines] == [
        ["message"],
        ["session"],
        ["message"],
        ["session"],
    ]  # whole, then appended
    assert journal(tmp_path)[-1] == {"filed": "s1"}  # written once the file was synced
    found = SessionStore(tmp_path).get_sync("s1")
    assert found is not None and [m["id"] for m in found["messages"]] == ["u1", "a1"]

    # A stop with no shutdown (the store never closed): a new store reads both.
    await store.create(model="m", session_id="s2", messages=[{"id": "u2", "role": "user", "content": "yo"}])
    reopened = SessionStore(tmp_path)
    try:
        assert [m["id"] for m in await reopened.messages("s2")] == ["u2"]
        assert [m["id"] for m in await reopened.messages("s1")] == ["u1", "a1"]
        assert session_files(tmp_path) == ["s1.jsonl", "s2.jsonl"]  # written at its first use, the journal emptied
        assert journal(tmp_path) == []
    finally:
        await reopened.aclose()


async def test_the_journal_is_emptied_past_its_size_and_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "JOURNAL_BYTES", 2000)
    store = SessionStore(tmp_path)
    ids = [f"s{n}" for n in range(40)]
    for n, sid in enumerate(ids):
        await store.create(model="m", session_id=sid, messages=[{"id": f"u{n}", "role": "user", "content": "x" * 100}])
        if n % 3 == 0:  # some get their file at their next write, the others when the journal is emptied
            await store.append_message(sid, {"id": f"a{n}", "role": "assistant", "content": "y"})
        size = (tmp_path / "sessions" / JOURNAL_NAME).stat().st_size
        assert size < 2000 + 1000, size  # bounded: emptied once past JOURNAL_BYTES
    files = session_files(tmp_path)
    assert any(f"{sid}.jsonl" in files for n, sid in enumerate(ids) if n % 3)  # filed when the journal was emptied
    listed = {s["id"]: s["messageCount"] for s in SessionStore(tmp_path).summaries_sync()}
    assert listed == {sid: 2 if n % 3 == 0 else 1 for n, sid in enumerate(ids)}
    await store.aclose()
    assert journal(tmp_path) == [] and session_files(tmp_path) == sorted(f"{sid}.jsonl" for sid in ids)
    assert {s["id"]: s["messageCount"] for s in SessionStore(tmp_path).summaries_sync()} == listed


async def test_deleted_sessions_do_not_come_back_after_a_crash(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    for sid in ("unfiled", "filed", "outside"):
        await store.create(model="m", session_id=sid)
    for sid in ("filed", "outside"):
        await store.touch(sid)  # their files written
    assert await store.delete("unfiled") and await store.delete("filed")
    assert SessionStore(tmp_path).delete_sync("outside")  # the CLI, another process
    assert SessionStore(tmp_path).summaries_sync() == []
    # The server stops without shutting down; the next one reads the journal.
    reopened = SessionStore(tmp_path)
    try:
        assert await reopened.summaries() == []
        for sid in ("unfiled", "filed", "outside"):
            assert await reopened.get(sid) is None
    finally:
        await reopened.aclose()
    assert session_files(tmp_path) == []


async def test_the_cli_deletes_a_session_whose_filed_mark_never_reached_the_disk(tmp_path: Path) -> None:
    """A session's file is synced before the journal marks it filed, and the mark rides on a later sync: a crash or
    a power cut in between leaves its create unfiled beside its file. The CLI's delete writes a delete to the
    journal then, or the next start would bring the session back from its create."""
    store = SessionStore(tmp_path)
    for sid in ("lost-mark", "kept"):
        await store.create(model="m", session_id=sid, messages=[{"id": "u1", "role": "user", "content": "hi"}])
        await store.append_message(sid, {"id": "a1", "role": "assistant", "content": "hello"})  # filed
    path = tmp_path / "sessions" / JOURNAL_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'{"filed":"lost-mark"}\n' in lines
    path.write_bytes(b"".join(line for line in lines if line != b'{"filed":"lost-mark"}\n'))  # what the disk kept

    env = {"AGENTSPACE_HOME": str(tmp_path)}
    for sid in ("lost-mark", "kept"):
        deleted = CliRunner().invoke(cli, ["sessions", "delete", sid, "--yes"], env=env)
        assert deleted.exit_code == 0 and f"Deleted session {sid}" in deleted.output, deleted.output
    assert journal(tmp_path)[-1] == {"delete": "lost-mark"}  # the filed one needed none
    assert session_files(tmp_path) == []
    restarted = SessionStore(tmp_path)  # the next server
    try:
        assert await restarted.summaries() == []
        assert await restarted.get("lost-mark") is None and await restarted.get("kept") is None
    finally:
        await restarted.aclose()
    assert session_files(tmp_path) == []
    assert "lost-mark" not in CliRunner().invoke(cli, ["sessions", "list"], env=env).output


async def test_a_damaged_journal_is_moved_aside_and_named(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    await store.create(model="m", session_id="kept")
    await store.touch("kept")
    await store.aclose()
    path = tmp_path / "sessions" / JOURNAL_NAME
    path.write_bytes(b'{"create": {"id": "x", "entries": []}}\nnot json\n')
    listing = SessionStore(tmp_path).listing_sync()
    assert [s["id"] for s in listing.sessions] == ["kept"] and listing.damaged_files == [str(path)]
    reopened = SessionStore(tmp_path)
    try:
        await reopened.create(model="m", session_id="new")
        assert {s["id"] for s in await reopened.summaries()} == {"kept", "new"}
    finally:
        await reopened.aclose()
    assert [p.name for p in path.parent.iterdir() if ".damaged-" in p.name]  # kept for a person to look at


async def test_serve_killed_during_a_first_turn_keeps_its_user_message(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """The request left, so the new session's user message is durable (in the journal only: its answer, which
    would give it a file, never comes). The CLI shows it before a restart, and the restarted server writes its
    file and serves it."""
    fake_anthropic.default = fa.text_response("never finished").stall(60, after=2)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            session_id = await first_turn_in_flight(ws, fake_anthropic, "remember me")
            await server.kill()
            await ws.close()
    finally:
        await server.aclose()
    assert session_files(data_dir) == []  # no file yet: the journal holds it

    shown = CliRunner().invoke(cli, ["sessions", "show", session_id], env={"AGENTSPACE_HOME": str(data_dir)})
    assert shown.exit_code == 0 and "remember me" in shown.output, shown.output

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        headers = {"Authorization": f"Bearer {restarted.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{restarted.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 200, await resp.text()
                messages = (await resp.json())["session"]["messages"]
            assert [(m["role"], m["content"]) for m in messages] == [("user", "remember me")]
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                assert session_id in {s["id"] for s in (await resp.json())["sessions"]}
        assert session_files(data_dir) == [f"{session_id}.jsonl"] and journal(data_dir) == []
        assert "written from" in restarted.log()
    finally:
        await restarted.aclose()
    assert os.path.getsize(data_dir / "sessions" / f"{session_id}.jsonl") > 0


async def test_the_servers_delete_of_a_session_whose_filed_mark_never_reached_the_disk(tmp_path: Path) -> None:
    """The server's own delete, as the CLI's above: the filed mark is appended unsynced and rides on a later sync of
    the journal, so a power cut after the delete may leave the create without it, and the file gone. The delete
    writes itself down in the journal too, or the next start brings the deleted session back from its create."""
    store = SessionStore(tmp_path)
    for sid in ("lost-mark", "kept"):
        await store.create(model="m", session_id=sid, messages=[{"id": "u1", "role": "user", "content": "hi"}])
        await store.append_message(sid, {"id": "a1", "role": "assistant", "content": "hello"})  # filed
    assert await store.delete("lost-mark")
    path = tmp_path / "sessions" / JOURNAL_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'{"filed":"lost-mark"}\n' in lines
    path.write_bytes(b"".join(line for line in lines if line != b'{"filed":"lost-mark"}\n'))  # what the disk kept
    # The server stops without shutting down (a power cut); the next one reads the journal.
    restarted = SessionStore(tmp_path)
    try:
        assert await restarted.get("lost-mark") is None
        assert [s["id"] for s in await restarted.summaries()] == ["kept"]
    finally:
        await restarted.aclose()
    assert session_files(tmp_path) == ["kept.jsonl"]


@pytest.mark.parametrize("kept_lines", [0, 1])
async def test_a_new_session_file_torn_in_its_first_write_is_written_again_from_the_journal(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, kept_lines: int
) -> None:
    """A machine stopped between a new session's file and its first sync may keep the file's name and part of its
    lines (``append_log._sync_all``): a creation never acknowledged, whose filed mark was never written either. The
    session's create in the journal was acknowledged: the restarted server writes the file again from it (the
    user message kept, the answer that was never acknowledged gone), not a damaged file moved aside."""
    fake_anthropic.default = fa.text_response("the answer")
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            await ws.send_json({"type": "chat.send", "id": "r1", "content": "keep me"})
            frames = [await ws.receive_json(timeout=30)]
            while frames[-1]["type"] not in ("chat.stream.end", "error"):
                frames.append(await ws.receive_json(timeout=30))
            assert frames[-1]["type"] == "chat.stream.end", frames[-1]
            session_id = frames[0]["sessionId"]
            await ws.close()
        await server.kill()
    finally:
        await server.aclose()
    # What the disk may keep: the journal without the filed mark (written after the file's sync), the file's name
    # with the start of its first write only (its first line whole, or cut inside it).
    path = data_dir / "sessions" / JOURNAL_NAME
    mark = json.dumps({"filed": session_id}, separators=(",", ":")).encode() + b"\n"
    assert mark in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(mark, b""))
    session_file = data_dir / "sessions" / f"{session_id}.jsonl"
    lines = session_file.read_bytes().splitlines(keepends=True)
    session_file.write_bytes(b"".join(lines[:kept_lines]) + lines[kept_lines][:20])

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(f"{restarted.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 200, await resp.text()
                messages = (await resp.json())["session"]["messages"]
            assert [(m["role"], m["content"]) for m in messages] == [("user", "keep me")]
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                assert (await resp.json())["damagedFiles"] == []
    finally:
        await restarted.aclose()
    assert [p.name for p in (data_dir / "sessions").iterdir() if ".damaged-" in p.name] == []
