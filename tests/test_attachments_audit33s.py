"""Images and documents in sessions tried from outside once more (audit 33s): what the OpenAPI document and the
web app promise for them."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes import openai_upstream as fo
from tests.fakes.anthropic_upstream import citations_response, error_status, text_response
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import chat, connect
from tests.test_attachments import file_message, png

PROTOCOL = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")


async def test_the_openapi_document_describes_file_parts_and_the_refusals_of_files(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # A client generated from the document (or a tester validating answers against it) met an undocumented 415
    # and file parts with fields the schemas did not name: the i33 additions were lost when the document became
    # agentspace/openapi.yaml.
    client: TestClient = await make_client(attachments={"max_file_bytes": 1000})
    doc = await (await client.get("/api/openapi.json", headers=auth_headers)).json()
    answers = doc["paths"]["/api/chat"]["post"]["responses"]

    resp = await post_chat(client, auth_headers, "bmp", file_message("look", ("image/bmp", b"BM" + b"\0" * 60)))
    assert resp.status == 415 and (await resp.json())["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert "UNSUPPORTED_MEDIA_TYPE" in answers["415"]["description"]
    resp = await post_chat(client, auth_headers, "big", file_message("look", ("image/png", png(200, 200))))
    assert resp.status == 413 and "max_file_bytes" in (await resp.json())["error"]["message"]
    assert "max_file_bytes" in answers["413"]["description"]
    row = next(line for line in PROTOCOL.splitlines() if line.startswith("| `POST /api/chat` |"))
    assert re.search(r"415 `UNSUPPORTED_MEDIA_TYPE`", row), row

    # The AI SDK's file part as sent, and the stored one as GET /api/sessions/{id} returns it.
    schemas = doc["components"]["schemas"]
    sent = schemas["UIMessage"]["properties"]["parts"]["items"]["properties"]
    assert {"type", "mediaType", "url", "filename"} <= set(sent), sent
    fake_anthropic.enqueue(text_response("A gradient."))
    await read_all(await post_chat(client, auth_headers, "pic", file_message("look", ("image/png", png(8, 8)))))
    session = (await (await client.get("/api/sessions/pic", headers=auth_headers)).json())["session"]
    [part] = [p for p in session["messages"][0]["parts"] if p["type"] == "file"]
    stored = schemas["Message"]["properties"]["parts"]["items"]["properties"]
    assert set(part) <= set(stored), (sorted(part), sorted(stored))
    # The inspector's attachments section, file by file.
    context = await (await client.get("/api/sessions/pic/context", headers=auth_headers)).json()
    [row] = [s for s in context["sections"] if s["name"] == "attachments"]
    section = schemas["ContextInspection"]["properties"]["sections"]["items"]["properties"]
    assert set(row) <= set(section), (sorted(row), sorted(section))
    assert set(row["files"][0]) <= set(section["files"]["items"]["properties"])


async def test_the_files_of_a_turn_the_upstream_refused_no_longer_bind_the_session(
    make_client: Any, token: str, fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    # A turn that failed before any output is resent by no later call (context.answered_turns), its files neither;
    # the checks of what a call resends still counted them: after the upstream refused an image, the session could
    # not go on with a model without vision ("does not take images"), for an image no call would send.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_anthropic.enqueue(error_status(400, "Could not process image"))
    ws = await connect(client, token)
    data = base64.b64encode(png(16, 16)).decode()
    frames = await chat(ws, "Describe it", "r1", attachments=[{"mediaType": "image/png", "data": data}])
    assert frames[-1]["type"] == "error" and "Could not process image" in frames[-1]["message"], frames[-1]
    session_id = frames[0]["sessionId"]
    fake_openai.enqueue(fo.text_response("Text only."))
    frames = await chat(ws, "Never mind; what is 2 + 2?", "r2", sessionId=session_id, model="openai/gpt-3.5-turbo")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    [request] = fake_openai.requests
    assert "image_url" not in json.dumps(request.body)
    await ws.close()


async def test_the_inspector_counts_an_image_as_a_high_resolution_claude_model_reads_it(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # Claude Opus 4.7 reads images up to 2576 px on the long side (about 3.75 megapixels), at (width x height) /
    # 750 tokens ("Vision"); the inspector scaled every image to 1568 px and 1,600 tokens, so it showed a Full HD
    # screenshot at 1,600 tokens where Opus 4.7 bills about 2,765.
    fake_anthropic.enqueue(text_response("A screenshot."))
    message = file_message("What is on screen?", ("image/png", png(1920, 1080)))
    await read_all(await post_chat(client, auth_headers, "hd", message))

    async def estimate(model: str) -> int:
        query = f"?model={model}"
        context = await (await client.get(f"/api/sessions/hd/context{query}", headers=auth_headers)).json()
        [row] = [s for s in context["sections"] if s["name"] == "attachments"]
        return int(row["files"][0]["tokenEstimate"])

    assert await estimate("anthropic/claude-opus-4-7") == round(1920 * 1080 / 750)
    # Other Claude models scale it to 1568 px on the long side, at most about 1,600 tokens.
    assert await estimate("anthropic/claude-sonnet-4-5") == 1600
    # Past 2576 px (or 3.75 megapixels) Opus 4.7 scales it down too.
    fake_anthropic.enqueue(text_response("A wide one."))
    wide = file_message("And this?", ("image/png", png(5152, 1000)), id="u2")
    await read_all(await post_chat(client, auth_headers, "hd", wide))
    context = await (
        await client.get("/api/sessions/hd/context?model=anthropic/claude-opus-4-7", headers=auth_headers)
    ).json()
    [row] = [s for s in context["sections"] if s["name"] == "attachments"]
    assert row["files"][1]["tokenEstimate"] == round(2576 * 500 / 750)


async def test_a_chat_started_from_the_stored_messages_goes_on_when_an_answer_cited_sources(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # docs/attachments.md: an app that starts useChat from GET /api/sessions/{id}'s messages shows the files
    # again after a reload. useChat sends those messages back with the next one, and an answer's stored sources
    # (parts of type "source") made every later turn of such an app a 400.
    fake_anthropic.enqueue(citations_response(), text_response("More."))
    question = file_message("Search for what this shows", ("image/png", png(8, 8)))
    await read_all(await post_chat(client, auth_headers, "reload", question))
    stored = (await (await client.get("/api/sessions/reload", headers=auth_headers)).json())["session"]["messages"]
    assert "source" in [p["type"] for p in stored[1]["parts"]]
    messages = [{"id": m["id"], "role": m["role"], "parts": m["parts"]} for m in stored]
    messages.append({"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Tell me more"}]})
    resp = await post_chat(client, auth_headers, "reload", *messages)
    assert resp.status == 200, await resp.text()
    chunks = await read_all(resp)
    assert not [c for c in chunks if isinstance(c, dict) and c["type"] == "error"], chunks
    request = fake_anthropic.requests[-1]
    assert [b["type"] for b in request.body["messages"][0]["content"]][:2] == ["text", "image"]
    assert request.body["messages"][-1]["content"][-1]["text"] == "Tell me more"
