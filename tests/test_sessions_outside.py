"""Sessions changed from outside the server that has them cached (docs/sessions.md, docs/architecture.md): the
CLI deleting one while its answer streams, a session file restored from a copy or appended to by another
program, a torn last line. Through the real app (WebSocket, HTTP), the CLI and the fake upstream."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.transports import state as STATE
from tests.fakes import anthropic_upstream as fa
from tests.support.ws import chat, connect, receive


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


async def records_of(client: TestClient, session_id: str) -> list[dict[str, Any]]:
    return await client.server.app[STATE.REGISTRY].usage.records(session_id=session_id)


async def shown(client: TestClient, headers: dict[str, str], session_id: str) -> list[str]:
    resp = await client.get(f"/api/sessions/{session_id}", headers=headers)
    assert resp.status == 200, await resp.text()
    return [m["content"] for m in (await resp.json())["session"]["messages"]]


def on_disk(session_id: str) -> list[str]:
    """The session as the CLI reads it from the data directory (no cache)."""
    result = invoke("sessions", "show", session_id, "--json")
    assert result.exit_code == 0, result.output
    return [m["content"] for m in json.loads(result.stdout)["messages"]]


def sent_texts(fake_anthropic: Any) -> list[str]:
    """The message texts of the upstream's last request (the turn's context)."""
    texts = []
    for m in fake_anthropic.requests[-1].body["messages"]:
        content = m["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts.append("".join(b.get("text", "") for b in blocks if b.get("type") == "text"))
    return texts


async def test_a_session_deleted_by_the_cli_while_its_answer_streams(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    session_id = (await chat(ws, "first question"))[0]["sessionId"]
    fake_anthropic.enqueue(fa.text_response("a slow answer in many pieces", chunks=10).with_delay(0.1))
    await ws.send_json({"type": "chat.send", "id": "r2", "content": "second", "sessionId": session_id})
    frames = [await receive(ws)]
    while frames[-1]["type"] != "chat.stream.delta":
        frames.append(await receive(ws))
    deleted = invoke("sessions", "delete", "--yes", session_id)  # the CLI does not know the server streams
    assert deleted.exit_code == 0, deleted.output
    while frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(await receive(ws))

    # The client is told what happened: not a full disk, not a write kept for a retry.
    end = frames[-1]
    assert end["type"] == "error" and end["code"] == "SESSION_NOT_FOUND" and end["requestId"] == "r2", end
    assert "deleted" in end["message"]
    registry = client.server.app[STATE.REGISTRY]
    assert len(registry.pending) == 0 and not registry.pending.holds(session_id)
    # The call is billed once; nothing recreated the session, and no door shows it.
    records = await records_of(client, session_id)
    assert len(records) == 2 and records[-1]["outputTokens"] > 0 and not records[-1].get("estimatedFields")
    assert not (isolated_env / "sessions" / f"{session_id}.jsonl").exists()
    resp = await client.get(f"/api/sessions/{session_id}", headers=auth_headers)
    assert resp.status == 404
    listing = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert listing["sessions"] == []
    found = await (await client.get("/api/sessions?q=first", headers=auth_headers)).json()
    assert found["sessions"] == []
    reply = (await chat(ws, "third", "r3", sessionId=session_id))[-1]
    assert reply["code"] == "SESSION_NOT_FOUND"
    await ws.close()


async def test_a_session_file_restored_from_a_copy_while_cached_is_read_again(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    session_id = (await chat(ws, "first question"))[0]["sessionId"]
    path = isolated_env / "sessions" / f"{session_id}.jsonl"
    backup = isolated_env / "backup.jsonl"
    shutil.copy2(path, backup)
    await chat(ws, "second question", "r2", sessionId=session_id)
    assert len(await shown(client, auth_headers, session_id)) == 4  # cached by the server now

    # Restored the way backup tools do it: a new file renamed over the old one.
    shutil.copy2(backup, isolated_env / "restore.tmp")
    os.replace(isolated_env / "restore.tmp", path)
    answer = fa.DEFAULT_TEXT
    assert await shown(client, auth_headers, session_id) == ["first question", answer]
    assert on_disk(session_id) == ["first question", answer]
    listing = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert listing["sessions"][0]["messageCount"] == 2

    # The next turn's context is the restored session, and its messages land in the file that is there.
    await chat(ws, "third question", "r3", sessionId=session_id)
    assert sent_texts(fake_anthropic) == ["first question", answer, "third question"]
    expected = ["first question", answer, "third question", answer]
    assert await shown(client, auth_headers, session_id) == expected
    assert on_disk(session_id) == expected
    await ws.close()


async def test_a_torn_line_added_while_cached_is_cut_before_the_next_write(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    session_id = (await chat(ws, "first question"))[0]["sessionId"]
    path = isolated_env / "sessions" / f"{session_id}.jsonl"
    with open(path, "ab") as f:  # another program's write cut short (a sync tool, a copy that stopped)
        f.write(b'{"message": {"role": "us')
    answer = fa.DEFAULT_TEXT
    assert await shown(client, auth_headers, session_id) == ["first question", answer]

    await chat(ws, "second question", "r2", sessionId=session_id)
    expected = ["first question", answer, "second question", answer]
    assert await shown(client, auth_headers, session_id) == expected
    # The file stays readable: the torn bytes were cut off, not written over (a later start would find damage).
    assert on_disk(session_id) == expected
    assert b'"role": "us' not in path.read_bytes()
    await ws.close()


async def test_a_session_file_with_a_torn_last_line_opens_with_everything_before_it(
    make_client: Any, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    first = await make_client()
    ws = await connect(first, token)
    session_id = (await chat(ws, "first question"))[0]["sessionId"]
    await chat(ws, "second question", "r2", sessionId=session_id)
    await ws.close()
    await first.close()
    path = isolated_env / "sessions" / f"{session_id}.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"message": {"id": "msg_x", "role": "user", "cont')  # a crash mid-line

    client = await make_client()
    answer = fa.DEFAULT_TEXT
    expected = ["first question", answer, "second question", answer]
    assert on_disk(session_id) == expected  # a reader ignores the torn line
    assert await shown(client, auth_headers, session_id) == expected
    assert path.read_bytes() == whole  # the writer cut it off
    listing = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert [s["id"] for s in listing["sessions"]] == [session_id] and listing["damagedFiles"] == []
    ws = await connect(client, token)
    await chat(ws, "third question", "r3", sessionId=session_id)
    assert sent_texts(fake_anthropic) == [*expected, "third question"]
    assert on_disk(session_id) == [*expected, "third question", answer]
    await ws.close()
