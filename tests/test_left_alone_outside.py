"""What the last stop noticed and left alone (docs/sessions.md, docs/clients.md), tried from outside: a session's
message count after a regenerate, on both storage backends; the damaged files a search could not read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from tests.support.ws import connect, receive_after
from tests.test_audit28s_outside import ui_chat, use_chat_turns, user


@pytest.mark.parametrize("backend", ["tinydb", "postgres"])
async def test_the_message_count_is_of_the_messages_the_conversation_shows(
    make_client: Any, auth_headers: dict[str, str], request: pytest.FixtureRequest, backend: str
) -> None:
    """A regenerate sets the answer it replaces aside (kept, billed, shown nowhere): the listing and the session
    counted it, so the sidebar said 5 messages beside a conversation of 4."""
    storage: dict[str, Any] = {"backend": backend}
    if backend == "postgres":
        storage["dsn"] = request.getfixturevalue("pg_dsn")
    client = await make_client(storage=storage)
    messages = await use_chat_turns(client, auth_headers, "regen", ["First question", "Second question"])
    body = {"id": "regen", "messages": messages[:-1], "trigger": "regenerate-message", "messageId": "x"}
    await ui_chat(client, auth_headers, body)

    session = (await (await client.get("/api/sessions/regen", headers=auth_headers)).json())["session"]
    assert len(session["messages"]) == 4 and session["messageCount"] == 4
    listed = (await (await client.get("/api/sessions", headers=auth_headers)).json())["sessions"]
    assert [s["messageCount"] for s in listed] == [4]
    if backend == "tinydb":  # the CLI reads the data directory (the postgres one: the database, as the server)
        result = CliRunner().invoke(cli, ["sessions", "list", "--json"])
        assert [s["messageCount"] for s in json.loads(result.output)] == [4], result.output


async def test_a_search_names_the_session_files_it_could_not_read_as_the_listing_does(
    client: Any, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """Search results always said ``damagedFiles: []``: a session damaged outside agentspace was silently not
    searched. They name the files the search could not read (a file that does not parse, a copy moved aside),
    as the listing does."""
    await ui_chat(client, auth_headers, {"id": "good", "messages": [user("u1", "find the WORD")]})
    sessions = isolated_env / "sessions"
    (sessions / "s_bad.jsonl").write_bytes(b"garbage: the WORD\n")  # damaged outside agentspace
    (sessions / "s_old.jsonl.damaged-20261201T000000Z").write_bytes(b"moved aside before\n")
    damaged = [str(sessions / "s_bad.jsonl"), str(sessions / "s_old.jsonl.damaged-20261201T000000Z")]

    listing = await (await client.get("/api/sessions", headers=auth_headers)).json()
    found = await (await client.get("/api/sessions?q=word", headers=auth_headers)).json()
    assert sorted(listing["damagedFiles"]) == sorted(found["damagedFiles"]) == damaged
    assert [s["id"] for s in found["sessions"]] == ["good"] and found["more"] is False
    again = await (await client.get("/api/sessions?q=word", headers=auth_headers)).json()  # the index warm
    assert sorted(again["damagedFiles"]) == damaged

    result = CliRunner().invoke(cli, ["sessions", "search", "word"])  # the CLI warns, as its list does
    assert "good" in result.stdout and "2 damaged file(s)" in result.stderr, result.output

    ws = await connect(client, token)
    reply = await receive_after(ws, {"type": "session.list", "id": "r1", "query": "word"})
    assert sorted(reply["damagedFiles"]) == damaged and [s["id"] for s in reply["sessions"]] == ["good"]
    await ws.close()
