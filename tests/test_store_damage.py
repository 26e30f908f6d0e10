"""Damaged store files (issue 15, items 1-3): the gateway keeps counting, listings skip and name what is
damaged, a damaged session answers SESSION_DAMAGED on every transport, truncation is never silent, and a
failed write raises StorageError and leaves the store usable. Through the real app (WebSocket, HTTP), the CLI
and, for full disks, a child process with a real file-size limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import SessionStore, UsageStore
from agentspace.storage.embedded.usage import write_segment
from agentspace.transports import state as STATE
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso
from tests.support.ui_stream import post_chat, user
from tests.support.ws import chat, connect, receive_after


def record(n: int) -> dict[str, Any]:
    return UsageRecord(
        f"seed{n}",
        now_iso(),
        "anthropic/claude-sonnet-4-5",
        "anthropic",
        "s_seed",
        "test",
        TokenUsage(10, 5),
        Cost(0.001, 0.002),
        1.0,
        "stop",
    ).to_dict()


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def damaged_copies(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if ".damaged-" in p.name)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


async def test_a_damaged_usage_segment_does_not_stop_counting(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, caplog: Any
) -> None:
    write_segment(isolated_env, today(), 0, [record(n) for n in range(3)])
    segment = isolated_env / "usage" / today() / "00000.json"
    raw = bytearray(segment.read_bytes())
    colon = raw.index(b'":', len(raw) // 2) + 1
    raw[colon] ^= 0x01  # one flipped byte inside the segment (":" becomes ";")
    segment.write_bytes(bytes(raw))

    ws = await connect(client, token)
    for i in range(20):
        assert (await chat(ws, f"question {i}", f"r{i}"))[-1]["type"] == "chat.stream.end"
    # The damaged segment was moved aside (kept), logged once with its path, and writing went on afresh.
    [moved] = damaged_copies(isolated_env / "usage")
    assert moved.name.startswith("00000.json.damaged-") and moved.read_bytes() == bytes(raw)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and str(moved) in r.getMessage()]
    assert len(errors) == 1
    assert len(await client.server.app[STATE.REGISTRY].usage.records()) == 20

    resp = await client.get("/api/usage", headers=auth_headers)
    assert resp.status == 200
    report = await resp.json()
    assert report["grandTotal"]["requestCount"] == 20 and report["damagedFiles"] == [str(moved)]
    reply = await receive_after(ws, {"type": "usage.query", "id": "u1"})
    assert reply["grandTotal"]["requestCount"] == 20 and reply["damagedFiles"] == [str(moved)]
    await ws.close()

    text = invoke("usage")
    assert text.exit_code == 0, text.output
    assert "warning: 1 damaged usage file(s) not counted" in text.stderr and str(moved) in text.stderr
    assert "TOTAL" in text.stdout
    as_json = invoke("usage", "--json")
    assert as_json.exit_code == 0
    data = json.loads(as_json.stdout)
    assert data["grandTotal"]["requestCount"] == 20 and data["damagedFiles"] == [str(moved)]


async def test_damage_to_the_segment_being_written_is_moved_aside_before_the_next_record(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, caplog: Any
) -> None:
    """A line of junk added, or the segment cut mid-line, from outside while the server writes it: the next
    record goes to a fresh segment, not after the damage (where every record written since would go uncounted,
    in the reports and in every budget, with the segment)."""
    ws = await connect(client, token)
    for i in range(2):
        assert (await chat(ws, f"question {i}", f"r{i}"))[-1]["type"] == "chat.stream.end"
    segment = isolated_env / "usage" / today() / "00000.jsonl"
    with open(segment, "ab") as f:
        f.write(b"not a record\n")
    for i in range(2, 4):
        assert (await chat(ws, f"question {i}", f"r{i}"))[-1]["type"] == "chat.stream.end"
    [moved] = damaged_copies(isolated_env / "usage")
    assert moved.name.startswith("00000.jsonl.damaged-")
    os.truncate(segment, segment.stat().st_size - 5)  # the last record cut mid-line
    for i in range(4, 7):
        assert (await chat(ws, f"question {i}", f"r{i}"))[-1]["type"] == "chat.stream.end"
    await ws.close()
    resp = await client.get("/api/usage", headers=auth_headers)
    report = await resp.json()
    # The two records set aside with the junk are named, not counted; of the five written after it, the one cut
    # short is lost, the other four (the three written after the cut among them) counted.
    assert report["grandTotal"]["requestCount"] == 4 and report["damagedFiles"] == [str(moved)]
    assert any("changed from outside the server" in r.getMessage() for r in caplog.records)


async def test_a_damaged_segment_found_by_readers_is_reported_before_the_writer_moves_it(
    client: TestClient, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    write_segment(isolated_env, "2026-01-01", 0, [record(n) for n in range(300)])
    write_segment(isolated_env, "2026-01-02", 0, [record(n) for n in range(2)])
    truncated = isolated_env / "usage" / "2026-01-01" / "00000.json"
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) * 9 // 10])  # truncated mid-way: not 274 of 300 records, silently
    resp = await client.get("/api/usage", headers=auth_headers)
    report = await resp.json()
    assert resp.status == 200 and report["grandTotal"]["requestCount"] == 2
    assert report["damagedFiles"] == [str(truncated)]
    result = invoke("usage", "--by-day", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["damagedFiles"] == [str(truncated)]
    assert str(truncated) in result.stderr


async def test_one_bad_file_does_not_break_a_listing(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    good = (await chat(ws, "a good session"))[0]["sessionId"]
    sessions = isolated_env / "sessions"
    (sessions / "notes.json").write_text('{"my": "notes"}')  # a stray file
    (sessions / "s_empty.json").write_bytes(b"")
    (sessions / "s_bad.json").write_bytes(b"\x00\xffgarbage")
    (sessions / f"{good}.meta.json").write_bytes(b"garbage")  # an earlier version's summary copy: ignored
    expected = [str(sessions / name) for name in ("notes.json", "s_bad.json", "s_empty.json")]

    resp = await client.get("/api/sessions", headers=auth_headers)
    body = await resp.json()
    assert resp.status == 200 and [s["id"] for s in body["sessions"]] == [good]
    assert body["damagedFiles"] == expected
    reply = await receive_after(ws, {"type": "session.list", "id": "l1"})
    assert [s["id"] for s in reply["sessions"]] == [good] and reply["damagedFiles"] == expected
    listed = invoke("sessions", "list")
    assert listed.exit_code == 0, listed.output
    assert good in listed.stdout and "warning: 3 damaged file(s)" in listed.stderr
    assert json.loads(invoke("sessions", "list", "--json").stdout)[0]["id"] == good

    # Chatting to a damaged session: a clear error, the socket stays usable, the file is moved aside (kept).
    reply = (await chat(ws, "hello?", "r2", sessionId="s_bad"))[-1]
    assert reply["type"] == "error" and reply["code"] == "SESSION_DAMAGED" and reply["requestId"] == "r2"
    assert not (sessions / "s_bad.json").exists()
    [moved] = damaged_copies(sessions)
    assert moved.name.startswith("s_bad.json.damaged-") and moved.read_bytes() == b"\x00\xffgarbage"
    reply = (await chat(ws, "again?", "r3", sessionId="s_bad"))[-1]  # still damaged, not a new session
    assert reply["code"] == "SESSION_DAMAGED"
    assert (await chat(ws, "still fine", "r4", sessionId=good))[-1]["type"] == "chat.stream.end"
    await ws.close()

    resp = await client.get("/api/sessions/s_bad", headers=auth_headers)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "SESSION_DAMAGED"
    resp = await post_chat(client, auth_headers, "s_empty", user("hi"))
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "SESSION_DAMAGED"
    shown = invoke("sessions", "show", "s_bad")
    assert shown.exit_code == 1 and "damaged" in shown.output and "Traceback" not in shown.output
    body = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert str(moved) in body["damagedFiles"]


async def test_a_truncated_session_is_moved_aside_not_served_in_part(
    client: TestClient, token: str, isolated_env: Path
) -> None:
    store = SessionStore(isolated_env)
    await store.create(
        model="anthropic/claude-sonnet-4-5",
        session_id="s_long",
        messages=[
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "text " * 20}
            for i in range(20)
        ],
    )
    await store.aclose()
    path = isolated_env / "sessions" / "s_long.jsonl"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])

    result = invoke("sessions", "show", "s_long")  # the CLI reads it: an error, not 10 of 20 messages
    assert result.exit_code == 1 and "damaged" in result.output
    # A reader moves nothing: it says the file is where it was, not that it was moved aside.
    assert "kept as it is (run: agentspace doctor)." in result.output and "moved aside" not in result.output
    assert path.exists()
    ws = await connect(client, token)
    reply = (await chat(ws, "more", sessionId="s_long"))[-1]
    assert reply["code"] == "SESSION_DAMAGED"
    await ws.close()
    [moved] = damaged_copies(isolated_env / "sessions")
    assert moved.read_bytes() == raw[: len(raw) // 2]  # kept as it was found


# A child process with a real file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so writes past it fail with
# EFBIG): the stores raise StorageError, keep what they stored, and the same write succeeds once there is room.
FULL_DISK = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from agentspace.errors import StorageError
from agentspace.storage import SessionStore, UsageStore
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso

data_dir = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)


def record(n):
    return UsageRecord(f"u{n}", now_iso(), "m", "p", "s1", "c", TokenUsage(1, 1), Cost(), 1.0, "stop")


async def main():
    sessions, usage = SessionStore(data_dir), UsageStore(data_dir, segment_size=10_000)
    await sessions.create(model="m", session_id="s1")
    await usage.append(record(0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))  # the disk is full from here on
    out = {"usage": 1, "messages": 0}
    for n in range(1, 1000):
        try:
            await usage.append(record(n))
            out["usage"] += 1
        except StorageError as e:
            out["usage_error"] = [e.code, e.message]
            break
    for n in range(1000):
        try:
            await sessions.append_message("s1", {"id": f"m{n}", "role": "user", "content": "x" * 500})
            out["messages"] += 1
        except StorageError as e:
            out["message_error"] = [e.code, e.message]
            break
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again: the failed writes are retried
    await usage.append(record(out["usage"]))
    await sessions.append_message("s1", {"id": f"m{out['messages']}", "role": "user", "content": "x" * 500})
    await usage.append(record(out["usage"]))  # a retry of a write that did land: not stored twice
    await usage.aclose()
    await sessions.aclose()
    print(json.dumps(out))


asyncio.run(main())
"""


def test_a_failed_write_raises_storage_error_and_the_store_stays_usable(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["usage_error"][0] == "STORAGE_ERROR" and "too large" in out["usage_error"][1]
    assert out["message_error"][0] == "STORAGE_ERROR"
    stored_usage = [r["id"] for r in UsageStore(tmp_path).records_sync()]
    assert stored_usage == [f"u{n}" for n in range(out["usage"] + 1)]  # the acknowledged ones, then the retry
    session = SessionStore(tmp_path).get_sync("s1")
    assert session is not None
    assert [m["id"] for m in session["messages"]] == [f"m{n}" for n in range(out["messages"] + 1)]
    assert session["messageCount"] == out["messages"] + 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_doctor_checks_store_files_and_secrets(isolated_env: Path) -> None:
    assert invoke("token").exit_code == 0  # creates the gateway token (0600)
    assert CliRunner().invoke(cli, ["keys", "add", "anthropic"], input="sk-ant-doctor-0000\n").exit_code == 0
    write_segment(isolated_env, "2026-01-01", 0, [record(n) for n in range(3)])
    clean = invoke("doctor")
    assert clean.exit_code == 0, clean.output
    assert "usage: 3 records readable, 0 damaged" in clean.output and "No problems found" in clean.output

    (isolated_env / "sessions").mkdir(exist_ok=True)
    (isolated_env / "sessions" / "s_bad.json").write_text("{")
    segment = isolated_env / "usage" / "2026-01-01" / "00000.json"
    segment.write_bytes(segment.read_bytes()[:-10])
    (isolated_env / "keys.json").write_text("not json")
    os.chmod(isolated_env / "keys.json", 0o644)
    (isolated_env / "gateway-token").write_bytes(b"\xff\xfe")
    result = invoke("doctor")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{isolated_env / 'sessions' / 's_bad.json'}: damaged session file" in result.output
    assert f"{segment}: damaged usage segment" in result.output
    assert f"{isolated_env / 'keys.json'}: not valid JSON" in result.output
    assert f"{isolated_env / 'keys.json'}: mode 0644" in result.output
    assert f"{isolated_env / 'gateway-token'}: not UTF-8" in result.output
    assert "5 problem(s)" in result.output


def test_doctor_checks_the_data_directory_the_config_names(isolated_env: Path, tmp_path: Path) -> None:
    # The damage warning of `usage --config FILE` says "see: agentspace doctor": the same --config (or
    # --data-dir) must check that data directory, not the default one.
    data_dir = tmp_path / "elsewhere"
    write_segment(data_dir, "2026-01-01", 0, [record(n) for n in range(3)])
    segment = data_dir / "usage" / "2026-01-01" / "00000.json"
    segment.write_bytes(segment.read_bytes()[:-10])
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\ndata_dir = "{data_dir}"\n')
    for args in (["doctor", "--config", str(config)], ["doctor", "--data-dir", str(data_dir)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert f"{segment}: damaged usage segment" in result.output and f"problem(s) in {data_dir}" in result.output


def test_doctor_on_a_postgres_gateway_does_not_count_the_empty_files(isolated_env: Path, tmp_path: Path) -> None:
    # With the postgres backend the sessions, usage and clients are in the database: the data directory's
    # (absent) store files are not "0 sessions, 0 records, 0 clients", which reads as if everything were lost.
    data_dir = tmp_path / "data"
    config = tmp_path / "agentspace.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data_dir}"\nbackend = "postgres"\n'
        'dsn = "postgresql://agentspace:PASSWORD@127.0.0.1:1/agentspace"\n'
    )
    result = CliRunner().invoke(cli, ["doctor", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "sessions: 0 readable" not in result.output and "clients: 0 readable" not in result.output
    assert "in the postgres store" in result.output and "secrets: ok" in result.output
