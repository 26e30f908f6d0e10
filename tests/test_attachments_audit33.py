"""Images and documents tried from outside once more (audit 33), in what a ``useChat`` app does every day."""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.fakes import openai_upstream as fo
from tests.fakes.anthropic_upstream import text_response
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import chat, connect
from tests.test_attachments import blocks, data_url, file_message, gateway, pdf, png

__all__ = ["gateway"]  # the fixture: each test on both storage backends


def errors(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]


async def test_regenerating_an_answer_to_a_file_does_not_count_the_file_twice(
    gateway: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # useChat's regenerate() sends the question again with its file; the session holds that file already. It
    # was counted twice against max_session_bytes (and Claude's 32 MB), so a file of more than half the limit
    # could be asked about once and never again.
    document = pdf(1) + b"%" * 6000
    client = await gateway(attachments={"max_session_bytes": 10_000})
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


async def test_a_21st_image_is_refused_when_a_claude_call_would_carry_one_over_2000_pixels(
    gateway: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # Claude takes 8000 px a side, but at most 2000 when a request holds more than 20 images ("Vision", General
    # limits). A session's 21st image made every later call (each resends them all) fail with a 400 upstream
    # when one was a wide screenshot; now the image that would do it is refused before it is stored.
    client = await gateway()
    fake_anthropic.enqueue(text_response("Twenty."), text_response("Still twenty."))
    wide = ("image/png", png(2100, 4))
    twenty = file_message("look", wide, *[("image/png", png(8, 8, seed=i)) for i in range(19)])
    assert not errors(await read_all(await post_chat(client, auth_headers, "many", twenty)))
    one_more = file_message("and this", ("image/png", png(8, 8, seed=99)), id="u2")
    resp = await post_chat(client, auth_headers, "many", one_more)
    assert resp.status == 400, await resp.text()
    message = (await resp.json())["error"]["message"]
    assert "'f0' is 2100 x 4 pixels" in message and "21" in message, message
    assert len(fake_anthropic.requests) == 1
    # Text goes on as before (the session's 20 images are sent as they were).
    text = {"id": "u3", "role": "user", "parts": [{"type": "text", "text": "thanks"}]}
    assert not errors(await read_all(await post_chat(client, auth_headers, "many", text)))
    assert len(blocks(fake_anthropic.requests[1], "image")) == 20
    # All 21 in one message: refused before anything is stored.
    resp = await post_chat(client, auth_headers, "many2", file_message("all", wide, *[("image/png", png(8, 8))] * 20))
    assert resp.status == 400, await resp.text()
    assert (await client.get("/api/sessions/many2", headers=auth_headers)).status == 404
    # The same as earlier messages of a new chat (useChat resends the conversation; the gateway imports it).
    answer = {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "Twenty."}]}
    resp = await client.post(
        "/api/chat",
        json={"id": "many3", "messages": [twenty, answer, one_more], "trigger": "submit-message"},
        headers=auth_headers,
    )
    assert resp.status == 400, await resp.text()
    assert "'f0' is 2100 x 4 pixels" in (await resp.json())["error"]["message"]
    assert len(fake_anthropic.requests) == 2


async def test_files_past_the_history_limit_no_longer_bind_the_session_to_models_that_read_them(
    make_client: Any, token: str, fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    # [chat] history_limit leaves a long session's oldest turns out of every call, and their files with them; the
    # checks of what a call resends still counted those files (here: a text-only model was refused for an image
    # no call sends any more).
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}}, chat={"history_limit": 2})
    fake_anthropic.enqueue(text_response("A square."), text_response("Later."))
    ws = await connect(client, token)
    data = base64.b64encode(png(16, 16)).decode()
    frames = await chat(ws, "Describe it", "r1", attachments=[{"mediaType": "image/png", "data": data}])
    session_id = frames[0]["sessionId"]
    assert (await chat(ws, "And then?", "r2", sessionId=session_id))[-1]["type"] == "chat.stream.end"
    fake_openai.enqueue(fo.text_response("Text only."))
    frames = await chat(ws, "Go on", "r3", sessionId=session_id, model="openai/gpt-3.5-turbo")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    [request] = fake_openai.requests
    assert "image_url" not in json.dumps(request.body)
    await ws.close()
