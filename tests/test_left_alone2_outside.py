"""What the last closing note noticed and left alone, second round (docs/clients.md, docs/protocol.md, ...),
tried from outside: through the CLI, the HTTP routes and the WebSocket of the running app."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from tests.test_audit28s_outside import ui_chat, use_chat_turns
from tests.test_audit28s_outside import user as ui_user


def test_a_budget_of_minus_zero_is_shown_as_zero(isolated_env: Path) -> None:
    """``clients add --budget -0`` was stored as -0.0 and printed ``$-0.000000`` in every listing."""
    runner = CliRunner()
    added = runner.invoke(cli, ["clients", "add", "ann", "--budget", "-0"])
    assert added.exit_code == 0, added.output
    for args in (["clients", "list"], ["clients", "show", "ann"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "$0.000000 / $0.000000" in result.output and "$-" not in result.output, result.output
    shown = runner.invoke(cli, ["clients", "show", "ann", "--json"])
    assert json.loads(shown.output)["budget"]["usd"] == 0 and "-0.0" not in shown.output, shown.output


async def test_a_damaged_sessions_resume_is_a_204_for_every_caller(
    client: Any, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """``GET /api/chat/{id}/stream`` of a damaged session was a 409 for a client key and a 204 for the gateway
    token. Nothing streams in a session whose file cannot be read: a 204 for both (docs/protocol.md), which
    useChat's ``resume`` takes as "nothing to resume"; the next ``POST /api/chat`` says the session is damaged."""
    made = await client.post("/api/clients", json={"name": "ann"}, headers=auth_headers)
    ann = {"Authorization": f"Bearer {(await made.json())['key']}"}
    (isolated_env / "sessions").mkdir(parents=True, exist_ok=True)
    for headers in (ann, auth_headers, ann):
        (isolated_env / "sessions" / "s_bad.jsonl").write_bytes(b"garbage\n")  # damaged outside agentspace
        resumed = await client.get("/api/chat/s_bad/stream", headers=headers)
        assert resumed.status == 204, await resumed.text()


async def test_the_delete_prompt_counts_the_answers_set_aside_too(
    client: Any, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """``sessions delete`` asked "Delete session regen (4 messages)?" of a session that holds 5: the answer a
    regenerate set aside (kept, shown nowhere) is deleted too, and the prompt says so."""
    messages = await use_chat_turns(client, auth_headers, "regen", ["First question", "Second question"])
    body = {"id": "regen", "messages": messages[:-1], "trigger": "regenerate-message", "messageId": "x"}
    await ui_chat(client, auth_headers, body)

    declined = CliRunner().invoke(cli, ["sessions", "delete", "regen"], input="n\n")
    assert declined.exit_code == 1, declined.output  # aborted: nothing deleted
    assert "Delete session regen (4 messages shown, 1 set aside)?" in declined.output, declined.output
    listed = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert [s["id"] for s in listed["sessions"]] == ["regen"]


async def test_a_sessions_files_are_not_json_encoded(
    client: Any, auth_headers: dict[str, str], fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /api/sessions/{id}`` JSON-encoded every file's ``data:`` URL, holding the event loop (0.47 s for
    75 MB; on a worker thread too, since the encoder holds the GIL). Base64 needs no escaping: the URLs are
    spliced into the answer. Seen without timing: no ``json.dumps`` may be given a file's data while the
    session is read, on any thread (``json.dumps`` wrapped), nor aiohttp's own on the loop's (profiled: its
    ``json_response`` holds the function itself)."""
    raw = b"%PDF-1.4\n1 0 obj\n<< /Type /Page >>\nendobj\n%" + b"x" * 1_500_000 + b"\n%%EOF\n"
    url = "data:application/pdf;base64," + base64.b64encode(raw).decode()
    part = {"type": "file", "mediaType": "application/pdf", "url": url, "filename": "big.pdf"}
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Read this."}, part]}
    await ui_chat(client, auth_headers, {"id": "files", "messages": [message]})

    encoded: list[int] = []

    def longest_string(obj: Any) -> int:
        if isinstance(obj, str):
            return len(obj)
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        return max(map(longest_string, values), default=0)

    dumps = json.dumps

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is dumps.__code__:
            encoded.append(longest_string(frame.f_locals.get("obj")))

    def recorded(obj: Any, **kwargs: Any) -> str:
        encoded.append(longest_string(obj))
        return dumps(obj, **kwargs)

    monkeypatch.setattr(json, "dumps", recorded)
    sys.setprofile(profile)
    try:
        resp = await client.get("/api/sessions/files", headers=auth_headers)
        session = (await resp.json())["session"]
    finally:
        sys.setprofile(None)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json; charset=utf-8"
    (file,) = [p for m in session["messages"] for p in m["parts"] if p["type"] == "file"]
    assert file["url"] == url and file["filename"] == "big.pdf"
    assert [m["parts"][0]["text"] for m in session["messages"]][:1] == ["Read this."]
    assert encoded and max(encoded) < 1_000_000, f"a file's data went through json.dumps: {encoded}"


async def test_a_mistyped_model_is_answered_with_a_suggestion_the_client_may_use(
    client: Any, auth_headers: dict[str, str]
) -> None:
    """A client allowed only Claude Haiku that mistyped a bare id was told "Did you mean
    'anthropic/claude-sonnet-4-6'?", a model it may not use (a 403 next). The suggestion is of its own models;
    the gateway token's is of every model."""
    made = await client.post(
        "/api/clients", json={"name": "ann", "models": ["anthropic/claude-haiku-*"]}, headers=auth_headers
    )
    ann = {"Authorization": f"Bearer {(await made.json())['key']}"}

    async def refusal(headers: dict[str, str], path: str, model: str) -> str:
        body: dict[str, Any] = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        resp = await client.post(path, json=body, headers=headers)
        assert resp.status == 404, await resp.text()
        return str((await resp.json())["error"]["message"])

    for path in ("/v1/chat/completions", "/v1/messages"):
        assert "Did you mean 'anthropic/claude-sonnet-4-6'?" in await refusal(auth_headers, path, "claude-sonet-4-6")
        told = await refusal(ann, path, "claude-sonet-4-6")
        assert "Unknown model 'anthropic/claude-sonet-4-6'" in told and "sonnet" not in told, told
        told = await refusal(ann, path, "claude-haiku-4-55")
        assert "Did you mean 'anthropic/claude-haiku-4-5'?" in told, told
    # The chat APIs too: /api/chat answers before its stream starts.
    body = {"id": "c1", "model": "anthropic/claude-sonet-4-6", "messages": [ui_user("u1", "hi")]}
    resp = await client.post("/api/chat", json=body, headers=ann)
    assert resp.status == 400, await resp.text()
    told = (await resp.json())["error"]["message"]
    assert told.startswith("Unknown model 'anthropic/claude-sonet-4-6'") and "sonnet" not in told, told
