"""Sessions that last, tried from outside (issue 28): what a long session through the web app's (and
``useChat``'s default) transport and the inspector's prediction looked like to a user."""

from __future__ import annotations

import json
from typing import Any

from tests.test_prompt_cache import turn_text


def ui_text(raw: str) -> tuple[str, str]:
    """(the answer's message id, its text) from a UI message stream."""
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    message_id = next(c["messageId"] for c in chunks if c["type"] == "start")
    return message_id, "".join(c.get("delta", "") for c in chunks if c["type"] == "text-delta")


async def test_a_long_http_chat_that_resends_its_conversation_keeps_answering(
    make_client: Any, auth_headers: dict[str, str]
) -> None:
    """``useChat``'s default transport (and the web app) sends the whole conversation with every turn. Its text
    past ``[server] max_body_bytes`` made every later turn of the session a 413: the turns it resends are read
    only to create a session, so only the message answered keeps that limit."""
    limit = 64 * 1024
    client = await make_client(server={"max_body_bytes": limit})
    messages: list[dict[str, Any]] = []
    for turn in range(1, 13):  # 8 KB a turn: past the limit from the ninth
        messages.append({"id": f"u{turn}", "role": "user", "parts": [{"type": "text", "text": turn_text(turn, 8000)}]})
        body = {"id": "resent", "messages": messages, "trigger": "submit-message"}
        response = await client.post("/api/chat", json=body, headers=auth_headers)
        raw = await response.text()
        assert response.status == 200, (turn, len(json.dumps(body)), raw[:300])
        message_id, answer = ui_text(raw)
        messages.append({"id": message_id, "role": "assistant", "parts": [{"type": "text", "text": answer}]})
    assert len(json.dumps(messages)) > limit
    session = await (await client.get("/api/sessions/resent", headers=auth_headers)).json()
    assert len(session["session"]["messages"]) == 24

    # The message answered keeps the limit.
    big = {"id": "u-big", "role": "user", "parts": [{"type": "text", "text": "x" * (limit + 1)}]}
    response = await client.post("/api/chat", json={"id": "resent", "messages": [big]}, headers=auth_headers)
    assert response.status == 413 and (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
