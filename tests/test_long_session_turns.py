"""A long session grown in short turns, as a coding agent grows one: each turn's context reuses what earlier turns
converted and counted (the session cache's messages keep their provider parts, ``context._segments``; counts are
remembered by text, ``tokens.count_tokens``). What the model is sent and what the inspector counts must be what a
fresh read of the session gives, turn after turn, and a message changed since must be sent and counted as it is
now. The real app over WebSocket and HTTP, against the fake Anthropic upstream."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from tests.fakes.anthropic_upstream import error_status, text_response, tool_use_response
from tests.support.ws import chat, connect
from tests.test_prompt_cache import turn_text
from tests.tool_plugins import WeatherTools

TURNS = 36
TOOL_TURNS = (8, 21)  # turns whose answer runs the tool loop: stored as one message of several roles' parts
# A tool loop whose second call fails: its answer ends with the tool's result, which the next turn's message joins
# (one user message of the result and the new text).
FAILED_TURN = 15


def content_of(turn: int) -> str:
    """Short and longer turns, some beyond ASCII (counted with the older encoding too, for reservations)."""
    text = turn_text(turn, (12, 200, 1000)[turn % 3])
    return text if turn % 4 else text + " — déjà vu, 東京"


def plain(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's messages without the cache marks (they move to the newest messages every turn)."""
    out = []
    for message in body["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out.append(
            {"role": message["role"], "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in blocks]}
        )
    return out


def read_again(path: Path) -> None:
    """Make the server read the session file again, as after a change from outside: same bytes, new mtime."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


async def inspect(client: TestClient, headers: dict[str, str], session_id: str, draft: str) -> dict[str, Any]:
    resp = await client.post(f"/api/sessions/{session_id}/context", json={"userMessage": draft}, headers=headers)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_every_turn_sends_and_counts_what_a_fresh_read_of_the_session_gives(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client: TestClient = await make_client(pm=pm, chat={"history_limit": 10_000})
    ws = await connect(client, token)
    session_id = ""
    previous: list[dict[str, Any]] = []
    for turn in range(1, TURNS + 1):
        if turn in TOOL_TURNS or turn == FAILED_TURN:
            fake_anthropic.enqueue(
                tool_use_response("get_weather", {"city": f"Paris {turn}"}, id=f"toolu_{turn}", text="Checking."),
                error_status(400) if turn == FAILED_TURN else text_response(f"Sunny, turn {turn}."),
            )
        else:
            fake_anthropic.enqueue(text_response(turn_text(1000 + turn, (30, 200, 600)[turn % 3])))
        requests_before = len(fake_anthropic.requests)
        frames = await chat(ws, content_of(turn), f"r{turn}", **({"sessionId": session_id} if session_id else {}))
        assert frames[-1]["type"] == ("error" if turn == FAILED_TURN else "chat.stream.end"), frames[-1]
        session_id = session_id or frames[0]["sessionId"]

        # The turn's first call sends the previous turn's last call unchanged, that call's answer and the new
        # message: nothing an earlier turn converted has changed or gone missing.
        sent = plain(fake_anthropic.requests[requests_before].body)
        new = {"type": "text", "text": content_of(turn)}
        if turn == 1:
            assert sent == [{"role": "user", "content": [new]}]
        elif turn == FAILED_TURN + 1:  # no answer after the tool's result: the new text joins it
            assert sent == [*previous[:-1], {"role": "user", "content": [*previous[-1]["content"], new]}]
        else:
            assert sent[: len(previous)] == previous, f"turn {turn}"
            assert len(sent) == len(previous) + 2 and sent[-1] == {"role": "user", "content": [new]}, f"turn {turn}"
        previous = plain(fake_anthropic.requests[-1].body)

        if turn % 9 == 0 or turn == TURNS:
            # The inspector's counts of the next call (sections, the calibrated total): the same from the messages
            # the turns converted and from the session read anew.
            path = isolated_env / "sessions" / f"{session_id}.jsonl"
            draft = content_of(turn + 1)
            warm = await inspect(client, auth_headers, session_id, draft)
            assert await inspect(client, auth_headers, session_id, draft) == warm
            read_again(path)
            assert await inspect(client, auth_headers, session_id, draft) == warm, f"turn {turn}"
            assert warm["totals"]["calibratedTokens"] > 0
    # Every answer recorded what its call sent as counted here (the inspector calibrates by it).
    resp = await client.get(f"/api/sessions/{session_id}", headers=auth_headers)
    answers = [m for m in (await resp.json())["session"]["messages"] if m["role"] == "assistant"]
    estimates = [m["lastCall"]["promptEstimate"] for m in answers]
    assert len(estimates) == TURNS and estimates == sorted(estimates) and len(set(estimates)) == TURNS
    await ws.close()


def append_write(path: Path, entry: dict[str, Any]) -> None:
    """Another program's write to the session file (another replica): one entry, then the summary closing it."""
    lines = path.read_bytes().splitlines()
    summary = json.loads(lines[-1])
    assert "session" in summary
    with open(path, "ab") as f:
        f.write(json.dumps(entry).encode() + b"\n" + lines[-1] + b"\n")


async def test_a_message_changed_since_a_turn_converted_it_is_sent_and_counted_as_it_is_now(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    client: TestClient = await make_client(chat={"history_limit": 10_000})
    ws = await connect(client, token)
    session_id = (await chat(ws, content_of(1)))[0]["sessionId"]
    for turn in range(2, 7):
        await chat(ws, content_of(turn), f"r{turn}", sessionId=session_id)
    path = isolated_env / "sessions" / f"{session_id}.jsonl"
    before = await inspect(client, auth_headers, session_id, "next")

    # Another replica changes the second turn's question and its answer (the turns have converted both).
    resp = await client.get(f"/api/sessions/{session_id}", headers=auth_headers)
    messages = (await resp.json())["session"]["messages"]
    question, answer = messages[2], messages[3]
    assert question["content"] == content_of(2)
    edited_answer = "An edited answer, longer than the one it replaces: " + turn_text(77, 300)
    edited = {"content": "An edited question.", "parts": [{"type": "text", "text": "An edited question."}]}
    append_write(path, {"update": {"id": question["id"], "changes": edited}})
    changes = {"content": edited_answer, "parts": [{"type": "text", "text": edited_answer}]}
    append_write(path, {"update": {"id": answer["id"], "changes": changes}})

    after = await inspect(client, auth_headers, session_id, "next")
    history = {s["name"]: s for s in after["sections"]}["history"]
    old_history = {s["name"]: s for s in before["sections"]}["history"]
    assert history["byteCount"] != old_history["byteCount"]
    assert history["tokenEstimate"] != old_history["tokenEstimate"]
    assert after["totals"]["calibratedTokens"] != before["totals"]["calibratedTokens"]
    read_again(path)
    assert await inspect(client, auth_headers, session_id, "next") == after

    frames = await chat(ws, "after the edit", "r7", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    sent = plain(fake_anthropic.requests[-1].body)
    assert sent[2]["content"] == [{"type": "text", "text": "An edited question."}]
    assert sent[3]["content"] == [{"type": "text", "text": edited_answer}]
    assert content_of(2) not in json.dumps(fake_anthropic.requests[-1].body, ensure_ascii=False)

    # Compaction marks a message (a new stored message): the next call's history starts after it.
    fake_anthropic.enqueue(text_response("SUMMARY OF THE FIRST TURNS"))
    resp = await client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers)
    assert resp.status == 200, await resp.text()
    frames = await chat(ws, "after the summary", "r8", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    body = fake_anthropic.requests[-1].body
    assert "SUMMARY OF THE FIRST TURNS" in json.dumps(body["system"])
    assert "An edited question." not in json.dumps(body["messages"])
    assert plain(body)[-1]["content"] == [{"type": "text", "text": "after the summary"}]
    await ws.close()
