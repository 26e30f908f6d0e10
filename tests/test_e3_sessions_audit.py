"""Sessions that last, seen from outside: combinations the other tests do not reach (files of imported messages
refused before anything is kept, non-ASCII search, a litellm model with a small window), through the real
transports against the fake upstreams."""

from __future__ import annotations

import unicodedata
from typing import Any

from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes.anthropic_upstream import text_response
from tests.test_attachments import file_message, png
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


async def test_search_finds_accented_text_whatever_its_unicode_form(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
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
