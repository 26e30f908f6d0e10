"""Images and documents tried from outside once more (audit 33), in what a ``useChat`` app does every day."""

from __future__ import annotations

from typing import Any

from tests.fakes.anthropic_upstream import text_response
from tests.support.ui_stream import post_chat, read_all
from tests.test_attachments import blocks, data_url, file_message, pdf


def errors(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]


async def test_regenerating_an_answer_to_a_file_does_not_count_the_file_twice(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # useChat's regenerate() sends the question again with its file; the session holds that file already. It
    # was counted twice against max_session_bytes (and Claude's 32 MB), so a file of more than half the limit
    # could be asked about once and never again.
    document = pdf(1) + b"%" * 6000
    client = await make_client(attachments={"max_session_bytes": 10_000})
    fake_anthropic.enqueue(text_response("First."), text_response("Second."))
    question = file_message("Summarise", ("application/pdf", document))
    assert not errors(await read_all(await post_chat(client, auth_headers, "regen", question)))
    chunks = await read_all(await post_chat(client, auth_headers, "regen", question, trigger="regenerate-message"))
    assert not errors(chunks), chunks
    [sent] = blocks(fake_anthropic.requests[-1], "document")
    assert data_url("application/pdf", document).endswith(sent["source"]["data"])
    session = (await (await client.get("/api/sessions/regen", headers=auth_headers)).json())["session"]
    assert [(m["role"], len([p for p in m["parts"] if p["type"] == "file"])) for m in session["messages"]] == [
        ("user", 1),
        ("assistant", 0),
    ]
