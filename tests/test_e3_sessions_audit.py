"""Sessions that last, seen from outside: combinations the other tests do not reach (files of imported messages
refused before anything is kept, non-ASCII search, a litellm model with a small window), through the real
transports against the fake upstreams."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes.anthropic_upstream import text_response
from tests.test_attachments import (
    file_message,
    file_server,  # noqa: F401 (a fixture: a local server of images)
    png,
)
from tests.test_http_chat import post_chat, read_all


async def test_an_imported_file_refused_leaves_no_blob_of_the_new_message(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    earlier = file_message("old", ("image/bmp", b"BM" + b"\x00" * 60), id="u0")
    answer = {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "ok"}]}
    latest = file_message("new", ("image/png", png(8, 8)), id="u1")
    resp = await post_chat(client, auth_headers, "imp", earlier, answer, latest)
    assert resp.status == 415, await resp.text()
    assert (await resp.json())["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    gw = client.app[state.REGISTRY]
    assert fake_anthropic.requests == []
    assert await gw.blobs.hashes() == []  # nothing kept for a session that was never created
    assert (await client.get("/api/sessions/imp", headers=auth_headers)).status == 404


@pytest.mark.parametrize("backend", ["tinydb", "postgres"])
async def test_search_finds_accented_text_whatever_its_unicode_form(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, backend: str, request: Any
) -> None:
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    client = await make_client(storage=storage) if storage else await make_client()
    fake_anthropic.enqueue(text_response("Très bien."))
    stored = unicodedata.normalize("NFD", "Le café de Zoë à Besançon")  # as pasted from a PDF or macOS
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": stored}]}
    await read_all(await post_chat(client, auth_headers, "fr", user))
    for query in ("CAFÉ DE ZOË", unicodedata.normalize("NFD", "café"), "besançon", "TRÈS BIEN"):
        body = await (await client.get("/api/sessions", params={"q": query}, headers=auth_headers)).json()
        assert [s["id"] for s in body["sessions"]] == ["fr"], query
    # The snippet keeps the text's own case (composed).
    body = await (await client.get("/api/sessions", params={"q": "zoë"}, headers=auth_headers)).json()
    assert "Le café de Zoë à Besançon" in body["sessions"][0]["match"]


async def test_a_litellm_model_with_a_small_window_compacts_and_the_session_stays_readable(
    make_client: Any, auth_headers: dict[str, str], fake_openai: Any, monkeypatch: Any
) -> None:
    from agentspace.context_policy import COMPACT_PROMPT
    from tests.fakes import openai_upstream as fo
    from tests.test_prompt_cache import turn_text

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    model = "openai/gpt-4o-mini"
    client = await make_client(
        providers={"openai": {"base_url": fake_openai.url}},
        chat={"context_policy": "compact", "max_tokens": 1024, "history_limit": 10_000},
        pricing={model: {"context_window": 8000}},
    )
    for turn in range(1, 16):
        fake_openai.enqueue(fo.text_response(f"Answer {turn}.").without_usage())
        user = {"id": f"u{turn}", "role": "user", "parts": [{"type": "text", "text": turn_text(turn, 3000)}]}
        resp = await post_chat(client, auth_headers, "small", user, model=model)
        assert resp.status == 200, await resp.text()
        await read_all(resp)
    compacting = [r for r in fake_openai.requests if r.body["messages"][0].get("content") == COMPACT_PROMPT]
    assert compacting, "the policy never compacted"
    gw = client.app[state.REGISTRY]
    usage = await gw.usage.records(session_id="small")
    assert len(usage) == len(fake_openai.requests)  # one record per provider call
    compactions = [r for r in usage if r.get("purpose") == "compact"]
    assert len(compactions) == len(compacting) and all(r["model"] == model for r in compactions)
    session = (await (await client.get("/api/sessions/small", headers=auth_headers)).json())["session"]
    assert len(session["messages"]) == 30 and any(m.get("summary") for m in session["messages"])
    for fmt in ("md", "json"):
        resp = await client.get("/api/sessions/small/export", params={"format": fmt}, headers=auth_headers)
        assert resp.status == 200 and "Turn 1:" in await resp.text()
    # The oldest turn is still found, though it is no longer sent.
    body = await (await client.get("/api/sessions", params={"q": turn_text(1, 3000)[:40]}, headers=auth_headers)).json()
    assert [s["id"] for s in body["sessions"]] == ["small"]


async def test_claude_behind_litellm_marks_a_message_with_files_for_the_cache(
    make_client: Any, auth_headers: dict[str, str], fake_openai: Any, monkeypatch: Any
) -> None:
    """A user message with an image goes to litellm as a list of content parts: its last part carries the mark,
    on the turn that sends it (written) and on the next (read back)."""
    from tests.fakes import openai_upstream as fo
    from tests.test_prompt_cache import chat_marks

    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    model = "openrouter/anthropic/claude-sonnet-4.5"
    client = await make_client(
        providers={"openrouter": {"base_url": fake_openai.url}},
        pricing={model: {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "supports_vision": True}},
    )
    fake_openai.enqueue(fo.text_response("A chart."), fo.text_response("Blue."))
    await read_all(
        await post_chat(client, auth_headers, "img", file_message("Look", ("image/png", png(20, 10))), model=model)
    )
    first = fake_openai.requests[0].body
    assert [c["type"] for c in first["messages"][1]["content"]] == ["text", "image_url"]
    assert chat_marks(first) == [(0, "system"), (1, "user")]
    assert "cache_control" in first["messages"][1]["content"][-1]
    later = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "What colour?"}]}
    await read_all(await post_chat(client, auth_headers, "img", later, model=model))
    assert chat_marks(fake_openai.requests[1].body) == [(0, "system"), (1, "user"), (3, "user")]


async def test_a_pdf_without_a_name_reaches_an_openai_model_over_the_websocket(
    make_client: Any, token: str, fake_openai: Any, monkeypatch: Any
) -> None:
    """OpenAI takes inline file data only with a filename; a WebSocket attachment need not have one."""
    import base64

    from tests.fakes import openai_upstream as fo
    from tests.test_attachments import pdf
    from tests.test_ws import chat, connect

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.enqueue(fo.text_response("Read."), fo.text_response("Again."))
    ws = await connect(client, token)
    document = {"mediaType": "application/pdf", "data": base64.b64encode(pdf(1)).decode()}
    frames = await chat(ws, "Summarise", model="openai/gpt-4o-mini", attachments=[document])
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    frames = await chat(ws, "More", "r2", model="openai/gpt-4o-mini", sessionId=frames[0]["sessionId"])
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]  # resent with the history
    await ws.close()
    [file] = [c["file"] for c in fake_openai.requests[0].body["messages"][-1]["content"] if c["type"] == "file"]
    assert file["filename"]  # litellm names it (the fake refuses file data without a name, as OpenAI does)


async def test_imported_files_behind_urls_count_toward_the_session_limit(
    make_client: Any,
    auth_headers: dict[str, str],
    fake_anthropic: Any,
    file_server: Any,  # noqa: F811
) -> None:
    base, served = file_server
    size = len(served["png"])
    client = await make_client(chat={"fetch_urls": True}, attachments={"max_session_bytes": 2 * size - 1})
    earlier = {
        "id": "u0",
        "role": "user",
        "parts": [{"type": "file", "mediaType": "image/png", "url": base + "/img.png"}],
    }
    answer = {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "ok"}]}
    latest = file_message("and this", ("image/png", served["png"]), id="u1")
    resp = await post_chat(client, auth_headers, "big-import", earlier, answer, latest)
    assert resp.status == 413, await resp.text()
    assert "max_session_bytes" in (await resp.json())["error"]["message"]
    assert fake_anthropic.requests == [] and await client.app[state.REGISTRY].blobs.hashes() == []


@pytest.mark.parametrize("backend", ["tinydb", "postgres"])
async def test_a_deleted_session_is_not_found_and_one_made_again_under_its_id_is(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, backend: str, request: Any
) -> None:
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    client = await make_client(storage=storage) if storage else await make_client()

    async def say(session_id: str, text: str) -> None:
        fake_anthropic.enqueue(text_response("Noted."))
        user = {"id": f"u-{len(text)}", "role": "user", "parts": [{"type": "text", "text": text}]}
        await read_all(await post_chat(client, auth_headers, session_id, user))

    async def found(query: str) -> list[str]:
        body = await (await client.get("/api/sessions", params={"q": query}, headers=auth_headers)).json()
        return [s["id"] for s in body["sessions"]]

    await say("keep", "the walrus ledger")
    await say("gone", "the walrus ledger, again")
    assert sorted(await found("walrus ledger")) == ["gone", "keep"]  # the index is warm
    assert (await client.delete("/api/sessions/gone", headers=auth_headers)).status == 204
    assert await found("walrus ledger") == ["keep"]
    await say("gone", "a heron almanac")
    assert await found("walrus ledger") == ["keep"] and await found("HERON almanac") == ["gone"]


async def test_a_summary_knows_the_files_it_stands_for(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """Compacting leaves the summarised messages' files out of every later call: the summarising model is told
    which files there were."""
    from agentspace.context_policy import COMPACT_PROMPT
    from tests.test_attachments import pdf

    fake_anthropic.enqueue(text_response("A chart."), text_response("Yes."), text_response("Summary."))
    message = file_message("Look", ("image/png", png(20, 10)), ("application/pdf", pdf(1)))
    message["parts"][1]["filename"] = "chart.png"
    await read_all(await post_chat(client, auth_headers, "sum", message))
    later = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "And?"}]}
    await read_all(await post_chat(client, auth_headers, "sum", later))
    response = await client.post("/api/sessions/sum/compact", headers=auth_headers)
    assert (await response.json())["compacted"] is True
    [summarising] = [r for r in fake_anthropic.requests if r.body.get("system") == COMPACT_PROMPT]
    transcript = summarising.body["messages"][0]["content"]
    transcript = transcript if isinstance(transcript, str) else transcript[0]["text"]
    assert "user: Look\n[attached: chart.png (image/png, " in transcript, transcript
    assert "[attached: f1 (application/pdf, " in transcript
    assert '"sha256"' not in transcript  # the stored parts are not dumped as JSON
