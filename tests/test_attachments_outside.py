"""Images and documents (docs/attachments.md) tried again from outside, in the combinations the first tests
(tests/test_attachments.py) left out: other models a turn may reach (fallbacks, a group's deployments), what
the errors name, fields given together."""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes import openai_upstream as fo
from tests.fakes.anthropic_upstream import error_status, text_response
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import chat, connect, receive
from tests.test_attachments import blocks, file_message, pdf, png

OPENAI_KEY = "sk-openai-test-0123456789"


async def with_openai(make_client: Any, fake_openai: Any, monkeypatch: Any, **sections: Any) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    client: TestClient = await make_client(
        providers={"openai": {"base_url": fake_openai.url}}, chat={"max_retries": 0}, **sections
    )
    return client


# --- a turn's other models must read its files too ----------------------------------------------


async def test_a_fallback_without_vision_is_skipped_not_sent_the_image(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    fallbacks = {"anthropic/claude-sonnet-4-5": ["openai/gpt-3.5-turbo"]}
    client = await with_openai(make_client, fake_openai, monkeypatch, models={"fallbacks": fallbacks})
    fake_anthropic.enqueue(error_status(529))
    fake_openai.enqueue(fo.text_response("I see no image."))
    resp = await post_chat(client, auth_headers, "fb", file_message("look", ("image/png", png(8, 8))))
    assert resp.status == 200
    chunks = await read_all(resp)
    # The fallback cannot read the image: it is not called (the upstream's failure is the answer).
    assert fake_openai.requests == []
    assert [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]
    # Text-only turns still fall back to it.
    fake_anthropic.enqueue(error_status(529))
    fake_openai.enqueue(fo.text_response("Hello."))
    resp = await post_chat(
        client, auth_headers, "text", {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    )
    await read_all(resp)
    assert len(fake_openai.requests) == 1


async def test_a_group_sends_files_only_to_its_deployments_that_read_them(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    deployments = [{"model": "openai/gpt-3.5-turbo"}, {"model": "anthropic/claude-sonnet-4-5"}]
    group = {"deployments": deployments, "strategy": "least-busy"}  # in order: gpt-3.5-turbo first
    blind = {"deployments": [{"model": "openai/gpt-3.5-turbo"}]}
    groups = {"mix": group, "blind": blind}
    client = await with_openai(make_client, fake_openai, monkeypatch, models={"groups": groups})
    fake_anthropic.enqueue(text_response("A gradient."))
    image = png(8, 8)
    resp = await post_chat(client, auth_headers, "gr", file_message("look", ("image/png", image)), model="mix")
    assert resp.status == 200
    await read_all(resp)
    assert fake_openai.requests == []
    [sent] = blocks(fake_anthropic.requests[0], "image")
    assert sent["source"]["data"] == base64.b64encode(image).decode()

    # A group none of whose deployments reads images is refused before anything is stored or sent.
    resp = await post_chat(client, auth_headers, "bl", file_message("look", ("image/png", image)), model="blind")
    assert resp.status == 400
    assert "does not take images" in (await resp.json())["error"]["message"]
    assert fake_openai.requests == [] and len(fake_anthropic.requests) == 1


# --- errors name the field the client sent ---------------------------------------------------------


async def test_an_empty_or_bad_data_url_names_the_url_field_of_the_file_part(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # The AI SDK's file part has no `data` field: its bytes are in `url`.
    for url, problem in [("data:image/png;base64,", "required"), ("data:image/png;base64,iVBO-w_", "base64")]:
        part = {"type": "file", "mediaType": "image/png", "filename": "a.png", "url": url}
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "look"}, part]}
        resp = await post_chat(client, auth_headers, "bad", message)
        assert resp.status == 400
        [field] = (await resp.json())["error"]["fields"]
        assert field["path"] == "messages[0].parts[1].url" and problem in field["message"], field
    assert fake_anthropic.requests == []


async def test_an_attachment_field_the_gateway_would_not_use_is_refused_by_name(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    data = base64.b64encode(png(8, 8)).decode()
    ws = await connect(client, token)
    # Both the bytes and a URL: one of them would be dropped unseen.
    frames = await chat(ws, "look", "r1", attachments=[{"mediaType": "image/png", "data": data, "url": "https://x/a"}])
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "INVALID_MESSAGE", frames[-1]
    assert "attachments[0].url" in frames[-1]["message"]
    # A filename that is not a string would be dropped too.
    frames = await chat(ws, "look", "r2", attachments=[{"mediaType": "image/png", "data": data, "filename": 7}])
    assert frames[-1]["type"] == "error" and "attachments[0].filename" in frames[-1]["message"], frames[-1]
    await ws.close()
    part = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64," + data, "filename": ["a"]}
    resp = await post_chat(client, auth_headers, "fn", {"id": "u1", "role": "user", "parts": [part]})
    assert resp.status == 400
    assert (await resp.json())["error"]["fields"][0]["path"] == "messages[0].parts[0].filename"
    assert fake_anthropic.requests == []


async def test_a_compacted_session_may_move_to_a_model_without_vision(
    make_client: Any, token: str, fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    # After a compaction no call sends the summarised turns' files again (the summary names them), so the model
    # that reads on need not read them: "the files would be resent" no longer holds.
    client = await with_openai(make_client, fake_openai, monkeypatch)
    fake_anthropic.enqueue(text_response("A square."), text_response("Later."), text_response("Summary."))
    ws = await connect(client, token)
    data = base64.b64encode(png(16, 16)).decode()
    frames = await chat(ws, "Describe it", "r1", attachments=[{"mediaType": "image/png", "data": data}])
    session_id = frames[0]["sessionId"]
    assert (await chat(ws, "And then?", "r2", sessionId=session_id))[-1]["type"] == "chat.stream.end"
    await ws.send_json({"type": "session.compact", "id": "c1", "sessionId": session_id})
    compacted = await receive(ws, 20)
    assert compacted["type"] == "session.compacted" and compacted["compacted"], compacted
    fake_openai.enqueue(fo.text_response("Text only."))
    frames = await chat(ws, "Go on", "r3", sessionId=session_id, model="openai/gpt-3.5-turbo")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    [request] = fake_openai.requests
    assert "image_url" not in json.dumps(request.body)
    await ws.close()


# --- Anthropic's own limits on an image --------------------------------------------------------------


async def test_an_image_over_anthropics_limits_is_refused_before_it_is_stored_and_resent_forever(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    # The Messages API refuses an image of more than 5 MB of base64 ("image exceeds 5 MB maximum") or more than
    # 8000 px on a side. Stored, such an image would be resent by every later turn: the session would fail for
    # good. Within [attachments] max_file_bytes (20 MiB), so only the model's limit can refuse it.
    client = await with_openai(make_client, fake_openai, monkeypatch)
    large = b"\x89PNG\r\n\x1a\n" + bytes(4 * 1024 * 1024)  # 5.3 MB as base64
    resp = await post_chat(client, auth_headers, "large", file_message("look", ("image/png", large)))
    assert resp.status == 413, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and "'f0'" in error["message"] and "5242880" in error["message"]
    resp = await post_chat(client, auth_headers, "wide", file_message("look", ("image/png", png(8001, 1))))
    assert resp.status == 400
    assert "8000" in (await resp.json())["error"]["message"]
    assert fake_anthropic.requests == []
    sessions = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert sessions["sessions"] == []

    # OpenAI takes it (20 MB an image); the session cannot move to a Claude model afterwards, which would be
    # resent it.
    fake_openai.enqueue(fo.text_response("Seen."))
    message = file_message("look", ("image/png", large))
    resp = await post_chat(client, auth_headers, "oa", message, model="openai/gpt-4o-mini")
    assert resp.status == 200
    await read_all(resp)
    later = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "and?"}]}
    resp = await post_chat(client, auth_headers, "oa", later, model="anthropic/claude-sonnet-4-5")
    assert resp.status == 413
    assert fake_anthropic.requests == []


async def test_a_ws_attachment_as_a_data_url_passes_max_frame_bytes_as_its_data_would(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    # `url` takes a data: URL too (as /api/chat's file parts): a large one is the attachment's bytes, which a
    # chat.send may carry past [server] max_frame_bytes (1 MiB by default), not a frame too large.
    image = png(8, 8) + bytes(1536 * 1024)  # 1.5 MiB: 2 MiB as base64
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    ws = await connect(client, token)
    frames = await chat(ws, "look", "r1", attachments=[{"mediaType": "image/png", "url": url}])
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    [sent] = blocks(fake_anthropic.requests[0], "image")
    assert base64.b64decode(sent["source"]["data"]) == image
    await ws.close()


async def test_files_past_a_claude_requests_32_mb_are_refused_before_they_are_stored(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # The Messages API takes requests of at most 32 MB, and every turn resends the session's files: a file that
    # takes them past it would be stored and then fail every later turn (within [attachments]
    # max_session_bytes, 100 MiB).
    client = await make_client()
    document = pdf(1) + bytes(9 * 1024 * 1024)  # 12 MB as base64
    for i in range(2):
        message = file_message(f"part {i}", ("application/pdf", document + bytes([i])), id=f"u{i}")
        resp = await post_chat(client, auth_headers, "big-docs", message)
        assert resp.status == 200
        chunks = await read_all(resp)
        assert not [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]
    third = file_message("part 2", ("application/pdf", document + b"\x02"), id="u2")
    resp = await post_chat(client, auth_headers, "big-docs", third)
    assert resp.status == 413, await resp.text()
    assert "32" in (await resp.json())["error"]["message"]
    assert len(fake_anthropic.requests) == 2
    # The session goes on without it.
    later = {"id": "u3", "role": "user", "parts": [{"type": "text", "text": "Compare them."}]}
    resp = await post_chat(client, auth_headers, "big-docs", later)
    chunks = await read_all(resp)
    assert not [c for c in chunks if isinstance(c, dict) and c["type"] == "error"], chunks
