"""Sessions changed from outside the server that has them cached (docs/sessions.md, docs/architecture.md): the
CLI deleting one while its answer streams, a session file restored from a copy or appended to by another
program, a torn last line. Through the real app (WebSocket, HTTP), the CLI and the fake upstream."""

from __future__ import annotations

import asyncio
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
from tests.support.ui_stream import DONE, next_chunk, post_chat, read_all, user
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


async def test_one_session_three_clients_at_once_then_abort_and_ask_again(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    ws1, ws2 = await connect(client, token), await connect(client, token)
    session_id = (await chat(ws1, "first question"))[0]["sessionId"]
    fake_anthropic.default = fa.text_response("a slow answer", chunks=5).with_delay(0.05)

    async def over_http() -> tuple[int, str]:
        resp = await post_chat(client, auth_headers, session_id, user("from the web app", "u9"))
        return resp.status, (await resp.json())["error"]["code"] if resp.status != 200 else ""

    # Two sockets and the web app's transport send at once: one turn streams, the others are refused.
    one, two, web = await asyncio.gather(
        chat(ws1, "one", "a", sessionId=session_id), chat(ws2, "two", "b", sessionId=session_id), over_http()
    )
    ends = [one[-1], two[-1]]
    assert sorted(f["type"] for f in ends) == ["chat.stream.end", "error"] and web == (409, "STREAM_IN_PROGRESS")
    [winner] = [f for f in ends if f["type"] == "chat.stream.end"]
    assert [f["code"] for f in ends if f["type"] == "error"] == ["STREAM_IN_PROGRESS"]
    asked = "one" if winner["requestId"] == "a" else "two"
    assert (await shown(client, auth_headers, session_id))[2:] == [asked, "a slow answer"]
    assert len(await records_of(client, session_id)) == 2

    # Stop, then the next question at once (the client does not wait for the stopped answer's end).
    fake_anthropic.default = fa.text_response("a long answer in many small pieces", chunks=20).with_delay(0.1)
    await ws1.send_json({"type": "chat.send", "id": "c", "content": "to be stopped", "sessionId": session_id})
    while (await receive(ws1))["type"] != "chat.stream.delta":
        pass
    await ws1.send_json({"type": "chat.abort", "id": "stop", "requestId": "c"})
    fake_anthropic.default = fa.text_response("the next answer")
    await ws1.send_json({"type": "chat.send", "id": "d", "content": "right after", "sessionId": session_id})
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error") or frames[-1]["requestId"] != "d":
        frames.append(await receive(ws1))
    ends = [(f["type"], f["requestId"], f.get("finishReason")) for f in frames if f["type"] != "chat.stream.delta"]
    assert ends == [
        ("chat.stream.end", "c", "aborted"),
        ("chat.stream.start", "d", None),
        ("chat.stream.end", "d", "stop"),
    ], frames
    stored = await shown(client, auth_headers, session_id)
    assert stored[4] == "to be stopped" and stored[6:] == ["right after", "the next answer"]
    assert len(await records_of(client, session_id)) == 4

    # The web app's stop (DELETE /api/chat/{id}/stream), then its next question at once.
    fake_anthropic.default = fa.text_response("a long answer in many small pieces", chunks=20).with_delay(0.1)
    resp = await post_chat(client, auth_headers, session_id, user("to be stopped too", "u10"))
    assert resp.status == 200
    while (await next_chunk(resp)).get("type") != "text-delta":
        pass
    stop = await client.delete(f"/api/chat/{session_id}/stream", headers=auth_headers)
    assert stop.status == 204
    fake_anthropic.default = fa.text_response("the last answer")
    again = await post_chat(client, auth_headers, session_id, user("and again", "u11"))
    assert again.status == 200, await again.text()
    assert any(c != DONE and c["type"] == "finish" for c in await read_all(again))
    stored = await shown(client, auth_headers, session_id)
    assert stored[8] == "to be stopped too" and stored[10:] == ["and again", "the last answer"]
    assert len(await records_of(client, session_id)) == 6
    await ws1.close()
    await ws2.close()


async def test_search_over_long_sessions_keeps_its_text_within_its_bound(
    client: TestClient, auth_headers: dict[str, str], monkeypatch: Any
) -> None:
    from agentspace.storage import search

    monkeypatch.setattr(search, "INDEX_BYTES", 20_000)
    sessions = client.server.app[STATE.REGISTRY].sessions
    for k in range(10):  # 5 KB each: the bound keeps about four
        messages = [{"role": "user", "content": f"common words {k} " + "filler " * 700}]
        messages.append({"role": "assistant", "content": f"the needle{k} is HERE"})
        await sessions.create(model="anthropic/claude-sonnet-4-5", session_id=f"s_long{k}", messages=messages)

    async def found(query: str) -> list[tuple[str, str]]:
        resp = await client.get("/api/sessions", params={"q": query}, headers=auth_headers)
        assert resp.status == 200
        return [(s["id"], s["match"]) for s in (await resp.json())["sessions"]]

    for _ in range(2):  # the first search builds the index, the second uses it
        hits = await found("COMMON WORDS")
        assert sorted(session_id for session_id, _ in hits) == [f"s_long{k}" for k in range(10)]
        [(session_id, match)] = await found("needle7")
        assert session_id == "s_long7" and match.endswith("filler the needle7 is HERE")
    index = search._INDEXES[sessions]
    kept = [entry.text for entry in index.values() if entry.text is not None]
    assert sum(map(len, kept)) <= 20_000 and 0 < len(kept) < 10  # the rest is read by each search

    # A session the index does not keep still shows its newest message at once.
    [dropped] = [session_id for session_id, entry in index.items() if entry.text is None][:1]
    await sessions.append_message(dropped, {"role": "user", "content": "a fresh Word"})
    [(session_id, match)] = await found("fresh word")
    assert session_id == dropped and match.endswith("the needle" + dropped[-1] + " is HERE a fresh Word")


async def test_a_damaged_session_is_moved_aside_and_its_id_is_free_once_the_copy_is_removed(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    ws = await connect(client, token)
    good = (await chat(ws, "a good session"))[0]["sessionId"]
    sessions = isolated_env / "sessions"
    (sessions / "s_bad.jsonl").write_bytes(b"garbage\n")  # damaged outside agentspace

    async def listed() -> tuple[list[str], list[str]]:
        body = await (await client.get("/api/sessions", headers=auth_headers)).json()
        return [s["id"] for s in body["sessions"]], body["damagedFiles"]

    assert await listed() == ([good], [str(sessions / "s_bad.jsonl")])
    resp = await client.get("/api/sessions/s_bad", headers=auth_headers)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "SESSION_DAMAGED"
    [moved] = [p for p in sessions.iterdir() if ".damaged-" in p.name]
    assert await listed() == ([good], [str(moved)])
    reply = (await chat(ws, "hello?", "r2", sessionId="s_bad"))[-1]
    assert reply["code"] == "SESSION_DAMAGED"  # still damaged while its copy is there, not a new session

    # The user inspected the copy and took it away: the running server sees the id free at once.
    moved.rename(isolated_env / moved.name)
    assert await listed() == ([good], [])
    resp = await client.get("/api/sessions/s_bad", headers=auth_headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "SESSION_NOT_FOUND"
    resp = await post_chat(client, auth_headers, "s_bad", user("a new start"))
    assert resp.status == 200 and any(c != DONE and c["type"] == "finish" for c in await read_all(resp))
    assert await shown(client, auth_headers, "s_bad") == ["a new start", fa.DEFAULT_TEXT]
    assert on_disk("s_bad") == ["a new start", fa.DEFAULT_TEXT]
    await ws.close()
