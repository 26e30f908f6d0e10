"""What the last stop noticed and left alone (docs/sessions.md, docs/clients.md), tried from outside: a session's
message count after a regenerate, on both storage backends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from tests.test_audit28s_outside import ui_chat, use_chat_turns


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
