"""Images and documents in the gateway's own sessions (docs/attachments.md), through the real transports:
``POST /api/chat`` with the AI SDK's file parts, WebSocket ``chat.send`` attachments, ``GET /api/sessions/{id}``,
the inspector, against the fake upstreams; every test on both storage backends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agentspace import attachments
from tests.fakes.anthropic_upstream import text_response
from tests.test_http_chat import post_chat, read_all
from tests.test_ws import chat, connect

BACKENDS = ["tinydb", "postgres"]


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid RGB PNG of this size."""
    row = b"\x00" + bytes((x * 7 + seed) % 256 for x in range(width * 3))
    raw = row * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pdf(pages: int) -> bytes:
    """A small PDF with this many pages (page objects are what the estimate counts)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Count %d >>" % pages]
    objects += [b"<< /Type /Page /Parent 2 0 R >>"] * pages
    body = b"".join(b"%d 0 obj\n%s\nendobj\n" % (i + 1, o) for i, o in enumerate(objects))
    return b"%PDF-1.4\n" + body + b"%%EOF\n"


def data_url(media_type: str, raw: bytes) -> str:
    return f"data:{media_type};base64," + base64.b64encode(raw).decode()


def file_message(text: str, *files: tuple[str, bytes], id: str = "u1") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [
        {"type": "file", "mediaType": t, "url": data_url(t, raw), "filename": f"f{i}"}
        for i, (t, raw) in enumerate(files)
    ]
    return {"id": id, "role": "user", "parts": parts}


def blocks(request: Any, kind: str) -> list[dict[str, Any]]:
    """The content blocks of this kind in a recorded Messages API request, in order."""
    return [
        b
        for m in request.body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == kind
    ]


@pytest.fixture(params=BACKENDS)
async def gateway(request: pytest.FixtureRequest, make_client: Any) -> AsyncIterator[Any]:
    """A started gateway on each storage backend; ``gateway(**sections)`` starts it with more config."""

    async def start(**sections: Any) -> TestClient:
        if request.param == "postgres":
            sections["storage"] = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
        return await make_client(**sections)

    yield start


async def test_api_chat_png_reaches_upstream_and_comes_back_with_the_session(
    gateway: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await gateway()
    image = png(200, 100)
    fake_anthropic.enqueue(text_response("A gradient."), text_response("Still a gradient."))
    resp = await post_chat(client, auth_headers, "pics", file_message("What is in this image?", ("image/png", image)))
    assert resp.status == 200, await resp.text()
    chunks = await read_all(resp)
    assert chunks[-1] == "[DONE]" and not [c for c in chunks if isinstance(c, dict) and c["type"] == "error"]

    [sent] = blocks(fake_anthropic.requests[0], "image")
    assert sent["source"] == {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}
    texts = blocks(fake_anthropic.requests[0], "text")
    assert texts[-1]["text"] == "What is in this image?"

    # A reloaded chat gets the file back as the AI SDK's file part (a data: URL) with its name and size.
    session = (await (await client.get("/api/sessions/pics", headers=auth_headers)).json())["session"]
    [part] = [p for p in session["messages"][0]["parts"] if p["type"] == "file"]
    assert part["url"] == data_url("image/png", image) and part["filename"] == "f0" and part["size"] == len(image)
    assert "data" not in part

    # The next turn resends the image (it is part of the history), from the blob store.
    second = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "And now?"}]}
    resp = await post_chat(client, auth_headers, "pics", second)
    await read_all(resp)
    [again] = blocks(fake_anthropic.requests[1], "image")
    assert again["source"]["data"] == base64.b64encode(image).decode()


async def test_ws_attachment_is_resent_by_the_next_turn(gateway: Any, token: str, fake_anthropic: Any) -> None:
    client = await gateway()
    image = png(64, 64, seed=3)
    fake_anthropic.enqueue(text_response("A square."), text_response("Yes."))
    ws = await connect(client, token)
    attached = [{"mediaType": "image/png", "data": base64.b64encode(image).decode(), "filename": "sq.png"}]
    frames = await chat(ws, "Describe it", attachments=attached)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    session_id = frames[0]["sessionId"]
    frames = await chat(ws, "Is it square?", "r2", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    first, second = fake_anthropic.requests
    assert [b["source"]["data"] for b in blocks(first, "image")] == [base64.b64encode(image).decode()]
    assert [b["source"]["data"] for b in blocks(second, "image")] == [base64.b64encode(image).decode()]
    # The image sits in the first user turn of the second call: the cached prefix, not a new message.
    assert second.body["messages"][0]["content"][1]["type"] == "image"
    await ws.close()


async def test_pdf_and_png_reach_upstream_and_the_inspector_counts_them(
    gateway: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await gateway()
    image, document = png(300, 150), pdf(3)
    fake_anthropic.enqueue(text_response("Read both."))
    message = file_message("Compare", ("image/png", image), ("application/pdf", document))
    await read_all(await post_chat(client, auth_headers, "docs", message))
    [sent_image] = blocks(fake_anthropic.requests[0], "image")
    [sent_pdf] = blocks(fake_anthropic.requests[0], "document")
    assert base64.b64decode(sent_image["source"]["data"]) == image
    assert sent_pdf["source"] == {
        "type": "base64",
        "media_type": "application/pdf",
        "data": base64.b64encode(document).decode(),
    }
    assert sent_pdf["title"] == "f1"  # the file's name: Claude can refer to the document by it
    assert "title" not in sent_image  # the API takes no title on an image

    context = await (await client.get("/api/sessions/docs/context", headers=auth_headers)).json()
    [row] = [s for s in context["sections"] if s["name"] == "attachments"]
    image_tokens = round(300 * 150 / 750)  # Anthropic's formula
    pdf_tokens = 3 * attachments.PDF_PAGE_TOKENS
    assert [f["tokenEstimate"] for f in row["files"]] == [image_tokens, pdf_tokens]
    assert row["files"][1]["pages"] == 3
    assert row["tokenEstimate"] == image_tokens + pdf_tokens
    assert row["byteCount"] == len(image) + len(document)


async def test_refusals_make_no_upstream_call(
    gateway: Any, auth_headers: dict[str, str], token: str, fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await gateway(
        providers={"openai": {"base_url": fake_openai.url}},
        server={"max_body_bytes": 1_048_576},
        attachments={"max_file_bytes": 20 * 1024 * 1024, "max_session_bytes": 100 * 1024 * 1024},
    )
    # 30 MB: over the per-file limit.
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (30 * 1024 * 1024)
    resp = await post_chat(client, auth_headers, "big", file_message("look", ("image/png", big)))
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and "max_file_bytes" in error["message"] and "'f0'" in error["message"]

    # A media type the gateway does not take.
    resp = await post_chat(client, auth_headers, "bmp", file_message("look", ("image/bmp", b"BM" + b"\x00" * 60)))
    assert resp.status == 415
    error = (await resp.json())["error"]
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE" and "image/bmp" in error["message"]

    # A model without vision.
    resp = await post_chat(
        client, auth_headers, "blind", file_message("look", ("image/png", png(8, 8))), model="openai/gpt-3.5-turbo"
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "openai/gpt-3.5-turbo" in error["message"] and "images" in error["message"]

    # The same refusals over the WebSocket, as error frames.
    ws = await connect(client, token)
    frames = await chat(
        ws, "look", "r0", attachments=[{"mediaType": "image/png", "data": base64.b64encode(big).decode()}]
    )
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "PAYLOAD_TOO_LARGE", frames[-1]
    assert "max_file_bytes" in frames[-1]["message"]
    frames = await chat(
        ws, "look", attachments=[{"mediaType": "text/x-script", "data": base64.b64encode(b"echo").decode()}]
    )
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    frames = await chat(
        ws,
        "look",
        "r2",
        model="openai/gpt-3.5-turbo",
        attachments=[{"mediaType": "image/png", "data": base64.b64encode(png(8, 8)).decode()}],
    )
    assert frames[-1]["type"] == "error" and "does not take images" in frames[-1]["message"]
    await ws.close()

    assert fake_anthropic.requests == [] and fake_openai.requests == []
    sessions = await (await client.get("/api/sessions", headers=auth_headers)).json()
    assert sessions["sessions"] == []  # nothing was stored either


async def test_unhandled_part_types_are_refused_by_name(
    client: TestClient, auth_headers: dict[str, str], token: str, fake_anthropic: Any
) -> None:
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}, {"type": "audio", "url": "x"}]}
    resp = await post_chat(client, auth_headers, "odd", message)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "'audio'" in error["message"] and "messages[0].parts[1].type" in json.dumps(error["fields"])

    # A part the AI SDK has but a user message cannot carry.
    message = {"id": "u1", "role": "user", "parts": [{"type": "reasoning", "text": "hmm"}]}
    resp = await post_chat(client, auth_headers, "odd", message)
    assert resp.status == 400 and "'reasoning'" in (await resp.json())["error"]["message"]

    ws = await connect(client, token)
    frames = await chat(ws, "hi", attachments=[{"mediaType": "image/png", "bytes": "AAAA"}])
    assert frames[-1]["type"] == "error" and "attachments[0].bytes" in frames[-1]["message"]
    await ws.close()
    assert fake_anthropic.requests == []


@pytest.fixture
async def file_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local HTTP server: /img.png, /slow.png (answers after 5 s, or as the test ends), /huge.png (past the
    limit)."""
    served: dict[str, Any] = {"png": png(40, 20), "hits": 0}
    ended = asyncio.Event()  # the test is over: the slow answer need not hold the server's cleanup

    async def img(request: web.Request) -> web.Response:
        served["hits"] += 1
        return web.Response(body=served["png"], content_type="image/png")

    async def slow(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), 5)
        return web.Response(body=served["png"], content_type="image/png")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"\x00" * 65536)
        return response

    app = web.Application()
    app.router.add_get("/img.png", img)
    app.router.add_get("/slow.png", slow)
    app.router.add_get("/huge.png", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", served
    ended.set()
    await runner.cleanup()


def url_message(url: str) -> dict[str, Any]:
    return {
        "id": "u1",
        "role": "user",
        "parts": [{"type": "text", "text": "see"}, {"type": "file", "mediaType": "image/png", "url": url}],
    }


async def test_http_urls_are_not_fetched_by_default(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any, file_server: tuple[str, dict[str, Any]]
) -> None:
    base, served = file_server
    resp = await post_chat(client, auth_headers, "u-off", url_message(base + "/img.png"))
    assert resp.status == 400 and "fetch_urls" in (await resp.json())["error"]["message"]
    assert served["hits"] == 0 and fake_anthropic.requests == []


async def test_http_urls_are_fetched_within_limits_when_allowed(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, file_server: tuple[str, dict[str, Any]]
) -> None:
    base, served = file_server
    on = await make_client(
        chat={"fetch_urls": True}, attachments={"fetch_timeout_seconds": 1, "max_file_bytes": 1024 * 1024}
    )
    fake_anthropic.enqueue(text_response("Fetched."))
    resp = await post_chat(on, auth_headers, "u-on", url_message(base + "/img.png"))
    assert resp.status == 200
    await read_all(resp)
    [sent] = blocks(fake_anthropic.requests[0], "image")
    assert base64.b64decode(sent["source"]["data"]) == served["png"]

    resp = await post_chat(on, auth_headers, "u-slow", url_message(base + "/slow.png"))
    assert resp.status == 400 and "in time" in (await resp.json())["error"]["message"]
    resp = await post_chat(on, auth_headers, "u-huge", url_message(base + "/huge.png"))
    assert resp.status == 413 and "max_file_bytes" in (await resp.json())["error"]["message"]
    assert len(fake_anthropic.requests) == 1


async def test_deleting_a_session_deletes_the_files_no_other_session_uses(
    gateway: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await gateway()
    shared, own = png(10, 10, seed=1), png(12, 12, seed=2)
    fake_anthropic.enqueue(text_response("a"), text_response("b"))
    await read_all(
        await post_chat(client, auth_headers, "one", file_message("x", ("image/png", shared), ("image/png", own)))
    )
    await read_all(await post_chat(client, auth_headers, "two", file_message("y", ("image/png", shared))))
    from agentspace.transports import state

    gw = client.app[state.REGISTRY]  # type: ignore[index]
    digest = attachments.from_bytes("image/png", shared).sha256
    own_digest = attachments.from_bytes("image/png", own).sha256
    assert sorted(await gw.blobs.hashes()) == sorted([digest, own_digest])

    assert (await client.delete("/api/sessions/one", headers=auth_headers)).status == 204
    assert await gw.blobs.hashes() == [digest]  # still used by "two"
    assert await gw.blobs.sessions_of(digest) == ["two"]
    assert (await client.delete("/api/sessions/two", headers=auth_headers)).status == 204
    assert await gw.blobs.hashes() == []


def test_image_token_estimates() -> None:
    assert attachments.image_tokens(png(200, 100)) == round(200 * 100 / 750)
    # Past 1568 px on the long side the image is scaled down first; the estimate is capped at 1600.
    assert attachments.image_tokens(png(4000, 3000)) == attachments.IMAGE_TOKENS
    assert attachments.image_tokens(b"not an image") == attachments.IMAGE_TOKENS
    assert attachments.pdf_pages(pdf(4)) == 4
    # A reservation counts every image at the ceiling, whatever the provider bills for it.
    small = attachments.from_bytes("image/png", png(20, 20))
    assert attachments.tokens(small) == 1 and attachments.tokens(small, ceiling=True) == attachments.IMAGE_TOKENS
    document = attachments.from_bytes("application/pdf", pdf(3))
    assert attachments.tokens(document) == attachments.tokens(document, ceiling=True) == 3 * 4600


async def test_the_reservation_counts_the_files(gateway: Any, token: str, fake_anthropic: Any) -> None:
    # Thinking off: a turn reserves its input plus max_tokens (4096) of output, $0.06 at $15/MTok.
    client = await gateway(thinking={"enabled": False})
    created = await client.post(
        "/api/clients", headers={"Authorization": f"Bearer {token}"}, json={"name": "team", "budgetUsd": 0.15}
    )
    key = (await created.json())["key"]
    headers = {"Authorization": f"Bearer {key}"}
    fake_anthropic.enqueue(text_response("Fine."))
    chunks = await read_all(await post_chat(client, headers, "budget", file_message("hi", ("image/png", png(20, 20)))))
    assert not [c for c in chunks if isinstance(c, dict) and c["type"] == "error"], chunks
    # 20 pages at 4,600 tokens, $0.28 at $3/MTok: past the budget before anything is sent, so refused as the
    # turn's own check refuses (a 429, nothing streamed).
    resp = await post_chat(client, headers, "budget2", file_message("read", ("application/pdf", pdf(20))))
    error = (await resp.json())["error"]
    assert resp.status == 429 and error["code"] == "BUDGET_EXCEEDED" and "budget" in error["message"], error
    assert len(fake_anthropic.requests) == 1


async def test_other_providers_get_litellm_image_and_file_content(
    gateway: Any, auth_headers: dict[str, str], fake_openai: Any, monkeypatch: Any
) -> None:
    from tests.fakes import openai_upstream as fo

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await gateway(providers={"openai": {"base_url": fake_openai.url}})
    image, document = png(50, 40), pdf(1)
    fake_openai.enqueue(fo.text_response("Seen."), fo.text_response("Again."))
    message = file_message("Look", ("image/png", image), ("application/pdf", document))
    resp = await post_chat(client, auth_headers, "oa", message, model="openai/gpt-4o-mini")
    assert resp.status == 200
    await read_all(resp)
    content = fake_openai.requests[0].body["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "Look"}
    assert content[1] == {"type": "image_url", "image_url": {"url": data_url("image/png", image)}}
    assert content[2]["type"] == "file" and content[2]["file"]["file_data"] == data_url("application/pdf", document)
    # The next turn resends both in the history.
    await read_all(
        await post_chat(
            client, auth_headers, "oa", {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "More?"}]}
        )
    )
    first_user = fake_openai.requests[1].body["messages"][1]
    assert [c["type"] for c in first_user["content"]] == ["text", "image_url", "file"]


def test_storage_migrate_copies_the_files_and_sessions_delete_releases_them(tmp_path: Any, pg_dsn: str) -> None:
    from click.testing import CliRunner

    from agentspace.cli import main
    from agentspace.storage.embedded.blobs import FileBlobStore
    from agentspace.storage.embedded.sessions import SessionStore
    from agentspace.storage.postgres import PostgresBlobStore, PostgresDatabase, PostgresSessionStore

    data_dir = tmp_path / "data"
    image = attachments.from_bytes("image/png", png(16, 16), "a.png")

    async def seed() -> None:
        sessions = SessionStore(data_dir)
        message = {"id": "q", "role": "user", "content": "see", "parts": [attachments.stored_part(image)]}
        await sessions.create(model="anthropic/claude-sonnet-4-5", session_id="pic", client="cli", messages=[message])
        await sessions.aclose()
        await FileBlobStore(data_dir).put(str(image.sha256), png(16, 16), "pic")

    asyncio.run(seed())
    result = CliRunner().invoke(main, ["--data-dir", str(data_dir), "storage", "migrate", "--to", pg_dsn])
    assert result.exit_code == 0, result.output
    assert "files: 1 copied" in result.output

    async def copied() -> tuple[bytes | None, list[str], dict[str, Any] | None]:
        db = PostgresDatabase(pg_dsn)
        await db.start()
        try:
            blobs = PostgresBlobStore(db)
            session = await PostgresSessionStore(db).get("pic")
            return await blobs.get(str(image.sha256)), await blobs.sessions_of(str(image.sha256)), session
        finally:
            await db.aclose()

    data, users, session = asyncio.run(copied())
    assert data == png(16, 16) and users == ["pic"]
    assert session is not None and session["messages"][0]["parts"][0]["sha256"] == image.sha256

    # agentspace sessions delete (the data directory): the blob no other session uses goes with it.
    result = CliRunner().invoke(main, ["--data-dir", str(data_dir), "sessions", "delete", "pic", "--yes"])
    assert result.exit_code == 0, result.output
    assert FileBlobStore(data_dir).hashes_sync() == []


async def test_markdown_export_names_the_files(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    image = png(10, 10)
    fake_anthropic.enqueue(text_response("Ok."))
    await read_all(await post_chat(client, auth_headers, "exp", file_message("see", ("image/png", image))))
    text = await (await client.get("/api/sessions/exp/export?format=md", headers=auth_headers)).text()
    assert f"Attached: `f0` (image/png, {len(image)} bytes)" in text


async def test_a_new_session_imports_the_files_of_earlier_messages(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    image = png(30, 20, seed=7)
    earlier = file_message("Here is a picture", ("image/png", image), id="u0")
    answer = {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "Nice picture."}]}
    latest = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "What colour was it?"}]}
    fake_anthropic.enqueue(text_response("Striped."))
    await read_all(await post_chat(client, auth_headers, "imported", earlier, answer, latest))
    [sent] = blocks(fake_anthropic.requests[0], "image")
    assert base64.b64decode(sent["source"]["data"]) == image
    session = (await (await client.get("/api/sessions/imported", headers=auth_headers)).json())["session"]
    [part] = [p for p in session["messages"][0]["parts"] if p["type"] == "file"]
    assert (
        part["url"] == data_url("image/png", image)
        and part["sha256"] == attachments.from_bytes("image/png", image).sha256
    )


async def test_the_context_policy_counts_a_new_turns_files(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await make_client(
        chat={"context_policy": "refuse"},
        thinking={"enabled": False},
        pricing={"anthropic/claude-sonnet-4-5": {"context_window": 20_000}},
    )
    fake_anthropic.enqueue(text_response("Hello."))
    await read_all(await post_chat(client, auth_headers, "window", file_message("hi")))
    # 5 pages at 4,600 tokens: past the 20,000-token window (less max_tokens), after a call that fitted.
    message = file_message("read this", ("application/pdf", pdf(5)), id="u2")
    resp = await post_chat(client, auth_headers, "window", message)
    # Refused before the answer starts: 413 with the numbers (docs/protocol.md), nothing sent upstream.
    error = (await resp.json())["error"]
    assert resp.status == 413 and error["code"] == "CONTEXT_TOO_LONG" and "context" in error["message"].lower()
    assert len(fake_anthropic.requests) == 1


async def test_capabilities_come_from_the_config_for_models_the_cost_map_does_not_know(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Any
) -> None:
    model = "anthropic/claude-in-house"
    client = await make_client(
        providers={"anthropic": {"base_url": fake_anthropic.url, "models": ["claude-in-house"]}},
        pricing={model: {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "supports_vision": True}},
    )
    fake_anthropic.enqueue(text_response("Seen."))
    message = file_message("look", ("image/png", png(8, 8)))
    await read_all(await post_chat(client, auth_headers, "inhouse", message, model=model))
    assert len(blocks(fake_anthropic.requests[0], "image")) == 1
    # It takes images, not PDFs: the cost map knows nothing of it and the config says nothing of PDFs.
    resp = await post_chat(
        client, auth_headers, "inhouse2", file_message("read", ("application/pdf", pdf(1))), model=model
    )
    assert resp.status == 400 and "does not take PDF" in (await resp.json())["error"]["message"]
    assert len(fake_anthropic.requests) == 1


async def test_a_message_of_files_only(client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(text_response("A picture."))
    ws = await connect(client, token)
    image = png(9, 9)
    frames = await chat(ws, "", attachments=[{"mediaType": "image/png", "data": base64.b64encode(image).decode()}])
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    # One user turn holding the image alone: no empty text block (the API refuses those).
    content = fake_anthropic.requests[0].body["messages"][-1]["content"]
    assert [{k: v for k, v in b.items() if k != "cache_control"} for b in content] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()},
        }
    ]
    frames = await chat(ws, "  ", "r2")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "INVALID_MESSAGE"  # no text, no files
    await ws.close()


async def test_a_file_that_is_not_what_it_says_is_refused(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    resp = await post_chat(client, auth_headers, "liar", file_message("look", ("image/png", pdf(1))))
    assert resp.status == 400
    assert "is not image/png" in (await resp.json())["error"]["message"]
    assert fake_anthropic.requests == []
